"""The FHIR R4 (4.0.1) structure model, generated from HL7's package into ``data/r4.json.gz``.

Regenerate with ``python -m fhir_server.definitions._generate /path/to/hl7.fhir.r4.examples-4.0.1.tgz``.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources
from typing import Any

import orjson

__all__ = ["RESOURCE_TYPES", "summary_elements", "mandatory_elements", "load_model", "json_names"]

# Elements _summary=true always keeps (search.html#summary), whatever isSummary says.
_ALWAYS_SUMMARY = ("id", "meta", "implicitRules")


@lru_cache(maxsize=1)
def load_model() -> dict[str, Any]:
    """The generated model: ``primitives``, ``types`` (element rows) and ``valueSets``.

    Element rows use short keys: ``p`` path, ``n`` min, ``x`` max, ``t`` types, ``s`` isSummary,
    ``m`` isModifier, ``b`` required value set URL, ``r`` contentReference. Treat as read-only.
    """
    raw = resources.files(__package__).joinpath("data", "r4.json.gz").read_bytes()
    model: dict[str, Any] = orjson.loads(gzip.decompress(raw))
    return model


def json_names(path: str, types: list[str]) -> list[str]:
    """JSON property names of an element: ``value[x]`` expands to ``valueQuantity`` etc."""
    name = path.rsplit(".", 1)[-1]
    if not name.endswith("[x]"):
        return [name]
    base = name[:-3]
    return [base + t[0].upper() + t[1:] for t in types]


def _index() -> tuple[frozenset[str], dict[str, frozenset[str]], dict[str, frozenset[str]]]:
    types = load_model()["types"]
    resource_types = frozenset(n for n, t in types.items() if t["kind"] == "resource" and not t["abstract"])
    summary: dict[str, frozenset[str]] = {}
    mandatory: dict[str, frozenset[str]] = {}
    for name in resource_types:
        summ: set[str] = set(_ALWAYS_SUMMARY)
        mand: set[str] = set()
        for row in types[name]["elements"]:
            if row["p"].count(".") != 1:
                continue
            names = json_names(row["p"], row.get("t", []))
            if row["n"] >= 1:
                mand.update(names)
            if row.get("s") or row["n"] >= 1:
                summ.update(names)
        summary[name] = frozenset(summ)
        mandatory[name] = frozenset(mand)
    return resource_types, summary, mandatory


RESOURCE_TYPES, _SUMMARY, _MANDATORY = _index()


def summary_elements(resource_type: str) -> frozenset[str]:
    """Top-level JSON names _summary=true keeps: isSummary ones, id/meta/implicitRules, mandatory ones.

    Choice elements come expanded (``value[x]`` → ``valueQuantity``, ...). ``resourceType`` is not
    an element and is not listed. Raises KeyError for an unknown resource type.
    """
    try:
        return _SUMMARY[resource_type]
    except KeyError:
        raise KeyError(f"unknown resource type {resource_type!r}") from None


def mandatory_elements(resource_type: str) -> frozenset[str]:
    """Top-level JSON names with min >= 1 (a mandatory choice lists all its expansions).

    Raises KeyError for an unknown resource type.
    """
    try:
        return _MANDATORY[resource_type]
    except KeyError:
        raise KeyError(f"unknown resource type {resource_type!r}") from None
