"""The 妇幼 connector end to end: simulator over HTTP → transport → JSON Schema → mapping →
validated writes (cn profiles) with Provenance and raw payloads, against a real mongod.

Expected figures: the simulator's planted faults (5 bad records, one per kind) and the
hand-built record tests/data/mch/checkup.json.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import orjson
import pytest

from conftest import make_settings
from fhir_server.connectors import deadletter, runner
from fhir_server.connectors._db import database
from fhir_server.connectors.mch import MchConnector
from fhir_server.connectors.provenance import provenance_id
from fhir_server.connectors.transport import HttpTransport, RetryPolicy
from fhir_server.http.app import create_app
from fhir_server.simulators._http import serving
from fhir_server.simulators.mch import MchUpstream
from fhir_server.storage import field_crypto  # the stored JSON holds ID and phone numbers encrypted

DATA = Path(__file__).parent / "data" / "mch"
_TYPES = ("Patient", "EpisodeOfCare", "Encounter", "Observation", "Condition", "CarePlan")
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
async def server(mongo_uri):
    app = create_app(make_settings(mongo_uri, load_conformance=True))
    async with app.router.lifespan_context(app):
        srv = app.state.server
        await srv.store.ensure_types(set(_TYPES))
        yield srv


@pytest.fixture(scope="module")
def upstream():
    up = MchUpstream(seed=11, children=6)
    with serving(up, "t0ken") as url:
        yield up, url


async def _sync(server, url: str, full: bool = False) -> runner.SyncReport:
    transport = HttpTransport(url, "t0ken", page_size=40, policy=RetryPolicy(retries=3, base=0.01, cap=0.05), seed=1)
    try:
        return await runner.sync(server, MchConnector(), transport, linker=None, full=full)
    finally:
        await transport.close()


async def _resources(server) -> list[dict]:
    db, out = database(server), []
    for type_ in _TYPES:
        async for doc in db[type_].find({"_id": {"$regex": "^mch-"}, "d": False}, {"r": 1}):
            out.append(orjson.loads(field_crypto.decode(doc["r"])))
    return out


async def test_sync_counts_provenance_and_resync(server, upstream):
    up, url = upstream
    report = await _sync(server, url, full=True)
    assert report.error is None, report.error
    assert report.balanced
    assert report.rejected == up.planted_bad == 5  # one record per planted fault, nothing else
    assert report.created > 0 and report.updated >= up.planted["corrected"] > 0
    letters = await deadletter.list_open(server, "sh-mch")
    assert {d["code"] for d in letters} >= {"schema", "impossible-date", "id-check-digit"}
    assert all("$" in d["reason_en"] and d["reason_zh"] for d in letters)  # names the JSON path

    resources = await _resources(server)
    # a Condition only for a pregnancy whose risk colour is not green (computed from what was served)
    risky = any(isinstance(d, dict) and d.get("riskColour") in ("yellow", "orange", "red", "purple") for d in up.deliveries)
    assert {r["resourceType"] for r in resources} == set(_TYPES) - (set() if risky else {"Condition"})
    db = database(server)
    for r in resources:
        assert r["meta"]["source"].startswith("https://fhir.cn-ehr.org/identifier/source/sh-mch#")
        prov = await server.store.current("Provenance", provenance_id(r["resourceType"], r["id"], int(r["meta"]["versionId"])))
        assert prov is not None and not prov.deleted, f"{r['resourceType']}/{r['id']} has no Provenance on its current version"
    # the child's Patient names the mother as contact (GB/T 4761 code 52)
    children = [r for r in resources if r["resourceType"] == "Patient" and "#child/" in r["meta"]["source"]]
    assert children and all(c["contact"][0]["relationship"][0]["coding"][0]["code"] == "52" for c in children)

    history = await db["_history"].count_documents({})
    again = await _sync(server, url, full=True)
    assert again.balanced and again.created == again.updated == 0 and again.rejected == 5
    assert await db["_history"].count_documents({}) == history  # re-sync: no new versions


async def test_changed_record_makes_new_version(server, upstream):
    record = json.loads((DATA / "checkup.json").read_text(encoding="utf-8"))
    connector = MchConnector()
    units, rejections = connector.parse_record(record)
    assert not rejections
    # hand-built record: Patient + Encounter + weight, height, head circumference
    assert sorted(u.resource["resourceType"] for u in units) == ["Encounter", "Observation", "Observation", "Observation", "Patient"]
    weight = next(u.resource for u in units if u.record_id.endswith("/obs/weightKg"))
    assert weight["code"]["coding"][0] == {"system": "http://loinc.org", "code": "29463-7"}
    assert weight["valueQuantity"] == {"value": 9.1, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}

    report = runner.SyncReport("sh-mch")
    await runner.process(server, connector, units, [], report, "t1", None)
    letters = [d["reason_en"] for d in await deadletter.list_open(server, "sh-mch")]
    assert (report.created, report.rejected) == (5, 0), "\n".join(letters[-1].split("; "))
    changed = copy.deepcopy(record)
    changed["weightKg"], changed["updatedAt"] = 9.3, "2025-03-02 10:00:00"
    units, _ = connector.parse_record(changed)
    report = runner.SyncReport("sh-mch")
    await runner.process(server, connector, units, [], report, "t2", None)
    # only the weight changed: one new version, the rest unchanged
    assert (report.created, report.updated, report.unchanged, report.rejected) == (0, 1, 4, 0)
    stored = await server.store.current("Observation", weight["id"])
    assert stored.version == 2 and orjson.loads(stored.raw)["valueQuantity"]["value"] == 9.3


def test_child_born_on_29_february_gets_its_care_plan_to_the_day_before_its_seventh_birthday():
    """2020-02-29 + 7 years has no 29 February: the plan ends 2027-02-28 (found by the city test)."""
    up = MchUpstream(seed=11, children=6)
    record = copy.deepcopy(next(r for r in up.deliveries if r["recordType"] == "birth-certificate"))
    record["child"].pop("idNumber", None)  # its number encodes the old birth date
    record["child"]["birthDate"] = "2020-02-29"
    record["issueDate"] = "2020-03-03"
    units, rejections = MchConnector().parse_record(record)
    assert not rejections, rejections[0].reason_en if rejections else ""
    plan = next(u.resource for u in units if u.resource["resourceType"] == "CarePlan")
    assert plan["period"] == {"start": "2020-02-29", "end": "2027-02-28"}


def test_a_mapping_defect_is_a_dead_letter_not_a_failed_sync(monkeypatch):
    connector = MchConnector()
    up = MchUpstream(seed=11, children=2)

    def broken(record, raw):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(connector, "_map", broken)
    units, rejections = connector.parse_record(up.deliveries[0])
    assert units == [] and [r.code for r in rejections] == ["mapping-error"]
    assert "ZeroDivisionError" in rejections[0].reason_en and rejections[0].reason_zh.startswith("映射程序出错")
