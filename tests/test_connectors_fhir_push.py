"""Pushed FHIR Bundles (fhir_server/connectors/fhir_push.py) end to end against a real mongod:
identity (deterministic source ids, the real MPI), reference rewriting, idempotence, Provenance
with the entry's SHA-256, dead letters, whole-push errors.

Every expected value comes from the hand-built bundles below and from the rules written in
mappings/fhir-push/README.md (the id formula, the record ids), never from the connector's output.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random

import orjson
import pytest

from conftest import make_settings
from helpers import RecordingLinker, uid
from fhir_server.connectors import deadletter
from fhir_server.connectors._db import database
from fhir_server.connectors.fhir_push import ingest
from fhir_server.connectors.provenance import provenance_id
from fhir_server.http.app import create_app
from fhir_server.outcome import FhirError

pytestmark = pytest.mark.timeout(120)

A, B = "sh-demo-hosp-a", "sh-demo-hosp-b"
SYS = {code: f"https://fhir.cn-ehr.org/identifier/source/fhir-push/{code}" for code in (A, B)}
ORG = {A: "310000-DEMO-A", B: "310000-DEMO-B"}
MRN = "http://hosp.example/mrn"
VISIT = "http://hosp.example/visit"
ID_CARD = "urn:oid:2.16.156.10011.1.3"
PUSHED_SOURCE = "https://fhir.cn-ehr.org/StructureDefinition/cn-pushed-meta-source"
SD = "https://fhir.cn-ehr.org/StructureDefinition"


@pytest.fixture(scope="module")
async def server(mongo_uri):
    app = create_app(make_settings(mongo_uri, load_conformance=True))
    async with app.router.lifespan_context(app):
        yield app.state.server


# -- the rules, restated from the README -----------------------------------------------------------


def sid(code: str, type_: str, record_id: str) -> str:
    """fp-<first 3 letters of the type, lower case>-<sha256("<source code>|<record id>")[:40]>"""
    return f"fp-{type_[:3].lower()}-" + hashlib.sha256(f"{code}|{record_id}".encode()).hexdigest()[:40]


def body(entries: list[dict], type_: str = "transaction") -> bytes:
    return json.dumps({"resourceType": "Bundle", "type": type_, "entry": entries}, ensure_ascii=False).encode()


def entry_sha(entry: dict) -> str:
    """The entry's bytes as they stand inside ``body(...)`` (json.dumps nests identically)."""
    return hashlib.sha256(json.dumps(entry, ensure_ascii=False).encode()).hexdigest()


def id_number(rng: random.Random, birth: str = "19800512", district: str = "310104") -> str:
    """A 身份证 number with a correct GB 11643 check character."""
    body17 = f"{district}{birth}{rng.randrange(100, 999)}"
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    return body17 + "10X98765432"[sum(int(c) * w for c, w in zip(body17, weights)) % 11]


def patient(**extra) -> dict:
    return {"resourceType": "Patient", "name": [{"text": "张伟", "family": "张", "given": ["伟"]}], "gender": "male", "birthDate": "1980-05-12", **extra}


def observation(subject: str, value: float, **extra) -> dict:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}], "text": "体重"},
        "subject": {"reference": subject},
        "valueQuantity": {"value": value, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
        **extra,
    }


async def read(server, type_: str, id_: str) -> dict:
    stored = await server.store.current(type_, id_)
    assert stored is not None and not stored.deleted, f"{type_}/{id_} is not stored"
    return orjson.loads(stored.raw)


async def letters(server, source: str, run_id: str) -> list[dict]:
    return [d for d in await deadletter.list_open(server, source, limit=10_000) if d["run_id"] == run_id]


# -- tests -------------------------------------------------------------------------------------------


async def test_transaction_references_rewritten_with_provenance(server):
    u = uid()
    pid = f"p-{u[:12]}"
    entries = [
        {
            "fullUrl": f"urn:uuid:{u[:8]}-0000-4000-8000-000000000001",
            # the hospital's own meta, a Patient.link and a forged golden tag
            "resource": patient(
                id=pid,
                meta={"source": "http://hosp-a.example/fhir#rec-77", "versionId": "9", "lastUpdated": "2025-03-01T10:00:00+08:00",
                      "tag": [{"system": "https://fhir.cn-ehr.org/CodeSystem/mpi", "code": "golden"}]},
                identifier=[{"system": MRN, "value": u}],
                link=[{"other": {"reference": "Patient/somebody-else"}, "type": "seealso"}],
            ),
            "request": {"method": "PUT", "url": f"Patient/{pid}"},
        },
        {
            "fullUrl": f"urn:uuid:{u[:8]}-0000-4000-8000-000000000002",
            "resource": {
                "resourceType": "Encounter",
                "identifier": [{"system": VISIT, "value": u}],
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "subject": {"reference": f"urn:uuid:{u[:8]}-0000-4000-8000-000000000001"},
            },
            "request": {"method": "POST", "url": "Encounter"},
        },
        {
            "fullUrl": f"urn:uuid:{u[:8]}-0000-4000-8000-000000000003",
            "resource": observation(f"Patient?identifier={MRN}|{u}", 61.5, encounter={"reference": f"urn:uuid:{u[:8]}-0000-4000-8000-000000000002"}),
            "request": {"method": "PUT", "url": f"Observation/obs-{u[:12]}"},
        },
        {
            "fullUrl": f"urn:uuid:{u[:8]}-0000-4000-8000-000000000004",
            "resource": {
                "resourceType": "Condition",
                "identifier": [{"system": "http://hosp.example/dx", "value": u}],
                "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "I10"}]},
                "subject": {"reference": f"Patient/{pid}"},
            },
            "request": {"method": "POST", "url": "Condition", "ifNoneExist": f"identifier=http://hosp.example/dx|{u}"},
        },
    ]
    linker = RecordingLinker()
    report = await ingest(server, body(entries), A, linker=linker)
    assert (report.received, report.created, report.rejected) == (4, 4, 0), await letters(server, A, report.run_id)
    assert report.balanced

    patient_id = sid(A, "Patient", f"Patient/{pid}")
    encounter_id = sid(A, "Encounter", f"Encounter?identifier={VISIT}|{u}")
    obs_id = sid(A, "Observation", f"Observation/obs-{u[:12]}")
    cond_id = sid(A, "Condition", f"Condition?identifier=http://hosp.example/dx|{u}")
    assert linker.calls == [patient_id]  # every written Patient, and only those, goes to the MPI

    p = await read(server, "Patient", patient_id)
    assert p["meta"]["source"] == f"{SYS[A]}#Patient/{pid}"
    assert {"url": PUSHED_SOURCE, "valueUri": "http://hosp-a.example/fhir#rec-77"} in p["meta"]["extension"]
    assert p["meta"]["versionId"] == "1" and "tag" not in p["meta"] and "link" not in p
    assert p["identifier"] == [{"system": MRN, "value": u}]
    enc = await read(server, "Encounter", encounter_id)
    assert enc["subject"] == {"reference": f"Patient/{patient_id}"}  # urn:uuid
    obs = await read(server, "Observation", obs_id)
    assert obs["subject"] == {"reference": f"Patient/{patient_id}"}  # conditional reference
    assert obs["encounter"] == {"reference": f"Encounter/{encounter_id}"}
    cond = await read(server, "Condition", cond_id)
    assert cond["subject"] == {"reference": f"Patient/{patient_id}"}  # relative Patient/x

    # Provenance per version: the hospital as author, the connector as assembler, the entry's bytes.
    for entry, (type_, id_) in zip(entries, [("Patient", patient_id), ("Encounter", encounter_id), ("Observation", obs_id), ("Condition", cond_id)]):
        sha = entry_sha(entry)
        prov = await read(server, "Provenance", provenance_id(type_, id_, 1))
        assert prov["target"] == [{"reference": f"{type_}/{id_}/_history/1"}]
        assert prov["agent"][0]["who"]["identifier"]["value"] == ORG[A]
        assert "fhir-push" in prov["agent"][1]["who"]["display"] and "0.1.0" in prov["agent"][1]["who"]["display"]
        ext = {x["url"]: x for x in prov["entity"][0]["extension"]}
        assert ext[f"{SD}/cn-source-hash"]["valueString"] == sha
        assert ext[f"{SD}/cn-source-system"]["valueIdentifier"]["value"] == A
        assert prov["entity"][0]["what"]["reference"] == f"Binary/{sha}"
        binary = await read(server, "Binary", sha)
        assert binary["contentType"] == "application/fhir+json"
        assert base64.b64decode(binary["data"]) == json.dumps(entry, ensure_ascii=False).encode()


async def test_two_hospitals_one_resident_one_golden(server):
    from fhir_server.mpi import link_many as link  # the real MPI, in the batch form the runner calls

    number = id_number(random.Random(uid()))
    card = {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "NNCHN"}]}, "system": ID_CARD, "value": number}
    a_local = f"a-{uid()[:10]}"
    bundle_a = body([{"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111", "resource": patient(id=a_local, identifier=[{"system": MRN, "value": a_local}, card], telecom=[{"system": "phone", "value": "13800138000"}]), "request": {"method": "PUT", "url": f"Patient/{a_local}"}}])
    # Hospital B knows the resident only by the ID card (no id of its own), as a collection.
    bundle_b = body([{"fullUrl": "urn:uuid:22222222-2222-4222-8222-222222222222", "resource": patient(identifier=[card])}], "collection")

    ra = await ingest(server, bundle_a, A, linker=link)
    rb = await ingest(server, bundle_b, B, linker=link)
    assert (ra.created, rb.created, ra.rejected, rb.rejected) == (1, 1, 0, 0)
    assert ra.decisions == {"new": 1} and rb.decisions == {"id-match": 1}

    a_id = sid(A, "Patient", f"Patient/{a_local}")
    hashed = "sha256:" + hashlib.sha256(number.encode()).hexdigest()[:24]  # ID numbers stay out of record ids
    b_record = f"Patient?identifier={ID_CARD}|{hashed}"
    b_id = sid(B, "Patient", b_record)
    pa, pb = await read(server, "Patient", a_id), await read(server, "Patient", b_id)
    assert a_id != b_id
    assert pb["meta"]["source"] == f"{SYS[B]}#{b_record}" and number not in pb["meta"]["source"]
    prov_b = await read(server, "Provenance", provenance_id("Patient", b_id, 1))  # version 2 is the MPI's link
    assert number not in json.dumps(prov_b)
    golden_a = next(l["other"]["reference"] for l in pa["link"] if l["type"] == "refer")
    golden_b = next(l["other"]["reference"] for l in pb["link"] if l["type"] == "refer")
    assert golden_a == golden_b
    golden = await read(server, "Patient", golden_a.split("/")[1])
    assert sorted(l["other"]["reference"] for l in golden["link"]) == sorted([f"Patient/{a_id}", f"Patient/{b_id}"])
    assert any(i["value"] == number for i in golden["identifier"])
    # Re-pushing a linked Patient leaves the MPI's link in place (the runner carries it over).
    again = await ingest(server, bundle_b, B, linker=link)
    assert (again.unchanged, again.created, again.updated) == (1, 0, 0)


async def test_repush_is_a_noop_and_a_change_makes_one_version(server):
    u = uid()
    pid = f"p-{u[:12]}"
    entries = [
        {"fullUrl": f"http://hosp-a.example/fhir/Patient/{pid}", "resource": patient(id=pid, identifier=[{"system": MRN, "value": u}])},
        {"fullUrl": f"http://hosp-a.example/fhir/Observation/w-{u[:8]}", "resource": observation(f"Patient/{pid}", 60.0, id=f"w-{u[:8]}")},
        {"fullUrl": f"http://hosp-a.example/fhir/Observation/h-{u[:8]}", "resource": observation(f"http://hosp-a.example/fhir/Patient/{pid}", 61.0, id=f"h-{u[:8]}")},
    ]
    first = await ingest(server, body(entries, "collection"), A, linker=RecordingLinker())
    assert (first.created, first.rejected) == (3, 0)
    db = database(server)
    history = await db["_history"].count_documents({})
    provenances = await db["Provenance"].count_documents({})

    again = await ingest(server, body(entries, "collection"), A, linker=RecordingLinker())
    assert (again.received, again.created, again.updated, again.unchanged, again.rejected) == (3, 0, 0, 3, 0)
    assert await db["_history"].count_documents({}) == history
    assert await db["Provenance"].count_documents({}) == provenances

    # the same content laid out differently: new bytes (ledger misses) but nothing to write
    pretty = json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}, ensure_ascii=False, indent=2).encode()
    relaid = await ingest(server, pretty, A, linker=RecordingLinker())
    assert (relaid.created, relaid.updated, relaid.unchanged) == (0, 0, 3)
    assert await db["_history"].count_documents({}) == history

    changed = json.loads(json.dumps(entries))
    changed[1]["resource"]["valueQuantity"]["value"] = 60.4
    report = await ingest(server, body(changed, "collection"), A, linker=RecordingLinker())
    assert (report.created, report.updated, report.unchanged, report.rejected) == (0, 1, 2, 0)
    w_id = sid(A, "Observation", f"Observation/w-{u[:8]}")
    w = await read(server, "Observation", w_id)
    assert w["meta"]["versionId"] == "2" and w["valueQuantity"]["value"] == 60.4
    assert w["subject"] == {"reference": f"Patient/{sid(A, 'Patient', f'Patient/{pid}')}"}
    prov2 = await read(server, "Provenance", provenance_id("Observation", w_id, 2))
    assert {x["url"]: x.get("valueString") for x in prov2["entity"][0]["extension"]}[f"{SD}/cn-source-hash"] == entry_sha(changed[1])
    assert prov2["activity"]["coding"][0]["code"] == "UPDATE"
    await read(server, "Provenance", provenance_id("Observation", w_id, 1))  # the first one stays
    h = await read(server, "Observation", sid(A, "Observation", f"Observation/h-{u[:8]}"))
    assert h["meta"]["versionId"] == "1" and h["subject"] == w["subject"]  # absolute fullUrl reference


async def test_bad_entries_go_to_dead_letters_the_rest_is_stored(server):
    u = uid()
    pid = f"p-{u[:12]}"
    good_patient = {"fullUrl": "urn:uuid:aaaaaaaa-0000-4000-8000-000000000001", "resource": patient(id=pid), "request": {"method": "PUT", "url": f"Patient/{pid}"}}
    entries = [
        good_patient,
        {"fullUrl": "urn:uuid:aaaaaaaa-0000-4000-8000-000000000002", "resource": observation("urn:uuid:aaaaaaaa-0000-4000-8000-000000000001", 70.0, id=f"ok-{u[:8]}"), "request": {"method": "POST", "url": "Observation"}},
        # not valid FHIR: an unknown element
        {"fullUrl": "urn:uuid:aaaaaaaa-0000-4000-8000-000000000003", "resource": observation(f"Patient/{pid}", 71.0, id=f"bad-{u[:8]}", weight="heavy"), "request": {"method": "POST", "url": "Observation"}},
        {"request": {"method": "DELETE", "url": f"Observation/old-{u[:8]}"}},
        # a reference to something neither in the bundle nor on the server
        {"fullUrl": "urn:uuid:aaaaaaaa-0000-4000-8000-000000000005", "resource": observation(f"Patient/nobody-{u[:8]}", 72.0, id=f"d1-{u[:8]}"), "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": "urn:uuid:aaaaaaaa-0000-4000-8000-000000000006", "resource": observation("urn:uuid:aaaaaaaa-0000-4000-8000-00000000ffff", 73.0, id=f"d2-{u[:8]}"), "request": {"method": "POST", "url": "Observation"}},
        # a Patient without id or identifier, and an Observation that refers to it
        {"fullUrl": "urn:uuid:aaaaaaaa-0000-4000-8000-000000000007", "resource": patient(), "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:aaaaaaaa-0000-4000-8000-000000000008", "resource": observation("urn:uuid:aaaaaaaa-0000-4000-8000-000000000007", 74.0, id=f"d3-{u[:8]}"), "request": {"method": "POST", "url": "Observation"}},
        # a type a push must not change
        {"fullUrl": "urn:uuid:aaaaaaaa-0000-4000-8000-000000000009", "resource": {"resourceType": "SearchParameter", "id": f"sp-{u[:8]}"}, "request": {"method": "PUT", "url": f"SearchParameter/sp-{u[:8]}"}},
        # a request the connector cannot honour
        {"fullUrl": "urn:uuid:aaaaaaaa-0000-4000-8000-00000000000a", "resource": observation(f"Patient/{pid}", 75.0, id=f"m-{u[:8]}"), "request": {"method": "PUT", "url": f"Observation/m-{u[:8]}", "ifMatch": 'W/"3"'}},
        # conditional criteria other than identifier=system|value
        {"fullUrl": "urn:uuid:aaaaaaaa-0000-4000-8000-00000000000b", "resource": observation(f"Patient/{pid}", 76.0), "request": {"method": "PUT", "url": "Observation?code=http://loinc.org|29463-7"}},
    ]
    report = await ingest(server, body(entries, "batch"), A, linker=RecordingLinker())
    assert report.balanced and report.received == len(entries) == 11
    assert (report.created, report.rejected) == (2, 9)
    await read(server, "Patient", sid(A, "Patient", f"Patient/{pid}"))
    ok = await read(server, "Observation", sid(A, "Observation", f"Observation/ok-{u[:8]}"))
    assert ok["subject"] == {"reference": f"Patient/{sid(A, 'Patient', f'Patient/{pid}')}"}
    for bad in ("bad", "d1", "d2", "d3", "m"):
        assert await server.store.current("Observation", sid(A, "Observation", f"Observation/{bad}-{u[:8]}")) is None

    got = await letters(server, A, report.run_id)
    codes = sorted(d["code"] for d in got)
    assert codes == sorted(["server-refused", "unsupported-request", "dangling-reference", "dangling-reference", "no-identity", "parent-rejected", "unsupported-type", "unsupported-request", "unsupported-request"])
    by_entry = {d["context"].get("index"): d for d in got}
    assert "weight" in by_entry[2]["reason_en"] and by_entry[2]["record_id"] == f"Observation/bad-{u[:8]}"
    assert "DELETE" in by_entry[3]["reason_en"] and "删除" in by_entry[3]["reason_zh"]
    assert f"Patient/nobody-{u[:8]}" in by_entry[4]["reason_en"]
    assert "Bundle.entry[6]" in by_entry[7]["reason_en"]
    assert "identifier=system|value" in by_entry[10]["reason_en"]
    for d in got:  # Chinese and English reasons, the entry's bytes kept
        assert d["reason_zh"] and d["reason_en"] and d["reason_zh"] != d["reason_en"]
        assert d["raw"] == json.dumps(entries[d["context"]["index"]], ensure_ascii=False).encode()


async def test_later_push_refers_to_earlier_records_of_the_same_hospital_only(server):
    u = uid()
    pid = f"p-{u[:12]}"
    await ingest(server, body([{"resource": patient(id=pid, identifier=[{"system": MRN, "value": u}])}], "collection"), A, linker=RecordingLinker())
    await ingest(server, body([{"resource": patient(id=pid, identifier=[{"system": MRN, "value": u}])}], "collection"), B, linker=RecordingLinker())
    later = [
        {"resource": observation(f"Patient/{pid}", 80.0, id=f"x-{u[:8]}")},
        {"resource": observation(f"Patient?identifier={MRN}|{u}", 81.0, id=f"y-{u[:8]}")},
    ]
    report = await ingest(server, body(later, "collection"), A, linker=RecordingLinker())
    assert (report.created, report.rejected) == (2, 0), await letters(server, A, report.run_id)
    mine = f"Patient/{sid(A, 'Patient', f'Patient/{pid}')}"
    for local in ("x", "y"):  # A's own source Patient, never B's (which has the same MRN)
        assert (await read(server, "Observation", sid(A, "Observation", f"Observation/{local}-{u[:8]}")))["subject"] == {"reference": mine}
    # The same local id pushed by B names B's own source Patient.
    rb = await ingest(server, body([{"resource": observation(f"Patient/{pid}", 82.0, id=f"z-{u[:8]}")}], "collection"), B, linker=RecordingLinker())
    zb = await read(server, "Observation", sid(B, "Observation", f"Observation/z-{u[:8]}"))
    assert rb.created == 1 and zb["subject"] == {"reference": f"Patient/{sid(B, 'Patient', f'Patient/{pid}')}"}


@pytest.mark.parametrize(
    "payload, source, status, zh",
    [
        (b'{"resourceType": "Bundle", "type": "batch", "entry": [', A, 400, "JSON"),
        (b"\xff\xfe{}", A, 400, "UTF-8"),
        (b'{"resourceType": "Bundle", "type": "batch", "type": "batch"}', A, 400, "JSON"),
        (b'{"resourceType": "Patient", "id": "x"}', A, 400, "Bundle"),
        (b"[]", A, 400, "JSON"),
        (b'{"resourceType": "Bundle", "type": "document", "entry": []}', A, 400, "document"),
        (b'{"resourceType": "Bundle", "type": "batch", "entry": {}}', A, 400, "数组"),
        (b'{"resourceType": "Bundle", "type": "batch", "entry": []}', "sh-unknown-hospital", 403, "未登记"),
    ],
)
async def test_unusable_push_is_a_clear_error(server, payload, source, status, zh):
    with pytest.raises(FhirError) as caught:
        await ingest(server, payload, source, linker=RecordingLinker())
    issue = caught.value.issues[0]
    assert caught.value.status == status
    assert zh in issue.details_zh and issue.diagnostics and issue.details_zh != issue.diagnostics


async def test_empty_bundle_is_an_empty_report(server):
    report = await ingest(server, body([], "batch"), A, linker=RecordingLinker())
    assert report.balanced and report.received == 0 and report.error is None
