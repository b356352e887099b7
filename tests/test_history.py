"""history at instance, type and system level (http.html#history): order, deletions, _since, _at,
_count and the next link walked to the end.

Type and system history are checked on a database of their own, so the expected sets of versions
are exactly what these tests wrote.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, AsyncIterator

import httpx
import pytest

from fhir_server.http.app import create_app
from tests.conftest import make_settings
from tests.helpers import uid as _uid

SYSTEM = "urn:test:history"



def _patient(family: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": _uid()}], "name": [{"family": family}]}


def _instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _fhir_instant(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _version_of(entry: dict[str, Any]) -> tuple[str, str, int]:
    """(type, id, version) of a history entry, from fullUrl and response.etag."""
    type_, id_ = entry["fullUrl"].split("/fhir/")[1].split("/")[:2]
    etag = entry["response"]["etag"]
    assert etag.startswith('W/"') and etag.endswith('"')
    return type_, id_, int(etag[3:-1])


async def _walk(client: httpx.AsyncClient, url: str, params: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], int, list[dict]]:
    """All entries of a history, following next links; also the number of pages and the first bundle."""
    r = await client.get(url, params=params)
    assert r.status_code == 200, r.text
    bundles = [r.json()]
    while True:
        nxt = [link["url"] for link in bundles[-1].get("link", []) if link["relation"] == "next"]
        if not nxt:
            break
        assert len(bundles) < 1000, "the next links do not end"
        r = await client.get(nxt[0])
        assert r.status_code == 200, r.text
        bundles.append(r.json())
    entries = [e for b in bundles for e in b.get("entry", [])]
    for b in bundles:
        assert b["resourceType"] == "Bundle" and b["type"] == "history"
    return entries, len(bundles), bundles


async def _make_versions(client: httpx.AsyncClient, updates: int, delete: bool = False) -> tuple[str, list[dict[str, Any]]]:
    created = await client.post("/Patient", json=_patient("V1"))
    assert created.status_code == 201
    pid = created.json()["id"]
    versions = [created.json()]
    for n in range(2, updates + 2):
        r = await client.put(f"/Patient/{pid}", json={**_patient(f"V{n}"), "id": pid})
        assert r.status_code == 200
        versions.append(r.json())
    if delete:
        assert (await client.delete(f"/Patient/{pid}")).status_code in (200, 204)
    return pid, versions


# -- instance --------------------------------------------------------------------------------


async def test_instance_history_newest_first(client: httpx.AsyncClient) -> None:
    pid, versions = await _make_versions(client, updates=3, delete=True)
    r = await client.get(f"/Patient/{pid}/_history")
    assert r.status_code == 200
    bundle = r.json()
    assert bundle["type"] == "history"
    assert bundle["total"] == 5
    entries = bundle["entry"]
    assert [_version_of(e)[2] for e in entries] == [5, 4, 3, 2, 1]
    assert all(_version_of(e)[:2] == ("Patient", pid) for e in entries)
    assert entries[0]["request"] == {"method": "DELETE", "url": f"Patient/{pid}"}
    assert "resource" not in entries[0]
    assert entries[-1]["request"]["method"] == "POST"
    assert entries[-1]["response"]["status"].startswith("201")
    for entry, n in zip(entries[1:-1], (4, 3, 2)):
        assert entry["request"] == {"method": "PUT", "url": f"Patient/{pid}"}
        assert entry["resource"]["meta"]["versionId"] == str(n)
        assert entry["resource"]["name"][0]["family"] == f"V{n}"
        assert entry["response"]["status"].startswith("200")
    assert any(link["relation"] == "self" for link in bundle["link"])


async def test_instance_history_paging_walk(client: httpx.AsyncClient) -> None:
    pid, _ = await _make_versions(client, updates=8)
    entries, pages, _ = await _walk(client, f"/Patient/{pid}/_history", {"_count": "2"})
    assert pages == 5
    assert [_version_of(e)[2] for e in entries] == [9, 8, 7, 6, 5, 4, 3, 2, 1]


async def test_instance_history_count_one(client: httpx.AsyncClient) -> None:
    pid, _ = await _make_versions(client, updates=2)
    r = await client.get(f"/Patient/{pid}/_history", params={"_count": "1"})
    bundle = r.json()
    assert len(bundle["entry"]) == 1
    assert _version_of(bundle["entry"][0])[2] == 3
    assert any(link["relation"] == "next" for link in bundle["link"])


async def test_instance_history_since(client: httpx.AsyncClient) -> None:
    pid, versions = await _make_versions(client, updates=4)
    since = versions[2]["meta"]["lastUpdated"]  # version 3
    r = await client.get(f"/Patient/{pid}/_history", params={"_since": since})
    assert r.status_code == 200
    assert [_version_of(e)[2] for e in r.json()["entry"]] == [5, 4, 3]
    future = _fhir_instant(datetime.now(timezone.utc) + timedelta(days=1))
    r = await client.get(f"/Patient/{pid}/_history", params={"_since": future})
    assert r.status_code == 200
    assert r.json().get("entry", []) == []


async def test_instance_history_at(client: httpx.AsyncClient) -> None:
    pid, versions = await _make_versions(client, updates=3)
    v2 = _instant(versions[1]["meta"]["lastUpdated"])
    v3 = _instant(versions[2]["meta"]["lastUpdated"])
    assert v3 > v2
    r = await client.get(f"/Patient/{pid}/_history", params={"_at": versions[1]["meta"]["lastUpdated"]})
    assert r.status_code == 200
    assert [_version_of(e)[2] for e in r.json()["entry"]] == [2]
    before = _fhir_instant(_instant(versions[0]["meta"]["lastUpdated"]) - timedelta(days=1))
    r = await client.get(f"/Patient/{pid}/_history", params={"_at": before})
    assert r.status_code == 200
    assert r.json().get("entry", []) == []


async def test_instance_history_unknown_is_404(client: httpx.AsyncClient) -> None:
    r = await client.get(f"/Patient/none-{_uid()}/_history")
    assert r.status_code == 404
    assert r.json()["resourceType"] == "OperationOutcome"


async def test_history_bad_parameters_are_400(client: httpx.AsyncClient) -> None:
    pid, _ = await _make_versions(client, updates=0)
    for params in ({"_since": "yesterday"}, {"_count": "-1"}, {"_page": "%%%"}, {"_at": "2020-13-40"}):
        r = await client.get(f"/Patient/{pid}/_history", params=params)
        assert r.status_code == 400, params
        assert r.json()["resourceType"] == "OperationOutcome"


# -- type and system, on a database of their own ---------------------------------------------


@pytest.fixture(scope="module")
async def fresh(mongo_uri: str) -> AsyncIterator[httpx.AsyncClient]:
    application = create_app(make_settings(mongo_uri))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver/fhir", timeout=60) as c:
            yield c


@pytest.fixture(scope="module")
async def written(fresh: httpx.AsyncClient) -> dict[str, Any]:
    """7 Patients with 1..3 versions each (one deleted) and 4 Observations, all on `fresh`."""
    expected: set[tuple[str, str, int]] = set()
    middle = None
    for i in range(7):
        pid, versions = await _make_versions(fresh, updates=i % 3, delete=(i == 4))
        expected |= {("Patient", pid, n) for n in range(1, len(versions) + 1 + (i == 4))}
        if i == 3:
            middle = versions[-1]["meta"]["lastUpdated"]
    observations = []
    for _ in range(4):
        obs = {"resourceType": "Observation", "status": "final", "code": {"text": "t"}}
        r = await fresh.post("/Observation", json=obs)
        assert r.status_code == 201
        expected.add(("Observation", r.json()["id"], 1))
        observations.append(r.json())
    return {"expected": expected, "middle": middle, "observations": observations}


async def test_type_history_walk(fresh: httpx.AsyncClient, written: dict[str, Any]) -> None:
    expected = {v for v in written["expected"] if v[0] == "Patient"}
    entries, pages, bundles = await _walk(fresh, "/Patient/_history", {"_count": "3"})
    seen = [_version_of(e) for e in entries]
    assert len(seen) == len(set(seen)), "a version appears twice"
    assert set(seen) == expected
    assert pages == -(-len(expected) // 3)
    assert bundles[0]["total"] == len(expected)
    # Newest first across resources.
    times = [_instant(e["response"]["lastModified"]) for e in entries]
    assert times == sorted(times, reverse=True)


async def test_system_history_walk(fresh: httpx.AsyncClient, written: dict[str, Any]) -> None:
    entries, pages, bundles = await _walk(fresh, "/_history", {"_count": "4"})
    seen = [_version_of(e) for e in entries]
    assert len(seen) == len(set(seen))
    assert set(seen) == written["expected"]
    assert pages == -(-len(written["expected"]) // 4)
    assert bundles[0]["total"] == len(written["expected"])


async def test_system_history_since(fresh: httpx.AsyncClient, written: dict[str, Any]) -> None:
    first_obs = written["observations"][0]["meta"]["lastUpdated"]
    entries, _, _ = await _walk(fresh, "/_history", {"_since": first_obs, "_count": "2"})
    seen = {_version_of(e) for e in entries}
    assert seen == {("Observation", o["id"], 1) for o in written["observations"]}


async def test_type_history_since_paging(fresh: httpx.AsyncClient, written: dict[str, Any]) -> None:
    middle = _instant(written["middle"])
    all_entries, _, _ = await _walk(fresh, "/Patient/_history", {"_count": "100"})
    want = {_version_of(e) for e in all_entries if _instant(e["response"]["lastModified"]) >= middle}
    assert 0 < len(want) < len(all_entries)
    entries, _, _ = await _walk(fresh, "/Patient/_history", {"_since": written["middle"], "_count": "2"})
    seen = [_version_of(e) for e in entries]
    assert len(seen) == len(set(seen))
    assert set(seen) == want


async def test_type_history_at(fresh: httpx.AsyncClient, written: dict[str, Any]) -> None:
    """_at: for each resource, the version current at that instant (resources created later are absent)."""
    first_obs = written["observations"][0]
    r = await fresh.get("/Observation/_history", params={"_at": first_obs["meta"]["lastUpdated"]})
    assert r.status_code == 200
    assert [_version_of(e) for e in r.json().get("entry", [])] == [("Observation", first_obs["id"], 1)]


async def test_type_history_observation_only(fresh: httpx.AsyncClient, written: dict[str, Any]) -> None:
    entries, _, _ = await _walk(fresh, "/Observation/_history", {"_count": "3"})
    assert {_version_of(e) for e in entries} == {v for v in written["expected"] if v[0] == "Observation"}


async def test_type_history_at_pages(fresh: httpx.AsyncClient, written: dict[str, Any]) -> None:
    """_at with paging: the next link walks every resource's then-current version, none twice."""
    now = _fhir_instant(datetime.now(timezone.utc))
    full, _, _ = await _walk(fresh, "/Observation/_history", {"_at": now})
    assert {_version_of(e) for e in full} == {("Observation", o["id"], 1) for o in written["observations"]}
    entries, pages, _ = await _walk(fresh, "/Observation/_history", {"_at": now, "_count": "1"})
    seen = [_version_of(e) for e in entries]
    assert len(seen) == len(set(seen))
    assert set(seen) == {("Observation", o["id"], 1) for o in written["observations"]}
    assert pages == len(written["observations"])


async def test_instance_history_at_period(client: httpx.AsyncClient) -> None:
    """_at with a coarse value is a period: every version current at some point during it
    (http.html#history: "resource versions that were current at some point during the time period")."""
    pid, versions = await _make_versions(client, updates=2)
    china = timezone(timedelta(hours=8))  # a date without a zone is read in the server's zone (UTC+8)
    years = {_instant(v["meta"]["lastUpdated"]).astimezone(china).year for v in versions}
    if len(years) != 1:
        pytest.skip("the versions straddle new year")
    r = await client.get(f"/Patient/{pid}/_history", params={"_at": str(years.pop())})
    assert r.status_code == 200
    assert [_version_of(e)[2] for e in r.json()["entry"]] == [3, 2, 1]
    # A one-second period before the first version: nothing was current then.
    first = _instant(versions[0]["meta"]["lastUpdated"]) - timedelta(seconds=2)
    r = await client.get(f"/Patient/{pid}/_history", params={"_at": first.strftime("%Y-%m-%dT%H:%M:%SZ")})
    assert r.status_code == 200
    assert r.json().get("entry", []) == []
    # A one-second period that contains version 2's change: versions 1 (until then) and 2 were current.
    second = _instant(versions[1]["meta"]["lastUpdated"])
    third = _instant(versions[2]["meta"]["lastUpdated"])
    if second.replace(microsecond=0) == third.replace(microsecond=0) or second.replace(microsecond=0) == _instant(
        versions[0]["meta"]["lastUpdated"]
    ).replace(microsecond=0) or second.microsecond == 0:
        return  # versions within one second of each other: the exact-second case is not separable
    r = await client.get(f"/Patient/{pid}/_history", params={"_at": second.strftime("%Y-%m-%dT%H:%M:%SZ")})
    assert [_version_of(e)[2] for e in r.json()["entry"]] == [2, 1]
