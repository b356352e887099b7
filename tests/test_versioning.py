"""Version ids, ETag / Last-Modified / Location headers, If-Match (http.html#versioning,
#concurrency) and Prefer: return (http.html#ops)."""

from __future__ import annotations

from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from tests.helpers import uid as _uid

SYSTEM = "urn:test:versioning"
JSON_PATCH = {"Content-Type": "application/json-patch+json"}



def _patient(family: str = "Zhao") -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": _uid()}], "name": [{"family": family}]}


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def _create(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.post("/Patient", json=_patient())
    assert r.status_code == 201
    return r.json()


async def test_headers_agree_with_meta(client: httpx.AsyncClient) -> None:
    r = await client.post("/Patient", json=_patient())
    body = r.json()
    last_updated = _instant(body["meta"]["lastUpdated"])
    assert last_updated.tzinfo is not None
    assert abs((datetime.now(timezone.utc) - last_updated).total_seconds()) < 120
    # Last-Modified is an HTTP date with one-second resolution.
    assert parsedate_to_datetime(r.headers["Last-Modified"]) == last_updated.replace(microsecond=0)
    assert r.headers["ETag"] == f'W/"{body["meta"]["versionId"]}"'
    assert r.headers["Location"].endswith(f"/Patient/{body['id']}/_history/{body['meta']['versionId']}")
    read = await client.get(f"/Patient/{body['id']}")
    assert read.headers["ETag"] == 'W/"1"'
    assert read.headers["Last-Modified"] == r.headers["Last-Modified"]
    assert read.json()["meta"] == body["meta"]


async def test_versions_and_last_updated_increase(client: httpx.AsyncClient) -> None:
    created = await _create(client)
    pid = created["id"]
    times = [_instant(created["meta"]["lastUpdated"])]
    for n in range(2, 6):
        r = await client.put(f"/Patient/{pid}", json={**_patient(f"F{n}"), "id": pid})
        assert r.status_code == 200
        assert r.json()["meta"]["versionId"] == str(n)
        assert r.headers["ETag"] == f'W/"{n}"'
        times.append(_instant(r.json()["meta"]["lastUpdated"]))
    assert times == sorted(times)
    assert len(set(times)) == len(times)


async def test_if_match_on_update(client: httpx.AsyncClient) -> None:
    pid = (await _create(client))["id"]
    ok = await client.put(f"/Patient/{pid}", json={**_patient("B"), "id": pid}, headers={"If-Match": 'W/"1"'})
    assert ok.status_code == 200
    assert ok.json()["meta"]["versionId"] == "2"
    stale = await client.put(f"/Patient/{pid}", json={**_patient("C"), "id": pid}, headers={"If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert stale.json()["resourceType"] == "OperationOutcome"
    read = (await client.get(f"/Patient/{pid}")).json()
    assert read["meta"]["versionId"] == "2" and read["name"][0]["family"] == "B"


async def test_if_match_on_update_of_missing_resource(client: httpx.AsyncClient) -> None:
    pid = "im-" + _uid()
    r = await client.put(f"/Patient/{pid}", json={**_patient(), "id": pid}, headers={"If-Match": 'W/"1"'})
    assert r.status_code in (404, 412)
    assert (await client.get(f"/Patient/{pid}")).status_code == 404


async def test_if_match_on_patch(client: httpx.AsyncClient) -> None:
    pid = (await _create(client))["id"]
    ops = [{"op": "add", "path": "/active", "value": True}]
    ok = await client.patch(f"/Patient/{pid}", json=ops, headers={**JSON_PATCH, "If-Match": 'W/"1"'})
    assert ok.status_code == 200
    stale = await client.patch(
        f"/Patient/{pid}", json=[{"op": "add", "path": "/active", "value": False}], headers={**JSON_PATCH, "If-Match": 'W/"1"'}
    )
    assert stale.status_code == 412
    assert stale.json()["resourceType"] == "OperationOutcome"
    read = (await client.get(f"/Patient/{pid}")).json()
    assert read["active"] is True and read["meta"]["versionId"] == "2"


async def test_if_match_on_delete(client: httpx.AsyncClient) -> None:
    pid = (await _create(client))["id"]
    assert (await client.put(f"/Patient/{pid}", json={**_patient(), "id": pid})).status_code == 200
    stale = await client.delete(f"/Patient/{pid}", headers={"If-Match": 'W/"1"'})
    assert stale.status_code == 412
    assert stale.json()["resourceType"] == "OperationOutcome"
    assert (await client.get(f"/Patient/{pid}")).status_code == 200
    ok = await client.delete(f"/Patient/{pid}", headers={"If-Match": 'W/"2"'})
    assert ok.status_code in (200, 204)
    assert (await client.get(f"/Patient/{pid}")).status_code == 410


async def test_if_match_strong_form_accepted(client: httpx.AsyncClient) -> None:
    pid = (await _create(client))["id"]
    r = await client.put(f"/Patient/{pid}", json={**_patient(), "id": pid}, headers={"If-Match": '"1"'})
    assert r.status_code == 200


async def test_malformed_if_match_is_400(client: httpx.AsyncClient) -> None:
    pid = (await _create(client))["id"]
    r = await client.put(f"/Patient/{pid}", json={**_patient(), "id": pid}, headers={"If-Match": 'W/"abc"'})
    assert r.status_code in (400, 412)
    assert r.json()["resourceType"] == "OperationOutcome"
    assert (await client.get(f"/Patient/{pid}")).json()["meta"]["versionId"] == "1"


# -- Prefer: return --------------------------------------------------------------------------


async def test_prefer_minimal(client: httpx.AsyncClient) -> None:
    r = await client.post("/Patient", json=_patient(), headers={"Prefer": "return=minimal"})
    assert r.status_code == 201
    assert r.content == b""
    location = r.headers["Location"]
    assert r.headers["ETag"] == 'W/"1"'
    pid = location.split("/Patient/")[1].split("/")[0]
    assert (await client.get(f"/Patient/{pid}")).status_code == 200
    u = await client.put(f"/Patient/{pid}", json={**_patient(), "id": pid}, headers={"Prefer": "return=minimal"})
    assert u.status_code == 200 and u.content == b""
    assert u.headers["ETag"] == 'W/"2"'
    p = await client.patch(
        f"/Patient/{pid}", json=[{"op": "add", "path": "/active", "value": True}], headers={**JSON_PATCH, "Prefer": "return=minimal"}
    )
    assert p.status_code == 200 and p.content == b""


async def test_prefer_representation(client: httpx.AsyncClient) -> None:
    sent = _patient("Rep")
    r = await client.post("/Patient", json=sent, headers={"Prefer": "return=representation"})
    assert r.status_code == 201
    body = r.json()
    assert body["resourceType"] == "Patient"
    assert body["name"] == sent["name"]
    assert body["meta"]["versionId"] == "1"


async def test_prefer_operation_outcome(client: httpx.AsyncClient) -> None:
    r = await client.post("/Patient", json=_patient(), headers={"Prefer": "return=OperationOutcome"})
    assert r.status_code == 201
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"] and body["issue"][0]["severity"] in ("information", "warning")
    pid = r.headers["Location"].split("/Patient/")[1].split("/")[0]
    u = await client.put(f"/Patient/{pid}", json={**_patient(), "id": pid}, headers={"Prefer": "return=OperationOutcome"})
    assert u.status_code == 200
    assert u.json()["resourceType"] == "OperationOutcome"
