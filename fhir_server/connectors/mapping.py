"""Declarative mappings (mappings/<source>/mapping.yaml): loaded once, read by the connectors."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"


def load(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict) or not {"url", "version", "source"} <= data.keys():
        raise ValueError(f"{path}: a mapping needs url, version and source")
    return data


@lru_cache(maxsize=8)
def shipped(source: str) -> dict[str, Any]:
    """The mapping shipped in mappings/<source>/mapping.yaml (cached; callers must not mutate it)."""
    return load(MAPPINGS / source / "mapping.yaml")
