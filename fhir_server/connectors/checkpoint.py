"""Where a source's sync stopped: the upstream watermark after the last fully committed page.

A page's resources, ledger entries and dead letters are written before its checkpoint moves, so a
run that stops anywhere resumes at the first page not yet committed; re-reading a page that was
committed but not checkpointed is harmless (idempotent by content hash).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fhir_server.connectors._db import CHECKPOINTS, database
from fhir_server.interactions.context import Server


@dataclass
class Checkpoint:
    source: str
    since: str = "0"  # the upstream watermark (opaque to the runner)
    pages: int = 0  # pages committed since the checkpoint was reset
    status: str = "new"  # new | running | complete | failed
    error: str | None = None
    updated: datetime | None = None


async def load(server: Server, source: str) -> Checkpoint:
    doc = await database(server)[CHECKPOINTS].find_one({"_id": source})
    if not doc:
        return Checkpoint(source)
    return Checkpoint(source, doc.get("since", "0"), doc.get("pages", 0), doc.get("status", "new"), doc.get("error"), doc.get("updated"))


async def save(server: Server, source: str, **fields: Any) -> None:
    fields["updated"] = datetime.now(timezone.utc)
    await database(server)[CHECKPOINTS].update_one({"_id": source}, {"$set": fields}, upsert=True)


async def reset(server: Server, source: str) -> None:
    """Forget the watermark: the next run reads the upstream from its beginning."""
    await database(server)[CHECKPOINTS].delete_one({"_id": source})
