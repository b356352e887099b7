"""Re-index jobs: recompute the stored search values (``s``) after search parameters change.

A job walks the collections of some resource types in batches by ``_id``, recomputes each live
resource's values with :func:`index_resource` and stores them only where the version is still the
one it read: a concurrent write indexed itself. (A resource that moved is read again and indexed
once more, since its writer may not have known the new parameter yet.) The ``_refs`` stored at
write time are kept: they were computed with the client's base URL, which the job does not know.

Progress lives in the ``_jobs`` collection: ``{_id, kind, params, types, total, done, status
(queued | running | done | failed), started, finished, error}``, plus the runner (``owner``), its
last report (``hb``) and the position reached (``position``). A job survives a restart: it is
*resumed* from its position by the first server whose sweep (at startup, then every
``sweep_every`` seconds) finds its runner silent for ``stale_after`` seconds; re-indexing a
resource twice is harmless. A job whose work raises is marked failed with the error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

import orjson

from fhir_server.search.extract import index_resource
from fhir_server.storage.base import Store

log = logging.getLogger("fhir_server.reindex")

Job = dict[str, Any]
# Attempts at a batch's resources that other writers keep changing; after that their writers own them.
_ATTEMPTS = 3


def _now() -> datetime:
    now = datetime.now(timezone.utc)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)  # what BSON dates hold


def _job_id() -> str:
    return f"{time.time_ns() // 1_000_000:011x}{os.urandom(4).hex()}"


def percent(job: Job) -> float:
    """How far a job is, 0-100."""
    if job.get("status") == "done":
        return 100.0
    total = job.get("total")
    if not total:
        return 0.0
    return round(min(100.0, 100.0 * job.get("done", 0) / total), 1)


class Reindexer:
    """Starts, runs and resumes re-index jobs of one server (one per worker process)."""

    def __init__(
        self,
        store: Store,
        *,
        base_url: str = "",
        batch_size: int = 200,
        stale_after: float = 60.0,
        sweep_every: float = 30.0,
    ) -> None:
        self._store = store
        self._base_url = base_url
        self._batch_size = batch_size
        self._stale_after = stale_after
        self._sweep_every = sweep_every
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Start sweeping for jobs left behind by stopped servers (the first sweep runs now)."""
        self._sweeper = asyncio.create_task(self._sweep(), name="reindex-sweep")

    async def close(self) -> None:
        """Stop the sweep and the running jobs; they stay ``running`` and are resumed later."""
        tasks = [t for t in (self._sweeper, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sweeper = None

    async def start(self, *, params: Sequence[str] = (), types: Sequence[str] | None = None, delay: float = 0.0) -> Job:
        """Record a job over ``types`` (default: every type with a collection) and run it in the
        background after ``delay`` seconds. ``params`` (SearchParameter urls, none meaning all)
        says why; every value of the resources is recomputed either way."""
        chosen = set(types) if types is not None else await self._store.types()
        now = _now()
        job: Job = {
            "_id": _job_id(),
            "kind": "reindex",
            "params": list(params),
            "types": sorted(chosen),
            "total": None,
            "done": 0,
            "status": "queued",
            "started": now,
            "finished": None,
            "error": None,
            "owner": self.owner,
            "hb": now,
            "position": None,
        }
        await self._store.insert_job(job)
        self._spawn(job["_id"], delay)
        return job

    async def job(self, job_id: str) -> Job | None:
        return await self._store.job(job_id)

    async def wait(self) -> None:
        """Until the jobs this runner started have ended (tests, shutdown of the CLI)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _spawn(self, job_id: str, delay: float = 0.0) -> None:
        task = asyncio.create_task(self._run(job_id, delay), name=f"reindex-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        while True:
            try:
                while True:
                    now = _now()
                    job = await self._store.claim_job(self.owner, now - timedelta(seconds=self._stale_after), now)
                    if job is None:
                        break
                    log.warning("resuming re-index job %s (%s of %s done)", job["_id"], job.get("done"), job.get("total"))
                    self._spawn(job["_id"])
            except asyncio.CancelledError:
                raise
            except Exception:  # the database being away must not end the sweep for good
                log.warning("re-index sweep failed; trying again later", exc_info=True)
            await asyncio.sleep(self._sweep_every)

    async def _run(self, job_id: str, delay: float) -> None:
        try:
            if delay:
                await asyncio.sleep(delay)
            job = await self._store.job(job_id)
            if job is not None:
                beat = asyncio.create_task(self._beat(job_id), name=f"reindex-beat-{job_id}")
                try:
                    await self._work(job)
                finally:
                    beat.cancel()
        except asyncio.CancelledError:
            raise  # left ``running``: the next sweep (here or in another server) resumes it
        except Exception as e:
            log.exception("re-index job %s failed", job_id)
            fields = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:500], "finished": _now()}
            try:
                await self._store.update_job(job_id, fields, owner=self.owner)
            except Exception:
                log.warning("could not record the failure of re-index job %s", job_id, exc_info=True)

    async def _beat(self, job_id: str) -> None:
        """Report the job alive between batches too: building an index on a large collection
        takes longer than ``stale_after``, and a silent job would be taken over."""
        while True:
            await asyncio.sleep(self._stale_after / 4)
            try:
                await self._store.update_job(job_id, {"hb": _now()}, owner=self.owner)
            except Exception:  # the next beat (or batch) tries again
                log.debug("heartbeat of re-index job %s failed", job_id, exc_info=True)

    async def _work(self, job: Job) -> None:
        store, job_id, owner = self._store, job["_id"], self.owner
        types: list[str] = job["types"]
        if not await store.update_job(job_id, {"status": "running", "hb": _now()}, owner=owner):
            return  # another server took it over
        await store.ensure_search_indexes(set(types))
        total = job.get("total")
        if total is None:
            total = sum([await store.count(t, {}) for t in types])
            await store.update_job(job_id, {"total": total}, owner=owner)
        done: int = job.get("done") or 0
        position = job.get("position") or {}
        first = types.index(position["type"]) if position.get("type") in types else 0
        for type_ in types[first:]:
            after = position.get("after") if position.get("type") == type_ else None
            while True:
                rows = await store.scan_for_reindex(type_, after=after, limit=self._batch_size)
                if not rows:
                    break
                await self._index(type_, rows)
                after = rows[-1][0]
                done += len(rows)
                progress = {"done": done, "position": {"type": type_, "after": after}, "hb": _now()}
                if not await store.update_job(job_id, progress, owner=owner):
                    log.warning("re-index job %s was taken over by another server", job_id)
                    return
        final = {"status": "done", "done": done, "total": max(total, done), "finished": _now(), "position": None}
        await store.update_job(job_id, final, owner=owner)
        log.info("re-index job %s done: %d resources of %s", job_id, done, ", ".join(types) or "no types")

    async def _index(self, type_: str, rows: list[tuple[str, int, bytes, list[str] | None]]) -> None:
        for _ in range(_ATTEMPTS):
            values = [(id_, version, self._values(raw, refs)) for id_, version, raw, refs in rows]
            moved = await self._store.set_search_values(type_, values)
            if not moved:
                return
            rows = await self._store.scan_for_reindex(type_, ids=moved)

    def _values(self, raw: bytes, refs: list[str] | None) -> dict[str, Any]:
        index = index_resource(orjson.loads(raw), raw, self._base_url)
        index.pop("_refs", None)
        if refs:
            index["_refs"] = refs
        return index
