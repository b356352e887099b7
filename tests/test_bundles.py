"""batch and transaction at the base URL (http.html#transaction): processing order, urn:uuid and
conditional references, all-or-nothing failure, ifNoneExist, the response bundles, size limit."""

from __future__ import annotations

import re
import uuid
from typing import Any, AsyncIterator

import httpx
import pytest

from fhir_server.http.app import create_app
from tests.conftest import make_settings
from tests.helpers import uid as _uid

SYSTEM = "urn:test:bundles"



def _urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _patient(ident: str, family: str = "Qian") -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": ident}], "name": [{"family": family}]}


def _observation(ident: str, subject: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": SYSTEM, "value": ident}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
        "subject": {"reference": subject},
        **extra,
    }


def _transaction(*entries: dict[str, Any], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def _post(resource: dict[str, Any], full_url: str | None = None, **request: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"resource": resource, "request": {"method": "POST", "url": resource["resourceType"], **request}}
    if full_url:
        entry["fullUrl"] = full_url
    return entry


async def _search_total(client: httpx.AsyncClient, type_: str, ident: str) -> int:
    r = await client.get(f"/{type_}", params={"identifier": f"{SYSTEM}|{ident}", "_summary": "count"})
    assert r.status_code == 200
    return r.json()["total"]


def _id_from_location(location: str) -> str:
    # "Patient/<id>/_history/<n>", possibly absolute
    parts = location.split("/")
    i = parts.index("_history")
    return parts[i - 1]


# -- the base URL, with and without a trailing slash ----------------------------------------


@pytest.mark.parametrize("path", ["", "/"])
async def test_transaction_at_base(client: httpx.AsyncClient, path: str) -> None:
    ident = _uid()
    r = await client.post(path, json=_transaction(_post(_patient(ident), _urn())))
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction-response"
    assert len(bundle["entry"]) == 1
    response = bundle["entry"][0]["response"]
    assert response["status"].startswith("201")
    pid = _id_from_location(response["location"])
    assert response["etag"] == 'W/"1"'
    read = await client.get(f"/Patient/{pid}")
    assert read.status_code == 200
    assert read.json()["identifier"][0]["value"] == ident


@pytest.mark.parametrize("path", ["", "/"])
async def test_batch_at_base(client: httpx.AsyncClient, path: str) -> None:
    ident = _uid()
    r = await client.post(path, json=_transaction(_post(_patient(ident)), kind="batch"))
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert bundle["type"] == "batch-response"
    assert bundle["entry"][0]["response"]["status"].startswith("201")
    assert await _search_total(client, "Patient", ident) == 1


async def test_not_a_bundle_is_400(client: httpx.AsyncClient) -> None:
    for body in (_patient(_uid()), {"resourceType": "Bundle", "type": "collection", "entry": []}):
        r = await client.post("", json=body)
        assert r.status_code == 400
        assert r.json()["resourceType"] == "OperationOutcome"


# -- transaction-response --------------------------------------------------------------------


async def test_transaction_response_per_entry(client: httpx.AsyncClient) -> None:
    existing = (await client.post("/Patient", json=_patient(_uid(), "Old"))).json()
    gone_id = (await client.post("/Patient", json=_patient(_uid()))).json()["id"]
    put_id = "tx-" + _uid()[:20]
    ident = _uid()
    bundle = _transaction(
        _post(_patient(ident), _urn()),
        {"resource": {**_patient(_uid()), "id": put_id}, "request": {"method": "PUT", "url": f"Patient/{put_id}"}},
        {
            "resource": {**_patient(_uid(), "New"), "id": existing["id"]},
            "request": {"method": "PUT", "url": f"Patient/{existing['id']}"},
        },
        {"request": {"method": "DELETE", "url": f"Patient/{gone_id}"}},
    )
    r = await client.post("", json=bundle)
    assert r.status_code == 200, r.text
    entries = r.json()["entry"]
    assert len(entries) == 4  # one per request entry, in the same order
    post, put_new, put_old, delete = (e["response"] for e in entries)
    assert post["status"].startswith("201") and post["etag"] == 'W/"1"'
    assert re.search(r"(^|/)Patient/[A-Za-z0-9\-.]{1,64}/_history/1$", post["location"]), post["location"]
    assert put_new["status"].startswith("201")
    assert _id_from_location(put_new["location"]) == put_id
    assert put_new["etag"] == 'W/"1"'
    assert put_old["status"].startswith("200")
    assert _id_from_location(put_old["location"]) == existing["id"]
    assert put_old["etag"] == 'W/"2"'
    assert delete["status"][:3] in ("200", "204")
    assert (await client.get(f"/Patient/{gone_id}")).status_code == 410
    assert (await client.get(f"/Patient/{put_id}")).status_code == 200
    assert (await client.get(f"/Patient/{existing['id']}")).json()["name"][0]["family"] == "New"
    assert await _search_total(client, "Patient", ident) == 1


async def test_transaction_prefer_representation(client: httpx.AsyncClient) -> None:
    ident = _uid()
    r = await client.post("", json=_transaction(_post(_patient(ident), _urn())), headers={"Prefer": "return=representation"})
    assert r.status_code == 200
    entry = r.json()["entry"][0]
    assert entry["resource"]["resourceType"] == "Patient"
    assert entry["resource"]["identifier"][0]["value"] == ident
    assert entry["resource"]["meta"]["versionId"] == "1"
    assert entry["fullUrl"].endswith(f"/Patient/{entry['resource']['id']}")


# -- processing order ------------------------------------------------------------------------


async def test_get_sees_the_put_of_the_same_transaction(client: httpx.AsyncClient) -> None:
    pid = "ord-" + _uid()[:20]
    bundle = _transaction(
        {"request": {"method": "GET", "url": f"Patient/{pid}"}},
        {"resource": {**_patient(_uid()), "id": pid}, "request": {"method": "PUT", "url": f"Patient/{pid}"}},
    )
    r = await client.post("", json=bundle)
    assert r.status_code == 200, r.text
    get, put = r.json()["entry"]
    assert get["response"]["status"].startswith("200")
    assert get["resource"]["id"] == pid
    assert put["response"]["status"].startswith("201")


async def test_get_search_sees_the_post_of_the_same_transaction(client: httpx.AsyncClient) -> None:
    ident = _uid()
    bundle = _transaction(
        {"request": {"method": "GET", "url": f"Patient?identifier={SYSTEM}|{ident}"}},
        _post(_patient(ident), _urn()),
    )
    r = await client.post("", json=bundle)
    assert r.status_code == 200, r.text
    get, post = r.json()["entry"]
    assert post["response"]["status"].startswith("201")
    searchset = get["resource"]
    assert searchset["resourceType"] == "Bundle" and searchset["type"] == "searchset"
    assert [e["resource"]["id"] for e in searchset["entry"]] == [_id_from_location(post["response"]["location"])]


async def test_delete_runs_before_post(client: httpx.AsyncClient) -> None:
    """DELETE is processed before POST, so a conditional create no longer sees what is deleted."""
    ident = _uid()
    old = (await client.post("/Patient", json=_patient(ident, "Old"))).json()["id"]
    bundle = _transaction(
        _post(_patient(ident, "New"), _urn(), ifNoneExist=f"identifier={SYSTEM}|{ident}"),
        {"request": {"method": "DELETE", "url": f"Patient/{old}"}},
    )
    r = await client.post("", json=bundle)
    assert r.status_code == 200, r.text
    post, delete = r.json()["entry"]
    assert post["response"]["status"].startswith("201")
    new = _id_from_location(post["response"]["location"])
    assert new != old
    assert (await client.get(f"/Patient/{old}")).status_code == 410
    assert (await client.get(f"/Patient/{new}")).json()["name"][0]["family"] == "New"


async def test_same_resource_twice_is_refused(client: httpx.AsyncClient) -> None:
    pid = "twice-" + _uid()[:20]
    bundle = _transaction(
        {"resource": {**_patient(_uid()), "id": pid}, "request": {"method": "PUT", "url": f"Patient/{pid}"}},
        {"resource": {**_patient(_uid()), "id": pid}, "request": {"method": "PUT", "url": f"Patient/{pid}"}},
    )
    r = await client.post("", json=bundle)
    assert r.status_code == 400
    assert r.json()["resourceType"] == "OperationOutcome"
    assert (await client.get(f"/Patient/{pid}")).status_code == 404


# -- references ------------------------------------------------------------------------------


async def test_urn_uuid_references_rewritten_everywhere(client: httpx.AsyncClient) -> None:
    p_urn, o1_urn, o2_urn, panel_urn = _urn(), _urn(), _urn(), _urn()
    pi, o1i, o2i, pani = _uid(), _uid(), _uid(), _uid()
    panel = _observation(
        pani,
        p_urn,
        hasMember=[{"reference": o1_urn}, {"reference": o2_urn}],
        performer=[{"reference": p_urn, "display": "self"}],
        extension=[{"url": "http://example.org/ext", "valueReference": {"reference": o1_urn}}],
        contained=[
            {
                "resourceType": "Provenance",
                "id": "prov",
                "target": [{"reference": o2_urn}],
                "recorded": "2020-01-01T00:00:00Z",
                "agent": [{"who": {"reference": p_urn}}],
            }
        ],
        note=[{"text": p_urn}],  # not a reference: must stay as written
    )
    # The panel comes first, before the resources it points to.
    bundle = _transaction(
        _post(panel, panel_urn),
        _post(_observation(o1i, p_urn), o1_urn),
        _post(_observation(o2i, p_urn, derivedFrom=[{"reference": o1_urn}]), o2_urn),
        _post(_patient(pi), p_urn),
    )
    r = await client.post("", json=bundle)
    assert r.status_code == 200, r.text
    ids = [_id_from_location(e["response"]["location"]) for e in r.json()["entry"]]
    panel_id, o1, o2, pid = ids
    got = (await client.get(f"/Observation/{panel_id}")).json()
    assert got["subject"] == {"reference": f"Patient/{pid}"}
    assert got["hasMember"] == [{"reference": f"Observation/{o1}"}, {"reference": f"Observation/{o2}"}]
    assert got["performer"] == [{"reference": f"Patient/{pid}", "display": "self"}]
    assert got["extension"][0]["valueReference"] == {"reference": f"Observation/{o1}"}
    assert got["contained"][0]["target"] == [{"reference": f"Observation/{o2}"}]
    assert got["contained"][0]["agent"][0]["who"] == {"reference": f"Patient/{pid}"}
    assert got["note"] == [{"text": p_urn}]
    second = (await client.get(f"/Observation/{o2}")).json()
    assert second["subject"] == {"reference": f"Patient/{pid}"}
    assert second["derivedFrom"] == [{"reference": f"Observation/{o1}"}]
    # Searches by the rewritten reference find them.
    s = await client.get("/Observation", params={"subject": f"Patient/{pid}", "_summary": "count"})
    assert s.json()["total"] == 3


async def test_urn_reference_to_conditional_create_match(client: httpx.AsyncClient) -> None:
    """ifNoneExist inside an entry: a match is reused (200), and references to its fullUrl point at it."""
    ident = _uid()
    existing = (await client.post("/Patient", json=_patient(ident, "Existing"))).json()["id"]
    p_urn = _urn()
    oi = _uid()
    bundle = _transaction(
        _post(_patient(ident, "Duplicate"), p_urn, ifNoneExist=f"identifier={SYSTEM}|{ident}"),
        _post(_observation(oi, p_urn)),
    )
    r = await client.post("", json=bundle)
    assert r.status_code == 200, r.text
    post_p, post_o = (e["response"] for e in r.json()["entry"])
    assert post_p["status"].startswith("200")
    assert _id_from_location(post_p["location"]) == existing
    assert post_o["status"].startswith("201")
    assert await _search_total(client, "Patient", ident) == 1
    assert (await client.get(f"/Patient/{existing}")).json()["name"][0]["family"] == "Existing"
    obs = (await client.get(f"/Observation/{_id_from_location(post_o['location'])}")).json()
    assert obs["subject"] == {"reference": f"Patient/{existing}"}


async def test_if_none_exist_no_match_in_transaction_creates(client: httpx.AsyncClient) -> None:
    ident = _uid()
    r = await client.post("", json=_transaction(_post(_patient(ident), _urn(), ifNoneExist=f"identifier={SYSTEM}|{ident}")))
    assert r.status_code == 200
    assert r.json()["entry"][0]["response"]["status"].startswith("201")
    assert await _search_total(client, "Patient", ident) == 1


async def test_conditional_reference_resolved(client: httpx.AsyncClient) -> None:
    ident = _uid()
    pid = (await client.post("/Patient", json=_patient(ident))).json()["id"]
    oi = _uid()
    r = await client.post("", json=_transaction(_post(_observation(oi, f"Patient?identifier={SYSTEM}|{ident}"))))
    assert r.status_code == 200, r.text
    oid = _id_from_location(r.json()["entry"][0]["response"]["location"])
    assert (await client.get(f"/Observation/{oid}")).json()["subject"] == {"reference": f"Patient/{pid}"}


async def test_conditional_reference_no_match_fails_everything(client: httpx.AsyncClient) -> None:
    pi, oi = _uid(), _uid()
    bundle = _transaction(
        _post(_patient(pi), _urn()),
        _post(_observation(oi, f"Patient?identifier={SYSTEM}|{_uid()}")),
    )
    r = await client.post("", json=bundle)
    assert r.status_code in (400, 404, 412, 422)
    assert r.json()["resourceType"] == "OperationOutcome"
    assert await _search_total(client, "Patient", pi) == 0
    assert await _search_total(client, "Observation", oi) == 0


async def test_conditional_reference_several_matches_fails_everything(client: httpx.AsyncClient) -> None:
    ident = _uid()
    for _ in range(2):
        assert (await client.post("/Patient", json=_patient(ident))).status_code == 201
    pi, oi = _uid(), _uid()
    bundle = _transaction(
        _post(_patient(pi), _urn()),
        _post(_observation(oi, f"Patient?identifier={SYSTEM}|{ident}")),
    )
    r = await client.post("", json=bundle)
    assert r.status_code in (400, 409, 412, 422)
    assert r.json()["resourceType"] == "OperationOutcome"
    assert await _search_total(client, "Patient", pi) == 0
    assert await _search_total(client, "Observation", oi) == 0
    assert await _search_total(client, "Patient", ident) == 2


async def test_conditional_update_entry_and_its_full_url(client: httpx.AsyncClient) -> None:
    ident = _uid()
    pid = (await client.post("/Patient", json=_patient(ident, "Before"))).json()["id"]
    p_urn = _urn()
    bundle = _transaction(
        {"fullUrl": p_urn, "resource": _patient(ident, "After"), "request": {"method": "PUT", "url": f"Patient?identifier={SYSTEM}|{ident}"}},
        _post(_observation(_uid(), p_urn)),
    )
    r = await client.post("", json=bundle)
    assert r.status_code == 200, r.text
    put, post = (e["response"] for e in r.json()["entry"])
    assert put["status"].startswith("200")
    assert _id_from_location(put["location"]) == pid
    assert (await client.get(f"/Patient/{pid}")).json()["name"][0]["family"] == "After"
    obs = (await client.get(f"/Observation/{_id_from_location(post['location'])}")).json()
    assert obs["subject"]["reference"] == f"Patient/{pid}"


# -- all or nothing --------------------------------------------------------------------------


async def test_invalid_last_entry_leaves_no_trace(client: httpx.AsyncClient) -> None:
    pi, oi, bad = _uid(), _uid(), _uid()
    existing = (await client.post("/Patient", json=_patient(_uid(), "Untouched"))).json()["id"]
    p_urn = _urn()
    bundle = _transaction(
        _post(_patient(pi), p_urn),
        _post(_observation(oi, p_urn)),
        {"resource": {**_patient(_uid(), "Changed"), "id": existing}, "request": {"method": "PUT", "url": f"Patient/{existing}"}},
        _post({**_patient(bad), "gender": "not-a-gender"}),
    )
    r = await client.post("", json=bundle)
    assert r.status_code == 400
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert "Traceback" not in r.text
    assert await _search_total(client, "Patient", pi) == 0
    assert await _search_total(client, "Observation", oi) == 0
    assert await _search_total(client, "Patient", bad) == 0
    read = (await client.get(f"/Patient/{existing}")).json()
    assert read["name"][0]["family"] == "Untouched" and read["meta"]["versionId"] == "1"
    history = (await client.get(f"/Patient/{existing}/_history")).json()
    assert history["total"] == 1


async def test_failed_delete_in_transaction_keeps_everything(client: httpx.AsyncClient) -> None:
    """A stale If-Match on one entry fails the whole transaction, deletions included."""
    keep = (await client.post("/Patient", json=_patient(_uid()))).json()["id"]
    other = (await client.post("/Patient", json=_patient(_uid()))).json()["id"]
    bundle = _transaction(
        {"request": {"method": "DELETE", "url": f"Patient/{keep}"}},
        {"resource": {**_patient(_uid()), "id": other}, "request": {"method": "PUT", "url": f"Patient/{other}", "ifMatch": 'W/"9"'}},
    )
    r = await client.post("", json=bundle)
    assert r.status_code == 412
    assert r.json()["resourceType"] == "OperationOutcome"
    assert (await client.get(f"/Patient/{keep}")).status_code == 200
    assert (await client.get(f"/Patient/{other}")).json()["meta"]["versionId"] == "1"


async def test_unresolvable_urn_fails(client: httpx.AsyncClient) -> None:
    oi = _uid()
    r = await client.post("", json=_transaction(_post(_observation(oi, _urn()))))
    assert r.status_code in (400, 404, 422)
    assert r.json()["resourceType"] == "OperationOutcome"
    assert await _search_total(client, "Observation", oi) == 0


# -- batch -----------------------------------------------------------------------------------


async def test_batch_mixed_outcomes(client: httpx.AsyncClient) -> None:
    good1, bad, good2 = _uid(), _uid(), _uid()
    existing = (await client.post("/Patient", json=_patient(_uid()))).json()["id"]
    bundle = _transaction(
        _post(_patient(good1)),
        _post({**_patient(bad), "gender": "not-a-gender"}),
        {"request": {"method": "GET", "url": f"Patient/{existing}"}},
        {"request": {"method": "GET", "url": f"Patient/missing-{_uid()[:10]}"}},
        _post(_patient(good2)),
        kind="batch",
    )
    r = await client.post("", json=bundle)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "batch-response"
    statuses = [e["response"]["status"][:3] for e in body["entry"]]
    assert statuses == ["201", "400", "200", "404", "201"]
    assert body["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert body["entry"][3]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert body["entry"][2]["resource"]["id"] == existing
    assert await _search_total(client, "Patient", good1) == 1
    assert await _search_total(client, "Patient", good2) == 1
    assert await _search_total(client, "Patient", bad) == 0
    assert _id_from_location(body["entry"][0]["response"]["location"])


async def test_batch_entries_do_not_reference_each_other(client: httpx.AsyncClient) -> None:
    """In a batch, an entry must not depend on another (http.html#brules): a urn:uuid reference to
    another entry cannot be resolved, so that entry fails and the others succeed."""
    p_urn = _urn()
    pi, oi = _uid(), _uid()
    r = await client.post("", json=_transaction(_post(_patient(pi), p_urn), _post(_observation(oi, p_urn)), kind="batch"))
    assert r.status_code == 200
    statuses = [e["response"]["status"][:3] for e in r.json()["entry"]]
    assert statuses[0] == "201"
    assert statuses[1].startswith("4")
    assert await _search_total(client, "Observation", oi) == 0


# -- size limit ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def small(mongo_uri: str) -> AsyncIterator[httpx.AsyncClient]:
    application = create_app(make_settings(mongo_uri, max_bundle_entries=5))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver/fhir", timeout=60) as c:
            yield c


@pytest.mark.parametrize("kind", ["transaction", "batch"])
async def test_bundle_size_limit(small: httpx.AsyncClient, kind: str) -> None:
    idents = [_uid() for _ in range(6)]
    r = await small.post("", json=_transaction(*(_post(_patient(i), _urn()) for i in idents), kind=kind))
    assert r.status_code == 413
    assert r.json()["resourceType"] == "OperationOutcome"
    for i in idents:
        assert await _search_total(small, "Patient", i) == 0
    ok = await small.post("", json=_transaction(*(_post(_patient(i), _urn()) for i in idents[:5]), kind=kind))
    assert ok.status_code == 200
    assert [e["response"]["status"][:3] for e in ok.json()["entry"]] == ["201"] * 5


# -- patch entries ---------------------------------------------------------------------------


async def test_fhirpath_patch_in_transaction(client: httpx.AsyncClient) -> None:
    pid = (await client.post("/Patient", json=_patient(_uid()))).json()["id"]
    params = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "operation",
                "part": [
                    {"name": "type", "valueCode": "add"},
                    {"name": "path", "valueString": "Patient"},
                    {"name": "name", "valueString": "active"},
                    {"name": "value", "valueBoolean": True},
                ],
            }
        ],
    }
    r = await client.post("", json=_transaction({"resource": params, "request": {"method": "PATCH", "url": f"Patient/{pid}"}}))
    assert r.status_code == 200, r.text
    response = r.json()["entry"][0]["response"]
    assert response["status"].startswith("200") and response["etag"] == 'W/"2"'
    assert (await client.get(f"/Patient/{pid}")).json()["active"] is True


async def test_json_patch_as_binary_in_transaction(client: httpx.AsyncClient) -> None:
    """http.html#patch: in a batch or transaction, a JSON Patch travels as a Binary resource."""
    import base64
    import json

    pid = (await client.post("/Patient", json=_patient(_uid()))).json()["id"]
    ops = [{"op": "add", "path": "/active", "value": False}]
    binary = {
        "resourceType": "Binary",
        "contentType": "application/json-patch+json",
        "data": base64.b64encode(json.dumps(ops).encode()).decode(),
    }
    r = await client.post("", json=_transaction({"resource": binary, "request": {"method": "PATCH", "url": f"Patient/{pid}"}}))
    assert r.status_code == 200, r.text
    assert r.json()["entry"][0]["response"]["status"].startswith("200")
    assert (await client.get(f"/Patient/{pid}")).json()["active"] is False


async def test_large_transaction_with_references(client: httpx.AsyncClient) -> None:
    ident = _uid()
    entries = []
    for i in range(100):
        p_urn = _urn()
        entries.append(_post(_patient(f"{ident}-{i}"), p_urn))
        entries.append(_post(_observation(f"{ident}-o{i}", p_urn)))
    r = await client.post("", json=_transaction(*entries))
    assert r.status_code == 200
    out = r.json()["entry"]
    assert len(out) == 200
    for i in range(0, 200, 2):
        pid = _id_from_location(out[i]["response"]["location"])
        oid = _id_from_location(out[i + 1]["response"]["location"])
        if i % 40 == 0:
            assert (await client.get(f"/Observation/{oid}")).json()["subject"]["reference"] == f"Patient/{pid}"


async def test_document_bundle_inside_a_transaction(client: httpx.AsyncClient) -> None:
    """A document (Bundle type=document) stored through a transaction keeps its own urn:uuid
    references: they resolve within the document, not against the transaction."""
    ident = _uid()
    p_urn, c_urn = _urn(), _urn()
    document = {
        "resourceType": "Bundle",
        "identifier": {"system": SYSTEM, "value": ident},
        "type": "document",
        "timestamp": "2024-01-01T00:00:00Z",
        "entry": [
            {
                "fullUrl": c_urn,
                "resource": {
                    "resourceType": "Composition",
                    "status": "final",
                    "type": {"text": "note"},
                    "subject": {"reference": p_urn},
                    "date": "2024-01-01",
                    "author": [{"reference": p_urn}],
                    "title": "Note",
                },
            },
            {"fullUrl": p_urn, "resource": _patient(_uid())},
        ],
    }
    r = await client.post("", json=_transaction(_post(document, _urn())))
    assert r.status_code == 200, r.text
    bid = _id_from_location(r.json()["entry"][0]["response"]["location"])
    stored = (await client.get(f"/Bundle/{bid}")).json()
    assert stored["entry"][0]["resource"]["subject"] == {"reference": p_urn}


async def test_conditional_update_entry_without_match_creates(client: httpx.AsyncClient) -> None:
    ident = _uid()
    p_urn = _urn()
    bundle = _transaction(
        {"fullUrl": p_urn, "resource": _patient(ident), "request": {"method": "PUT", "url": f"Patient?identifier={SYSTEM}|{ident}"}},
        _post(_observation(_uid(), p_urn)),
    )
    r = await client.post("", json=bundle)
    assert r.status_code == 200, r.text
    put, post = (e["response"] for e in r.json()["entry"])
    assert put["status"].startswith("201")
    pid = _id_from_location(put["location"])
    assert await _search_total(client, "Patient", ident) == 1
    obs = (await client.get(f"/Observation/{_id_from_location(post['location'])}")).json()
    assert obs["subject"]["reference"] == f"Patient/{pid}"


async def test_if_none_exist_several_matches_fails_everything(client: httpx.AsyncClient) -> None:
    ident = _uid()
    for _ in range(2):
        assert (await client.post("/Patient", json=_patient(ident))).status_code == 201
    other = _uid()
    bundle = _transaction(
        _post(_patient(other), _urn()),
        _post(_patient(ident), _urn(), ifNoneExist=f"identifier={SYSTEM}|{ident}"),
    )
    r = await client.post("", json=bundle)
    assert r.status_code == 412
    assert r.json()["resourceType"] == "OperationOutcome"
    assert await _search_total(client, "Patient", other) == 0
    assert await _search_total(client, "Patient", ident) == 2


async def test_duplicate_full_url_is_refused(client: httpx.AsyncClient) -> None:
    """bdl-7: fullUrl is unique within a bundle; two entries claiming one urn:uuid make every
    reference to it ambiguous."""
    p_urn = _urn()
    a, b, o = _uid(), _uid(), _uid()
    bundle = _transaction(_post(_patient(a), p_urn), _post(_patient(b), p_urn), _post(_observation(o, p_urn)))
    r = await client.post("", json=bundle)
    assert r.status_code == 400
    assert r.json()["resourceType"] == "OperationOutcome"
    for ident in (a, b):
        assert await _search_total(client, "Patient", ident) == 0
    assert await _search_total(client, "Observation", o) == 0


async def test_entry_without_request_is_refused(client: httpx.AsyncClient) -> None:
    ident = _uid()
    r = await client.post("", json=_transaction(_post(_patient(_uid())), {"resource": _patient(ident)}))
    assert r.status_code == 400
    assert r.json()["resourceType"] == "OperationOutcome"
    assert await _search_total(client, "Patient", ident) == 0
    # In a batch only that entry fails.
    r = await client.post("", json=_transaction(_post(_patient(ident)), {"resource": _patient(_uid())}, kind="batch"))
    assert r.status_code == 200
    assert [e["response"]["status"][:3] for e in r.json()["entry"]] == ["201", "400"]
