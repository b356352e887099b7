"""No search on an indexed parameter scans a whole collection: MongoDB's own query plans say so.

For every resource type and every parameter the server indexes, a search with a plain value of the
parameter's type is compiled and explained against a collection with the server's indexes; the
winning plan must start from an index scan (IXSCAN), never a collection scan (COLLSCAN).
"""

from __future__ import annotations

from typing import Any

import pytest
from pymongo import AsyncMongoClient

from fhir_server.search.extract import indexed_parameters
from fhir_server.search.indexes import search_indexes
from fhir_server.search.parameters import params_for
from fhir_server.search.query import compile_search
from fhir_server.storage.mongo import MongoStore
from tests.helpers import uid

_SAMPLE = {
    "token": "http://loinc.org|8302-2",
    "string": "zhang",
    "reference": "Patient/p1",
    "date": "ge2020-01-01",
    "number": "5",
    "quantity": "5.4|http://unitsofmeasure.org|mg",
    "uri": "http://example.org/fhir/ValueSet/x",
}
_TYPES = ["Patient", "Observation", "Encounter", "Condition", "CarePlan", "Composition", "Immunization", "MedicationRequest", "Procedure", "Organization"]


def _sample(type_: str, code: str) -> str | None:
    sp = params_for(type_)[code]
    if sp.type != "composite":
        return _SAMPLE.get(sp.type)
    by_url = {p.url: p for p in params_for(type_).values()}
    parts = [_SAMPLE.get(by_url[d].type) if d in by_url else None for d, _ in sp.components]
    return None if None in parts else "$".join(p for p in parts if p is not None)


def _stages(plan: dict[str, Any]) -> list[str]:
    out = [plan.get("stage", "")]
    for key in ("inputStage",):
        if key in plan:
            out += _stages(plan[key])
    for child in plan.get("inputStages", ()):
        out += _stages(child)
    return out


@pytest.mark.parametrize("type_", _TYPES)
async def test_every_indexed_parameter_is_answered_from_an_index(mongo_uri: str, type_: str) -> None:
    client: AsyncMongoClient = AsyncMongoClient(mongo_uri, tz_aware=True)
    try:
        store = MongoStore(client, f"explain_{uid()}", indexes_for=search_indexes)
        await store.open()
        await store.ensure_types({type_})
        db = client[store._db.name]  # the test looks at MongoDB's plan itself
        await db[type_].insert_one({"_id": "x", "v": 1, "t": None, "d": False, "s": {}})
        scanned = []
        checked = 0
        for code, _ in indexed_parameters(type_):
            value = _sample(type_, code)
            if value is None:
                continue
            compiled = await compile_search(type_, [(code, value)], lookup=store, default_count=10, max_count=10)
            plan = (await db[type_].find(compiled.filter).explain())["queryPlanner"]["winningPlan"]
            stages = _stages(plan)
            checked += 1
            if "COLLSCAN" in stages or "IXSCAN" not in stages:
                scanned.append((code, stages))
        assert checked >= 10
        assert scanned == []
    finally:
        await client.close()
