"""The Synthea resources the in-process benchmarks measure (``../shared/data/synthea-120``)."""

from __future__ import annotations

import bz2
from pathlib import Path
from typing import Any

import orjson

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthea-120"


def has_bundles(data_dir: Path) -> bool:
    return data_dir.is_dir() and any(data_dir.glob("*.json.bz2"))


def load_resources(data_dir: Path) -> list[dict[str, Any]]:
    """Every entry's resource of every ``*.json.bz2`` bundle in ``data_dir``, in file order."""
    resources: list[dict[str, Any]] = []
    for f in sorted(data_dir.glob("*.json.bz2")):
        bundle = orjson.loads(bz2.decompress(f.read_bytes()))
        resources += [e["resource"] for e in bundle.get("entry", ()) if "resource" in e]
    return resources
