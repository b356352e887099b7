"""The hospital EMR connector (WS/T 500 CDA R2): hand-written C0001 / C0002 / C0007 / C0032 / C0053
documents checked field by field (medications and procedures included), then the registry simulator
over HTTP → transport → mapping → validated writes with Provenance and raw payloads, against a real
mongod.

Expected values come from the hand-written fixtures in tests/data/emr/ and the simulator's plan.
"""

from __future__ import annotations

import base64
import copy
import hashlib
from pathlib import Path

import orjson
import pytest

from helpers import RecordingLinker
from fhir_server.connectors import deadletter, runner
from fhir_server.connectors._db import database
from fhir_server.connectors.emr import EmrConnector
from fhir_server.connectors.mapping import shipped
from fhir_server.connectors.provenance import provenance_id
from fhir_server.connectors.transport import FileTransport, HttpTransport, RetryPolicy
from fhir_server.simulators.emr import EmrUpstream
from fhir_server.storage import field_crypto  # the stored JSON holds ID and phone numbers encrypted

DATA = Path(__file__).parent / "data" / "emr"
SD = "https://fhir.cn-ehr.org/StructureDefinition"
SRC = "https://fhir.cn-ehr.org/identifier/source/sh-hospital-emr"
UCUM = "http://unitsofmeasure.org"
ROUTE = "urn:oid:2.16.156.10011.2.3.1.158"
DRUG = "urn:oid:1.2.156.112604.1.2.2"
ICD9 = "urn:oid:2.16.156.10011.2.3.3.12"
pytestmark = pytest.mark.timeout(120)


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
    for type_ in ("Patient", "Encounter", "Condition", "Observation", "MedicationRequest", "MedicationStatement", "Procedure", "DocumentReference"):
        async for doc in db[type_].find({"_id": {"$regex": "^emr-"}, "d": False}, {"r": 1}):
            out.append(orjson.loads(field_crypto.decode(doc["r"])))
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
        planted = ("malformed", "bad-id", "impossible-birth", "unknown-lab-code", "unknown-route-code", "impossible-procedure-date")
        assert up.truth["rejected"] == sum(up.planted[k] for k in planted)
        # the plan covers every document type and the new record types, faults included
        assert {c for _, c, _ in up.deliveries} == {"C0001", "C0002", "C0007", "C0032", "C0053"}
        assert all(up.planted[k] for k in ("unknown-route-code", "impossible-procedure-date"))
        assert report.by_kind["medication"]["created"] and report.by_kind["procedure"]["created"]
        assert report.by_kind["medication"]["rejected"] == up.planted["unknown-route-code"]
        assert report.by_kind["procedure"]["rejected"] == up.planted["impossible-procedure-date"]
        # each stay's 病案首页 updates the Encounter its 出院小结 created: the only updates of a first sync
        assert report.updated == report.by_kind["encounter"]["updated"] == sum(1 for _, c, _ in up.deliveries if c == "C0032")
        stored = await _emr_resources(server)
        assert {r["resourceType"] for r in stored} >= {"MedicationRequest", "MedicationStatement", "Procedure"}
        await _provenance_ok(server, [r for r in stored if r["id"].startswith("emr-")])
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


# -- C0001 / C0032 / C0053 and prescriptions: expected values written from the fixture documents --------


def _by_source(units, kind):
    """Resources of ``kind`` by the tail of their source record id (…/<n> or …/<code>)."""
    return {u.record_id.rsplit("/", 1)[1]: u.resource for u in units if u.kind == kind}


def _document_reference_ok(d, raw, code, name, template, doc_id, when, author):
    assert d["masterIdentifier"] == {"system": "urn:oid:2.16.156.10011.1.1", "value": doc_id}
    assert d["type"]["coding"] == [{"system": "urn:oid:2.16.156.10011.2.4", "code": code, "display": name}]
    att = d["content"][0]["attachment"]
    assert att["url"] == f"Binary/{hashlib.sha256(raw).hexdigest()}" and att["size"] == len(raw)
    assert att["hash"] == base64.b64encode(hashlib.sha1(raw).digest()).decode() and att["contentType"] == "application/hl7-v3+xml"
    assert d["content"][0]["format"] == {"system": "urn:oid:2.16.156.10011.2.1.1", "code": template}
    assert d["date"] == when and d["author"] == [{"display": author}]
    assert d["meta"]["source"] == f"{SRC}#doc/{doc_id}"


def test_c0001_summary_field_by_field():
    raw, units, rejections, received = _parse("c0001-summary.xml")
    assert rejections == [] and received == 4
    # 病历概要 has no encompassingEncounter: no Encounter, and nothing refers to one
    assert sorted(u.kind for u in units) == ["condition", "condition", "document", "patient"]
    p = _one(units, "patient")
    assert p["meta"] == {"source": f"{SRC}#patient/42502657200/2.16.156.10011.1.3/310101195603084520", "profile": [f"{SD}/cn-patient"]}
    assert p["name"] == [{"text": "李淑珍", "family": "李", "given": ["淑珍"]}]
    assert p["gender"] == "female" and p["birthDate"] == "1956-03-08"
    assert {i["system"]: i["value"] for i in p["identifier"]} == {
        SRC: "patient/42502657200/2.16.156.10011.1.3/310101195603084520",
        "urn:oid:2.16.156.10011.1.3": "310101195603084520",
        "urn:oid:2.16.156.10011.1.19": "HC3101010098765",
    }
    assert p["telecom"] == [{"system": "phone", "value": "13601234567", "use": "mobile"}]
    assert p["address"] == [{"use": "home", "text": "上海市黄浦区南京东路100号1201室", "country": "CN"}]
    conds = _by_source(units, "condition")
    assert set(conds) == {"I10", "E11.9"}
    for c in conds.values():
        # past illnesses are problem-list items (cn-cond-1: with their diagnosis date), not a visit's diagnoses
        assert c["category"] == [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "problem-list-item"}]}]
        assert "encounter" not in c and c["recordedDate"] == "2025-04-01T10:00:00+08:00"
        assert c["subject"] == {"reference": f"Patient/{p['id']}"} and c["meta"]["profile"] == [f"{SD}/cn-condition"]
    assert conds["I10"]["onsetDateTime"] == "2012-05-15" and conds["E11.9"]["onsetDateTime"] == "2018-09-20"
    assert conds["E11.9"]["code"] == {"coding": [{"system": "urn:oid:2.16.156.10011.2.3.3.11", "code": "E11.9", "display": "2型糖尿病不伴有并发症"}], "text": "2型糖尿病不伴有并发症"}
    d = _one(units, "document")
    _document_reference_ok(d, raw, "C0001", "病历概要", "2.16.156.10011.2.1.1.21", "HX-C0001-20250401-0007", "2025-04-01T10:00:00+08:00", "陈慧")
    assert d["context"] == {"related": [{"reference": f"Condition/{conds['I10']['id']}"}, {"reference": f"Condition/{conds['E11.9']['id']}"}]}
    # a past illness without its diagnosis date says too little: that entry alone is refused
    undated = raw.decode("utf-8").replace('<effectiveTime value="20120515"/>', "")
    units, rejections, received = EmrConnector().parse_page(undated.encode("utf-8"))
    assert received == 4 and [(r.kind, r.record_id, r.code) for r in rejections] == [("condition", "condition/HX-C0001-20250401-0007/I10", "schema")]
    assert "确诊日期" in rejections[0].reason_zh and "diagnosis date" in rejections[0].reason_en


def test_c0002_prescription_field_by_field():
    raw, units, rejections, received = _parse("c0002-prescription.xml")
    # four drugs: the fourth (route code 77, 雾化, not in CV06.00.102) alone is refused
    assert received == 8 and [(r.kind, r.record_id, r.code) for r in rejections] == [("medication", "med/HX-C0002-20250402-0019/4", "unknown-code")]
    assert "77" in rejections[0].reason_zh and "route" in rejections[0].reason_en
    assert sorted(u.kind for u in units) == ["condition", "document", "encounter", "medication", "medication", "medication", "patient"]
    p, e = _one(units, "patient"), _one(units, "encounter")
    assert p == _one(_parse("c0002-outpatient.xml")[1], "patient")  # the same resident, one source Patient
    assert e["identifier"] == [{"system": "urn:oid:2.16.156.10011.1.11", "value": "MZ20250402007"}] and e["period"] == {"start": "2025-04-02T10:05:00+08:00"}
    meds = _by_source(units, "medication")
    assert set(meds) == {"1", "2", "3"} and {m["resourceType"] for m in meds.values()} == {"MedicationRequest"}
    for m in meds.values():
        assert m["intent"] == "order" and "profile" not in m["meta"]  # no CN profile covers MedicationRequest
        assert m["category"] == [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category", "code": "outpatient"}]}]
        assert m["subject"] == {"reference": f"Patient/{p['id']}"} and m["encounter"] == {"reference": f"Encounter/{e['id']}"}
        assert m["authoredOn"] == "2025-04-02T10:20:00+08:00" and m["requester"] == {"display": "顾志明"}
    nifedipine = meds["1"]
    assert nifedipine["meta"]["source"] == f"{SRC}#med/HX-C0002-20250402-0019/1"
    assert nifedipine["identifier"] == [{"system": SRC, "value": "med/HX-C0002-20250402-0019/1"}]
    assert nifedipine["status"] == "completed"  # the entry's statusCode says so
    assert nifedipine["medicationCodeableConcept"] == {"coding": [{"system": DRUG, "code": "XY0102", "display": "硝苯地平控释片(30mg)"}], "text": "硝苯地平控释片"}
    assert nifedipine["dosageInstruction"] == [
        {
            "text": "每日1次，每次1片，口服",
            "timing": {"code": {"text": "qd"}, "repeat": {"frequency": 1, "period": 1, "periodUnit": "d", "boundsDuration": {"value": 14, "unit": "d", "system": UCUM, "code": "d"}}},
            "route": {"coding": [{"system": ROUTE, "code": "1", "display": "口服"}, {"system": "http://snomed.info/sct", "code": "26643006"}], "text": "口服"},
            "doseAndRate": [{"doseQuantity": {"value": 30, "unit": "mg", "system": UCUM, "code": "mg"}}],
        }
    ]
    assert nifedipine["dispenseRequest"] == {"quantity": {"value": 14, "unit": "片"}, "expectedSupplyDuration": {"value": 14, "unit": "d", "system": UCUM, "code": "d"}}
    metformin = meds["2"]
    assert metformin["status"] == "unknown"  # no statusCode: the document does not say what became of it
    assert metformin["medicationCodeableConcept"] == {"text": "盐酸二甲双胍片"}  # <code/>: the name alone
    dose = metformin["dosageInstruction"][0]
    assert dose["timing"]["code"] == {"text": "TID"} and dose["timing"]["repeat"]["frequency"] == 3 and dose["timing"]["repeat"]["periodUnit"] == "d"
    assert dose["doseAndRate"][0]["doseQuantity"] == {"value": 0.5, "unit": "g", "system": UCUM, "code": "g"}
    assert metformin["dispenseRequest"]["quantity"] == {"value": 42, "unit": "片"}
    nitro = meds["3"]
    dose = nitro["dosageInstruction"][0]
    assert dose["asNeededBoolean"] is True and dose["timing"] == {"code": {"text": "prn"}}
    assert dose["route"]["coding"] == [{"system": ROUTE, "code": "3", "display": "舌下用药"}, {"system": "http://snomed.info/sct", "code": "37839007"}]
    assert "dispenseRequest" not in nitro
    d = _one(units, "document")
    _document_reference_ok(d, raw, "C0002", "门(急)诊病历", "2.16.156.10011.2.1.1.22", "HX-C0002-20250402-0019", "2025-04-02T10:20:00+08:00", "顾志明")
    assert {r["reference"] for r in d["context"]["related"]} >= {f"MedicationRequest/{m['id']}" for m in meds.values()}


def test_c0053_discharge_summary_field_by_field():
    raw, units, rejections, received = _parse("c0053-discharge.xml")
    assert rejections == [] and received == 10
    p = _one(units, "patient")
    assert p["meta"]["source"] == f"{SRC}#patient/42500000000003/2.16.156.10011.1.3/31010419580615003X"
    assert p["name"] == [{"text": "张建华", "family": "张", "given": ["建华"]}] and p["gender"] == "male" and p["birthDate"] == "1958-06-15"
    e = _one(units, "encounter")
    assert e["meta"]["source"] == f"{SRC}#encounter/42500000000003/2.16.156.10011.1.12/ZY2025000123"
    assert e["class"] == {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP", "display": "住院"}
    assert e["identifier"] == [{"system": "urn:oid:2.16.156.10011.1.12", "value": "ZY2025000123"}]
    assert e["period"] == {"start": "2025-03-10T14:30:00+08:00", "end": "2025-03-18T10:00:00+08:00"}  # admission, discharge
    assert e["location"] == [{"location": {"display": "心内科病区"}}]
    assert e["serviceProvider"] == {"identifier": {"system": "urn:oid:2.16.156.10011.1.5", "value": "42500000000003"}, "display": "上海交通大学医学院附属瑞金医院"}
    conds = _by_source(units, "condition")
    assert set(conds) == {"I25.1", "I10"} and conds["I25.1"]["onsetDateTime"] == "2025-03-18" and "onsetDateTime" not in conds["I10"]
    assert conds["I25.1"]["category"][0]["coding"][0]["code"] == "encounter-diagnosis" and conds["I25.1"]["encounter"] == {"reference": f"Encounter/{e['id']}"}
    assert [x["condition"]["reference"] for x in e["diagnosis"]] == [f"Condition/{conds['I25.1']['id']}", f"Condition/{conds['I10']['id']}"]
    meds = _by_source(units, "medication")
    assert {k: m["resourceType"] for k, m in meds.items()} == {"1": "MedicationStatement", "2": "MedicationStatement", "3": "MedicationRequest", "4": "MedicationRequest"}
    heparin = meds["1"]  # 住院期间用药: what the patient received, reported after the fact
    assert heparin["status"] == "completed" and "profile" not in heparin["meta"]
    assert heparin["category"] == {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/medication-statement-category", "code": "inpatient"}]}
    assert heparin["medicationCodeableConcept"] == {"coding": [{"system": DRUG, "code": "LD0301", "display": "低分子肝素钙注射液"}], "text": "低分子肝素钙注射液"}
    assert heparin["subject"] == {"reference": f"Patient/{p['id']}"} and heparin["context"] == {"reference": f"Encounter/{e['id']}"}
    assert heparin["effectivePeriod"] == {"start": "2025-03-10", "end": "2025-03-14"}
    assert heparin["dateAsserted"] == "2025-03-18T11:00:00+08:00" and heparin["informationSource"] == {"display": "陈静"}
    assert heparin["dosage"] == [
        {
            "timing": {"code": {"text": "q12h"}, "repeat": {"frequency": 1, "period": 12, "periodUnit": "h"}},
            "route": {"coding": [{"system": ROUTE, "code": "401", "display": "皮下注射"}, {"system": "http://snomed.info/sct", "code": "34206005"}], "text": "皮下注射"},
            "doseAndRate": [{"doseQuantity": {"value": 4100, "unit": "IU", "system": UCUM, "code": "[iU]"}}],
        }
    ]
    assert meds["2"]["medicationCodeableConcept"] == {"text": "阿司匹林肠溶片"} and meds["2"]["effectivePeriod"] == {"start": "2025-03-10", "end": "2025-03-18"}
    statin = meds["3"]  # 出院带药: prescribed and dispensed at discharge
    assert (statin["status"], statin["intent"]) == ("unknown", "order")
    assert statin["category"] == [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category", "code": "discharge"}]}]
    assert statin["medicationCodeableConcept"]["coding"] == [{"system": DRUG, "code": "XY0207", "display": "阿托伐他汀钙片"}]
    assert statin["encounter"] == {"reference": f"Encounter/{e['id']}"} and statin["authoredOn"] == "2025-03-18T11:00:00+08:00"
    dose = statin["dosageInstruction"][0]
    assert dose["text"] == "每晚1片，口服"
    assert dose["timing"]["repeat"] == {"frequency": 1, "period": 1, "periodUnit": "d", "when": ["HS"], "boundsDuration": {"value": 30, "unit": "d", "system": UCUM, "code": "d"}}
    assert dose["doseAndRate"] == [{"doseQuantity": {"value": 20, "unit": "mg", "system": UCUM, "code": "mg"}}]
    assert statin["dispenseRequest"] == {"quantity": {"value": 30, "unit": "片"}, "expectedSupplyDuration": {"value": 30, "unit": "d", "system": UCUM, "code": "d"}}
    assert meds["4"]["medicationCodeableConcept"]["text"] == "硫酸氢氯吡格雷片" and meds["4"]["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]["value"] == 75
    proc = _one(units, "procedure")
    assert proc["meta"] == {"source": f"{SRC}#proc/HX-C0053-20250318-0005/1"}
    assert proc["status"] == "completed"
    assert proc["code"] == {"coding": [{"system": ICD9, "code": "36.07", "display": "药物洗脱冠状动脉支架置入"}], "text": "药物洗脱冠状动脉支架置入"}
    assert proc["performedDateTime"] == "2025-03-12" and proc["performer"] == [{"function": {"text": "手术者"}, "actor": {"display": "王建国"}}]
    assert proc["subject"] == {"reference": f"Patient/{p['id']}"} and proc["encounter"] == {"reference": f"Encounter/{e['id']}"}
    d = _one(units, "document")
    _document_reference_ok(d, raw, "C0053", "出院小结", "2.16.156.10011.2.1.1.73", "HX-C0053-20250318-0005", "2025-03-18T11:00:00+08:00", "陈静")
    assert d["context"]["encounter"] == [{"reference": f"Encounter/{e['id']}"}] and len(d["context"]["related"]) == 7


def test_c0032_inpatient_homepage_field_by_field():
    raw, units, rejections, received = _parse("c0032-homepage.xml")
    # three operations: the third is dated 31 February and alone is refused
    assert received == 8 and [(r.kind, r.record_id, r.code) for r in rejections] == [("procedure", "proc/HX-C0032-20250320-0011/3", "impossible-date")]
    assert "20250231" in rejections[0].reason_zh and "20250231" in rejections[0].reason_en
    stay = _parse("c0053-discharge.xml")[1]
    p, e = _one(units, "patient"), _one(units, "encounter")
    assert p == _one(stay, "patient")
    # the same 住院号: the same Encounter record as the 出院小结's, with this document's diagnoses
    e53 = _one(stay, "encounter")
    assert e["id"] == e53["id"] and e["period"] == {"start": "2025-03-10T14:30:00+08:00", "end": "2025-03-18T10:00:00+08:00"}
    assert {k: v for k, v in e.items() if k != "diagnosis"} == {k: v for k, v in e53.items() if k != "diagnosis"} and e["diagnosis"] != e53["diagnosis"]
    assert set(_by_source(units, "condition")) == {"I25.1", "I10"}
    procs = _by_source(units, "procedure")
    assert set(procs) == {"1", "2"}
    angio = procs["1"]
    assert angio["code"] == {"coding": [{"system": ICD9, "code": "88.57", "display": "其他和未特指的冠状动脉造影术"}], "text": "其他和未特指的冠状动脉造影术"}
    assert angio["performedDateTime"] == "2025-03-12"
    # the surgeon's <name> carries a <prefix>手术者</prefix>: the name is 王建国 alone
    assert angio["performer"] == [{"function": {"text": "手术者"}, "actor": {"display": "王建国"}}, {"function": {"text": "第一助手"}, "actor": {"display": "刘洋"}}]
    stent = procs["2"]
    assert stent["code"] == {"coding": [{"system": ICD9, "code": "36.0700", "display": "药物洗脱冠状动脉支架置入"}], "text": "经皮冠状动脉药物洗脱支架置入术"}
    assert stent["performedPeriod"] == {"start": "2025-03-12T10:15:00+08:00", "end": "2025-03-12T11:20:00+08:00"} and "performedDateTime" not in stent
    assert stent["performer"] == [{"function": {"text": "手术者"}, "actor": {"display": "王建国"}}]
    assert stent["identifier"] == [{"system": SRC, "value": "proc/HX-C0032-20250320-0011/2"}] and stent["encounter"] == {"reference": f"Encounter/{e['id']}"}
    d = _one(units, "document")
    _document_reference_ok(d, raw, "C0032", "住院病案首页", "2.16.156.10011.2.1.1.52", "HX-C0032-20250320-0011", "2025-03-20T16:00:00+08:00", "周敏")
    # a code that is not ICD-9-CM-3 (an ICD-10 code in the procedure slot) is refused too
    wrong = raw.decode("utf-8").replace('code="88.57"', 'code="I25.1"')
    assert [(r.record_id, r.code) for r in EmrConnector().parse_page(wrong.encode("utf-8"))[1]][0] == ("proc/HX-C0032-20250320-0011/1", "unknown-code")


async def test_inpatient_and_prescription_files_store_and_dead_letters_replay(server):
    files = [str(DATA / f) for f in ("c0001-summary.xml", "c0002-prescription.xml", "c0053-discharge.xml", "c0032-homepage.xml")]
    report = await runner.sync(server, EmrConnector(), FileTransport(files), linker=RecordingLinker())
    assert report.error is None and report.balanced
    assert report.received == 4 + 8 + 10 + 8 and report.rejected == 2  # nothing refused by the server's validation
    k = report.by_kind
    assert (k["medication"]["created"], k["medication"]["rejected"]) == (3 + 4, 1)
    assert (k["procedure"]["created"], k["procedure"]["rejected"]) == (1 + 2, 1)
    # the 首页 (written after discharge) updates the stay's Encounter that the 出院小结 created
    assert (k["encounter"]["created"], k["encounter"]["updated"]) == (2, 1)
    assert (k["condition"]["created"], k["document"]["created"], k["patient"]["received"]) == (2 + 1 + 2 + 2, 4, 4)
    stored = await _emr_resources(server)
    by_type = {}
    for r in stored:
        by_type.setdefault(r["resourceType"], set()).add(r["meta"]["source"].split("#", 1)[1])
    assert {"med/HX-C0053-20250318-0005/1", "med/HX-C0053-20250318-0005/2"} <= by_type["MedicationStatement"]
    assert {"med/HX-C0002-20250402-0019/1", "med/HX-C0053-20250318-0005/4"} <= by_type["MedicationRequest"]
    assert {"proc/HX-C0053-20250318-0005/1", "proc/HX-C0032-20250320-0011/1", "proc/HX-C0032-20250320-0011/2"} <= by_type["Procedure"]
    await _provenance_ok(server, stored)
    raw = (DATA / "c0032-homepage.xml").read_bytes()
    binary = await server.store.current("Binary", hashlib.sha256(raw).hexdigest())
    assert binary is not None and base64.b64decode(orjson.loads(binary.raw)["data"]) == raw
    again = await runner.sync(server, EmrConnector(), FileTransport(files), linker=RecordingLinker())
    assert (again.received, again.created, again.updated, again.unchanged, again.rejected) == (30, 0, 0, 28, 2)
    letters = {d["record_id"]: d for d in await deadletter.list_open(server, "sh-hospital-emr")}
    assert letters["med/HX-C0002-20250402-0019/4"]["code"] == "unknown-code"
    assert letters["proc/HX-C0032-20250320-0011/3"]["code"] == "impossible-date"
    # the route table is data: once the mapping knows code 77, a replay stores that prescription alone
    mapping = copy.deepcopy(shipped("emr"))
    mapping["medication"]["routes"]["77"] = {"display": "雾化吸入"}
    replay = await runner.replay_dead_letters(server, EmrConnector(mapping), linker=RecordingLinker(), keys=[letters["med/HX-C0002-20250402-0019/4"]["_id"]])
    assert replay.rejected == 0 and replay.by_kind["medication"]["created"] == 1
    still = {d["record_id"] for d in await deadletter.list_open(server, "sh-hospital-emr")}
    assert "med/HX-C0002-20250402-0019/4" not in still and "proc/HX-C0032-20250320-0011/3" in still
