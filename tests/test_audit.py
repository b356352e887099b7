"""The audit trail (fhir_server/audit): BALP-shaped AuditEvents, the hash chain under concurrency,
tamper detection, the CLI, and log redaction.

Expected codes are written out from the BALP profiles (IHE.BasicAudit.Read / Query / Create /
Delete, PatientQuery) and the R4 code systems, never taken from the module under test. Every chain
test gets a database of its own on the session's real mongod.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from dataclasses import fields
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import orjson
import pytest
from click.testing import CliRunner
from pymongo import AsyncMongoClient

from conftest import make_settings
from fhir_server.audit import AuditSource, AuditTrail, AuditUnavailable, RequestRecord, anchor, append, build_events, classify, verify
from fhir_server.audit.chain import HEAD, LINKS, link_hash
from fhir_server.audit.redact import RedactingFilter, install_log_redaction, redact
from fhir_server.cli import cli
from fhir_server.config import Settings
from fhir_server.http.app import create_app
from fhir_server.search.indexes import search_indexes
from fhir_server.storage.mongo import MongoStore
from fhir_server.validation import validate_resource

pytestmark = pytest.mark.timeout(180)

SOURCE = AuditSource(observer="fhir.sh-ehr.example", site="上海市社区健康管理平台")
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)


def _codes(event: dict[str, Any], path: str) -> list[tuple[str, str]]:
    out = []
    for agent in event[path]:
        for c in agent["type"]["coding"] if path == "agent" else [agent["type"]]:
            out.append((c["system"], c["code"]))
    return out


def _agent(event: dict[str, Any], system: str, code: str) -> dict[str, Any]:
    found = [a for a in event["agent"] if any(c["system"] == system and c["code"] == code for c in a["type"]["coding"])]
    assert len(found) == 1, (system, code, event["agent"])
    return found[0]


def _entities(event: dict[str, Any], type_code: str, role_code: str | None) -> list[dict[str, Any]]:
    return [
        e
        for e in event.get("entity", [])
        if e["type"]["code"] == type_code and (role_code is None or (e.get("role") or {}).get("code") == role_code)
    ]


def _structurally_valid(event: dict[str, Any]) -> None:
    errors = [i for i in validate_resource(event) if i.severity in ("error", "fatal")]
    assert not errors, [(i.expression, i.diagnostics) for i in errors]


# -- events --------------------------------------------------------------------------------------


def test_read_event_has_balp_read_shape():
    rec = RequestRecord(
        method="GET",
        path="/fhir/Patient/p1",
        status=200,
        client_id="community-app",
        user_id="u-42",
        user_name="王医生",
        fhir_user="Practitioner/d1",
        roles=("family-doctor",),
        remote_addr="10.1.2.3",
        user_agent="curl/8.0",
        server_address="fhir.sh-ehr.example",
        request_id="req-1",
        started=T0,
        ended=T0 + timedelta(milliseconds=12),
    )
    (ev,) = build_events(rec, SOURCE)
    _structurally_valid(ev)
    assert ev["resourceType"] == "AuditEvent" and ev["id"]
    assert ev["type"]["system"] == "http://terminology.hl7.org/CodeSystem/audit-event-type" and ev["type"]["code"] == "rest"
    assert [(c["system"], c["code"]) for c in ev["subtype"]] == [("http://hl7.org/fhir/restful-interaction", "read")]
    assert ev["action"] == "R"
    assert ev["outcome"] == "0"
    assert ev["recorded"] == "2026-03-01T08:00:00.012Z"
    assert ev["period"] == {"start": "2026-03-01T08:00:00.000Z", "end": "2026-03-01T08:00:00.012Z"}
    client = _agent(ev, "http://dicom.nema.org/resources/ontology/DCM", "110153")
    assert client["who"]["identifier"]["value"] == "community-app"
    assert client["network"] == {"address": "10.1.2.3", "type": "2"}
    assert client["requestor"] is False
    user = _agent(ev, "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "IRCP")
    assert user["requestor"] is True
    assert user["who"]["identifier"]["value"] == "u-42"
    assert user["who"]["reference"] == "Practitioner/d1"
    assert user["who"]["display"] == "王医生" and user["name"] == "王医生"
    assert "network" not in user
    server = _agent(ev, "http://dicom.nema.org/resources/ontology/DCM", "110152")
    assert server["requestor"] is False and server["network"]["address"] == "fhir.sh-ehr.example"
    assert ev["source"]["site"] == "上海市社区健康管理平台"
    assert ev["source"]["observer"]["display"] == "fhir.sh-ehr.example"
    assert ev["source"]["type"][0]["system"] == "http://terminology.hl7.org/CodeSystem/security-source-type"
    assert ev["source"]["type"][0]["code"] == "4"
    (data,) = _entities(ev, "2", "4")
    assert data["what"]["reference"] == "Patient/p1"
    assert data["type"]["system"] == "http://terminology.hl7.org/CodeSystem/audit-entity-type"
    assert data["role"]["system"] == "http://terminology.hl7.org/CodeSystem/object-role"
    (patient,) = _entities(ev, "1", "1")
    assert patient["what"]["reference"] == "Patient/p1"
    (xreq,) = [e for e in ev["entity"] if e["type"]["system"] == "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"]
    assert xreq["type"]["code"] == "XrequestId" and xreq["what"]["identifier"]["value"] == "req-1"
    assert not _entities(ev, "2", "24")  # a read has no query entity


def test_search_event_has_query_and_one_event_per_patient():
    query = "patient=Patient/p1&code=http://loinc.org|8480-6&_count=10"
    rec = RequestRecord(
        method="GET",
        path="/fhir/Observation",
        query=query,
        status=200,
        client_id="app",
        remote_addr="10.0.0.9",
        patients=["p1", "Patient/p2", "p1"],
        request_id="req-2",
    )
    events = build_events(rec, SOURCE)
    # BALP PatientQuery: one AuditEvent per patient in the results, each naming only that patient.
    assert len(events) == 2
    assert len({e["id"] for e in events}) == 2
    patients = []
    for ev in events:
        _structurally_valid(ev)
        assert [(c["system"], c["code"]) for c in ev["subtype"]] == [("http://hl7.org/fhir/restful-interaction", "search-type")]
        assert ev["action"] == "E"
        (q,) = _entities(ev, "2", "24")
        assert base64.b64decode(q["query"]).decode() == query
        assert "what" not in q
        (p,) = _entities(ev, "1", "1")
        patients.append(p["what"]["reference"])
        client = _agent(ev, "http://dicom.nema.org/resources/ontology/DCM", "110153")
        assert client["requestor"] is True  # no user: the application asked
        assert len(ev["agent"]) == 2
    assert patients == ["Patient/p1", "Patient/p2"]
    # Without results naming patients, the patient in the query is the one searched for.
    (ev,) = build_events(RequestRecord("GET", "/fhir/Observation", 200, query="subject=Patient/p7&code=x"), SOURCE)
    assert [e["what"]["reference"] for e in _entities(ev, "1", "1")] == ["Patient/p7"]
    # A search about nobody in particular: one event, no patient entity.
    (ev,) = build_events(RequestRecord("GET", "/fhir/Organization", 200, query="name=%E7%A4%BE%E5%8C%BA"), SOURCE)
    assert not _entities(ev, "1", "1")


def test_create_update_delete_events():
    (ev,) = build_events(
        RequestRecord("POST", "/fhir/Observation", 201, resource_id="o1", user_id="nurse-1", patients=["p1"]), SOURCE
    )
    _structurally_valid(ev)
    assert ev["subtype"][0]["code"] == "create" and ev["action"] == "C"
    _agent(ev, "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "AUT")
    assert [e["what"]["reference"] for e in _entities(ev, "2", "4")] == ["Observation/o1"]
    assert [e["what"]["reference"] for e in _entities(ev, "1", "1")] == ["Patient/p1"]

    (ev,) = build_events(RequestRecord("PUT", "/fhir/Patient/p1", 200, user_id="clerk"), SOURCE)
    assert ev["subtype"][0]["code"] == "update" and ev["action"] == "U"
    (ev,) = build_events(RequestRecord("PATCH", "/fhir/Patient/p1", 200), SOURCE)
    assert ev["subtype"][0]["code"] == "patch" and ev["action"] == "U"

    (ev,) = build_events(RequestRecord("DELETE", "/fhir/Patient/p1", 200, client_id="app", remote_addr="10.0.0.1"), SOURCE)
    _structurally_valid(ev)
    assert ev["subtype"][0]["code"] == "delete" and ev["action"] == "D"
    _agent(ev, "http://dicom.nema.org/resources/ontology/DCM", "110150")  # BALP Delete: Application
    _agent(ev, "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "custodian")

    (ev,) = build_events(RequestRecord("GET", "/fhir/Patient/p1/_history/3", 200), SOURCE)
    assert ev["subtype"][0]["code"] == "vread" and ev["action"] == "R"
    assert _entities(ev, "2", "4")[0]["what"]["reference"] == "Patient/p1/_history/3"

    (ev,) = build_events(RequestRecord("POST", "/fhir", 200), SOURCE, bundle_type="transaction")
    assert ev["subtype"][0]["code"] == "transaction" and ev["action"] == "E"
    (ev,) = build_events(RequestRecord("GET", "/fhir/Patient/p1/$everything", 200), SOURCE)
    assert ev["subtype"][0]["code"] == "operation" and ev["action"] == "E"
    assert [e["what"]["reference"] for e in _entities(ev, "1", "1")] == ["Patient/p1"]


@pytest.mark.parametrize(
    ("status", "outcome"), [(200, "0"), (304, "0"), (401, "4"), (403, "4"), (404, "4"), (429, "4"), (500, "8"), (503, "12")]
)
def test_refused_and_failed_requests_are_audited(status, outcome):
    rec = RequestRecord("GET", "/fhir/Patient/p9", status, remote_addr="203.0.113.7", reason="token expired" if status == 401 else None)
    (ev,) = build_events(rec, SOURCE)
    _structurally_valid(ev)
    assert ev["outcome"] == outcome
    assert ev["outcomeDesc"].startswith(f"HTTP {status}")
    assert _agent(ev, "http://dicom.nema.org/resources/ontology/DCM", "110153")["network"]["address"] == "203.0.113.7"
    assert _entities(ev, "1", "1")[0]["what"]["reference"] == "Patient/p9"


@pytest.mark.parametrize(
    ("method", "path", "interaction", "type_", "id_"),
    [
        ("GET", "/fhir/metadata", "capabilities", None, None),
        ("GET", "/fhir/_history", "history-system", None, None),
        ("GET", "/fhir/Patient/_history", "history-type", "Patient", None),
        ("GET", "/fhir/Patient/1/_history", "history-instance", "Patient", "1"),
        ("POST", "/fhir/Patient/_search", "search-type", "Patient", None),
        ("GET", "/fhir/Patient/1/Observation", "search-type", "Observation", None),
        ("GET", "/fhir/Patient/1/*", "search-system", None, None),
        ("POST", "/fhir", "batch", None, None),
        ("GET", "/fhir/$reindex", "operation", None, None),
        ("POST", "/fhir/Patient/$match", "operation", "Patient", None),
        ("PUT", "/fhir/Patient", "update", "Patient", None),
        ("DELETE", "Patient/1", "delete", "Patient", "1"),
    ],
)
def test_classify(method, path, interaction, type_, id_):
    where = classify(method, path)
    assert (where.interaction, where.type, where.id) == (interaction, type_, id_)


# -- the chain -----------------------------------------------------------------------------------


@pytest.fixture
async def fresh(mongo_uri):
    """A store and database of their own: an empty chain."""
    client: AsyncMongoClient = AsyncMongoClient(mongo_uri, tz_aware=True)
    name = f"test_audit_{uuid.uuid4().hex[:8]}"
    store = MongoStore(client, name, indexes_for=search_indexes)
    await store.open()
    try:
        yield store, client.get_database(name)
    finally:
        await client.drop_database(name)
        await client.close()


def _rec(i: int, **kw: Any) -> RequestRecord:
    return RequestRecord("GET", f"/fhir/Patient/p{i % 7}", 200, client_id="app", remote_addr="10.0.0.1", request_id=f"r{i}", **kw)


async def _chain(store, db, n: int) -> None:
    trail = AuditTrail(store, db.name, SOURCE, anchor_seconds=0)
    await trail.start()
    try:
        for i in range(n):
            await trail.record(_rec(i), wait=False)
        await trail.flush()
    finally:
        await trail.stop()


async def test_concurrent_appends_make_one_contiguous_verified_chain(fresh, mongo_uri):
    store, db = fresh
    # Three workers (own clients, own queues) and direct appends, all at once.
    trails = []
    for _ in range(3):
        c: AsyncMongoClient = AsyncMongoClient(mongo_uri, tz_aware=True)
        s = MongoStore(c, db.name, indexes_for=search_indexes)
        await s.open()
        t = AuditTrail(s, db.name, SOURCE, anchor_seconds=0, batch_max=16)
        await t.start()
        trails.append((c, t))
    work = [trails[i % 3][1].record(_rec(i), wait=True) for i in range(150)]
    work += [append(store, db, build_events(_rec(1000 + i), SOURCE)) for i in range(50)]
    await asyncio.gather(*work)
    for c, t in trails:
        await t.stop()
        await c.close()
    seqs = [d["_id"] async for d in db[LINKS].find({}, {"_id": 1}).sort("_id", 1)]
    assert seqs == list(range(1, 201))
    report = await verify(db)
    assert report.ok, report.problems
    assert (report.links, report.first_seq, report.last_seq, report.head_seq, report.missing) == (200, 1, 200, 200, 0)
    assert report.copies == 200
    # Each link's event is the stored AuditEvent, and the hash recomputes by hand.
    link = await db[LINKS].find_one({"_id": 2})
    prev = await db[LINKS].find_one({"_id": 1})
    assert link["p"] == prev["h"]
    assert link["h"] == link_hash(prev["h"], 2, link["e"])
    assert orjson.loads(link["e"])["id"] == link["id"]


async def test_verify_detects_a_modified_event(fresh):
    store, db = fresh
    await _chain(store, db, 20)
    link = await db[LINKS].find_one({"_id": 7})
    event = orjson.loads(link["e"])
    event["outcome"] = "4"
    await db[LINKS].update_one({"_id": 7}, {"$set": {"e": orjson.dumps(event)}})
    report = await verify(db, check_copies=False)
    assert not report.ok
    assert (report.first.seq, report.first.kind) == (7, "modified")
    assert report.counts == {"modified": 1}
    # Modified and rehashed: the link looks intact, its successor no longer follows it.
    await db[LINKS].update_one({"_id": 7}, {"$set": {"h": link_hash(link["p"], 7, orjson.dumps(event))}})
    report = await verify(db, check_copies=False)
    assert (report.first.seq, report.first.kind) == (8, "relinked")
    # With the copies compared, the searchable AuditEvent no longer matches the chain either.
    report = await verify(db)
    assert report.counts.get("copy-modified") == 1


async def test_verify_detects_a_deleted_event(fresh):
    store, db = fresh
    await _chain(store, db, 20)
    await db[LINKS].delete_one({"_id": 11})
    report = await verify(db, check_copies=False)
    assert not report.ok
    assert (report.first.seq, report.first.kind) == (11, "gap")
    assert report.missing == 1 and report.counts == {"gap": 1}
    # The first event deleted too: the chain must start at seq 1.
    await db[LINKS].delete_one({"_id": 1})
    report = await verify(db, check_copies=False)
    assert (report.first.seq, report.first.kind) == (1, "gap")
    assert report.missing == 2


async def test_verify_detects_a_swapped_pair(fresh):
    store, db = fresh
    await _chain(store, db, 20)
    a = await db[LINKS].find_one({"_id": 5})
    b = await db[LINKS].find_one({"_id": 6})
    fields_ = ("t", "id", "e", "p", "h")
    await db[LINKS].update_one({"_id": 5}, {"$set": {f: b[f] for f in fields_}})
    await db[LINKS].update_one({"_id": 6}, {"$set": {f: a[f] for f in fields_}})
    report = await verify(db, check_copies=False)
    assert not report.ok
    assert (report.first.seq, report.first.kind) == (5, "reordered")
    assert "appended as seq 6" in report.first.detail
    assert report.counts == {"reordered": 2}


async def test_verify_detects_a_truncated_tail_with_the_anchor(fresh):
    store, db = fresh
    await _chain(store, db, 20)
    anchored = await anchor(db)
    assert anchored["seq"] == 20
    assert (await verify(db)).ok
    # Delete the last five events and move the head back as well: only the anchor tells.
    await db[LINKS].delete_many({"_id": {"$gt": 15}})
    tail = await db[LINKS].find_one({"_id": 15})
    await db[HEAD].update_one({"_id": "head"}, {"$set": {"seq": 15, "h": tail["h"]}})
    report = await verify(db, check_copies=False)
    assert not report.ok
    assert report.counts == {"truncated": 1}
    assert report.first.seq == 20
    # The anchors in the database deleted too: the anchor from the log line still tells.
    await db["_audit_anchor"].delete_many({})
    assert (await verify(db, check_copies=False)).ok
    report = await verify(db, check_copies=False, expected=[(20, anchored["h"])])
    assert report.counts == {"truncated": 1}
    # A tail deleted without moving the head is caught by the head alone.
    await db[HEAD].update_one({"_id": "head"}, {"$set": {"seq": 20}})
    report = await verify(db, check_copies=False)
    assert report.counts == {"truncated": 1}


async def test_stop_drains_the_queue_and_anchors(fresh, caplog):
    store, db = fresh
    trail = AuditTrail(store, db.name, SOURCE, anchor_seconds=0.2)
    with pytest.raises(AuditUnavailable):
        await trail.record(_rec(0))  # not started
    await trail.start()
    for i in range(300):
        await trail.record(_rec(i), wait=False)
    await asyncio.sleep(0.5)  # the periodic anchor
    for i in range(300, 400):
        await trail.record(_rec(i), wait=False)
    with caplog.at_level(logging.WARNING, logger="fhir_server.audit"):
        await trail.stop()  # drains what is queued, then anchors the head
    assert await db[LINKS].count_documents({}) == 400
    anchors = [a async for a in db["_audit_anchor"].find().sort("seq", 1)]
    assert len(anchors) >= 2 and anchors[-1]["seq"] == 400
    assert f"seq=400 hash={anchors[-1]['h']}" in caplog.text
    with pytest.raises(AuditUnavailable):
        await trail.record(_rec(1))  # stopped
    assert (await verify(db)).ok


async def test_cli_verify(fresh, mongo_uri):
    store, db = fresh
    await _chain(store, db, 5)
    runner = CliRunner()
    result = await asyncio.to_thread(runner.invoke, cli, ["audit", "verify", "--mongodb-uri", mongo_uri, "--database", db.name])
    assert result.exit_code == 0, result.output
    assert "intact" in result.output and "完好" in result.output
    await db[LINKS].delete_one({"_id": 3})
    result = await asyncio.to_thread(runner.invoke, cli, ["audit", "verify", "--mongodb-uri", mongo_uri, "--database", db.name])
    assert result.exit_code == 1, result.output
    assert "BROKEN" in result.output and "seq 3" in result.output


# -- searchable through the server ---------------------------------------------------------------


async def test_audit_events_are_searchable_and_do_not_block_deletes(mongo_uri):
    overrides: dict[str, Any] = {}
    if "auth_enabled" in {f.name for f in fields(Settings)}:
        overrides["auth_enabled"] = False
    app = create_app(make_settings(mongo_uri, **overrides))
    async with app.router.lifespan_context(app):
        server = app.state.server
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver/fhir", timeout=60) as http:
            r = await http.put("/Patient/res1", json={"resourceType": "Patient", "id": "res1", "gender": "female"})
            assert r.status_code in (200, 201), r.text
            trail = AuditTrail(server.store, server.settings.database, SOURCE, anchor_seconds=0)
            await trail.start()
            try:
                await trail.record(RequestRecord("PUT", "/fhir/Patient/res1", 201, user_id="clerk"))
                await trail.record(RequestRecord("GET", "/fhir/Observation", 200, query="patient=res1", patients=["res1", "other"]))
                await trail.record(RequestRecord("GET", "/fhir/Patient/ghost", 404))
                await trail.flush()
            finally:
                await trail.stop()
            r = await http.get("/AuditEvent", params={"entity": "Patient/res1"})
            assert r.status_code == 200, r.text
            assert r.json()["total"] == 2
            r = await http.get("/AuditEvent", params={"patient": "Patient/res1", "subtype": "search-type"})
            (entry,) = r.json()["entry"]
            refs = [e["what"]["reference"] for e in entry["resource"]["entity"] if "what" in e and "reference" in e["what"]]
            assert "Patient/other" not in refs  # another resident's access stays in another event
            r = await http.get("/AuditEvent", params={"outcome": "4"})
            assert r.json()["total"] == 1
            # An AuditEvent naming a resource never stops its deletion (no referential integrity).
            r = await http.delete("/Patient/res1")
            assert r.status_code in (200, 204), r.text
            report = await verify(server.store.client.get_database(server.settings.database))
            assert report.ok and report.links == 4


# -- redaction -----------------------------------------------------------------------------------

ID = "310101199003071234"  # well-formed (region, 1990-03-07, sequence, check digit); not a real person's


def test_redact_strings():
    assert redact(f"identifier=urn:oid:2.16.156.10011.1.3|{ID}") == "identifier=urn:oid:2.16.156.10011.1.3|[身份证已脱敏]"
    assert redact(f"身份证{ID}已登记") == "身份证[身份证已脱敏]已登记"
    assert redact("31010119900307123X") == "[身份证已脱敏]"
    assert redact("phone 13812345678, +86 13912345678") == "phone 138****5678, +86 139****5678"
    assert redact("GET /fhir/Patient?name=张三丰&birthdate=1990") == "GET /fhir/Patient?name=张**&birthdate=1990"
    assert redact("/fhir/Patient?family:exact=%E6%AC%A7%E9%98%B3&given=xiaoming") == "/fhir/Patient?family:exact=欧*&given=x*******"
    assert redact("/fhir/Observation?subject:Patient.name=李四") == "/fhir/Observation?subject:Patient.name=李*"
    # Not personal data: ids, hashes, timestamps, counts.
    for text in ("Patient/0190a1b2c3d4e13812345678ff", "a" * 20 + ID + "b", "1712345678901", "seq=13812345678901", "_count=50"):
        assert redact(text) == text


@pytest.fixture
def restore_logging():
    """install_log_redaction changes process-wide logging: undo it for the tests that follow."""
    factory = logging.getLogRecordFactory()
    names = ("fhir_server", "uvicorn.access")
    before = {n: list(logging.getLogger(n).filters) for n in names}
    yield
    logging.setLogRecordFactory(factory)
    for n in names:
        logging.getLogger(n).filters[:] = before[n]


def test_log_redaction_filter_masks_formatted_output(caplog, restore_logging):
    install_log_redaction()
    install_log_redaction()  # twice is harmless
    assert sum(isinstance(f, RedactingFilter) for f in logging.getLogger("fhir_server").filters) == 1
    with caplog.at_level(logging.INFO):
        logging.getLogger("fhir_server").warning("lookup of %s by phone %s", ID, "13812345678")
        logging.getLogger("fhir_server.mpi").info("candidate %(name)s", {"name": "/Patient?name=王小明"})
        logging.getLogger("fhir_server.connectors.emr").error("bad id card %d", 310101199003071234)
        access = logging.getLogger("uvicorn.access")
        access.info('%s - "%s %s HTTP/%s" %d', "10.0.0.1:5000", "GET", f"/fhir/Patient?identifier={ID}&telecom=13912345678", "1.1", 200)
        try:
            raise ValueError(f"duplicate {ID}")
        except ValueError:
            logging.getLogger("fhir_server.http").exception("failed for %s", "15912345678")
        logging.getLogger("other").warning("untouched 13812345678")
    text = caplog.text
    assert ID not in text and "3101011990" not in text.replace("[身份证已脱敏]", "")
    assert "13812345678" not in text.replace("untouched 13812345678", "")
    assert "138****5678" in text and "139****5678" in text and "159****5678" in text
    assert "name=王**" in text and "王小明" not in text
    assert "bad id card [身份证已脱敏]" in text
    assert "duplicate [身份证已脱敏]" in text
    assert "untouched 13812345678" in text  # other loggers are left alone
    # uvicorn's access formatter reads the five arguments: their shape is kept.
    (rec,) = [r for r in caplog.records if r.name == "uvicorn.access"]
    assert isinstance(rec.args, tuple) and len(rec.args) == 5 and rec.args[4] == 200
    assert rec.args[2] == "/fhir/Patient?identifier=[身份证已脱敏]&telecom=139****5678"


def test_filter_alone_on_a_handler():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    lg = logging.getLogger("test_audit_plain")
    handler = Keep()
    handler.addFilter(RedactingFilter())
    lg.addHandler(handler)
    lg.propagate = False
    try:
        lg.warning("caller %s", f"13800001111 / {ID}")
    finally:
        lg.removeHandler(handler)
    assert logging.Formatter().format(records[0]) == "caller 138****1111 / [身份证已脱敏]"
