"""Terminology the server knows: value set membership and code system hierarchies.

Sources, in order: ValueSet and CodeSystem resources stored on this server (so a region's own code
systems work as soon as they are loaded), then the R4 value sets bound as required in the core
specification (expanded offline, see fhir_server/definitions). The Chinese code systems and maps
(terminology/ at the top of the repository) arrive as stored resources.

These helpers read the database and serve search (``:in``, ``:above``, ``:below``). The full
service (expansion with filters and imports, $lookup, $validate-code, $translate), synchronous over
the in-memory conformance registry, is :mod:`fhir_server.terminology.service`.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

import orjson

from fhir_server.definitions import load_model
from fhir_server.storage.base import Stored

# Enough for any real value set; beyond it a search by membership would be a bad idea anyway.
_MAX_MEMBERS = 20_000


class _Finder(Protocol):
    async def find(self, type_: str, query: dict[str, Any], limit: int, **kw: Any) -> list[Stored]: ...


async def _latest(store: _Finder, type_: str, url: str) -> dict[str, Any] | None:
    canonical, _, version = url.partition("|")
    found = await store.find(type_, {"s.url": canonical}, limit=20)
    resources = [orjson.loads(s.raw) for s in found if s.raw]
    if version:
        resources = [r for r in resources if r.get("version") == version]
    return resources[0] if resources else None


def _concepts(concepts: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for c in concepts:
        yield c
        yield from _concepts(c.get("concept", ()))


async def valueset_members(store: _Finder, url: str) -> set[tuple[str, str]] | None:
    """(system, code) pairs in the value set ``url``; None when the server does not know it."""
    vs = await _latest(store, "ValueSet", url)
    if vs is None:
        builtin = load_model()["valueSets"].get(url.partition("|")[0])
        if builtin is None:
            return None
        return {(system, code) for system, codes in builtin.items() for code in codes}
    members: set[tuple[str, str]] = set()
    for c in _concepts(vs.get("expansion", {}).get("contains", ())):
        if c.get("system") and c.get("code"):
            members.add((c["system"], c["code"]))
    for inc in vs.get("compose", {}).get("include", ()):
        system = inc.get("system")
        if not system:
            continue
        if inc.get("concept"):
            members.update((system, c["code"]) for c in inc["concept"] if c.get("code"))
        elif not inc.get("filter") and not inc.get("valueSet"):
            cs = await _latest(store, "CodeSystem", system)
            if cs is None:
                return None  # a whole code system the server does not hold: cannot expand
            members.update((system, c["code"]) for c in _concepts(cs.get("concept", ())) if c.get("code"))
        else:
            return None  # filters and nested value sets: not expanded here
        if len(members) > _MAX_MEMBERS:
            return None
    excluded = {
        (inc.get("system"), c.get("code")) for inc in vs.get("compose", {}).get("exclude", ()) for c in inc.get("concept", ())
    }
    return members - excluded


def _parents(cs: dict[str, Any]) -> dict[str, set[str]]:
    """code → its parents, from nested concepts and the ``parent`` / ``subsumedBy`` properties."""
    parents: dict[str, set[str]] = {}

    def walk(concepts: Iterable[dict[str, Any]], parent: str | None) -> None:
        for c in concepts:
            code = c.get("code")
            if not code:
                continue
            entry = parents.setdefault(code, set())
            if parent:
                entry.add(parent)
            for prop in c.get("property", ()):
                if prop.get("code") in ("parent", "subsumedBy") and prop.get("valueCode"):
                    entry.add(prop["valueCode"])
            walk(c.get("concept", ()), code)

    walk(cs.get("concept", ()), None)
    return parents


async def related_codes(store: _Finder, system: str, code: str, direction: str) -> set[str] | None:
    """``code`` with its descendants (``below``) or ancestors (``above``) in ``system``; None when
    the server holds no hierarchy for the system or does not know the code."""
    cs = await _latest(store, "CodeSystem", system)
    if cs is None:
        return None
    parents = _parents(cs)
    if code not in parents:
        return None
    if direction == "above":
        graph = parents
    else:
        graph = {}
        for child, ps in parents.items():
            for p in ps:
                graph.setdefault(p, set()).add(child)
    seen = {code}
    todo = [code]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen
