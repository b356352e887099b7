"""The audit trail: append-only, hash-chained, searchable as FHIR AuditEvents.

Storage (beside the FHIR collections, in the server's database):

- ``_audit``: one link per AuditEvent, ``{_id: seq, t: recorded, id: AuditEvent id, e: JSON bytes,
  p: previous link's hash, h: hash}`` with ``h = sha256(p + "|" + seq + "|" + e)`` (hex) and, for
  seq 1, ``p`` = 64 zeros. ``_id`` = seq: the unique index on the sequence number comes free.
- ``_audit_head``: ``{_id: "head", seq, h}``, the last link.
- ``AuditEvent`` (and ``_history``): the same event as an ordinary FHIR resource, byte for byte the
  link's ``e``, so the existing search serves ``AuditEvent?entity=Patient/x``, ``patient=``,
  ``date=``, ``agent=``, ``subtype=`` ... Its index has no ``_refs``: an AuditEvent must never
  stop a resource from being deleted (referential integrity), nor fail because it names a resource
  that never existed (a 404 is audited too). Written directly, without the write interceptors
  (validation runs in the tests, not per event).
- ``_audit_anchor``: ``{seq, h, t}`` snapshots of the head, also written to the log (WARNING on
  ``fhir_server.audit``, so it reaches the default log level): a log line outside the database is
  what makes a truncated or rewritten tail detectable.

Appending: one MongoDB transaction per batch reads the head, inserts the batch's links (seq + 1 ...)
and AuditEvents and moves the head. Two workers appending at once both write the head document:
the later committer gets a write conflict and runs again on the new head (first committer wins).
A sequence number is therefore taken in the same transaction that inserts its link: there is no
counter that can run ahead of the links, and an aborted append leaves nothing. **A gap in the
sequence is never an accident: it is a deleted event** (unlike a ``$inc`` counter, where a worker
dying between the increment and the insert would leave a gap indistinguishable from a deletion).

Batching: :class:`AuditTrail` queues events and one background task per worker appends whatever
has queued while the previous batch committed (group commit, up to ``batch_max`` events per
transaction). Requests that changed data wait until their events are durable (majority, journaled)
before the response goes out; reads, searches and history don't wait. At shutdown
:meth:`AuditTrail.stop` drains the queue (bounded). **Not guaranteed**: on a crash (SIGKILL, OOM,
power loss of the app host) the queued read events not yet appended are lost (at most what queued
during one append transaction, typically milliseconds); and a write's event is appended after the
write itself committed, so a crash between the two loses that write's event (its version stays in
``_history``). Appending inside the write's own transaction would close that window; it needs the
HTTP layer to pass its context into the interactions.

What verification proves: every link present hashes correctly and follows its predecessor, seq 1
to the head with no gap, the head and every anchor agree with the chain, and (optionally) each
FHIR AuditEvent equals its link. Without a secret, whoever can write the database can rewrite the
whole chain and the head consistently: only anchors kept outside the database (the log lines,
``fhir-server audit verify --expect SEQ:HASH``) reveal that.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

import orjson
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError
from pymongo.read_concern import ReadConcern
from pymongo.read_preferences import ReadPreference
from pymongo.write_concern import WriteConcern

from fhir_server.audit.events import AuditSource, RequestRecord, build_events, waits
from fhir_server.interactions._resource import stamped
from fhir_server.search.extract import index_resource
from fhir_server.storage.base import Write
from fhir_server.storage.mongo import MongoStore, MongoUnit, commit

log = logging.getLogger("fhir_server.audit")

LINKS = "_audit"
HEAD = "_audit_head"
ANCHORS = "_audit_anchor"
GENESIS = "0" * 64
_DURABLE = WriteConcern("majority", j=True)
_MAX_ATTEMPTS = 500


def link_hash(prev: str, seq: int, event: bytes) -> str:
    return hashlib.sha256(f"{prev}|{seq}|".encode("ascii") + event).hexdigest()


def _parse_instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _is_conflict(e: PyMongoError) -> bool:
    if e.has_error_label("TransientTransactionError"):
        return True
    return getattr(e, "code", None) in (112, 11000, 251)  # WriteConflict, DuplicateKey, NoSuchTransaction


class AuditUnavailable(Exception):
    """A request's audit events could not be made durable in time."""


async def open_collections(store: MongoStore, database: Any) -> None:
    """Create the audit collections (transactions cannot create them) and the AuditEvent type."""
    names = set(await database.list_collection_names())
    for name in (LINKS, HEAD, ANCHORS):
        if name not in names:
            try:
                await database.create_collection(name, check_exists=False)
            except PyMongoError as e:
                if getattr(e, "code", None) != 48:  # NamespaceExists: another worker made it
                    raise
    await database[LINKS].create_index([("t", 1)], name="recorded")
    await database[ANCHORS].create_index([("seq", -1)], name="seq")
    await store.ensure_types({"AuditEvent"})


async def append(store: MongoStore, database: Any, events: Sequence[dict[str, Any]]) -> list[int]:
    """Append ``events`` (AuditEvent JSON with ids, without meta) to the chain and store them as
    AuditEvent resources, atomically; the sequence numbers they got. Retried on write conflicts."""
    if not events:
        return []
    prepared = []
    for ev in events:
        when = _parse_instant(ev["recorded"])
        prepared.append((ev["id"], when))
    client: AsyncMongoClient = store.client
    heads, links = database[HEAD], database[LINKS]
    delay = 0.002
    last: Exception | None = None
    for _ in range(_MAX_ATTEMPTS):
        async with client.start_session() as session:
            try:
                await session.start_transaction(
                    read_concern=ReadConcern("snapshot"), write_concern=_DURABLE, read_preference=ReadPreference.PRIMARY
                )
                head = await heads.find_one({"_id": "head"}, session=session) or {"seq": 0, "h": GENESIS}
                seq, prev = int(head["seq"]), head["h"]
                unit = MongoUnit(store, session)
                docs, seqs = [], []
                now = datetime.now(timezone.utc)
                now = now.replace(microsecond=now.microsecond // 1000 * 1000)
                for ev, (id_, when) in zip(events, prepared):
                    seq += 1
                    final = stamped(ev, id_, 1, now)
                    raw = orjson.dumps(final)
                    h = link_hash(prev, seq, raw)
                    docs.append({"_id": seq, "t": when, "id": id_, "e": raw, "p": prev, "h": h})
                    index = index_resource(final, raw)
                    index.pop("_refs", None)
                    unit.write(Write("AuditEvent", id_, 1, now, raw, index, "POST", None))
                    seqs.append(seq)
                    prev = h
                await links.insert_many(docs, ordered=True, session=session)
                await unit.flush()
                await heads.update_one({"_id": "head"}, {"$set": {"seq": seq, "h": prev}}, upsert=True, session=session)
                await commit(session)
                return seqs
            except PyMongoError as e:
                if session.in_transaction:
                    try:
                        await session.abort_transaction()
                    except PyMongoError:
                        pass
                if not _is_conflict(e):
                    raise
                last = e
            except BaseException:
                if session.in_transaction:
                    try:
                        await session.abort_transaction()
                    except PyMongoError:
                        pass
                raise
        await asyncio.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 0.2)
    raise AuditUnavailable(f"audit append gave up after {_MAX_ATTEMPTS} conflicting attempts: {last}")




async def anchor(database: Any) -> dict[str, Any] | None:
    """Record the current head in ``_audit_anchor`` and in the log; None while the chain is empty."""
    head = await database[HEAD].find_one({"_id": "head"})
    if not head:
        return None
    doc = {"seq": int(head["seq"]), "h": head["h"], "t": datetime.now(timezone.utc)}
    await database.get_collection(ANCHORS, write_concern=_DURABLE).insert_one(doc)
    # WARNING so that it passes the default level (FHIR_LOG_LEVEL=warning) and reaches the log,
    # which is kept outside the database: the anchor's whole point.
    log.warning("审计链锚点 / audit chain anchor seq=%d hash=%s", doc["seq"], doc["h"])
    return doc


# -- verification ------------------------------------------------------------------------------


@dataclass(slots=True)
class Problem:
    seq: int
    kind: str  # modified | gap | reordered | relinked | truncated | head | anchor | copy-modified | copy-missing
    detail: str


@dataclass(slots=True)
class VerifyReport:
    links: int = 0  # links read
    first_seq: int | None = None
    last_seq: int | None = None
    head_seq: int | None = None
    head_hash: str | None = None
    anchors: int = 0  # anchors checked (stored and expected)
    copies: int = 0  # FHIR AuditEvents compared
    missing: int = 0  # sequence numbers absent (deleted events)
    problems: list[Problem] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # problems by kind (all, beyond the list too)

    @property
    def ok(self) -> bool:
        return not self.counts

    @property
    def first(self) -> Problem | None:
        """The first broken link (the lowest sequence number with a problem)."""
        return min(self.problems, key=lambda p: p.seq) if self.problems else None

    def add(self, seq: int, kind: str, detail: str, limit: int) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.problems) < limit:
            self.problems.append(Problem(seq, kind, detail))


def _appended_as(link: dict[str, Any], window: int = 64) -> int | None:
    """The sequence number this link's hash was computed for, near where it sits (a moved link)."""
    seq, e, p, h = link["_id"], bytes(link["e"]), link["p"], link["h"]
    for s in range(max(1, seq - window), seq + window + 1):
        if s != seq and link_hash(p, s, e) == h:
            return s
    return None


async def verify(
    database: Any,
    *,
    expected: Iterable[tuple[int, str]] = (),
    check_copies: bool = True,
    limit: int = 100,
    batch: int = 1000,
) -> VerifyReport:
    """Walk the chain in sequence order and recompute every hash.

    Kinds: ``modified`` (the link's own hash does not match its content: event, seq or hash
    edited), ``reordered`` (a link intact but sitting at another position than it was appended at:
    a swap or move), ``gap`` (sequence numbers missing: events deleted), ``relinked`` (an intact
    link whose predecessor is not the one it was chained to: the predecessor was replaced or
    rehashed), ``truncated`` (the head or an anchor is beyond the last link: the tail was deleted),
    ``head`` / ``anchor`` (they disagree with the chain: rewritten), ``copy-modified`` /
    ``copy-missing`` (the searchable AuditEvent differs from the chain or is gone).
    ``expected`` are (seq, hash) anchors from outside the database (log lines)."""
    report = VerifyReport()
    links = database[LINKS]
    prev_hash, prev_seq = GENESIS, 0
    hashes_at: dict[int, str] = {}
    recent: dict[str, None] = {}  # hashes of the last links, in order (a moved link's successor)
    anchor_seqs: dict[int, list[tuple[str, str]]] = {}
    async for a in database[ANCHORS].find({}, {"seq": 1, "h": 1}):
        anchor_seqs.setdefault(int(a["seq"]), []).append((a["h"], "stored anchor"))
    for s, h in expected:
        anchor_seqs.setdefault(int(s), []).append((h.lower(), "expected anchor"))
    copies = database["AuditEvent"]
    pending: list[dict[str, Any]] = []

    async def compare_copies() -> None:
        if not pending:
            return
        by_id = {l["id"]: l for l in pending}
        found = {}
        async for doc in copies.find({"_id": {"$in": list(by_id)}}, {"r": 1, "v": 1, "d": 1}):
            found[doc["_id"]] = doc
        for id_, l in by_id.items():
            report.copies += 1
            doc = found.get(id_)
            if doc is None or doc.get("d"):
                report.add(l["_id"], "copy-missing", f"AuditEvent/{id_} is not in the AuditEvent collection", limit)
            elif doc.get("v") != 1 or bytes(doc.get("r") or b"") != bytes(l["e"]):
                report.add(l["_id"], "copy-modified", f"AuditEvent/{id_} differs from the chain", limit)
        pending.clear()

    cursor = links.find({}).sort("_id", 1).batch_size(batch)
    async for link in cursor:
        seq = link["_id"]
        if not isinstance(seq, int):
            report.add(0, "modified", f"a link has a non-numeric sequence number {seq!r}", limit)
            continue
        report.links += 1
        if report.first_seq is None:
            report.first_seq = seq
        report.last_seq = seq
        e = bytes(link.get("e") or b"")
        p, h = link.get("p"), link.get("h")
        intact = isinstance(p, str) and isinstance(h, str) and link_hash(p, seq, e) == h
        if seq > prev_seq + 1:
            n = seq - prev_seq - 1
            report.missing += n
            what = f"seq {prev_seq + 1}" if n == 1 else f"seq {prev_seq + 1}..{seq - 1}"
            report.add(prev_seq + 1, "gap", f"{what} missing ({n} event{'s' if n > 1 else ''} deleted)", limit)
        if not intact:
            moved = _appended_as(link) if isinstance(p, str) and isinstance(h, str) else None
            if moved is not None:
                report.add(seq, "reordered", f"the link at seq {seq} was appended as seq {moved}", limit)
            else:
                report.add(seq, "modified", f"the event at seq {seq} does not match its hash (changed after it was written)", limit)
        elif p != prev_hash and seq == prev_seq + 1 and p not in recent:
            report.add(seq, "relinked", f"seq {seq} was chained to another predecessor than the event now at seq {prev_seq} (replaced or rehashed)", limit)
        # Go on from this link as stored: one tampering is reported once, not at every later link.
        prev_hash, prev_seq = (h if isinstance(h, str) else ""), seq
        recent[prev_hash] = None
        if len(recent) > 128:
            del recent[next(iter(recent))]
        if seq in anchor_seqs:
            hashes_at[seq] = prev_hash
        if check_copies and isinstance(link.get("id"), str):
            pending.append(link)
            if len(pending) >= batch:
                await compare_copies()
    if check_copies:
        await compare_copies()

    head = await database[HEAD].find_one({"_id": "head"})
    if head is not None:
        report.head_seq, report.head_hash = int(head["seq"]), head["h"]
        last = report.last_seq or 0
        if report.head_seq > last:
            report.add(last + 1, "truncated", f"the head is at seq {report.head_seq} but the last link is seq {last}", limit)
        elif report.head_seq < last:
            report.add(report.head_seq + 1, "head", f"links after the head (seq {report.head_seq}) up to {last}: written outside an append", limit)
        elif head["h"] != prev_hash:
            report.add(last, "head", f"the head's hash differs from the hash of seq {last}", limit)
    elif report.links:
        report.add(report.last_seq or 0, "head", "the head document is missing", limit)
    for s in sorted(anchor_seqs):
        for h, what in anchor_seqs[s]:
            report.anchors += 1
            if report.last_seq is None or s > report.last_seq:
                report.add(s, "truncated", f"a {what} is at seq {s} but the chain ends at seq {report.last_seq or 0}", limit)
            elif s not in hashes_at:
                pass  # deleted: reported as a gap
            elif hashes_at[s] != h:
                report.add(s, "anchor", f"the {what} for seq {s} has another hash: the chain was rewritten up to there", limit)
    return report


# -- the trail as the HTTP layer uses it ------------------------------------------------------


@dataclass(slots=True)
class _Item:
    events: list[dict[str, Any]]
    done: asyncio.Future[None] | None


class AuditTrail:
    """One per worker process: queues the events of each request and appends them in order.

    The HTTP layer calls :meth:`record` once per request, after it knows the status (refused
    requests included). :meth:`start` at startup, :meth:`stop` at shutdown."""

    def __init__(
        self,
        store: MongoStore,
        database: str,
        source: AuditSource = AuditSource(),
        *,
        batch_max: int = 500,
        queue_max: int = 100_000,
        wait_seconds: float = 10.0,
        anchor_seconds: float = 300.0,
    ) -> None:
        self.store = store
        self.db = store.client.get_database(database, write_concern=_DURABLE)
        self.source = source
        self.batch_max = max(1, batch_max)
        self.wait_seconds = wait_seconds
        self.anchor_seconds = anchor_seconds
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=queue_max)
        self._task: asyncio.Task[None] | None = None
        self._anchor_task: asyncio.Task[None] | None = None
        self._closed = False
        self.appended = 0  # events appended by this worker
        self.failures = 0  # append attempts that failed (each retried until the database answers)

    @classmethod
    def from_settings(cls, store: MongoStore, settings: Any) -> "AuditTrail":
        source = AuditSource(observer=settings.audit_observer, site=settings.audit_site, base_path=settings.base_path)
        return cls(
            store,
            settings.database,
            source,
            batch_max=settings.audit_batch_max,
            wait_seconds=settings.audit_wait_seconds,
            anchor_seconds=settings.audit_anchor_seconds,
        )

    async def start(self) -> None:
        await open_collections(self.store, self.db)
        self._task = asyncio.create_task(self._drain(), name="audit-drain")
        if self.anchor_seconds > 0:
            self._anchor_task = asyncio.create_task(self._anchor_loop(), name="audit-anchor")

    async def record(self, rec: RequestRecord, *, wait: bool | None = None, bundle_type: str | None = None) -> list[dict[str, Any]]:
        """Queue the events of ``rec``; the events. With ``wait`` (default: when the request may have
        changed data) return only once they are durable, or raise :class:`AuditUnavailable` after
        ``wait_seconds`` (they stay queued and are appended when the database answers again).
        A full queue makes the caller wait (back-pressure): nothing is dropped while the process lives."""
        if self._closed or self._task is None:
            raise AuditUnavailable("the audit trail is not running")
        events = build_events(rec, self.source, bundle_type=bundle_type)
        if wait is None:
            wait = waits(rec, self.source)
        done = asyncio.get_running_loop().create_future() if wait else None
        await self._queue.put(_Item(events, done))
        if done is not None:
            try:
                await asyncio.wait_for(asyncio.shield(done), self.wait_seconds)
            except asyncio.TimeoutError:
                raise AuditUnavailable(f"audit events not durable after {self.wait_seconds:.0f} s") from None
        return events

    async def flush(self) -> None:
        """Wait until everything queued so far is appended."""
        done = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item([], done))
        await done

    async def _drain(self) -> None:
        backoff = 0.05
        while True:
            items = [await self._queue.get()]
            n = len(items[0].events)
            while n < self.batch_max:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                items.append(item)
                n += len(item.events)
            events = [e for it in items for e in it.events]
            while True:
                try:
                    await append(self.store, self.db, events)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception:  # the database is away: keep the batch, try again
                    self.failures += 1
                    log.exception("appending %d audit events failed; retrying in %.1f s", len(events), backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            backoff = 0.05
            self.appended += len(events)
            for it in items:
                if it.done is not None and not it.done.done():
                    it.done.set_result(None)
                self._queue.task_done()

    async def _anchor_loop(self) -> None:
        last: int | None = None
        while True:
            await asyncio.sleep(self.anchor_seconds)
            try:
                newest = await self.db[ANCHORS].find_one({}, sort=[("seq", -1)])
                head = await self.db[HEAD].find_one({"_id": "head"})
                if head is None or head["seq"] == last or (newest and newest["seq"] >= head["seq"]):
                    continue  # nothing new (or another worker anchored it)
                doc = await anchor(self.db)
                last = doc["seq"] if doc else last
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("recording an audit chain anchor failed")

    async def stop(self, timeout: float = 10.0) -> None:
        """Refuse new events, append the queued ones (for at most ``timeout`` seconds), anchor the
        head, and stop. Events still queued after ``timeout`` are lost: their number is logged."""
        self._closed = True
        if self._anchor_task is not None:
            self._anchor_task.cancel()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except asyncio.TimeoutError:
            queued: list[_Item] = list(getattr(self._queue, "_queue", ()))
            lost = sum(len(it.events) for it in queued)
            log.error("audit trail stopped with %d events not appended (database unreachable for %.0f s)", lost, timeout)
        self._task.cancel()
        for task in (self._task, self._anchor_task):
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        self._task = None
        if self.anchor_seconds > 0:
            try:
                await asyncio.wait_for(anchor(self.db), 5.0)
            except Exception:
                log.exception("recording the final audit chain anchor failed")
