"""The immunization connector end to end: simulator over HTTP → transport → mapping → validated
writes with Provenance and raw payloads → MPI link hook, against a real mongod.

Expected counts come from the simulator's plan (what it planted, tallied independently of the
connector) and from the hand-built page tests/data/immunization/page-small.xml.
"""

from __future__ import annotations

import base64
import copy
import hashlib
from pathlib import Path

import httpx
import orjson
import pytest

from helpers import RecordingLinker
from fhir_server.connectors import checkpoint, deadletter, runner
from fhir_server.connectors._db import database
from fhir_server.connectors.immunization import ImmunizationConnector
from fhir_server.connectors.mapping import shipped
from fhir_server.connectors.transport import FileTransport, HttpTransport, RetryPolicy
from fhir_server.simulators._http import serving
from fhir_server.simulators.immunization import ImmunizationUpstream
from fhir_server.storage import field_crypto  # the stored JSON holds ID and phone numbers encrypted

DATA = Path(__file__).parent / "data" / "immunization"
SD = "https://fhir.cn-ehr.org/StructureDefinition"
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
async def server(cn_app):
    return cn_app.state.server


@pytest.fixture(scope="module")
async def http(cn_app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=cn_app), base_url="http://testserver/fhir", timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def upstream():
    up = ImmunizationUpstream(seed=11, children=60)
    with serving(up, "t0ken") as url:
        yield up, url


def _transport(url: str, **kw) -> HttpTransport:
    kw.setdefault("page_size", 25)
    return HttpTransport(url, "t0ken", policy=RetryPolicy(retries=6, base=0.01, cap=0.05), seed=1, **kw)


async def _sync(server, url: str, linker=None, full: bool = False, **kw) -> runner.SyncReport:
    transport = _transport(url, **kw)
    try:
        return await runner.sync(server, ImmunizationConnector(), transport, linker=linker, full=full)
    finally:
        await transport.close()


def _totals(report: runner.SyncReport) -> dict[str, int]:
    return {k: getattr(report, k) for k in ("received", "created", "updated", "unchanged", "rejected")}


async def _history_count(server) -> int:
    return await database(server)["_history"].count_documents({})


async def _connector_resources(server) -> list[dict]:
    db = database(server)
    out = []
    for type_ in ("Patient", "Immunization", "AdverseEvent"):
        async for doc in db[type_].find({"_id": {"$regex": "^imz-"}, "d": False}, {"r": 1}):
            out.append(orjson.loads(field_crypto.decode(doc["r"])))
    return out


async def test_full_sync_counts_traceability_and_idempotence(server, http, upstream):
    up, url = upstream
    linker = RecordingLinker()
    report = await _sync(server, url, linker, full=True)
    assert report.error is None
    truth = up.truth
    # received = stored + unchanged + rejected, and every figure is the planted one
    assert report.balanced
    assert _totals(report) == {k: truth[k] for k in ("received", "created", "updated", "unchanged", "rejected")}
    assert truth["rejected"] > 0 and truth["updated"] > 0 and truth["unchanged"] > 0
    assert report.by_kind["child"]["created"] == truth["created:child"] == len(linker.calls)
    assert {k: report.by_kind[k]["received"] for k in ("child", "inoculation", "aefi")} == {
        "child": truth["received:child"], "inoculation": truth["received:inoc"], "aefi": truth["received:aefi"]}
    assert report.linked == len(linker.calls)

    # every written resource: meta.source, a Provenance on its current version, the raw bytes
    resources = await _connector_resources(server)
    assert len(resources) == truth["records"]
    provs = {}
    async for doc in database(server)["Provenance"].find({"d": False}, {"r": 1}):
        p = orjson.loads(field_crypto.decode(doc["r"]))
        provs[p["target"][0]["reference"]] = p
    for res in resources[:: max(1, len(resources) // 150)] + resources[-5:]:
        key = f"{res['resourceType']}/{res['id']}"
        assert res["meta"]["source"].startswith("https://fhir.cn-ehr.org/identifier/source/sh-immunization#")
        prov = provs[f"{key}/_history/{res['meta']['versionId']}"]
        assert prov["meta"]["profile"] == [f"{SD}/cn-provenance"]
        entity = prov["entity"][0]
        ext = {e["url"].rsplit("/", 1)[1]: e for e in entity["extension"]}
        record_id = ext["cn-source-record-id"]["valueIdentifier"]["value"]
        assert res["meta"]["source"].endswith("#" + record_id)
        sha = ext["cn-source-hash"]["valueString"]
        assert ext["cn-transform"]["valueCanonical"] == "https://fhir.cn-ehr.org/StructureMap/immunization-xml|0.1.0"
        binary = (await http.get(f"/{entity['what']['reference']}", headers={"Accept": "application/fhir+json"})).json()
        raw = base64.b64decode(binary["data"])
        assert hashlib.sha256(raw).hexdigest() == sha
        assert raw.startswith({"Patient": b"<child>", "Immunization": b"<inoculation>", "AdverseEvent": b"<aefi>"}[res["resourceType"]])
    # the profiles were claimed (and so validated on write)
    kinds = {r["resourceType"]: r["meta"].get("profile") for r in resources}
    assert kinds["Patient"] == [f"{SD}/cn-patient"] and kinds["Immunization"] == [f"{SD}/cn-immunization"]

    # dead letters: one per distinct bad record, bilingual reasons, every planted kind of fault
    letters = await deadletter.list_open(server, "sh-immunization")
    assert sum(d["seen"] for d in letters) == truth["rejected"]
    codes = {d["code"] for d in letters}
    assert {"schema", "unknown-code", "impossible-date", "id-check-digit", "parent-rejected"} <= codes
    for d in letters:
        assert d["reason_zh"] and d["reason_en"] and d["raw"]
        assert any("\u4e00" <= ch <= "\u9fff" for ch in d["reason_zh"])

    # re-running the same sync (from the start) writes nothing, no new versions
    before = await _history_count(server)
    again = await _sync(server, url, linker, full=True)
    assert again.balanced and again.created == again.updated == 0
    assert again.received == truth["received"] and again.rejected == truth["rejected"]
    assert await _history_count(server) == before
    # and the incremental run after it has nothing to read
    incremental = await _sync(server, url, linker)
    assert incremental.received == 0 and await _history_count(server) == before


async def test_changed_record_makes_a_new_version_with_a_new_provenance(server, http, upstream):
    up, url = upstream
    cp = await checkpoint.load(server, "sh-immunization")
    # the platform corrects a lot number: a new snapshot of a child already delivered
    # (planted bad children have codes ...9000000nn; bad inoculations come after the good ones)
    original = next(d for d in up.deliveries if d.split("<chil_code>", 1)[1][9] == "0")
    lot = original.split("<inoc_batchno>", 1)[1].split("<", 1)[0]
    stamp = original.split("<chil_updatetime>", 1)[1][:19]
    changed = original.replace(f"<inoc_batchno>{lot}<", f"<inoc_batchno>{lot}-FIX<", 1).replace(stamp, "2025-07-01 12:00:00", 1)
    up.deliveries.append(changed)
    try:
        report = await _sync(server, url)
    finally:
        up.deliveries.pop()
    assert int(cp.since) == len(up.deliveries)
    assert report.received > 1 and report.updated == 1 and report.created == 0 and report.balanced
    code = original.split("<chil_code>", 1)[1][:18]
    docs = [orjson.loads(field_crypto.decode(d["r"])) async for d in database(server)["Immunization"].find({"d": False}, {"r": 1})]
    [imm] = [r for r in docs if r.get("lotNumber") == f"{lot}-FIX"]
    assert code in imm["meta"]["source"] and imm["meta"]["versionId"] == "2"
    history = (await http.get(f"/Immunization/{imm['id']}/_history")).json()
    assert history["total"] == 2
    provs = (await http.get("/Provenance", params={"target": f"Immunization/{imm['id']}"})).json()
    hashes = {}
    for e in provs.get("entry", []):
        p = e["resource"]
        hashes[p["target"][0]["reference"].rsplit("/", 1)[1]] = [x["valueString"] for x in p["entity"][0]["extension"] if x["url"].endswith("cn-source-hash")][0]
    if not hashes:  # target search may not match versioned references: read them by id
        from fhir_server.connectors.provenance import provenance_id

        for v in (1, 2):
            p = (await http.get(f"/Provenance/{provenance_id('Immunization', imm['id'], v)}")).json()
            hashes[str(v)] = [x["valueString"] for x in p["entity"][0]["extension"] if x["url"].endswith("cn-source-hash")][0]
            assert p["activity"]["coding"][0]["code"] == ("CREATE" if v == 1 else "UPDATE")
    assert set(hashes) == {"1", "2"} and hashes["1"] != hashes["2"]


async def test_interrupted_sync_resumes_with_the_same_totals(server):
    up = ImmunizationUpstream(seed=23, children=40)
    httpd, url = up.start(token="t0ken")
    try:
        await checkpoint.reset(server, "sh-immunization")
        up.faults.fail_after_pages = 2
        first = await _sync(server, url, page_size=15)
        assert first.error and first.pages == 2
        cp = await checkpoint.load(server, "sh-immunization")
        assert cp.status == "failed" and cp.since == "30"
        up.faults.fail_after_pages = None
        second = await _sync(server, url, page_size=15)
        assert second.error is None
    finally:
        httpd.shutdown()
        httpd.server_close()
    total = runner.SyncReport("sum")
    total.add(first)
    total.add(second)
    assert total.balanced
    assert _totals(total) == {k: up.truth[k] for k in ("received", "created", "updated", "unchanged", "rejected")}


async def test_transient_failures_and_timeouts_are_retried(server):
    up = ImmunizationUpstream(seed=31, children=12)
    up.faults.transient_every, up.faults.slow_every, up.faults.delay = 2, 5, 1.0
    httpd, url = up.start(token="t0ken")
    try:
        await checkpoint.reset(server, "sh-immunization")
        report = await _sync(server, url, page_size=5, timeout=0.4)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert report.error is None and report.retries >= 2
    assert _totals(report) == {k: up.truth[k] for k in ("received", "created", "updated", "unchanged", "rejected")}


async def test_bad_token_is_not_retried(server, upstream):
    _, url = upstream
    transport = HttpTransport(url, "wrong", policy=RetryPolicy(retries=3, base=0.01))
    try:
        report = await runner.sync(server, ImmunizationConnector(), transport, linker=None)
    finally:
        await transport.close()
    assert report.error and "401" in report.error and transport.retried == 0


async def test_hand_built_page_maps_as_specified(server, http, tmp_path):
    linker = RecordingLinker()
    transport = FileTransport([str(DATA / "page-small.xml")])
    report = await runner.sync(server, ImmunizationConnector(), transport, linker=linker)
    # 1 child + 3 inoculations (one with vaccine code 7777, which has no map) + 1 AEFI
    assert _totals(report) == {"received": 5, "created": 4, "updated": 0, "unchanged": 0, "rejected": 1}
    conn = ImmunizationConnector()
    pid = conn.resource_id("child", "child/310104000000000777")
    patient = (await http.get(f"/Patient/{pid}")).json()
    assert patient["name"] == [{"text": "欧阳小明", "family": "欧阳", "given": ["小明"]}]
    assert patient["gender"] == "male" and patient["birthDate"] == "2021-03-15"
    assert patient["_gender"]["extension"][0]["valueCoding"]["code"] == "1"
    assert {"system": "urn:oid:2.16.156.10011.1.3", "value": "310112202103150036"}.items() <= patient["identifier"][1].items()
    household, residence = patient["address"]
    assert household["district"] == "闵行区" and residence["district"] == "徐汇区"
    assert household["extension"][1]["valueCoding"]["code"] == "310112"
    assert [c["relationship"][0]["coding"][0]["code"] for c in patient["contact"]] == ["52", "51"]
    assert patient["contact"][0]["telecom"][0]["value"] == "13600136000"
    assert linker.calls == [pid]
    imm = (await http.get(f"/Immunization/{conn.resource_id('inoculation', 'inoc/310104000000000777/0101/2')}")).json()
    assert imm["vaccineCode"]["coding"][0]["code"] == "0101"
    assert imm["protocolApplied"] == [{"doseNumberPositiveInt": 2}]
    assert imm["lotNumber"] == "202103015" and imm["expirationDate"] == "2022-03-01"
    assert imm["occurrenceDateTime"] == "2021-04-15T09:30:00+08:00"
    assert imm["identifier"][0] == {"system": "https://fhir.cn-ehr.org/identifier/vaccine-trace", "value": "81234567890123456789"}
    assert imm["fundingSource"]["coding"][0]["code"] == "programme"
    assert imm["site"]["coding"][0]["code"] == "RA" and imm["patient"]["reference"] == f"Patient/{pid}"
    oral = (await http.get(f"/Immunization/{conn.resource_id('inoculation', 'inoc/310104000000000777/2801/1')}")).json()
    assert oral["fundingSource"]["coding"][0]["code"] == "non-programme" and oral["route"]["coding"][0]["code"] == "PO"
    aefi = (await http.get(f"/AdverseEvent/{conn.resource_id('aefi', 'aefi/310104000000000777/0101/01/2021-04-16')}")).json()
    assert aefi["suspectEntity"][0]["instance"]["reference"] == f"Immunization/{imm['id']}"
    assert aefi["event"]["text"] == "发热"
    # the profiles hold on what was stored
    for res in (patient, imm):
        outcome = (await http.post(f"/{res['resourceType']}/$validate", json=res)).json()
        assert not [i for i in outcome.get("issue", []) if i["severity"] in ("error", "fatal")], outcome

    # the unknown vaccine code is a dead letter; once the mapping knows it, a replay stores it
    letters = [d for d in await deadletter.list_open(server, "sh-immunization") if d["record_id"] == "inoc/310104000000000777/7777/1"]
    assert len(letters) == 1 and letters[0]["code"] == "unknown-code" and "7777" in letters[0]["reason_zh"]
    mapping = copy.deepcopy(shipped("immunization"))
    mapping["vaccines"]["codes"]["7777"] = {"code": "7777", "display": "测试疫苗"}
    replay = await runner.replay_dead_letters(server, ImmunizationConnector(mapping), linker=None, keys=[letters[0]["_id"]])
    assert replay.created == 1 and replay.rejected == 0
    assert (await http.get(f"/Immunization/{conn.resource_id('inoculation', 'inoc/310104000000000777/7777/1')}")).status_code == 200
    assert [d for d in await deadletter.list_open(server, "sh-immunization", status="resolved") if d["_id"] == letters[0]["_id"]]

    # a page that is not XML is one dead letter; the counts still balance
    bad = tmp_path / "broken.xml"
    bad.write_bytes(b"<children><child><chil_code>1</child>")
    broken = await runner.sync(server, ImmunizationConnector(), FileTransport([str(bad)]), linker=None)
    assert _totals(broken) == {"received": 1, "created": 0, "updated": 0, "unchanged": 0, "rejected": 1}


async def test_with_the_real_mpi_when_present(server):
    mpi = pytest.importorskip("fhir_server.mpi")
    up = ImmunizationUpstream(seed=41, children=10)
    httpd, url = up.start(token="t0ken")
    try:
        await checkpoint.reset(server, "sh-immunization")
        report = await _sync(server, url, linker=mpi.link_many)
        assert report.error is None and report.link_errors == 0
        assert sum(report.decisions.values()) == up.truth["created:child"]
        # the MPI's Patient.link on the source Patients is kept, and a re-run still writes nothing
        before = await _history_count(server)
        again = await _sync(server, url, linker=mpi.link_many, full=True)
        assert again.created == again.updated == 0 and await _history_count(server) == before
    finally:
        httpd.shutdown()
        httpd.server_close()
    linked = [orjson.loads(field_crypto.decode(d["r"])) async for d in database(server)["Patient"].find({"_id": {"$regex": "^imz-p-"}, "d": False}, {"r": 1})]
    assert any(p.get("link") for p in linked)


def test_record_bytes_are_elementtree_bytes():
    """The record bytes (hashed by the ledger, kept as the Binary) equal ElementTree's own
    serialisation: for every record of a simulated upstream and for escapes, empty elements,
    whitespace, attributes and nesting."""
    import gzip
    import xml.etree.ElementTree as ET

    from fhir_server.connectors.immunization import _bytes

    def reference(el: ET.Element) -> bytes:
        el = copy.copy(el)
        el.tail = None
        return ET.tostring(el, encoding="utf-8", xml_declaration=False)

    samples = [
        "<inoculation><a>x &amp; y &lt;z&gt;</a><b/><c></c>\n  <d>上海</d>tail</inoculation>",
        "<inoculation>  lead <a x='1'>v</a></inoculation>",
        "<child><a>1</a><inoculations><inoculation><b>2</b></inoculation></inoculations></child>",
        "<aefi/>",
        "<aefi>text only</aefi>",
    ]
    elements = [ET.fromstring(s) for s in samples]
    up = ImmunizationUpstream(seed=11, children=60)
    body, _, _, _ = up.page(0, 10_000)
    root = ET.fromstring(gzip.decompress(body))
    for child in root.iter("child"):
        elements.append(child)
        elements += child.findall("inoculations/inoculation") + child.findall("aefis/aefi")
    assert len(elements) > 100
    for el in elements:
        assert _bytes(el) == reference(el), ET.tostring(el)
