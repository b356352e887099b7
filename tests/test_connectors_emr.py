"""The hospital EMR connector (WS/T 500 CDA R2): hand-written C0002 / C0007 documents checked field
by field, then the registry simulator over HTTP → transport → mapping → validated writes with
Provenance and raw payloads, against a real mongod.

Expected values come from the hand-written fixtures in tests/data/emr/ and the simulator's plan.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import orjson
import pytest

from conftest import make_settings
from helpers import RecordingLinker
from fhir_server.connectors import deadletter, runner
from fhir_server.connectors._db import database
from fhir_server.connectors.emr import EmrConnector
from fhir_server.connectors.provenance import provenance_id
from fhir_server.connectors.transport import FileTransport, HttpTransport, RetryPolicy
from fhir_server.http.app import create_app
from fhir_server.simulators.emr import EmrUpstream

DATA = Path(__file__).parent / "data" / "emr"
SD = "https://fhir.cn-ehr.org/StructureDefinition"
SRC = "https://fhir.cn-ehr.org/identifier/source/sh-hospital-emr"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
async def cn_app(mongo_uri):
    app = create_app(make_settings(mongo_uri, load_conformance=True))
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture(scope="module")
async def server(cn_app):
    return cn_app.state.server


def _parse(name: str):
    raw = (DATA / name).read_bytes()
    units, rejections, received = EmrConnector().parse_page(raw)
    return raw, units, rejections, received


def _one(units, kind):
    found = [u.resource for u in units if u.kind == kind]
    assert len(found) == 1, kind
    return found[0]


def test_c0002_outpatient_field_by_field():
    raw, units, rejections, received = _parse("c0002-outpatient.xml")
    assert rejections == [] and received == 5
    assert sorted(u.kind for u in units) == ["condition", "condition", "document", "encounter", "patient"]
    p = _one(units, "patient")
    assert p["meta"]["profile"] == [f"{SD}/cn-patient"]
    assert p["meta"]["source"] == f"{SRC}#patient/42502657200/2.16.156.10011.1.3/11010519491231002X"
    assert p["name"] == [{"text": "欧阳秀英", "family": "欧阳", "given": ["秀英"]}]
    assert p["gender"] == "female" and p["_gender"]["extension"][0]["valueCoding"]["code"] == "2"
    assert p["birthDate"] == "1949-12-31"
    card = [i for i in p["identifier"] if i["system"] == "urn:oid:2.16.156.10011.1.3"]
    assert card[0]["value"] == "11010519491231002X" and card[0]["type"]["coding"][0]["code"] == "NNCHN"
    assert p["telecom"] == [{"system": "phone", "value": "13912345678", "use": "mobile"}]
    assert p["address"][0]["text"] == "上海市徐汇区漕溪北路88弄3号502室"
    e = _one(units, "encounter")
    assert e["class"]["code"] == "AMB" and e["identifier"] == [{"system": "urn:oid:2.16.156.10011.1.11", "value": "MZ20250312001"}]
    assert e["period"] == {"start": "2025-03-12T09:05:00+08:00"}
    assert e["serviceProvider"] == {"identifier": {"system": "urn:oid:2.16.156.10011.1.5", "value": "42502657200"}, "display": "上海市徐汇区中心医院"}
    assert e["subject"] == {"reference": f"Patient/{p['id']}"} and e["location"][0]["location"]["display"] == "心内科门诊"
    conds = {c.resource["code"]["coding"][0]["code"]: c.resource for c in units if c.kind == "condition"}
    assert set(conds) == {"I10", "E11.9"}
    assert conds["I10"]["code"]["coding"][0]["system"] == "urn:oid:2.16.156.10011.2.3.3.11"
    assert conds["I10"]["code"]["text"] == "特发性（原发性）高血压" and conds["I10"]["onsetDateTime"] == "2025-03-12"
    assert "onsetDateTime" not in conds["E11.9"] and conds["E11.9"]["recordedDate"] == "2025-03-12T09:30:00+08:00"
    assert conds["I10"]["encounter"] == {"reference": f"Encounter/{e['id']}"}
    assert [d["condition"]["reference"] for d in e["diagnosis"]] == [f"Condition/{conds['I10']['id']}", f"Condition/{conds['E11.9']['id']}"]
    d = _one(units, "document")
    assert d["masterIdentifier"] == {"system": "urn:oid:2.16.156.10011.1.1", "value": "HX-C0002-20250312-0001"}
    assert d["type"]["coding"][0] == {"system": "urn:oid:2.16.156.10011.2.4", "code": "C0002", "display": "门(急)诊病历"}
    att = d["content"][0]["attachment"]
    assert att["url"] == f"Binary/{hashlib.sha256(raw).hexdigest()}" and att["size"] == len(raw)
    assert att["hash"] == base64.b64encode(hashlib.sha1(raw).digest()).decode()
    assert d["content"][0]["format"]["code"] == "2.16.156.10011.2.1.1.22"
    assert d["date"] == "2025-03-12T09:30:00+08:00" and d["author"] == [{"display": "顾志明"}]


def test_c0007_lab_report_field_by_field():
    raw, units, rejections, received = _parse("c0007-lab.xml")
    # GLU and CREA map through the ConceptMap; UA has no map: that entry alone is rejected
    assert received == 6 and [(r.kind, r.code, r.record_id) for r in rejections] == [("observation", "unknown-code", "obs/HX-C0007-20250313-0042/UA")]
    assert "UA" in rejections[0].reason_zh
    obs = {u.resource["code"]["coding"][1]["code"]: u.resource for u in units if u.kind == "observation"}
    assert set(obs) == {"GLU", "CREA"}
    glu = obs["GLU"]
    assert glu["meta"]["profile"] == [f"{SD}/cn-lab-result"]
    assert glu["code"]["coding"][0] == {"system": "http://loinc.org", "code": "1558-6", "display": "Fasting glucose [Mass/volume] in Serum or Plasma"}
    assert glu["code"]["coding"][1]["system"] == "https://fhir.cn-ehr.org/CodeSystem/example-local-lab"
    assert glu["valueQuantity"] == {"value": 7.2, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"}
    assert glu["referenceRange"] == [{"low": {"value": 3.9, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"}, "high": {"value": 6.1, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"}}]
    assert glu["effectiveDateTime"] == "2025-03-13T08:10:00+08:00"
    assert glu["interpretation"][0]["coding"][0]["code"] == "H"
    assert {"system": "urn:oid:2.16.156.10011.1.33", "value": "JY250313042/GLU"} in glu["identifier"]
    crea = obs["CREA"]
    assert crea["code"]["coding"][0]["code"] == "2160-0" and crea["valueQuantity"]["value"] == 68 and crea["valueQuantity"]["code"] == "umol/L"
    e = _one(units, "encounter")
    assert e["period"] == {"start": "2025-03-13T08:00:00+08:00"} and "diagnosis" not in e
    # the same resident at the same hospital as the C0002: one source Patient record
    p2 = _one(units, "patient")
    assert p2 == _one(_parse("c0002-outpatient.xml")[1], "patient")


def test_unsafe_and_malformed_documents_are_rejected():
    c = EmrConnector()
    evil = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><ClinicalDocument xmlns="urn:hl7-org:v3">&e;</ClinicalDocument>'
    units, rejections, received = c.parse_page(evil)
    assert units == [] and received == 1 and rejections[0].code == "not-well-formed"
    page = orjson.dumps({"documents": [{"id": "X1", "xml": "<ClinicalDocument"}]})
    units, rejections, _ = c.parse_page(page)
    assert [(r.kind, r.record_id) for r in rejections] == [("page", "doc/X1")]
    bad = (DATA / "c0002-outpatient.xml").read_text(encoding="utf-8").replace("11010519491231002X", "110105194912310021")
    units, rejections, _ = c.parse_page(bad.encode())
    assert units == [] and [(r.kind, r.code) for r in rejections] == [("document", "id-check-digit")]
    bad = (DATA / "c0002-outpatient.xml").read_text(encoding="utf-8").replace('<birthTime value="19491231"/>', '<birthTime value="19490230"/>')
    assert [r.code for r in c.parse_page(bad.encode())[1]] == ["impossible-date"]


async def _provenance_ok(server, resources: list[dict]) -> None:
    for r in resources:
        key = f"{r['resourceType']}/{r['id']}"
        version = int(r["meta"]["versionId"])
        prov = await server.store.current("Provenance", provenance_id(r["resourceType"], r["id"], version))
        assert prov is not None and not prov.deleted, f"{key} has no Provenance"
        body = orjson.loads(prov.raw)
        assert body["target"] == [{"reference": f"{key}/_history/{version}"}]
        assert r["meta"]["source"].startswith(f"{SRC}#") and body["meta"]["source"] == r["meta"]["source"]


async def _emr_resources(server) -> list[dict]:
    db = database(server)
    out = []
    for type_ in ("Patient", "Encounter", "Condition", "Observation", "DocumentReference"):
        async for doc in db[type_].find({"_id": {"$regex": "^emr-"}, "d": False}, {"r": 1}):
            out.append(orjson.loads(doc["r"]))
    return out


async def test_pushed_files_store_validated_traceable_and_idempotent(server):
    linker = RecordingLinker()
    files = [str(DATA / "c0002-outpatient.xml"), str(DATA / "c0007-lab.xml")]
    report = await runner.sync(server, EmrConnector(), FileTransport(files), linker=linker)
    assert report.error is None and report.balanced
    # 5 + 6 units; the Patient of the second document is the same record, unchanged; UA rejected
    assert (report.received, report.created, report.updated, report.unchanged, report.rejected) == (11, 9, 0, 1, 1)
    assert len(linker.calls) == 1
    stored = await _emr_resources(server)
    assert len(stored) == 9
    await _provenance_ok(server, stored)
    # the DocumentReference's Binary holds the original bytes
    raw = (DATA / "c0007-lab.xml").read_bytes()
    binary = await server.store.current("Binary", hashlib.sha256(raw).hexdigest())
    assert binary is not None and base64.b64decode(orjson.loads(binary.raw)["data"]) == raw
    again = await runner.sync(server, EmrConnector(), FileTransport(files), linker=linker)
    assert (again.received, again.created, again.updated, again.unchanged, again.rejected) == (11, 0, 0, 10, 1)
    letters = await deadletter.list_open(server, "sh-hospital-emr")
    assert [(d["record_id"], d["code"]) for d in letters] == [("obs/HX-C0007-20250313-0042/UA", "unknown-code")]


async def test_simulator_full_sync_counts_provenance_and_resync(server):
    up = EmrUpstream(seed=11, residents=40)
    httpd, url = up.start(token="t0ken")
    try:
        policy = RetryPolicy(retries=4, base=0.01, cap=0.05)
        transport = HttpTransport(url, "t0ken", page_size=25, policy=policy, seed=1)
        try:
            report = await runner.sync(server, EmrConnector(), transport, linker=RecordingLinker(), full=True)
        finally:
            await transport.close()
        assert report.error is None and report.balanced
        totals = {k: getattr(report, k) for k in ("received", "created", "updated", "unchanged", "rejected")}
        assert totals == {k: up.truth[k] for k in totals}
        assert up.truth["rejected"] == sum(up.planted[k] for k in ("malformed", "bad-id", "impossible-birth", "unknown-lab-code"))
        await _provenance_ok(server, [r for r in await _emr_resources(server) if r["id"].startswith("emr-")])
        transport = HttpTransport(url, "t0ken", page_size=50, policy=policy, seed=1)
        try:
            again = await runner.sync(server, EmrConnector(), transport, linker=RecordingLinker(), full=True)
        finally:
            await transport.close()
        assert again.created == again.updated == 0 and again.rejected == up.truth["rejected"]
        assert again.unchanged == up.truth["received"] - up.truth["rejected"]
    finally:
        httpd.shutdown()
        httpd.server_close()
