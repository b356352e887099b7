"""The ceiling: the Synthea resources written by raw PyMongo ``insert_many`` (no FHIR server),
with the durability the server asks for (majority, journaled)."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import orjson
from pymongo import MongoClient
from pymongo.write_concern import WriteConcern

_BATCH = 1000


def _resources(path: Path) -> dict[str, list[dict[str, Any]]]:
    bundle = orjson.loads(path.read_bytes())
    by_type: dict[str, list[dict[str, Any]]] = {}
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource")
        if isinstance(resource, dict):
            by_type.setdefault(resource["resourceType"], []).append(resource)
    return by_type


def raw_insert(uri: str, database: str, files: list[Path]) -> dict[str, Any]:
    """Insert every resource of ``files`` (one collection per type); time only the inserts."""
    client: MongoClient = MongoClient(uri)
    try:
        client.drop_database(database)
        db = client.get_database(database, write_concern=WriteConcern("majority", j=True))
        inserted, seconds = 0, 0.0
        for path in files:
            for type_, docs in _resources(path).items():
                coll = db[type_]
                for start in range(0, len(docs), _BATCH):
                    chunk = docs[start : start + _BATCH]
                    t0 = time.perf_counter()
                    inserted += len(coll.insert_many(chunk, ordered=False).inserted_ids)
                    seconds += time.perf_counter() - t0
        return {"resources": inserted, "seconds": round(seconds, 3), "rps": round(inserted / seconds, 1) if seconds else 0.0}
    finally:
        client.close()


def sample_keys(uri: str, database: str, limit: int, *, live_only: bool = False) -> list[tuple[str, Any]]:
    """Up to ``limit`` random (collection, _id) pairs from the type collections of ``database``."""
    client: MongoClient = MongoClient(uri)
    try:
        db = client[database]
        keys: list[tuple[str, Any]] = []
        query = {"d": False} if live_only else {}
        for name in db.list_collection_names():
            if name[:1].isupper():
                keys += [(name, doc["_id"]) for doc in db[name].find(query, {"_id": 1})]
        random.shuffle(keys)
        return keys[:limit]
    finally:
        client.close()


def mongo_version(uri: str) -> str:
    client: MongoClient = MongoClient(uri)
    try:
        return str(client.admin.command("buildInfo")["version"])
    finally:
        client.close()


def count_resources(uri: str, database: str) -> int:
    """Live resources stored by the server in ``database``."""
    client: MongoClient = MongoClient(uri)
    try:
        db = client[database]
        return sum(db[n].count_documents({"d": False}) for n in db.list_collection_names() if n[:1].isupper())
    finally:
        client.close()
