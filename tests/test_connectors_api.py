"""The connectors over HTTP: ``$ingest`` (a hospital's pushed Bundle), ``$dead-letters`` and
``$dead-letters-replay``, against a real mongod. Expected counts come from the hand-built bundles."""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import make_settings
from helpers import uid
from fhir_server.connectors import runner
from fhir_server.connectors.mch import MchConnector
from fhir_server.http.app import create_app
from fhir_server.simulators.mch import MchUpstream

pytestmark = pytest.mark.timeout(120)
HOSPITAL = "sh-demo-hosp-a"


@pytest.fixture(scope="module")
async def app(mongo_uri):
    application = create_app(make_settings(mongo_uri))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="module")
async def http(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver/fhir", timeout=60) as c:
        yield c


def _params(body: dict) -> dict:
    """Counts by name, and the letters as dicts of their parts."""
    out: dict = {"letter": []}
    for p in body["parameter"]:
        if p["name"] == "letter":
            out["letter"].append({q["name"]: next(v for k, v in q.items() if k.startswith("value")) for q in p["part"]})
        else:
            out[p["name"]] = next(v for k, v in p.items() if k.startswith("value"))
    return out


def _bundle(u: str) -> bytes:
    patient = {"resourceType": "Patient", "identifier": [{"system": "http://hosp.example/mrn", "value": u}], "name": [{"text": "李娜"}], "gender": "female", "birthDate": "1990-01-02"}
    good = {
        "resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
        "subject": {"reference": "urn:uuid:00000000-0000-4000-8000-000000000001"},
        "valueQuantity": {"value": 55.0, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
        "identifier": [{"system": "http://hosp.example/obs", "value": u + "-1"}],
    }
    dangling = {**good, "identifier": [{"system": "http://hosp.example/obs", "value": u + "-2"}], "subject": {"reference": "Patient/nobody-" + u}}
    entries = [
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000001", "resource": patient, "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000002", "resource": good, "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000003", "resource": dangling, "request": {"method": "POST", "url": "Observation"}},
    ]
    return json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}, ensure_ascii=False).encode()


async def test_ingest_stores_what_it_can_and_reports_the_rest(http):
    u = uid()
    r = await http.post(f"/$ingest?source={HOSPITAL}", content=_bundle(u), headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 200, r.text
    got = _params(r.json())
    assert (got["received"], got["created"], got["unchanged"], got["rejected"]) == (3, 2, 0, 1)
    [letter] = got["letter"]
    assert letter["code"] == "dangling-reference" and letter["status"] == "open" and letter["reason"]
    # the pushed resources are there, searchable like any other
    found = (await http.get("/Patient", params={"identifier": f"http://hosp.example/mrn|{u}"})).json()
    assert found["total"] == 1 and found["entry"][0]["resource"]["meta"]["source"].endswith(f"#Patient?identifier=http://hosp.example/mrn|{u}")
    # the same push again: nothing new, the bad entry seen again
    again = _params((await http.post(f"/$ingest?source={HOSPITAL}", content=_bundle(u), headers={"Content-Type": "application/fhir+json"})).json())
    assert (again["received"], again["created"], again["updated"], again["unchanged"], again["rejected"]) == (3, 0, 0, 2, 1)
    assert again["letter"][0]["seen"] == 2

    listed = _params((await http.get("/$dead-letters", params={"source": HOSPITAL})).json())
    assert listed["total"] >= 1 and any(d["record"] == letter["record"] for d in listed["letter"])


@pytest.mark.parametrize(
    "url, body, status",
    [
        ("/$ingest", b'{"resourceType": "Bundle", "type": "batch"}', 400),  # no source
        ("/$ingest?source=nobody", b'{"resourceType": "Bundle", "type": "batch"}', 403),  # not a registered hospital
        (f"/$ingest?source={HOSPITAL}", b'{"resourceType": "Bundle", "type": ', 400),  # malformed JSON
        (f"/$ingest?source={HOSPITAL}", b'{"resourceType": "Patient"}', 400),  # not a Bundle
        (f"/$ingest?source={HOSPITAL}", b'{"resourceType": "Bundle", "type": "searchset"}', 400),
    ],
)
async def test_ingest_refuses_an_unusable_push_whole(http, url, body, status):
    r = await http.post(url, content=body, headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == status, r.text
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["severity"] == "error"


async def test_dead_letters_of_a_pulled_source_list_and_replay(app, http):
    server = app.state.server
    record = next(r for r in MchUpstream(seed=5, children=2).deliveries if r["recordType"] == "pregnancy-registration")
    bad = {**record, "recordId": record["recordId"] + uid()[:6], "riskColour": "blue"}
    connector = MchConnector()
    units, rejections = connector.parse_record(bad)
    await runner.process(server, connector, units, rejections, runner.SyncReport(connector.code), "api-test", None)

    listed = _params((await http.get("/$dead-letters", params={"source": "mch", "_count": "500"})).json())
    mine = [d for d in listed["letter"] if d["record"].endswith(bad["recordId"])]
    assert len(mine) == 1 and mine[0]["source"] == "sh-mch" and mine[0]["code"] == "schema" and "riskColour" in mine[0]["reason-en"]

    replayed = await http.post("/$dead-letters-replay", params={"source": "sh-mch", "key": mine[0]["key"]})
    assert replayed.status_code == 200, replayed.text
    got = _params(replayed.json())
    assert (got["received"], got["rejected"]) == (1, 1)  # still blue: still refused, still open
    still = _params((await http.get("/$dead-letters", params={"source": "mch", "_count": "500"})).json())
    assert any(d["key"] == mine[0]["key"] and d["status"] == "open" for d in still["letter"])


@pytest.mark.parametrize(
    "method, url, status",
    [
        ("GET", "/$dead-letters?status=lost", 400),
        ("GET", "/$dead-letters?_count=many", 400),
        ("POST", f"/$dead-letters-replay?source={HOSPITAL}", 400),  # a pushing hospital re-pushes instead
        ("POST", "/$dead-letters-replay", 400),
        ("POST", "/$dead-letters", 405),
    ],
)
async def test_dead_letter_api_errors(http, method, url, status):
    r = await http.request(method, url)
    assert r.status_code == status, r.text
    assert r.json()["resourceType"] == "OperationOutcome"


async def test_dead_letters_hold_no_id_number_in_clear(app, http):
    """A refused record keeps its bytes for the replay, sealed with the field key like stored
    resources: the collection never shows the ID number; the API shows it to whoever may list."""
    import bson

    from fhir_server.connectors._db import DEAD_LETTERS, database

    server = app.state.server
    record = next(r for r in MchUpstream(seed=6, children=2).deliveries if r["recordType"] == "child-checkup" and r["child"].get("idNumber"))
    number = record["child"]["idNumber"]
    wrong = number[:17] + ("0" if number[17] != "0" else "1")
    bad = {**record, "recordId": record["recordId"] + uid()[:6], "child": {**record["child"], "idNumber": wrong}}
    connector = MchConnector()
    units, rejections = connector.parse_record(bad)
    assert [r.code for r in rejections] == ["id-check-digit"]
    await runner.process(server, connector, units, rejections, runner.SyncReport(connector.code), "sealed-test", None)

    stored = [d async for d in database(server)[DEAD_LETTERS].find({"run_id": "sealed-test"})]
    assert len(stored) == 1
    assert wrong.encode() not in bson.encode(stored[0]) and wrong[:17].encode() not in bson.encode(stored[0])
    listed = _params((await http.get("/$dead-letters", params={"source": "mch", "_count": "1000"})).json())
    mine = [d for d in listed["letter"] if d["record"].endswith(bad["recordId"])]
    assert len(mine) == 1 and mine[0]["code"] == "id-check-digit" and mine[0]["reason"]
