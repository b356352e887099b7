"""One sync run: fetch → parse → map → write (with Provenance and raw payload) → MPI link → count.

Idempotent by content hash: a ledger (``_connector_ledger``) keeps, per source record, the SHA-256
of the bytes last written, the mapping version and the source's modification time. A record whose
hash and mapping are unchanged is skipped; a record older than the one written (an out-of-order
arrival) is skipped; otherwise the mapped resource is compared with the stored one and written only
when it differs — so a re-run creates nothing and no new versions, and a crash between a commit and
the ledger update cannot cause a spurious version either.

Each page is written in one transaction (all its resources, Binaries and Provenances); when the
server refuses it (validation, integrity), the page is retried child by child and the refused
child's records go to the dead letters with the server's reason. The checkpoint moves after the
page. Counts: received = created + updated + unchanged + rejected, always.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Awaitable, Callable

import orjson
from pymongo import UpdateOne

from fhir_server.connectors import checkpoint, deadletter
from fhir_server.connectors._db import LEDGER, database
from fhir_server.connectors.deadletter import Rejection
from fhir_server.connectors.unit import Unit
from fhir_server.connectors.provenance import provenance, raw_binary
from fhir_server.interactions._resource import store_resource
from fhir_server.interactions.context import Server, Tx
from fhir_server.outcome import FhirError
from fhir_server.storage import field_crypto
from fhir_server.storage.base import Conflict, Stored, TooLarge

log = logging.getLogger("fhir_server.connectors")

# Links stored source Patients to their golden records, in order, in one unit of work:
# ``fhir_server.mpi.link_many``, or a stand-in (tests).
Linker = Callable[[Server, list[str]], Awaitable[list[Any]]]
_TRACE_TYPES = frozenset({"Provenance", "Binary"})
_DEFAULT: Any = object()


def default_linker() -> Linker | None:
    """``fhir_server.mpi.link_many`` when the MPI is installed, else None (sources stay unlinked)."""
    try:
        from fhir_server.mpi import link_many
    except ImportError:
        return None
    return link_many


@dataclass
class SyncReport:
    source: str
    run_id: str = ""
    received: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: int = 0
    linked: int = 0
    stale: int = 0  # of unchanged: older snapshots that arrived after newer ones
    pages: int = 0
    retries: int = 0
    seconds: float = 0.0
    by_kind: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    decisions: Counter = field(default_factory=Counter)  # MPI link decisions
    link_errors: int = 0
    error: str | None = None

    @property
    def stored(self) -> int:
        return self.created + self.updated

    @property
    def balanced(self) -> bool:
        return self.received == self.created + self.updated + self.unchanged + self.rejected

    @property
    def rate(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0

    def count(self, kind: str, outcome: str, n: int = 1) -> None:
        setattr(self, outcome, getattr(self, outcome) + n)
        self.received += n
        self.by_kind[kind][outcome] += n
        self.by_kind[kind]["received"] += n

    def add(self, other: "SyncReport") -> None:
        for name in ("received", "created", "updated", "unchanged", "rejected", "linked", "stale", "pages", "retries", "link_errors"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for kind, counts in other.by_kind.items():
            self.by_kind[kind].update(counts)
        self.decisions.update(other.decisions)


def _comparable(resource: dict[str, Any]) -> dict[str, Any]:
    """What the connector owns: not the server's meta, not the MPI's links and tags."""
    out = dict(resource)
    meta = {k: v for k, v in (out.get("meta") or {}).items() if k not in ("versionId", "lastUpdated", "tag", "security")}
    out["meta"] = meta
    out.pop("link", None)
    return out


def _carry_over(resource: dict[str, Any], current: Stored | None) -> dict[str, Any]:
    """Keep what others added to the stored version (the MPI's Patient.link and meta.tag)."""
    if current is None or current.raw is None:
        return resource
    old = orjson.loads(current.raw)
    body = dict(resource)
    if old.get("link"):
        body["link"] = old["link"]
    if (old.get("meta") or {}).get("tag"):
        body["meta"] = {**body.get("meta", {}), "tag": old["meta"]["tag"]}
    return body


class _Writer:
    """Writes one round of units (each record at most once) for one connector."""

    def __init__(self, server: Server, connector: Any, report: SyncReport, run_id: str, linker: Linker | None) -> None:
        self.server, self.connector, self.report, self.run_id, self.linker = server, connector, report, run_id, linker
        self.db = database(server)

    def _ledger_key(self, unit: Unit) -> str:
        return f"{self.connector.code}|{unit.record_id}"

    async def _currents(self, type_: str, ids: list[str]) -> dict[str, Stored]:
        if not ids:
            return {}
        cursor = self.db[type_].find({"_id": {"$in": ids}}, {"v": 1, "t": 1, "d": 1, "r": 1})
        # Read beside the store, so decrypted here as the store would (fhir_server/storage/field_crypto.py).
        return {d["_id"]: Stored(type_, d["_id"], d["v"], d["t"], d["d"], field_crypto.decode(d.get("r"), type_)) async for d in cursor}

    async def round(self, units: list[Unit]) -> list[Rejection]:
        """Classify and write ``units``; the rejections the server caused."""
        report, transform = self.report, self.connector.transform
        ledger = {d["_id"]: d async for d in self.db[LEDGER].find({"_id": {"$in": [self._ledger_key(u) for u in units]}})}
        candidates: list[Unit] = []
        for u in units:
            entry = ledger.get(self._ledger_key(u))
            if entry and entry["sha256"] == u.sha256 and entry.get("mapping") == transform:
                report.count(u.kind, "unchanged")
            elif entry and u.source_time and entry.get("source_time", "") > u.source_time:
                report.count(u.kind, "unchanged")
                report.stale += 1
            else:
                candidates.append(u)
        by_type: dict[str, list[str]] = defaultdict(list)
        for u in candidates:
            by_type[u.resource["resourceType"]].append(u.resource["id"])
        currents: dict[str, Stored] = {}
        for type_, ids in by_type.items():
            for id_, stored in (await self._currents(type_, ids)).items():
                currents[f"{type_}/{id_}"] = stored
        binaries = await self._currents("Binary", [u.sha256 for u in candidates])
        refresh: list[Unit] = []
        writes: list[tuple[Unit, Stored | None]] = []
        for u in candidates:
            current = currents.get(u.key)
            if current is not None and not current.deleted and current.raw is not None:
                if _comparable(orjson.loads(current.raw)) == _comparable(orjson.loads(orjson.dumps(u.resource))):
                    report.count(u.kind, "unchanged")
                    refresh.append(u)
                    continue
            writes.append((u, current))
        rejections: list[Rejection] = []
        written: list[tuple[Unit, int, bool]] = []
        if writes:
            try:
                written = await self._write(writes, binaries)
            except (FhirError, Conflict, TooLarge):
                # Find the culprits: one transaction per child; the others still get in.
                groups: dict[str, list[tuple[Unit, Stored | None]]] = defaultdict(list)
                for item in writes:
                    groups[item[0].group].append(item)
                for group in groups.values():
                    try:
                        written += await self._write(group, binaries)
                    except (FhirError, Conflict, TooLarge) as e:
                        zh, en = _reasons(e)
                        for u, _ in group:
                            report.count(u.kind, "rejected")
                            rejections.append(Rejection(u.kind, u.record_id, "server-refused", f"服务器拒收：{zh}", f"refused by the server: {en}", u.raw, u.context))
        for u, version, created in written:
            report.count(u.kind, "created" if created else "updated")
        await self._remember([(u, v) for u, v, _ in written] + [(u, None) for u in refresh])
        if self.linker is not None:
            await self._link([u.resource["id"] for u, _, _ in written if u.resource["resourceType"] == "Patient"])
        return rejections

    async def _link(self, patient_ids: list[str]) -> None:
        """All of a round's Patients in one MPI transaction (one commit, not one per record); if
        that fails, one by one, so that one record's failure does not leave the others unlinked."""
        assert self.linker is not None
        if not patient_ids:
            return
        try:
            results = await self.linker(self.server, patient_ids)
        except Exception:
            if len(patient_ids) == 1:  # the record is stored; a failed link is reported, not fatal
                log.exception("MPI link failed for Patient/%s", patient_ids[0])
                self.report.link_errors += 1
                return
            for one in patient_ids:
                await self._link([one])
            return
        for result in results:
            self.report.decisions[getattr(result, "decision", None) or "linked"] += 1
            if getattr(result, "golden", None):
                self.report.linked += 1

    async def _write(self, items: list[tuple[Unit, Stored | None]], binaries: dict[str, Stored]) -> list[tuple[Unit, int, bool]]:
        connector, mapping = self.connector, self.connector.mapping
        attempts = [0]

        async def work(tx: Tx) -> list[tuple[Unit, int, bool]]:
            attempts[0] += 1
            out = []
            new_binaries: set[str] = set()
            for unit, current in items:
                type_, id_ = unit.resource["resourceType"], unit.resource["id"]
                if attempts[0] > 1:  # something moved under us: read afresh
                    current = await tx.unit.current(type_, id_)
                stored, _ = await store_resource(tx, _carry_over(unit.resource, current), id_, current, "PUT")
                created = current is None or current.deleted
                if unit.sha256 not in binaries and unit.sha256 not in new_binaries:
                    existing = await tx.unit.current("Binary", unit.sha256) if attempts[0] > 1 else None
                    if existing is None:
                        binary = raw_binary(unit.raw, unit.sha256, unit.key, unit.resource["meta"]["source"], unit.content_type)
                        await store_resource(tx, binary, unit.sha256, None, "PUT", trusted=True)
                    new_binaries.add(unit.sha256)
                prov = provenance(
                    target=unit.key,
                    version=stored.version,
                    created=created,
                    mapping=mapping,
                    connector=connector.source_kind,
                    record_id=unit.record_id,
                    sha256=unit.sha256,
                    kind=unit.kind,
                )
                prov_current = await tx.unit.current("Provenance", prov["id"]) if attempts[0] > 1 else None
                await store_resource(tx, prov, prov["id"], prov_current, "PUT", trusted=True)
                out.append((unit, stored.version, created))
            return out

        return await self.server.transact(work, {u.resource["resourceType"] for u, _ in items} | _TRACE_TYPES)

    async def _remember(self, items: list[tuple[Unit, int | None]]) -> None:
        if not items:
            return
        now = datetime.now(timezone.utc)
        ops = []
        for u, version in items:
            fields: dict[str, Any] = {"sha256": u.sha256, "mapping": self.connector.transform, "resource": u.key, "updated": now, "run_id": self.run_id}
            if version is not None:
                fields["version"] = version
            ops.append(UpdateOne({"_id": self._ledger_key(u)}, [{"$set": {**fields, "source_time": {"$max": [{"$ifNull": ["$source_time", ""]}, u.source_time]}}}], upsert=True))
        await self.db[LEDGER].bulk_write(ops, ordered=False)


def _reasons(e: Exception) -> tuple[str, str]:
    if isinstance(e, FhirError):
        issues = e.issues[:3]
        en = "; ".join(i.diagnostics for i in issues)
        zh = "；".join((i.details_zh or i.diagnostics) for i in issues)
        return zh, en
    return "数据库拒绝写入", str(e)


def _rounds(units: list[Unit]) -> list[list[Unit]]:
    """The same record twice in one page (a re-send) goes to a later round: one write per record per unit of work."""
    rounds: list[list[Unit]] = []
    seen: Counter = Counter()
    for u in units:
        n = seen[u.record_id]
        seen[u.record_id] += 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(u)
    return rounds


async def process(server: Server, connector: Any, units: list[Unit], rejections: list[Rejection], report: SyncReport, run_id: str, linker: Linker | None) -> None:
    """Write a parsed page and file its rejections; the report counts every record once."""
    writer = _Writer(server, connector, report, run_id, linker)
    for r in rejections:
        report.count(r.kind, "rejected")
    refused: list[Rejection] = []
    for batch in _rounds(units):
        refused += await writer.round(batch)
    await deadletter.put(server, connector.code, rejections + refused, run_id)


async def _one_ahead(pages: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """``pages``, fetching the next page while the caller writes this one: the upstream's latency
    (and its serialisation, for a simulator in this process) overlaps the writes. A failure to
    fetch surfaces when that page is due, after the previous one was written and checkpointed."""
    ahead = pages.__aiter__()
    pending = asyncio.ensure_future(ahead.__anext__())
    try:
        while True:
            try:
                page = await pending
            except StopAsyncIteration:
                return
            pending = asyncio.ensure_future(ahead.__anext__())
            yield page
    finally:
        if not pending.done():
            pending.cancel()
            try:
                await pending
            except (asyncio.CancelledError, StopAsyncIteration, Exception):
                pass


async def sync(
    server: Server,
    connector: Any,
    transport: Any,
    *,
    linker: Linker | None = _DEFAULT,
    full: bool = False,
    on_page: Callable[[SyncReport, Any], None] | None = None,
) -> SyncReport:
    """Pull every page after the checkpoint (from the start with ``full``) and write it.

    A transport failure stops the run with ``report.error`` set and the checkpoint at the last
    committed page: the next run resumes there."""
    if linker is _DEFAULT:
        linker = default_linker()
    run_id = uuid.uuid4().hex[:12]
    report = SyncReport(connector.code, run_id)
    checkpointed = getattr(transport, "checkpointed", True)
    if full and checkpointed:
        await checkpoint.reset(server, connector.code)
    cp = await checkpoint.load(server, connector.code)
    started = time.perf_counter()
    if checkpointed:
        await checkpoint.save(server, connector.code, status="running", run_id=run_id, since=cp.since, pages=cp.pages, error=None)
    pages = cp.pages
    try:
        async for page in _one_ahead(transport.pages(cp.since)):
            units, rejections, _ = connector.parse_page(page.body)
            await process(server, connector, units, rejections, report, run_id, linker)
            report.pages += 1
            pages += 1
            if checkpointed:
                await checkpoint.save(server, connector.code, since=page.next_since, pages=pages)
            if on_page:
                on_page(report, page)
    except Exception as e:
        from fhir_server.connectors.transport import TransportError

        report.error = str(e)
        if checkpointed:
            await checkpoint.save(server, connector.code, status="failed", error=str(e)[:500])
        if not isinstance(e, TransportError):
            raise
    else:
        if checkpointed:
            await checkpoint.save(server, connector.code, status="complete")
    finally:
        report.seconds = time.perf_counter() - started
        report.retries = getattr(transport, "retried", 0)
    return report


_KIND_ORDER = {"page": 0, "child": 1, "inoculation": 2, "aefi": 3}


async def replay_dead_letters(server: Server, connector: Any, *, linker: Linker | None = _DEFAULT, keys: list[str] | None = None) -> SyncReport:
    """Run the open dead letters of ``connector``'s source through the current mapping again.

    Letters that now map and store are marked resolved; the others stay open (seen once more)."""
    if linker is _DEFAULT:
        linker = default_linker()
    run_id = "replay-" + uuid.uuid4().hex[:8]
    report = SyncReport(connector.code, run_id)
    started = time.perf_counter()
    letters = await deadletter.list_open(server, connector.code, limit=100_000)
    if keys:
        letters = [d for d in letters if d["_id"] in keys]
    letters.sort(key=lambda d: (_KIND_ORDER.get(d["kind"], 9), d["first_seen"]))
    resolved: list[str] = []
    for letter in letters:
        if letter["kind"] == "page":
            units, rejections, _ = connector.parse_page(letter["raw"])
        else:
            element = ET.fromstring(letter["context"]["element"])
            units, rejections = connector.parse_child(element, only=letter["record_id"])
        before = report.rejected
        await process(server, connector, units, rejections, report, run_id, linker)
        if report.rejected == before:
            resolved.append(letter["_id"])
    await deadletter.resolve(server, resolved, run_id)
    report.seconds = time.perf_counter() - started
    return report
