"""Keeping ``Server.conformance`` current, the way stored SearchParameters are followed
(fhir_server/interceptors/search_parameters.py):

- at startup every stored canonical resource is loaded;
- after a unit commits, what it wrote is applied in this worker, so the next request sees it;
- a change stream per canonical type brings what other workers (processes) write, reopened with
  backoff when it fails; on every (re)open the type is reloaded, so nothing missed meanwhile is lost.
"""

from __future__ import annotations

import asyncio
import logging

import orjson

from fhir_server.conformance.registry import CANONICAL_TYPES, ConformanceRegistry
from fhir_server.interactions.context import Server, Tx
from fhir_server.storage.base import Store
from fhir_server.storage.follow import follow

log = logging.getLogger("fhir_server.conformance")


async def apply_conformance(tx: Tx) -> None:
    """After-commit hook: apply the canonical resources the unit wrote to this worker's registry."""
    registry = tx.server.conformance
    for write in tx.written:
        if write.type in CANONICAL_TYPES:
            try:
                registry.apply(write.type, write.id, write.version, write.raw)
            except Exception:  # the write has committed: a failure here must not turn it into an error
                log.exception("registering %s/%s failed", write.type, write.id)


async def load_type(store: Store, registry: ConformanceRegistry, type_: str) -> int:
    """(Re)load every stored resource of ``type_``; forget those no longer stored. The count loaded."""
    registry.begin_resync(type_)
    if type_ not in await store.types():
        registry.end_resync(type_, ())
        return 0
    seen = []
    for stored in await store.find(type_, {}, limit=0):
        seen.append(stored.id)
        if stored.raw:
            try:
                registry.apply(type_, stored.id, stored.version, orjson.loads(stored.raw))
            except orjson.JSONDecodeError:
                log.warning("%s/%s is not JSON and is ignored", type_, stored.id)
    registry.end_resync(type_, seen)
    return len(seen)


class ConformanceWatch:
    """Loads the stored canonical resources at startup and follows their changes."""

    def __init__(self, store: Store, registry: ConformanceRegistry) -> None:
        self._store = store
        self._registry = registry
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        counts = [await load_type(self._store, self._registry, t) for t in CANONICAL_TYPES]
        log.info("conformance registry: %d resources loaded", sum(counts))
        self._tasks = [asyncio.create_task(self._follow(t), name=f"conformance-watch-{t}") for t in CANONICAL_TYPES]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # A task cancelled inside the driver's change-stream cleanup can take long; do not wait on it.
            await asyncio.wait(self._tasks, timeout=5)
        self._tasks = []

    async def _follow(self, type_: str) -> None:
        await follow(
            self._store,
            type_,
            lambda: load_type(self._store, self._registry, type_),
            lambda id_, version, raw: self._registry.apply(type_, id_, version, raw),
        )


def install(server: Server) -> None:
    """Add the after-commit hook and the terminology operations (the app starts a
    :class:`ConformanceWatch` beside the server)."""
    import fhir_server.interactions.terminology  # noqa: F401  (registers the operations)

    server.after_commit.append(apply_conformance)
