"""The canonical resources this server holds, in memory, by url: profiles, code systems, value
sets, concept maps and implementation guides.

One :class:`ConformanceRegistry` per server (``Server.conformance``). Reads are synchronous and do
no I/O: the validator and the terminology service call them on every coded element. It is kept
current by fhir_server/conformance/watch.py: loaded from the database at startup, updated after
each commit in this worker (read-your-writes) and from a change stream for the other workers.

Resolution of a canonical (``url`` or ``url|version``): with a version, the resource with that
``version`` (the latest written when several); without, the preferred one among those with the url:
``active`` before ``draft``/``unknown`` before ``retired``, then the highest ``version`` (compared
number by number when it looks like 1.2.10), then the latest written.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import orjson

CANONICAL_TYPES: tuple[str, ...] = (
    "StructureDefinition",
    "CodeSystem",
    "ValueSet",
    "ConceptMap",
    "ImplementationGuide",
)

_STATUS_RANK = {"active": 2, "draft": 1, "unknown": 1, "retired": 0}
_NUMBER = re.compile(r"(\d+)")


def _version_key(version: Any) -> tuple[Any, ...]:
    """Orders 1.2.10 after 1.2.9, and any version after none."""
    if not isinstance(version, str) or not version:
        return (0,)
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in _NUMBER.split(version) if p)
    return (1, parts)


class _Entry:
    __slots__ = ("resource", "version", "url", "rank")

    def __init__(self, resource: dict[str, Any], version: int, seq: int) -> None:
        self.resource = resource
        self.version = version
        url = resource.get("url")
        self.url = url if isinstance(url, str) and url else None
        meta = resource.get("meta") or {}
        self.rank = (
            _STATUS_RANK.get(str(resource.get("status")), 1),
            _version_key(resource.get("version")),
            str(meta.get("lastUpdated") or ""),
            seq,
        )


class ConformanceRegistry:
    """Canonical resources by type and url. Treat returned dicts as read-only."""

    def __init__(self) -> None:
        #: Increases on every change; caches derived from the registry compare it to drop stale data.
        self.generation = 0
        self._entries: dict[str, dict[str, _Entry]] = {t: {} for t in CANONICAL_TYPES}
        self._by_url: dict[str, dict[str, list[_Entry]]] = {t: {} for t in CANONICAL_TYPES}
        # Version numbers applied per resource (kept for deletions too), so a late change event
        # never undoes a newer version.
        self._applied: dict[tuple[str, str], int] = {}
        self._all: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self._seq = 0
        # Ids applied while a type is being reloaded, by type (see begin_resync).
        self._touched: dict[str, set[str]] = {}
        self._exact: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._exact_generation = -1

    # -- reads (hot path) -------------------------------------------------------------------

    def get(self, type_: str, url: str) -> dict[str, Any] | None:
        """The resource for a canonical ``url`` or ``url|version`` (see the module doc), or None."""
        by_url = self._by_url.get(type_)
        if not by_url or not url:
            return None
        entries = by_url.get(url)
        if entries:
            return entries[0].resource
        canonical, bar, version = url.partition("|")
        if not bar:
            return None
        entries = by_url.get(canonical)
        if not entries:
            return None
        if not version:
            return entries[0].resource
        if self._exact_generation != self.generation:
            self._exact = {}
            self._exact_generation = self.generation
        key = (type_, url)
        if key not in self._exact:
            found = [e for e in entries if e.resource.get("version") == version]
            self._exact[key] = max(found, key=lambda e: e.rank[2:]).resource if found else None
        return self._exact[key]

    def by_id(self, type_: str, id_: str) -> dict[str, Any] | None:
        entry = self._entries.get(type_, {}).get(id_)
        return entry.resource if entry else None

    def all(self, type_: str) -> list[dict[str, Any]]:
        """Every live resource of ``type_`` (in no particular order; the list is shared, do not change it)."""
        cached = self._all.get(type_)
        if cached is not None and cached[0] == self.generation:
            return cached[1]
        items = [e.resource for e in self._entries.get(type_, {}).values()]
        self._all[type_] = (self.generation, items)
        return items

    def __len__(self) -> int:
        return sum(len(e) for e in self._entries.values())

    # -- changes --------------------------------------------------------------------------

    def apply(self, type_: str, id_: str, version: int, resource: dict[str, Any] | bytes | None) -> bool:
        """Bring the registry in line with version ``version`` of ``type_/id_`` (``resource`` None:
        deleted; version 0: unknown, always applied). False when nothing changed (an older
        version, or a type the registry does not hold)."""
        if type_ not in self._entries:
            return False
        key = (type_, id_)
        if version and version <= self._applied.get(key, 0):
            return False
        if version:
            self._applied[key] = version
        touched = self._touched.get(type_)
        if touched is not None:
            touched.add(id_)
        parsed: dict[str, Any] | None = (
            orjson.loads(resource) if isinstance(resource, (bytes, bytearray, memoryview)) else resource
        )
        old = self._entries[type_].pop(id_, None)
        if old is not None and old.url:
            self._unindex(type_, old)
        if parsed is not None:
            self._seq += 1
            entry = _Entry(parsed, version, self._seq)
            self._entries[type_][id_] = entry
            if entry.url:
                bucket = self._by_url[type_].setdefault(entry.url, [])
                bucket.append(entry)
                bucket.sort(key=lambda e: e.rank, reverse=True)
        elif old is None:
            return False
        self.generation += 1
        return True

    def _unindex(self, type_: str, entry: _Entry) -> None:
        assert entry.url
        bucket = self._by_url[type_].get(entry.url, [])
        bucket[:] = [e for e in bucket if e is not entry]
        if not bucket:
            self._by_url[type_].pop(entry.url, None)

    def begin_resync(self, type_: str) -> None:
        """Start reloading ``type_``: remember what changes meanwhile (see :meth:`end_resync`)."""
        self._touched[type_] = set()

    def end_resync(self, type_: str, seen: Iterable[str]) -> None:
        """Finish reloading ``type_``: drop the resources the reload did not see, unless they
        changed meanwhile (applied by this worker's after-commit hook while the reload was reading)."""
        touched = self._touched.pop(type_, set())
        keep = set(seen)
        for id_ in [i for i in self._entries.get(type_, {}) if i not in keep and i not in touched]:
            self.apply(type_, id_, 0, None)
