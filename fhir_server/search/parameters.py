"""The search parameters the server knows: the R4 definitions, per resource type."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

_DATA = Path(__file__).parent / "data" / "search-parameters.json.gz"
# Parameters on Resource/DomainResource apply to every type.
_ABSTRACT_BASES = ("Resource", "DomainResource")
# Parameters whose values the storage keeps outside the `s` index (or that mean something else).
SPECIAL = frozenset({"_id", "_lastUpdated", "_query", "_content", "_text", "_list", "_has", "_type"})


_change_listeners: list[Callable[[], None]] = []


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener`` whenever the set of known parameters changes (to drop derived caches)."""
    _change_listeners.append(listener)


def _changed() -> None:
    params_for.cache_clear()
    for listener in _change_listeners:
        listener()


@dataclass(frozen=True, slots=True)
class SearchParam:
    code: str
    type: str  # number | date | string | token | reference | composite | quantity | uri | special
    expression: str | None
    targets: tuple[str, ...]
    url: str
    modifiers: tuple[str, ...] = ()
    # Composite parameters: (definition URL, expression relative to the composite's node) per part.
    components: tuple[tuple[str, str], ...] = ()
    base: tuple[str, ...] = ()


def _load() -> list[dict[str, Any]]:
    return json.loads(gzip.decompress(_DATA.read_bytes()))


@lru_cache(maxsize=1)
def _by_base() -> dict[str, dict[str, SearchParam]]:
    out: dict[str, dict[str, SearchParam]] = {}
    for d in _load():
        sp = SearchParam(
            code=d["code"],
            type=d["type"],
            expression=d.get("expression"),
            targets=tuple(d.get("target", ())),
            url=d["url"],
            modifiers=tuple(d.get("modifier", ())),
            components=tuple((c["definition"], c["expression"]) for c in d.get("component", ())),
            base=tuple(d["base"]),
        )
        for base in d["base"]:
            out.setdefault(base, {})[sp.code] = sp
    return out


@lru_cache(maxsize=None)
def params_for(resource_type: str) -> dict[str, SearchParam]:
    """Every search parameter that applies to ``resource_type``, by code."""
    table = _by_base()
    merged: dict[str, SearchParam] = {}
    for base in (*_ABSTRACT_BASES, resource_type):
        merged.update(table.get(base, {}))
    return merged
