"""``link()``: find or create the golden Patient of a stored source Patient.

Decision, in order:

1. Already linked (its golden's link lists it): refresh the golden from its sources (no new
   version when nothing changed), repair the source's ``refer`` link if a connector dropped it,
   and answer the recorded decision and score - calling again is a no-op.
2. An open review Task for it: answer ``review`` (golden None) until a clerk resolves it.
3. A VALID 身份证 number held by a linked source: ``id-match`` (score 1.0).
4. The best candidate's probability ≥ ``mpi_auto_link``: ``auto-link``.
5. ≥ ``mpi_review``: a review Task (candidates ≥ mpi_review with their scores); the source stays
   unlinked.
6. Otherwise ``new``: a golden Patient built from the source (score = best candidate's, or 0).

Each link runs in one transaction that first touches lock documents for its blocking keys (hashed
into a fixed set), so two records of one resident linked at once are serialised instead of both
creating a golden; links of unrelated residents run in parallel.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import orjson

from fhir_server.interactions._resource import new_id, store_resource
from fhir_server.interactions.context import Server, Tx
from fhir_server.mpi import golden as g
from fhir_server.mpi.candidates import Candidate, Source, _filter, best_of, block_keys, candidates, sources_of
from fhir_server.mpi.match import demographics
from fhir_server.mpi.review import open_review, resolved, review_task, task_candidates
from fhir_server.outcome import FhirError, bad_request
from fhir_server.storage.base import Stored

_LOCK_BUCKETS = 8192
TYPES = frozenset({"Patient", "Task"})


@dataclass(frozen=True)
class LinkResult:
    golden: str | None  # golden Patient id (None while in review)
    decision: str  # "id-match" | "auto-link" | "review" | "new"
    score: float  # 0..1; 1.0 for an ID-card match


def not_found(what: str) -> FhirError:
    return FhirError.of(404, "not-found", f"{what} is not known", details_zh=f"{what} 不存在")


async def link(server: Server, source_patient_id: str) -> LinkResult:
    """After the source Patient is stored: find or create its golden Patient and link them;
    idempotent (calling again for an already linked source returns the same result)."""
    return await server.transact(lambda tx: link_in(tx, source_patient_id), set(TYPES))


async def link_many(server: Server, source_patient_ids: list[str]) -> list[LinkResult]:
    """``link`` for a batch of stored source Patients in ONE transaction (in order; a later one
    sees the goldens the earlier ones made): one commit instead of one per record, for connectors
    that store a page of records at a time. A conflict re-runs the whole batch."""
    async def work(tx: Tx) -> list[LinkResult]:
        return [await link_in(tx, i) for i in source_patient_ids]

    return await server.transact(work, set(TYPES))


async def read_patient(tx: Tx, id_: str) -> tuple[Stored, dict[str, Any]]:
    stored = await tx.unit.current("Patient", id_)
    if stored is None or stored.raw is None:
        raise not_found(f"Patient/{id_}")
    return stored, orjson.loads(stored.raw)


async def write(tx: Tx, resource: dict[str, Any], current: Stored | None, *, trusted: bool = False) -> dict[str, Any]:
    """Stage a new version (create when ``current`` is None); returns the stored JSON.
    ``trusted``: only the MPI's own link was added to a version that passed validation."""
    id_ = resource.get("id") or new_id()
    _, final = await store_resource(tx, resource, id_, current, "PUT" if current else "POST", trusted=trusted)
    return final


async def _source(tx: Tx, source_id: str) -> tuple[Stored, dict[str, Any]]:
    stored, source = await read_patient(tx, source_id)
    if g.is_golden(source):
        raise FhirError.of(
            400,
            "business-rule",
            f"Patient/{source_id} is a golden Patient, not a source record",
            details_zh=f"Patient/{source_id} 是主索引，不是源记录，不能再关联",
        )
    return stored, source


async def _linked_golden(tx: Tx, source_id: str, source: dict[str, Any]) -> tuple[Stored, dict[str, Any]] | None:
    """The golden that lists this source, found through the source's link or the goldens' links."""
    gid = g.golden_of(source)
    if gid:
        stored = await tx.unit.current("Patient", gid)
        if stored is not None and stored.raw is not None:
            golden = orjson.loads(stored.raw)
            if g.is_golden(golden) and source_id in g.source_ids(golden):
                return stored, golden
    flt = await _filter(tx.unit, [("link", f"Patient/{source_id}"), ("_tag", f"{g.MPI_SYSTEM}|golden")])
    for row in await tx.unit.find("Patient", flt, limit=5):
        golden = orjson.loads(row.raw) if row.raw else {}
        if source_id in g.source_ids(golden):
            return row, golden
    return None


async def refresh(
    tx: Tx, golden_stored: Stored | None, golden: dict[str, Any], known: dict[str, Source] | None = None
) -> dict[str, Any]:
    """Rebuild a golden from its current sources and write it when it changed; also (re)sets
    each source's ``refer`` link. ``golden`` holds the wanted links and active flag;
    ``golden_stored`` is the version it replaces (None for a new golden); ``known`` are source
    versions already read in this unit (not read again)."""
    links = [l for l in golden.get("link") or () if isinstance(l, dict)]
    ids = [i for i in (g.ref_id(l["other"]) for l in links if l.get("type") == "seealso") if i]
    by_id: dict[str, Source] = {i: known[i] for i in ids if known and i in known}
    missing = [i for i in ids if i not in by_id]
    if missing:
        rows = await tx.unit.find("Patient", {"_id": {"$in": missing}}, limit=len(missing) + 1)
        by_id.update((r.id, (r, orjson.loads(r.raw))) for r in rows if r.raw)
    sources = []
    for i in ids:
        if i in by_id:
            row, source = by_id[i]
            updated = g.with_source_link(source, golden["id"])
            if updated is not None:
                # The source's content was validated when it was stored; a refer link to its golden
                # cannot break a profile (none constrains Patient.link), so it is not checked again.
                source = await write(tx, updated, row, trusted=True)
            sources.append(source)
    active = golden.get("active", True) is not False
    kept = [l for l in links if l.get("type") != "seealso" or g.ref_id(l.get("other")) in by_id]
    rebuilt = g.build(golden["id"], sources, kept, active)
    previous = orjson.loads(golden_stored.raw) if golden_stored is not None and golden_stored.raw else None
    if g.same_content(previous, rebuilt):
        return previous  # type: ignore[return-value]
    return await write(tx, rebuilt, golden_stored)


async def attach(
    tx: Tx, golden_id: str, source_id: str, decision: str, score: float, known: dict[str, Source] | None = None
) -> dict[str, Any]:
    """Link a source to an existing golden (both ways) and rebuild the golden."""
    stored = await tx.unit.current("Patient", golden_id)
    golden = orjson.loads(stored.raw) if stored and stored.raw else None
    if golden is None or not g.is_golden(golden):
        raise not_found(f"Golden Patient/{golden_id}")
    if golden.get("active") is False:
        raise FhirError.of(
            409, "business-rule", f"Patient/{golden_id} was merged into another golden Patient",
            details_zh=f"主索引 Patient/{golden_id} 已被合并，不能再关联",
        )
    links = [l for l in golden.get("link") or () if g.ref_id(l.get("other")) != source_id or l.get("type") != "seealso"]
    golden = {**golden, "link": links + [g.link_entry(source_id, decision, score)]}
    return await refresh(tx, stored, golden, known)


async def create_golden(tx: Tx, source_id: str, decision: str, score: float, known: dict[str, Source] | None = None) -> dict[str, Any]:
    golden = {"resourceType": "Patient", "id": new_id(), "link": [g.link_entry(source_id, decision, score)]}
    return await refresh(tx, None, golden, known)


async def _lock(tx: Tx, keys: list[str]) -> None:
    for bucket in sorted({zlib.crc32(k.encode()) % _LOCK_BUCKETS for k in keys}):
        await tx.unit.lock(f"mpi:{bucket}")


async def link_in(tx: Tx, source_id: str) -> LinkResult:
    """``link`` inside a unit of work (a connector's own transaction may call it)."""
    stored, source = await _source(tx, source_id)
    # A golden lists a source only if the MPI also wrote the source's refer link (version ≥ 2):
    # a first version needs no look-up.
    existing = await _linked_golden(tx, source_id, source) if stored.version > 1 else None
    if existing is not None:
        golden_stored, golden = existing
        entry = next(l for l in g.source_links(golden) if g.ref_id(l["other"]) == source_id)
        decision, score = g.entry_decision(entry)
        await refresh(tx, golden_stored, golden)
        return LinkResult(golden["id"], decision, score)
    task = await open_review(tx.unit, source_id)
    if task is not None:
        return LinkResult(None, "review", max((s for _, s in task_candidates(task)), default=0.0))
    demo = demographics(source)
    await _lock(tx, block_keys(demo))
    found, known = await candidates(tx.unit, demo, {source_id})
    known[source_id] = (stored, source)
    best = found[0] if found else None
    settings = tx.settings
    if best is not None and best.comparison.certain:
        await attach(tx, best.golden, source_id, "id-match", 1.0, known)
        return LinkResult(best.golden, "id-match", 1.0)
    if best is not None and best.score >= settings.mpi_auto_link:
        await attach(tx, best.golden, source_id, "auto-link", best.score, known)
        return LinkResult(best.golden, "auto-link", best.score)
    if best is not None and best.score >= settings.mpi_review:
        queued = [c for c in found if c.score >= settings.mpi_review]
        await write(tx, review_task(source_id, queued), None)
        return LinkResult(None, "review", best.score)
    score = best.score if best is not None else 0.0
    golden = await create_golden(tx, source_id, "new", score, known)
    return LinkResult(golden["id"], "new", score)


async def score_against(tx: Tx, source: dict[str, Any], golden_id: str) -> float:
    by_golden = await sources_of(tx.unit, [golden_id])
    c: Candidate | None = best_of(demographics(source), [p for _, p in by_golden.get(golden_id, [])], golden_id)
    return c.score if c is not None else 0.0


async def resolve_in(tx: Tx, task_id: str, golden_id: str | None) -> tuple[dict[str, Any], LinkResult]:
    """Close a review Task: link its source to ``golden_id``, or to a new golden when None."""
    from fhir_server.mpi.review import OPEN, is_review

    stored = await tx.unit.current("Task", task_id)
    if stored is None or stored.raw is None:
        raise not_found(f"Task/{task_id}")
    task = orjson.loads(stored.raw)
    if not is_review(task):
        raise bad_request(f"Task/{task_id} is not an MPI review task (code mpi-review)")
    if task.get("status") not in OPEN:
        raise FhirError.of(
            409, "business-rule", f"Task/{task_id} is already {task.get('status')}",
            details_zh=f"审核任务 Task/{task_id} 已处理（状态：{task.get('status')}）",
        )
    source_id = g.ref_id(task.get("focus"))
    if source_id is None:
        raise bad_request(f"Task/{task_id} has no focus Patient")
    _, source = await _source(tx, source_id)
    if await _linked_golden(tx, source_id, source) is not None:
        raise FhirError.of(
            409, "business-rule", f"Patient/{source_id} is already linked",
            details_zh=f"源记录 Patient/{source_id} 已关联主索引",
        )
    if golden_id is None:
        golden = await create_golden(tx, source_id, "review", 0.0)
        result = LinkResult(golden["id"], "review", 0.0)
    else:
        scores = dict(task_candidates(task))
        score = scores[golden_id] if golden_id in scores else await score_against(tx, source, golden_id)
        await attach(tx, golden_id, source_id, "review", score)
        result = LinkResult(golden_id, "review", score)
    assert result.golden is not None
    await write(tx, resolved(task, result.golden, golden_id is None), stored)
    return task, result
