"""``_include`` and ``_revinclude`` (search.html#include): the resources a page's matches refer to,
and those that refer to them, fetched by index in a few queries per round.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from fhir_server.definitions import RESOURCE_TYPES
from fhir_server.search.extract import local_reference
from fhir_server.search.parameters import params_for
from fhir_server.search.query import Include, include_fields
from fhir_server.storage.base import Stored

# Rounds of :iterate; real graphs (Observation → Patient → Organization → ...) are shallow.
_MAX_ROUNDS = 4


class _Finder(Protocol):
    async def find(self, type_: str, query: dict[str, Any], limit: int, **kw: Any) -> list[Stored]: ...


def _targets_of(stored: Stored, inc: Include) -> list[str]:
    if inc.source not in ("*", stored.type):
        return []
    values = (stored.index or {}).get("_refs" if inc.param == "*" else inc.param) or ()
    out = []
    for v in values:
        ref = local_reference(v) if isinstance(v, str) else None
        if ref and (inc.target is None or ref.startswith(inc.target + "/")):
            out.append(ref)
    return out


def _within(query: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    return query if extra is None else {"$and": [query, extra]}


async def resolve(
    store: _Finder,
    matches: list[Stored],
    includes: Sequence[Include],
    limit: int,
    *,
    confine: Callable[[str], dict[str, Any] | None] | None = None,
) -> tuple[list[Stored], bool]:
    """The resources ``includes`` add to ``matches`` (none of the matches again), and whether
    ``limit`` cut them short. ``confine(type)`` is the condition a resource of that type must also
    meet to be added (the caller's rights; None: any)."""
    restrict: Callable[[str], dict[str, Any] | None] = confine or (lambda _t: None)
    seen = {f"{s.type}/{s.id}" for s in matches}
    added: list[Stored] = []
    frontier = list(matches)
    truncated = False
    for round_ in range(_MAX_ROUNDS):
        active = [inc for inc in includes if round_ == 0 or inc.iterate]
        if not active or not frontier:
            break
        found: list[Stored] = []
        # Forward: collect the references of the frontier, fetch them by id, type by type.
        wanted: dict[str, set[str]] = {}
        for s in frontier:
            for inc in active:
                if inc.reverse:
                    continue
                for ref in _targets_of(s, inc):
                    if ref not in seen:
                        type_, _, id_ = ref.partition("/")
                        wanted.setdefault(type_, set()).add(id_)
        for type_, ids in sorted(wanted.items()):
            room = limit - len(added) - len(found)
            if room <= 0:
                truncated = True
                break
            if type_ not in RESOURCE_TYPES:
                continue  # a reference to a type this server does not know cannot be included
            fields = sorted(include_fields([i for i in includes if i.iterate], type_))
            got = await store.find(type_, _within({"_id": {"$in": sorted(ids)}}, restrict(type_)), limit=room + 1, index_fields=fields)
            if len(got) > room:
                truncated, got = True, got[:room]
            found.extend(got)
        # Reverse: resources of the source type whose parameter refers to the frontier.
        for inc in active:
            if not inc.reverse:
                continue
            targets = params_for(inc.source)[inc.param].targets
            keys = sorted(
                f"{s.type}/{s.id}"
                for s in frontier
                if (inc.target is None or s.type == inc.target) and (not targets or s.type in targets)
            )
            if not keys:
                continue
            room = limit - len(added) - len(found)
            if room <= 0:
                truncated = True
                continue
            fields = sorted(include_fields([i for i in includes if i.iterate], inc.source))
            got = await store.find(inc.source, _within({"s." + inc.param: {"$in": keys}}, restrict(inc.source)), limit=room + 1, index_fields=fields)
            if len(got) > room:
                truncated, got = True, got[:room]
            found.extend(got)
        frontier = []
        for s in found:
            key = f"{s.type}/{s.id}"
            if key not in seen:
                seen.add(key)
                added.append(s)
                frontier.append(s)
    return added, truncated
