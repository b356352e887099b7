"""Conditional create, update, delete and read (http.html#ccreate, #cond-update, #cdelete, #cread)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any, AsyncIterator

import httpx
import pytest

from fhir_server.http.app import create_app
from tests.conftest import make_settings
from tests.helpers import uid as _uid

SYSTEM = "urn:test:conditional"



def _patient(ident: str, family: str = "Sun") -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": ident}], "name": [{"family": family}]}


async def _count(client: httpx.AsyncClient, ident: str) -> int:
    r = await client.get("/Patient", params={"identifier": f"{SYSTEM}|{ident}", "_summary": "count"})
    assert r.status_code == 200
    return r.json()["total"]


async def _ids(client: httpx.AsyncClient, ident: str) -> list[str]:
    r = await client.get("/Patient", params={"identifier": f"{SYSTEM}|{ident}"})
    assert r.status_code == 200
    return sorted(e["resource"]["id"] for e in r.json().get("entry", []))


# -- conditional create ----------------------------------------------------------------------


async def test_conditional_create_no_match_creates(client: httpx.AsyncClient) -> None:
    ident = _uid()
    r = await client.post("/Patient", json=_patient(ident), headers={"If-None-Exist": f"identifier={SYSTEM}|{ident}"})
    assert r.status_code == 201
    assert r.json()["identifier"][0]["value"] == ident
    assert await _count(client, ident) == 1


async def test_conditional_create_one_match_returns_existing(client: httpx.AsyncClient) -> None:
    ident = _uid()
    first = await client.post("/Patient", json=_patient(ident, "First"))
    assert first.status_code == 201
    existing_id = first.json()["id"]
    r = await client.post(
        "/Patient", json=_patient(ident, "Second"), headers={"If-None-Exist": f"identifier={SYSTEM}|{ident}"}
    )
    assert r.status_code == 200
    assert r.json()["id"] == existing_id
    assert r.json()["name"][0]["family"] == "First"
    assert r.headers["Location"].endswith(f"/Patient/{existing_id}/_history/1")
    assert r.headers["ETag"] == 'W/"1"'
    assert await _ids(client, ident) == [existing_id]
    # Nothing was written: the existing resource is still at version 1.
    assert (await client.get(f"/Patient/{existing_id}")).json()["meta"]["versionId"] == "1"


async def test_conditional_create_two_matches_is_412(client: httpx.AsyncClient) -> None:
    ident = _uid()
    for _ in range(2):
        assert (await client.post("/Patient", json=_patient(ident))).status_code == 201
    r = await client.post("/Patient", json=_patient(ident), headers={"If-None-Exist": f"identifier={SYSTEM}|{ident}"})
    assert r.status_code == 412
    assert r.json()["resourceType"] == "OperationOutcome"
    assert await _count(client, ident) == 2


async def test_conditional_create_with_full_url_criteria(client: httpx.AsyncClient) -> None:
    """If-None-Exist may carry the query with a leading '?' or as a bare query string."""
    ident = _uid()
    r1 = await client.post("/Patient", json=_patient(ident), headers={"If-None-Exist": f"?identifier={SYSTEM}|{ident}"})
    assert r1.status_code == 201
    r2 = await client.post("/Patient", json=_patient(ident), headers={"If-None-Exist": f"identifier={SYSTEM}|{ident}"})
    assert r2.status_code == 200
    assert r2.json()["id"] == r1.json()["id"]


async def test_conditional_create_ignores_deleted(client: httpx.AsyncClient) -> None:
    ident = _uid()
    pid = (await client.post("/Patient", json=_patient(ident))).json()["id"]
    assert (await client.delete(f"/Patient/{pid}")).status_code in (200, 204)
    r = await client.post("/Patient", json=_patient(ident), headers={"If-None-Exist": f"identifier={SYSTEM}|{ident}"})
    assert r.status_code == 201
    assert r.json()["id"] != pid


async def test_conditional_create_bad_criteria_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/Patient", json=_patient(_uid()), headers={"If-None-Exist": "no-such-param=1"})
    assert r.status_code == 400
    assert r.json()["resourceType"] == "OperationOutcome"


# -- conditional update ----------------------------------------------------------------------


async def test_conditional_update_no_match_creates(client: httpx.AsyncClient) -> None:
    ident = _uid()
    r = await client.put(f"/Patient?identifier={SYSTEM}|{ident}", json=_patient(ident, "New"))
    assert r.status_code == 201
    assert r.json()["meta"]["versionId"] == "1"
    ids = await _ids(client, ident)
    assert ids == [r.json()["id"]]


async def test_conditional_update_one_match_updates_it(client: httpx.AsyncClient) -> None:
    ident = _uid()
    pid = (await client.post("/Patient", json=_patient(ident, "Before"))).json()["id"]
    r = await client.put(f"/Patient?identifier={SYSTEM}|{ident}", json=_patient(ident, "After"))
    assert r.status_code == 200
    assert r.json()["id"] == pid
    assert r.json()["meta"]["versionId"] == "2"
    read = (await client.get(f"/Patient/{pid}")).json()
    assert read["name"][0]["family"] == "After"
    assert await _ids(client, ident) == [pid]


async def test_conditional_update_one_match_with_same_body_id(client: httpx.AsyncClient) -> None:
    ident = _uid()
    pid = (await client.post("/Patient", json=_patient(ident))).json()["id"]
    r = await client.put(f"/Patient?identifier={SYSTEM}|{ident}", json={**_patient(ident, "X"), "id": pid})
    assert r.status_code == 200
    assert r.json()["id"] == pid


async def test_conditional_update_one_match_with_other_body_id_is_400(client: httpx.AsyncClient) -> None:
    ident = _uid()
    pid = (await client.post("/Patient", json=_patient(ident))).json()["id"]
    r = await client.put(f"/Patient?identifier={SYSTEM}|{ident}", json={**_patient(ident, "X"), "id": "other-" + _uid()[:10]})
    assert r.status_code == 400
    assert r.json()["resourceType"] == "OperationOutcome"
    assert (await client.get(f"/Patient/{pid}")).json()["meta"]["versionId"] == "1"


async def test_conditional_update_two_matches_is_412(client: httpx.AsyncClient) -> None:
    ident = _uid()
    ids = sorted([(await client.post("/Patient", json=_patient(ident, "Orig"))).json()["id"] for _ in range(2)])
    r = await client.put(f"/Patient?identifier={SYSTEM}|{ident}", json=_patient(ident, "Changed"))
    assert r.status_code == 412
    assert r.json()["resourceType"] == "OperationOutcome"
    for pid in ids:
        read = (await client.get(f"/Patient/{pid}")).json()
        assert read["name"][0]["family"] == "Orig" and read["meta"]["versionId"] == "1"
    assert await _ids(client, ident) == ids


async def test_conditional_update_no_match_with_client_id(client: httpx.AsyncClient) -> None:
    ident = _uid()
    pid = "cu-" + _uid()[:20]
    r = await client.put(f"/Patient?identifier={SYSTEM}|{ident}", json={**_patient(ident), "id": pid})
    assert r.status_code == 201
    assert r.json()["id"] == pid
    assert (await client.get(f"/Patient/{pid}")).status_code == 200


# -- conditional delete ----------------------------------------------------------------------


async def test_conditional_delete_multiple_mode(client: httpx.AsyncClient) -> None:
    ident = _uid()
    ids = [(await client.post("/Patient", json=_patient(ident))).json()["id"] for _ in range(3)]
    r = await client.delete(f"/Patient?identifier={SYSTEM}|{ident}")
    assert r.status_code in (200, 204)
    assert await _count(client, ident) == 0
    for pid in ids:
        assert (await client.get(f"/Patient/{pid}")).status_code == 410


async def test_conditional_delete_one_match(client: httpx.AsyncClient) -> None:
    ident, other = _uid(), _uid()
    pid = (await client.post("/Patient", json=_patient(ident))).json()["id"]
    keep = (await client.post("/Patient", json=_patient(other))).json()["id"]
    r = await client.delete(f"/Patient?identifier={SYSTEM}|{ident}")
    assert r.status_code in (200, 204)
    assert (await client.get(f"/Patient/{pid}")).status_code == 410
    assert (await client.get(f"/Patient/{keep}")).status_code == 200


async def test_conditional_delete_no_match(client: httpx.AsyncClient) -> None:
    r = await client.delete(f"/Patient?identifier={SYSTEM}|{_uid()}")
    assert r.status_code in (200, 204, 404)


async def test_conditional_delete_without_criteria_is_refused(client: httpx.AsyncClient) -> None:
    ident = _uid()
    pid = (await client.post("/Patient", json=_patient(ident))).json()["id"]
    r = await client.delete("/Patient")
    assert r.status_code in (400, 405, 412)
    assert r.json()["resourceType"] == "OperationOutcome"
    assert (await client.get(f"/Patient/{pid}")).status_code == 200


@pytest.fixture(scope="module")
async def single_client(mongo_uri: str) -> AsyncIterator[httpx.AsyncClient]:
    application = create_app(make_settings(mongo_uri, conditional_delete="single"))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver/fhir", timeout=60) as c:
            yield c


async def test_conditional_delete_single_mode(single_client: httpx.AsyncClient) -> None:
    client = single_client
    cs = (await client.get("/metadata")).json()
    patient = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Patient")
    assert patient["conditionalDelete"] == "single"

    ident = _uid()
    ids = [(await client.post("/Patient", json=_patient(ident))).json()["id"] for _ in range(2)]
    r = await client.delete(f"/Patient?identifier={SYSTEM}|{ident}")
    assert r.status_code == 412
    assert r.json()["resourceType"] == "OperationOutcome"
    for pid in ids:
        assert (await client.get(f"/Patient/{pid}")).status_code == 200

    lone = _uid()
    pid = (await client.post("/Patient", json=_patient(lone))).json()["id"]
    r = await client.delete(f"/Patient?identifier={SYSTEM}|{lone}")
    assert r.status_code in (200, 204)
    assert (await client.get(f"/Patient/{pid}")).status_code == 410


# -- conditional read ------------------------------------------------------------------------


async def test_if_none_match(client: httpx.AsyncClient) -> None:
    pid = (await client.post("/Patient", json=_patient(_uid()))).json()["id"]
    r = await client.get(f"/Patient/{pid}", headers={"If-None-Match": 'W/"1"'})
    assert r.status_code == 304
    assert r.content == b""
    assert (await client.get(f"/Patient/{pid}", headers={"If-None-Match": 'W/"2"'})).status_code == 200
    assert (await client.put(f"/Patient/{pid}", json={**_patient(_uid()), "id": pid})).status_code == 200
    changed = await client.get(f"/Patient/{pid}", headers={"If-None-Match": 'W/"1"'})
    assert changed.status_code == 200
    assert changed.json()["meta"]["versionId"] == "2"


async def test_if_modified_since(client: httpx.AsyncClient) -> None:
    created = await client.post("/Patient", json=_patient(_uid()))
    pid = created.json()["id"]
    modified = parsedate_to_datetime(created.headers["Last-Modified"])
    later = format_datetime(modified + timedelta(seconds=5), usegmt=True)
    same = created.headers["Last-Modified"]
    earlier = format_datetime(datetime(2000, 1, 1, tzinfo=timezone.utc), usegmt=True)
    assert (await client.get(f"/Patient/{pid}", headers={"If-Modified-Since": later})).status_code == 304
    assert (await client.get(f"/Patient/{pid}", headers={"If-Modified-Since": same})).status_code == 304
    r = await client.get(f"/Patient/{pid}", headers={"If-Modified-Since": earlier})
    assert r.status_code == 200
    assert r.json()["id"] == pid


# -- conditional patch -----------------------------------------------------------------------

JSON_PATCH = {"Content-Type": "application/json-patch+json"}


async def test_conditional_patch(client: httpx.AsyncClient) -> None:
    ident = _uid()
    ops = [{"op": "add", "path": "/active", "value": True}]
    none = await client.patch(f"/Patient?identifier={SYSTEM}|{ident}", json=ops, headers=JSON_PATCH)
    assert none.status_code in (404, 412)
    assert none.json()["resourceType"] == "OperationOutcome"
    assert await _count(client, ident) == 0

    pid = (await client.post("/Patient", json=_patient(ident))).json()["id"]
    one = await client.patch(f"/Patient?identifier={SYSTEM}|{ident}", json=ops, headers=JSON_PATCH)
    assert one.status_code == 200
    assert one.json()["id"] == pid and one.json()["active"] is True
    assert one.json()["meta"]["versionId"] == "2"

    other = (await client.post("/Patient", json=_patient(ident))).json()["id"]
    two = await client.patch(
        f"/Patient?identifier={SYSTEM}|{ident}", json=[{"op": "add", "path": "/active", "value": False}], headers=JSON_PATCH
    )
    assert two.status_code == 412
    assert (await client.get(f"/Patient/{pid}")).json()["active"] is True
    assert "active" not in (await client.get(f"/Patient/{other}")).json()
