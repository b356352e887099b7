"""Declarative mappings (mappings/<source>/mapping.yaml): loaded once, read by the connectors."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"
# The canonical base the shipped mappings and profiles use (the server rewrites stored content).
_BASE = "https://fhir.cn-ehr.org"


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


class MappedSource:
    """What every connector takes from its mapping file: the source system's code and URI, and
    the mapping's identity, recorded as the transform of each Provenance."""

    source_kind = ""

    def __init__(self, mapping: dict[str, Any] | None = None) -> None:
        m = self.mapping = mapping or shipped(self.source_kind)
        self.code: str = m["source"]["code"]
        self.system: str = m["source"]["system"]
        self.transform = f"{m['url']}|{m['version']}"

    def source_identifier(self, value: str) -> dict[str, Any]:
        """The identifier a source system gives its record of a person. cn-patient asks every
        identifier that is not an ID card, health-record number or health card for a CV02.01.101
        document type: 99 (其他法定有效证件), with the project's own type saying what it is."""
        return {
            "type": {
                "coding": [
                    {"system": f"{_BASE}/CodeSystem/cv02-01-101-id-document-type", "code": "99", "display": "其他法定有效证件"},
                    {"system": f"{_BASE}/CodeSystem/cn-identifier-type", "code": "source-record", "display": "源系统记录号"},
                ]
            },
            "system": self.system,
            "value": value,
        }

    def _meta(self, record_id: str, profile: str | None = None) -> dict[str, Any]:
        """meta.source names the source record; meta.profile the CN profile the resource claims."""
        meta: dict[str, Any] = {"source": f"{self.system}#{record_id}"}
        if profile:
            meta["profile"] = [profile]
        return meta
