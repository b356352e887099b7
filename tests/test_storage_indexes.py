"""How the data sits in MongoDB, judged by MongoDB itself: searches use an index, and concurrent
writers of one resource type do not make each other's transactions abort."""

from __future__ import annotations

import asyncio
import uuid

import httpx
from pymongo import AsyncMongoClient

SYSTEM = "urn:oid:2.16.156.10011.1.3"


async def _server_status(mongo_uri: str) -> dict:
    client: AsyncMongoClient = AsyncMongoClient(mongo_uri)
    try:
        return await client.admin.command("serverStatus")
    finally:
        await client.close()


async def test_token_search_is_an_index_scan(client: httpx.AsyncClient, app, mongo_uri: str) -> None:
    value = uuid.uuid4().hex
    r = await client.post("/Patient", json={"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": value}]})
    assert r.status_code == 201
    db_name = app.state.server.settings.database
    mongo: AsyncMongoClient = AsyncMongoClient(mongo_uri)
    try:
        explain = await mongo[db_name].command(
            "explain", {"find": "Patient", "filter": {"s.identifier": f"{SYSTEM}|{value}", "d": False}}, verbosity="queryPlanner"
        )
    finally:
        await mongo.close()
    plan = str(explain["queryPlanner"]["winningPlan"])
    assert "IXSCAN" in plan and "COLLSCAN" not in plan, plan


async def test_concurrent_transactions_on_one_type_do_not_abort(client: httpx.AsyncClient, mongo_uri: str) -> None:
    # Warm up: the collection and its indexes exist before the measured writes.
    assert (await client.post("/Observation", json=_observation())).status_code in (400, 201)
    before = (await _server_status(mongo_uri))["transactions"]["totalAborted"]

    async def bundle() -> int:
        patient = f"urn:uuid:{uuid.uuid4()}"
        entries = [{"fullUrl": patient, "resource": {"resourceType": "Patient", "gender": "female"}, "request": {"method": "POST", "url": "Patient"}}]
        entries += [
            {"resource": {**_observation(), "subject": {"reference": patient}}, "request": {"method": "POST", "url": "Observation"}}
            for _ in range(50)
        ]
        resp = await client.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": entries})
        return resp.status_code

    statuses = await asyncio.gather(*(bundle() for _ in range(8)))
    assert statuses == [200] * 8
    after = (await _server_status(mongo_uri))["transactions"]["totalAborted"]
    assert after == before, f"{after - before} transactions aborted by write conflicts"


def _observation() -> dict:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
    }
