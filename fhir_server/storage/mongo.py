"""MongoDB implementation of the storage contract.

Layout: one collection per resource type holding the *current* version of each resource
(``_id`` = logical id, ``v`` version, ``t`` lastUpdated, ``d`` deleted, ``r`` the JSON bytes,
``s`` the search index values), and one ``_history`` collection holding every version. Storing the
JSON as bytes lets a read return them without decoding; search works on ``s`` only, through one
sparse index per search parameter (see fhir_server/search/indexes.py). ID-document and phone
numbers inside ``r`` are stored as encrypted tokens and put back in clear on every read
(fhir_server/storage/field_crypto.py); ``s`` holds their blind index instead of the numbers.

Every write runs in a multi-document transaction with majority, journaled write concern, so a
write is acknowledged only once durable, and a unit of work is all-or-nothing.
"""

from __future__ import annotations

import asyncio
import base64
import random
from datetime import datetime, timezone
from typing import Any, AsyncGenerator, Awaitable, Callable, Sequence, TypeVar

from pymongo import AsyncMongoClient, IndexModel, InsertOne, ReplaceOne, ReturnDocument, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import BulkWriteError, CollectionInvalid, DocumentTooLarge, DuplicateKeyError, OperationFailure, PyMongoError
from pymongo.read_concern import ReadConcern
from pymongo.read_preferences import ReadPreference
from pymongo.write_concern import WriteConcern

from fhir_server.storage import field_crypto
from fhir_server.storage.base import Conflict, HistoryPage, Stored, TooLarge, Write

T = TypeVar("T")

HISTORY = "_history"
LOCKS = "_locks"
_CURRENT_FIELDS = {"v": 1, "t": 1, "d": 1, "r": 1}
_MAX_ATTEMPTS = 200
_DURABLE = WriteConcern("majority", j=True)
# BSONObjectTooLarge, TransactionTooLarge, and the "too large" codes of the write path.
_TOO_LARGE_CODES = (10334, 257, 17419, 17420)


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


# Every stored JSON handed out goes through field_crypto.decode (protected values back in clear) and
# every one written through field_crypto.encode: nothing above the storage layer sees a token.
_decode = field_crypto.decode
_encode = field_crypto.encode


def _stored(type_: str, doc: dict[str, Any]) -> Stored:
    return Stored(type_, doc["_id"], doc["v"], _as_utc(doc["t"]), doc["d"], _decode(doc.get("r"), type_), index=doc.get("s"))


_NEGATIVE_OPS = frozenset({"$exists", "$not", "$nin", "$ne", "$nor"})


def _selects_on_index(query: dict[str, Any]) -> bool:
    """Whether ``query`` can only match documents with some search index value.

    A deletion is stored with an empty index, so such a query never matches one and needs no
    ``d: false`` condition, which would otherwise cost a document fetch per match (no count from
    the index alone)."""
    for key, cond in query.items():
        if key == "$and":
            if any(_selects_on_index(q) for q in cond):
                return True
        elif key == "$or":
            if cond and all(_selects_on_index(q) for q in cond):
                return True
        elif key.startswith("s."):
            if not isinstance(cond, dict) or not (_NEGATIVE_OPS & cond.keys()):
                return True
    return False


def _live(query: dict[str, Any]) -> dict[str, Any]:
    return query if _selects_on_index(query) else {**query, "d": False}


def _stored_history(doc: dict[str, Any]) -> Stored:
    type_ = doc["ty"]
    return Stored(type_, doc["id"], doc["v"], _as_utc(doc["t"]), doc["d"], _decode(doc.get("r"), type_), doc.get("m", "PUT"))


def _encode_cursor(t: datetime, key: str) -> str:
    raw = f"{int(t.timestamp() * 1000)}|{key}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ms, key = raw.split("|", 1)
        return datetime.fromtimestamp(int(ms) / 1000, timezone.utc), key
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError("malformed paging cursor") from e


class MongoStore:
    """The :class:`fhir_server.storage.base.Store` on a MongoDB replica set or sharded cluster."""

    def __init__(
        self,
        client: AsyncMongoClient,
        database: str,
        indexes_for: Callable[[str], Sequence[tuple[str, Sequence[tuple[str, int]]]]] = lambda _: (),
    ) -> None:
        """``indexes_for(type)`` names the (sparse) search indexes a type collection needs."""
        self._client = client
        self._indexes_for = indexes_for
        self._db = client.get_database(database, write_concern=_DURABLE)
        self._types: set[str] = set()
        self._types_lock = asyncio.Lock()

    @property
    def client(self) -> AsyncMongoClient:
        return self._client

    async def open(self) -> None:
        """Create the shared collections and indexes; learn which type collections exist."""
        names = set(await self._db.list_collection_names())
        if HISTORY not in names:
            await self._create(HISTORY)
        if LOCKS not in names:
            await self._create(LOCKS)
        hist = self._db[HISTORY]
        await hist.create_index([("ty", 1), ("id", 1), ("v", -1)], unique=True, name="instance")
        await hist.create_index([("t", -1), ("_id", -1)], name="system")
        await hist.create_index([("ty", 1), ("t", -1), ("_id", -1)], name="type")
        self._types = {n for n in names if n[:1].isupper()}

    async def _create(self, name: str) -> None:
        try:
            await self._db.create_collection(name, check_exists=False)
        except (OperationFailure, CollectionInvalid) as e:
            # Another worker (or server) made it first.
            if isinstance(e, OperationFailure) and e.code != 48:  # NamespaceExists
                raise

    async def ensure_types(self, types: set[str]) -> None:
        """Collections and indexes must exist before a transaction writes into them."""
        missing = types - self._types
        if not missing:
            return
        async with self._types_lock:
            for type_ in sorted(missing - self._types):
                await self._create(type_)
                models = [IndexModel([("t", 1), ("_id", 1)], name="lastUpdated")]
                models += [IndexModel(list(keys), name=name, sparse=True) for name, keys in self._indexes_for(type_)]
                await self._db[type_].create_indexes(models)
                self._types.add(type_)

    # -- reads ---------------------------------------------------------------------------

    async def current(self, type_: str, id_: str) -> Stored | None:
        doc = await self._db[type_].find_one({"_id": id_}, _CURRENT_FIELDS)
        return _stored(type_, doc) if doc else None

    async def version(self, type_: str, id_: str, version: int) -> Stored | None:
        doc = await self._db[HISTORY].find_one({"ty": type_, "id": id_, "v": version})
        return _stored_history(doc) if doc else None

    async def find(
        self,
        type_: str,
        query: dict[str, Any],
        *,
        sort: Sequence[tuple[str, int]] = (),
        limit: int,
        skip: int = 0,
        index_fields: Sequence[str] = (),
        session: AsyncClientSession | None = None,
    ) -> list[Stored]:
        fields: dict[str, int] = dict(_CURRENT_FIELDS)
        fields.update(("s." + f, 1) for f in index_fields)
        if sum(1 for f, _ in sort if f.startswith("s.")) > 1:
            return await self._find_by_computed_keys(type_, query, sort, limit, skip, fields, session)
        cursor = self._db[type_].find(_live(query), fields, session=session)
        if sort:
            cursor = cursor.sort(list(sort))
        if skip:
            cursor = cursor.skip(skip)
        if limit:
            cursor = cursor.limit(limit)
        return [_stored(type_, d) async for d in cursor]

    async def _find_by_computed_keys(
        self,
        type_: str,
        query: dict[str, Any],
        sort: Sequence[tuple[str, int]],
        limit: int,
        skip: int,
        fields: dict[str, int],
        session: AsyncClientSession | None,
    ) -> list[Stored]:
        # MongoDB refuses to sort a find by two array fields ("parallel arrays"); computing each
        # key as find would (smallest element ascending, largest descending) sorts the same way.
        keys = {f"_k{i}": {"$min" if d == 1 else "$max": "$" + f} for i, (f, d) in enumerate(sort) if f.startswith("s.")}
        order: dict[str, int] = {}
        for i, (f, d) in enumerate(sort):
            order[f"_k{i}" if f.startswith("s.") else f] = d
        pipeline: list[dict[str, Any]] = [{"$match": _live(query)}, {"$addFields": keys}, {"$sort": order}]
        if skip:
            pipeline.append({"$skip": skip})
        if limit:
            pipeline.append({"$limit": limit})
        pipeline.append({"$project": fields})
        cursor = await self._db[type_].aggregate(pipeline, session=session, allowDiskUse=True)
        return [_stored(type_, d) async for d in cursor]

    async def count(self, type_: str, query: dict[str, Any], *, session: AsyncClientSession | None = None) -> int:
        if session is None and type_ in self._types:
            # The count command counts from the index alone where it can (COUNT_SCAN); the
            # aggregation behind count_documents fetches. It is not allowed in transactions.
            reply = await self._db.command("count", type_, query=_live(query))
            return int(reply["n"])
        return await self._db[type_].count_documents(_live(query), session=session)

    async def find_ids(
        self, type_: str, query: dict[str, Any], limit: int, *, session: AsyncClientSession | None = None
    ) -> list[str]:
        cursor = self._db[type_].find(_live(query), {"_id": 1}, session=session).limit(limit)
        return [d["_id"] async for d in cursor]

    async def distinct(
        self, type_: str, query: dict[str, Any], field: str, limit: int, *, session: AsyncClientSession | None = None
    ) -> list[Any]:
        path = "$s." + field
        pipeline = [
            {"$match": _live(query)},
            {"$project": {"_id": 0, "x": path}},
            {"$unwind": "$x"},
            {"$group": {"_id": "$x"}},
            {"$limit": limit},
        ]
        cursor = await self._db[type_].aggregate(pipeline, session=session)
        return [d["_id"] async for d in cursor]

    async def types(self) -> set[str]:
        self._types |= {n for n in await self._db.list_collection_names() if n[:1].isupper()}
        return set(self._types)

    async def history(
        self,
        type_: str | None,
        id_: str | None,
        *,
        since: datetime | None,
        at: tuple[datetime, datetime] | None,
        count: int,
        cursor: str | None,
    ) -> HistoryPage:
        query: dict[str, Any] = {}
        if type_:
            query["ty"] = type_
        if id_:
            query["id"] = id_
        hist = self._db[HISTORY]
        after: dict[str, Any] = {}
        if cursor:
            t, key = _decode_cursor(cursor)
            after = {"$or": [{"t": {"$lt": t}}, {"t": t, "_id": {"$lt": key}}]}
        if at:
            # The versions current at some point during [lo, hi]: each resource's version current
            # at lo (unless that is a deletion), and every version made after lo up to hi.
            lo, hi = at
            pipeline: list[dict[str, Any]] = [
                {"$match": {**query, "t": {"$lte": lo}}},
                {"$sort": {"t": -1, "_id": -1}},
                {"$group": {"_id": {"ty": "$ty", "id": "$id"}, "doc": {"$first": "$$ROOT"}}},
                {"$replaceRoot": {"newRoot": "$doc"}},
                {"$match": {"d": False}},
                {"$unionWith": {"coll": HISTORY, "pipeline": [{"$match": {**query, "t": {"$gt": lo, "$lte": hi}}}]}},
            ]
            if since:
                pipeline.append({"$match": {"t": {"$gte": since}}})
            total = None
            if cursor is None:
                counted = [d async for d in await hist.aggregate([*pipeline, {"$count": "n"}])]
                total = counted[0]["n"] if counted else 0
            if after:
                pipeline.append({"$match": after})
            pipeline += [{"$sort": {"t": -1, "_id": -1}}, {"$limit": count + 1}]
            docs = [d async for d in await hist.aggregate(pipeline)]
        else:
            if since:
                query["t"] = {"$gte": since}
            total = await hist.count_documents(query) if cursor is None else None
            if after:
                query = {"$and": [query, after]}
            docs = [d async for d in hist.find(query).sort([("t", -1), ("_id", -1)]).limit(count + 1)]
        next_cursor = None
        if len(docs) > count:
            docs = docs[:count]
            next_cursor = _encode_cursor(_as_utc(docs[-1]["t"]), docs[-1]["_id"])
        return HistoryPage([_stored_history(d) for d in docs], total, next_cursor)

    # -- writes --------------------------------------------------------------------------

    async def transact(self, work: Callable[["MongoUnit"], Awaitable[T]]) -> T:
        """Run ``work`` in a transaction, re-running it after write conflicts (first committer wins)."""
        delay = 0.002
        for attempt in range(_MAX_ATTEMPTS):
            async with self._client.start_session() as session:
                unit = MongoUnit(self, session)
                try:
                    await session.start_transaction(
                        read_concern=ReadConcern("snapshot"),
                        write_concern=_DURABLE,
                        read_preference=ReadPreference.PRIMARY,
                    )
                    result = await work(unit)
                    await unit.flush()
                    await commit(session)
                    return result
                except (Conflict, DuplicateKeyError) as e:
                    await _abort(session)
                    last: Exception = e
                except DocumentTooLarge as e:
                    await _abort(session)
                    raise TooLarge(str(e)) from None
                except PyMongoError as e:
                    # Write conflicts, and anything the driver labels safe to retry as a whole
                    # (TransientTransactionError: a lost connection, a primary stepping down).
                    await _abort(session)
                    if _too_large(e):
                        raise TooLarge(str(e)) from None
                    if not _is_conflict(e):
                        raise
                    last = e
                except BaseException:
                    await _abort(session)
                    raise
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.1)
        raise Conflict(f"gave up after {_MAX_ATTEMPTS} conflicting attempts: {last}")

    # -- re-indexing ---------------------------------------------------------------------
    # For search parameters registered at run time (fhir_server/search/reindex.py): indexes on
    # existing collections, recomputed search values, the `_jobs` records that track progress,
    # and the change stream that tells every worker about new SearchParameters.

    _JOBS = "_jobs"

    async def ensure_search_indexes(self, types: set[str]) -> None:
        """Build the search indexes ``indexes_for`` names now on the existing collections of
        ``types`` (ensure_types builds them only with a new collection); rebuild changed ones."""
        for type_ in sorted(types & await self.types()):
            coll = self._db[type_]
            have = {ix["name"]: [(k, int(d)) for k, d in ix["key"].items()] async for ix in await coll.list_indexes()}
            for name, keys in self._indexes_for(type_):
                want = [(k, int(d)) for k, d in keys]
                if have.get(name) == want:
                    continue
                if name in have:  # same parameter code, another type (say string -> token)
                    await self.drop_search_indexes(type_, [name])
                try:
                    await coll.create_index(want, name=name, sparse=True)
                except OperationFailure as e:
                    if e.code not in (85, 86):  # IndexOptionsConflict/IndexKeySpecsConflict: a racing worker
                        raise

    async def drop_search_indexes(self, type_: str, names: Sequence[str]) -> None:
        for name in names:
            try:
                await self._db[type_].drop_index(name)
            except OperationFailure as e:
                if e.code not in (26, 27):  # NamespaceNotFound, IndexNotFound: nothing to drop
                    raise

    async def scan_for_reindex(
        self, type_: str, *, after: str | None = None, ids: Sequence[str] | None = None, limit: int = 0
    ) -> list[tuple[str, int, bytes, list[str] | None]]:
        """(id, version, JSON, stored ``_refs``) of live resources in ``_id`` order after ``after``,
        or of those among ``ids``."""
        query: dict[str, Any] = {"d": False}
        if ids is not None:
            query["_id"] = {"$in": list(ids)}
        elif after is not None:
            query["_id"] = {"$gt": after}
        cursor = self._db[type_].find(query, {"v": 1, "r": 1, "s._refs": 1}).sort("_id", 1)
        if limit:
            cursor = cursor.limit(limit)
        return [(d["_id"], d["v"], _decode(d["r"], type_), d.get("s", {}).get("_refs")) async for d in cursor]

    async def set_search_values(self, type_: str, values: Sequence[tuple[str, int, dict[str, Any]]]) -> list[str]:
        """Replace ``s`` of each (id, version, s) whose version is still the current one; the ids
        whose version moved (a concurrent write indexed them itself, perhaps without a new parameter)."""
        if not values:
            return []
        ops = [UpdateOne({"_id": id_, "v": v, "d": False}, {"$set": {"s": index}}) for id_, v, index in values]
        result = await self._db[type_].bulk_write(ops, ordered=False)
        if result.matched_count == len(values):
            return []
        wanted = {id_: v for id_, v, _ in values}
        cursor = self._db[type_].find({"_id": {"$in": list(wanted)}}, {"v": 1})
        return [d["_id"] async for d in cursor if d["v"] != wanted[d["_id"]]]

    async def insert_job(self, job: dict[str, Any]) -> None:
        await self._db[self._JOBS].insert_one(job)

    async def job(self, job_id: str) -> dict[str, Any] | None:
        return await self._db[self._JOBS].find_one({"_id": job_id})

    async def update_job(self, job_id: str, fields: dict[str, Any], *, owner: str | None = None) -> bool:
        """Set ``fields`` of a job (only while ``owner`` runs it, when given); False when it did not."""
        query: dict[str, Any] = {"_id": job_id}
        if owner is not None:
            query["owner"] = owner
        return (await self._db[self._JOBS].update_one(query, {"$set": fields})).matched_count == 1

    async def claim_job(self, owner: str, stale_before: datetime, now: datetime) -> dict[str, Any] | None:
        """Take over one unfinished job whose runner has not reported since ``stale_before``."""
        return await self._db[self._JOBS].find_one_and_update(
            {"status": {"$in": ["queued", "running"]}, "hb": {"$lt": stale_before}},
            {"$set": {"owner": owner, "hb": now}},
            sort=[("started", 1)],
            return_document=ReturnDocument.AFTER,
        )

    async def watch(self, type_: str) -> AsyncGenerator[Stored | None, None]:
        """The versions of ``type_`` resources as they commit: first None, once the change stream is
        open (nothing committed after that is missed), then each new current version (``raw`` None
        when deleted; version 0 for a document removed outright, which the server never does)."""
        pipeline = [{"$match": {"operationType": {"$in": ["insert", "replace", "update", "delete"]}}}]
        async with await self._db[type_].watch(pipeline, full_document="updateLookup") as stream:
            yield None
            async for change in stream:
                doc = change.get("fullDocument")
                if doc is None:
                    yield Stored(type_, change["documentKey"]["_id"], 0, datetime.now(timezone.utc), True, None)
                else:
                    yield _stored(type_, doc)


def _is_conflict(e: PyMongoError) -> bool:
    if e.has_error_label("TransientTransactionError"):
        return True
    if isinstance(e, BulkWriteError):
        errs = e.details.get("writeErrors", [])
        return bool(errs) and all(err.get("code") == 11000 for err in errs)
    return getattr(e, "code", None) in (112, 11000, 251)  # WriteConflict, DuplicateKey, NoSuchTransaction


def _too_large(e: PyMongoError) -> bool:
    if isinstance(e, BulkWriteError):
        return any(err.get("code") in _TOO_LARGE_CODES for err in e.details.get("writeErrors", []))
    return getattr(e, "code", None) in _TOO_LARGE_CODES


async def _abort(session: AsyncClientSession) -> None:
    if session.in_transaction:
        try:
            await session.abort_transaction()
        except PyMongoError:
            pass


class MongoUnit:
    """A unit of work inside one MongoDB transaction. Writes are buffered and sent in bulk
    before the next read and at commit, so a 2,000-entry transaction costs a few round trips."""

    def __init__(self, store: MongoStore, session: AsyncClientSession) -> None:
        self._store = store
        self._db = store._db
        self._session = session
        self._pending: list[Write] = []

    async def current(self, type_: str, id_: str) -> Stored | None:
        await self.flush()
        doc = await self._db[type_].find_one({"_id": id_}, _CURRENT_FIELDS, session=self._session)
        return _stored(type_, doc) if doc else None

    async def find(
        self,
        type_: str,
        query: dict[str, Any],
        limit: int,
        *,
        sort: Sequence[tuple[str, int]] = (),
        skip: int = 0,
        index_fields: Sequence[str] = (),
    ) -> list[Stored]:
        await self.flush()
        return await self._store.find(
            type_, query, sort=sort, limit=limit, skip=skip, index_fields=index_fields, session=self._session
        )

    async def count(self, type_: str, query: dict[str, Any]) -> int:
        await self.flush()
        return await self._store.count(type_, query, session=self._session)

    async def find_ids(self, type_: str, query: dict[str, Any], limit: int) -> list[str]:
        await self.flush()
        return await self._store.find_ids(type_, query, limit, session=self._session)

    async def distinct(self, type_: str, query: dict[str, Any], field: str, limit: int) -> list[Any]:
        await self.flush()
        return await self._store.distinct(type_, query, field, limit, session=self._session)

    async def types(self) -> set[str]:
        return await self._store.types()

    async def existing_ids(self, type_: str, ids: set[str]) -> set[str]:
        """Those of ``ids`` that are live resources of ``type_``."""
        await self.flush()
        if not ids:
            return set()
        query = {"_id": {"$in": list(ids)}, "d": False}
        # Nearly always every target exists: one count answers that without streaming the ids back.
        if await self._db[type_].count_documents(query, session=self._session) == len(ids):
            return set(ids)
        cursor = self._db[type_].find(query, {"_id": 1}, session=self._session)
        return {doc["_id"] async for doc in cursor}

    async def referenced_by(self, target: str, excluding: set[str]) -> str | None:
        """Some live resource (not in ``excluding``) whose references include ``target``."""
        await self.flush()
        # Ask the database which type collections exist: another worker may have made new ones.
        types = [n for n in await self._db.list_collection_names() if n[:1].isupper()]
        for type_ in sorted(types):
            async for doc in self._db[type_].find({"s._refs": target}, {"_id": 1}, session=self._session).limit(5):
                key = f"{type_}/{doc['_id']}"
                if key not in excluding:
                    return key
        return None

    async def lock(self, key: str) -> None:
        """Serialise units that touch ``key``: two transactions updating one document conflict."""
        crypto = field_crypto.active()
        if crypto is not None:  # lock keys may hold an ID number or a phone (fhir_server/mpi)
            key = crypto.lock_key(key)
        await self._db[LOCKS].update_one({"_id": key}, {"$inc": {"n": 1}}, upsert=True, session=self._session)

    def write(self, write: Write) -> None:
        self._pending.append(write)

    async def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        await self._store.ensure_types({w.type for w in pending})
        by_type: dict[str, list[Any]] = {}
        replaces: dict[str, int] = {}
        history = []
        for w in pending:
            raw = _encode(w.type, w.raw)
            doc = {"_id": w.id, "v": w.version, "t": w.last_updated, "d": w.raw is None, "r": raw, "s": w.index}
            ops = by_type.setdefault(w.type, [])
            if w.expected_version is None:
                ops.append(InsertOne(doc))
            else:
                ops.append(ReplaceOne({"_id": w.id, "v": w.expected_version}, doc))
                replaces[w.type] = replaces.get(w.type, 0) + 1
            history.append(
                InsertOne(
                    {
                        "_id": f"{w.type}/{w.id}/{w.version}",
                        "ty": w.type,
                        "id": w.id,
                        "v": w.version,
                        "t": w.last_updated,
                        "d": w.raw is None,
                        "m": w.method,
                        "r": raw,
                    }
                )
            )
        for type_, ops in by_type.items():
            result = await self._db[type_].bulk_write(ops, ordered=True, session=self._session)
            if result.matched_count != replaces.get(type_, 0):
                raise Conflict(f"{type_}: a resource changed while this request was processed")
        await self._db[HISTORY].bulk_write(history, ordered=True, session=self._session)


async def commit(session: AsyncClientSession) -> None:
    """Commit the session's transaction, retrying a commit whose result is unknown."""
    for attempt in range(5):
        try:
            await session.commit_transaction()
            return
        except PyMongoError as e:
            # Retrying a commit is safe (it is idempotent); giving up must not pass for success.
            if e.has_error_label("UnknownTransactionCommitResult") and attempt < 4:
                continue
            raise
