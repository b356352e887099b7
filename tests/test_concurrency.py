"""Concurrent writers (http.html#concurrency): conditional creates that race, updates that race
with and without If-Match, and what a client sees when a write cannot win."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, AsyncIterator

import httpx
import pytest

from fhir_server.http.app import create_app
from fhir_server.storage import mongo as mongo_storage
from tests.conftest import make_settings
from tests.helpers import uid as _uid

SYSTEM = "urn:test:concurrency"



def _patient(ident: str, family: str = "Zhou") -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": ident}], "name": [{"family": family}]}


async def _total(client: httpx.AsyncClient, ident: str) -> int:
    r = await client.get("/Patient", params={"identifier": f"{SYSTEM}|{ident}", "_summary": "count"})
    assert r.status_code == 200
    return r.json()["total"]


async def _history_versions(client: httpx.AsyncClient, pid: str) -> list[int]:
    versions: list[int] = []
    url: str | None = f"/Patient/{pid}/_history?_count=7"
    while url:
        bundle = (await client.get(url)).json()
        versions += [int(e["response"]["etag"][3:-1]) for e in bundle.get("entry", [])]
        url = next((link["url"] for link in bundle["link"] if link["relation"] == "next"), None)
    return versions


async def test_fifty_concurrent_conditional_creates(client: httpx.AsyncClient) -> None:
    ident = _uid()
    criteria = f"identifier={SYSTEM}|{ident}"
    responses = await asyncio.gather(
        *(client.post("/Patient", json=_patient(ident, f"N{i}"), headers={"If-None-Exist": criteria}) for i in range(50))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 49 + [201], statuses
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    assert await _total(client, ident) == 1
    (pid,) = ids
    assert (await client.get(f"/Patient/{pid}")).json()["meta"]["versionId"] == "1"


async def test_concurrent_conditional_creates_in_transactions(client: httpx.AsyncClient) -> None:
    ident = _uid()

    def bundle() -> dict[str, Any]:
        return {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                    "resource": _patient(ident),
                    "request": {"method": "POST", "url": "Patient", "ifNoneExist": f"identifier={SYSTEM}|{ident}"},
                }
            ],
        }

    responses = await asyncio.gather(*(client.post("", json=bundle()) for _ in range(20)))
    assert all(r.status_code == 200 for r in responses)
    statuses = sorted(r.json()["entry"][0]["response"]["status"][:3] for r in responses)
    assert statuses == ["200"] * 19 + ["201"]
    assert await _total(client, ident) == 1


async def test_concurrent_conditional_updates_create_once(client: httpx.AsyncClient) -> None:
    ident = _uid()
    responses = await asyncio.gather(
        *(client.put(f"/Patient?identifier={SYSTEM}|{ident}", json=_patient(ident, f"U{i}")) for i in range(20))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 19 + [201], statuses
    assert await _total(client, ident) == 1
    pid = responses[0].json()["id"]
    assert sorted(await _history_versions(client, pid)) == list(range(1, 21))


async def test_twenty_concurrent_updates_without_if_match(client: httpx.AsyncClient) -> None:
    pid = (await client.post("/Patient", json=_patient(_uid()))).json()["id"]
    responses = await asyncio.gather(
        *(client.put(f"/Patient/{pid}", json={**_patient(_uid(), f"W{i}"), "id": pid}) for i in range(20))
    )
    assert [r.status_code for r in responses] == [200] * 20
    returned = sorted(int(r.json()["meta"]["versionId"]) for r in responses)
    assert returned == list(range(2, 22))
    versions = await _history_versions(client, pid)
    assert versions == list(range(21, 0, -1))  # newest first, gapless, each once
    current = (await client.get(f"/Patient/{pid}")).json()
    assert current["meta"]["versionId"] == "21"
    # The current version is the one whose response said version 21.
    last = next(r.json() for r in responses if r.json()["meta"]["versionId"] == "21")
    assert current["name"] == last["name"]


async def test_two_updates_with_the_same_if_match(client: httpx.AsyncClient) -> None:
    pid = (await client.post("/Patient", json=_patient(_uid()))).json()["id"]
    a, b = await asyncio.gather(
        client.put(f"/Patient/{pid}", json={**_patient(_uid(), "A"), "id": pid}, headers={"If-Match": 'W/"1"'}),
        client.put(f"/Patient/{pid}", json={**_patient(_uid(), "B"), "id": pid}, headers={"If-Match": 'W/"1"'}),
    )
    assert sorted([a.status_code, b.status_code]) == [200, 412]
    winner, loser = (a, b) if a.status_code == 200 else (b, a)
    assert loser.json()["resourceType"] == "OperationOutcome"
    current = (await client.get(f"/Patient/{pid}")).json()
    assert current["meta"]["versionId"] == "2"
    assert current["name"] == winner.json()["name"]
    assert await _history_versions(client, pid) == [2, 1]


async def test_many_patches_with_the_same_if_match(client: httpx.AsyncClient) -> None:
    pid = (await client.post("/Patient", json=_patient(_uid()))).json()["id"]
    responses = await asyncio.gather(
        *(
            client.patch(
                f"/Patient/{pid}",
                json=[{"op": "replace", "path": "/name/0/family", "value": f"P{i}"}],
                headers={"Content-Type": "application/json-patch+json", "If-Match": 'W/"1"'},
            )
            for i in range(10)
        )
    )
    assert sorted(r.status_code for r in responses) == [200] + [412] * 9
    assert await _history_versions(client, pid) == [2, 1]


async def test_concurrent_creates_get_distinct_ids(client: httpx.AsyncClient) -> None:
    idents = [_uid() for _ in range(30)]
    responses = await asyncio.gather(*(client.post("/Patient", json=_patient(i)) for i in idents))
    assert all(r.status_code == 201 for r in responses)
    assert len({r.json()["id"] for r in responses}) == 30


async def test_concurrent_delete_and_update(client: httpx.AsyncClient) -> None:
    """A delete racing updates: whatever the interleaving, history is gapless and the end state
    agrees with the last history entry."""
    pid = (await client.post("/Patient", json=_patient(_uid()))).json()["id"]
    ops = [client.put(f"/Patient/{pid}", json={**_patient(_uid()), "id": pid}) for _ in range(5)]
    ops.insert(2, client.delete(f"/Patient/{pid}"))
    responses = await asyncio.gather(*ops)
    assert all(r.status_code in (200, 201, 204) for r in responses), [r.status_code for r in responses]
    versions = await _history_versions(client, pid)
    assert versions == list(range(len(versions), 0, -1))
    newest = (await client.get(f"/Patient/{pid}/_history", params={"_count": "1"})).json()["entry"][0]
    read = await client.get(f"/Patient/{pid}")
    if newest["request"]["method"] == "DELETE":
        assert read.status_code == 410
    else:
        assert read.status_code == 200 and read.json()["meta"]["versionId"] == str(versions[0])


# -- a write that keeps losing ---------------------------------------------------------------


@pytest.fixture
async def impatient(mongo_uri: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    """An app whose store gives up after the first write conflict."""
    monkeypatch.setattr(mongo_storage, "_MAX_ATTEMPTS", 1)
    application = create_app(make_settings(mongo_uri))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver/fhir", timeout=60) as c:
            yield c


async def test_conflict_after_retries_is_409(impatient: httpx.AsyncClient) -> None:
    client = impatient
    pid = (await client.post("/Patient", json=_patient(_uid()))).json()["id"]
    responses = await asyncio.gather(
        *(client.put(f"/Patient/{pid}", json={**_patient(_uid()), "id": pid}) for _ in range(20))
    )
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 409}, statuses
    assert 409 in statuses, "no write conflicted; the test proves nothing"
    for r in responses:
        if r.status_code == 409:
            body = r.json()
            assert body["resourceType"] == "OperationOutcome"
            assert body["issue"][0]["code"] in ("conflict", "transient", "lock-error")
            assert "Traceback" not in r.text
    # Every 200 made exactly one version.
    versions = await _history_versions(client, pid)
    assert versions == list(range(1 + statuses.count(200), 0, -1))


async def test_conflict_in_a_batch_entry_is_that_entrys_409(impatient: httpx.AsyncClient) -> None:
    client = impatient
    pid = (await client.post("/Patient", json=_patient(_uid()))).json()["id"]
    entry = {"resource": {**_patient(_uid()), "id": pid}, "request": {"method": "PUT", "url": f"Patient/{pid}"}}
    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [entry] * 12}
    r = await client.post("", json=bundle)
    assert r.status_code == 200, r.text
    statuses = [e["response"]["status"][:3] for e in r.json()["entry"]]
    assert set(statuses) <= {"200", "409"}, statuses
    for e in r.json()["entry"]:
        if e["response"]["status"].startswith("409"):
            assert e["response"]["outcome"]["resourceType"] == "OperationOutcome"


async def test_concurrent_deletes_make_one_deletion(client: httpx.AsyncClient) -> None:
    pid = (await client.post("/Patient", json=_patient(_uid()))).json()["id"]
    responses = await asyncio.gather(*(client.delete(f"/Patient/{pid}") for _ in range(10)))
    assert all(r.status_code in (200, 204) for r in responses), [r.status_code for r in responses]
    history = (await client.get(f"/Patient/{pid}/_history")).json()
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "POST"]
    assert (await client.get(f"/Patient/{pid}")).status_code == 410


async def test_concurrent_update_as_create_with_one_client_id(client: httpx.AsyncClient) -> None:
    pid = "race-" + _uid()[:20]
    responses = await asyncio.gather(
        *(client.put(f"/Patient/{pid}", json={**_patient(_uid(), f"C{i}"), "id": pid}) for i in range(10))
    )
    assert sorted(r.status_code for r in responses) == [200] * 9 + [201]
    assert sorted(int(r.json()["meta"]["versionId"]) for r in responses) == list(range(1, 11))
    assert await _history_versions(client, pid) == list(range(10, 0, -1))
