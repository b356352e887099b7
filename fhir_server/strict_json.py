"""Hooks for the stdlib JSON parser that make it FHIR-strict: FHIR JSON forbids duplicate
properties and NaN/Infinity, and only the stdlib parser lets a caller see them (orjson does not)."""

from __future__ import annotations

from typing import Any


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate property '{k[:60]}'")
        out[k] = v
    return out


def reject_non_finite(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
