"""Records that could not be turned into FHIR, with a reason in Chinese and English.

One document per (source, record id, content hash): the same bad record sent again is counted
again (``seen``) but stored once. Each keeps the raw bytes and what the replay needs (the parent
record's key), so ``fhir-server deadletter replay`` can retry it after the mapping or the upstream
data was fixed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import orjson

from fhir_server.connectors._db import DEAD_LETTERS, database
from fhir_server.interactions.context import Server
from fhir_server.storage import field_crypto


@dataclass
class Rejection:
    """Why one source record was refused."""

    kind: str  # child | inoculation | aefi | page ...
    record_id: str
    code: str  # schema | unknown-code | impossible-date | id-check-digit | parent-rejected | not-well-formed | server-refused
    reason_zh: str
    reason_en: str
    raw: bytes = b""
    # e.g. the parent child element for a replay; a value may be a zero-argument callable, made
    # only when the letter is filed (parsers hand every record a context; few become letters).
    context: dict[str, Any] = field(default_factory=dict)

    def stored_context(self) -> dict[str, Any]:
        return {k: v() if callable(v) else v for k, v in self.context.items()}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()


_indexed: set[tuple[int, str]] = set()


async def _ensure_indexes(collection: Any) -> None:
    """What listing (by status and source, oldest first) and a run's report look up by; created
    once per process and database (create_index on an existing index is a cheap no-op, but a round trip)."""
    key = (id(collection.database.client), collection.database.name)
    if key not in _indexed:
        await collection.create_index([("status", 1), ("source", 1), ("first_seen", 1)])
        await collection.create_index([("run_id", 1)])
        _indexed.add(key)


async def put(server: Server, source: str, rejections: list[Rejection], run_id: str) -> None:
    if not rejections:
        return
    from pymongo import UpdateOne

    now = datetime.now(timezone.utc)
    ops = []
    seal = _sealer()
    for r in rejections:
        key = f"{source}|{r.record_id}|{r.sha256}"
        ops.append(
            UpdateOne(
                {"_id": key},
                {
                    "$set": {
                        "source": source,
                        "kind": r.kind,
                        "record_id": r.record_id,
                        "code": r.code,
                        # The record, its context and the reasons (which may quote a value) can
                        # hold ID and phone numbers: sealed with the field key, like stored resources.
                        "reason_zh": seal(r.reason_zh.encode()).decode(),
                        "reason_en": seal(r.reason_en.encode()).decode(),
                        "raw": seal(r.raw),
                        "sha256": r.sha256,
                        "context": seal(orjson.dumps(r.stored_context())),
                        "last_seen": now,
                        "run_id": run_id,
                        "status": "open",
                    },
                    "$setOnInsert": {"first_seen": now},
                    "$inc": {"seen": 1},
                },
                upsert=True,
            )
        )
    collection = database(server)[DEAD_LETTERS]
    await _ensure_indexes(collection)
    await collection.bulk_write(ops, ordered=False)


def _sealer() -> Callable[[bytes], bytes]:
    crypto = field_crypto.active()
    return crypto.seal if crypto is not None else (lambda b: b)


def _opened(doc: dict[str, Any]) -> dict[str, Any]:
    """A stored letter with its sealed fields readable again (letters filed before encryption was
    turned on are read as they are)."""
    out = dict(doc)
    for name in ("reason_zh", "reason_en"):
        if isinstance(out.get(name), str):
            out[name] = field_crypto.decode(out[name].encode()).decode()  # type: ignore[union-attr]
    if isinstance(out.get("raw"), bytes):
        out["raw"] = field_crypto.decode(out["raw"])
    context = out.get("context")
    if isinstance(context, bytes):
        out["context"] = orjson.loads(field_crypto.decode(context))  # type: ignore[arg-type]
    return out


async def list_open(server: Server, source: str | None = None, *, status: str = "open", limit: int = 1000) -> list[dict[str, Any]]:
    query: dict[str, Any] = {"status": status} if status != "all" else {}
    if source:
        query["source"] = source
    cursor = database(server)[DEAD_LETTERS].find(query).sort([("first_seen", 1), ("_id", 1)]).limit(limit)
    return [_opened(d) async for d in cursor]


async def count(server: Server, source: str | None = None, status: str = "open") -> int:
    query: dict[str, Any] = {"status": status} if status != "all" else {}
    if source:
        query["source"] = source
    return await database(server)[DEAD_LETTERS].count_documents(query)


async def resolve(server: Server, keys: list[str], run_id: str) -> None:
    """Mark dead letters that a replay turned into FHIR."""
    if keys:
        now = datetime.now(timezone.utc)
        await database(server)[DEAD_LETTERS].update_many(
            {"_id": {"$in": keys}}, {"$set": {"status": "resolved", "resolved": now, "resolved_by": run_id}}
        )


async def of_run(server: Server, run_id: str, limit: int = 1000) -> list[dict[str, Any]]:
    """The letters a run (a sync, a push, a replay) filed or saw again."""
    cursor = database(server)[DEAD_LETTERS].find({"run_id": run_id}).sort([("first_seen", 1), ("_id", 1)]).limit(limit)
    return [_opened(d) async for d in cursor]
