"""The master patient index against hand-built residents (tests/data/mpi/residents.json).

Each resident's source records are stored as source Patients and linked in file order; the
planted truth (which records are one resident, and the decision each link must take) comes from
the fixture, never from the MPI's own output. A database of its own, so that other modules'
Patients never become candidates.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest

from fhir_server.http.app import create_app
from fhir_server.config import load_settings
from fhir_server.mpi import LinkResult, link, link_many
from tests.conftest import make_settings

DATA = Path(__file__).parent / "data" / "mpi" / "residents.json"
MPI = "https://fhir.cn-ehr.org/CodeSystem/mpi"
ID_CARD = "urn:oid:2.16.156.10011.1.3"
GRADE = "http://hl7.org/fhir/StructureDefinition/match-grade"


def patient(record: dict[str, Any]) -> dict[str, Any]:
    """A source Patient as a connector stores it (the record model in fhir_server/mpi/__init__.py)."""
    source = record["source"]
    p: dict[str, Any] = {
        "resourceType": "Patient",
        "meta": {"source": f"https://fhir.cn-ehr.org/source/{source}#{record['rid']}"},
        "identifier": [{"system": f"https://fhir.cn-ehr.org/identifier/source/{source}", "value": record["rid"]}],
        "gender": record["gender"],
        "birthDate": record["birthDate"],
    }
    if "id" in record:
        p["identifier"].append(
            {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "NNCHN"}]}, "system": ID_CARD, "value": record["id"]}
        )
    name: dict[str, Any] = {"text": record["name"]}
    if "family" in record:
        name.update(family=record["family"], given=[record["given"]])
    p["name"] = [name]
    if "phone" in record:
        p["telecom"] = [{"system": "phone", "value": record["phone"]}]
    if "district" in record or "line" in record:
        address: dict[str, Any] = {"city": "上海市"}
        if "district" in record:
            address["extension"] = [
                {
                    "url": "https://fhir.cn-ehr.org/StructureDefinition/cn-address-division",
                    "valueCoding": {"system": "https://fhir.cn-ehr.org/CodeSystem/gb-t-2260-division", "code": record["district"]},
                }
            ]
        if "line" in record:
            address["line"] = [record["line"]]
        p["address"] = [address]
    if "guardian" in record:
        gd = record["guardian"]
        p["contact"] = [
            {
                "relationship": [{"coding": [{"system": "urn:oid:2.16.156.10011.2.3.3.8", "code": gd["rel"]}]}],
                "name": {"text": gd["name"]},
                "telecom": [{"system": "phone", "value": gd["phone"]}],
            }
        ]
    return p


@pytest.fixture(scope="module")
async def mpi_app(mongo_uri: str):
    application = create_app(make_settings(mongo_uri))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="module")
async def http(mpi_app) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=mpi_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver/fhir", timeout=60) as c:
        yield c


async def store(http: httpx.AsyncClient, record: dict[str, Any]) -> str:
    r = await http.post("/Patient", json=patient(record))
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def read(http: httpx.AsyncClient, ref: str) -> dict[str, Any]:
    r = await http.get(f"/{ref}")
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
async def planted(mpi_app, http) -> dict[str, Any]:
    """Every record stored and linked in file order: {rid: (source id, resident, LinkResult, expect)}."""
    server = mpi_app.state.server
    out: dict[str, Any] = {}
    for resident in json.loads(DATA.read_text(encoding="utf-8"))["residents"]:
        for record in resident["records"]:
            sid = await store(http, record)
            result = await link(server, sid)
            out[record["rid"]] = (sid, resident.get("resident", resident["key"]), result, record["expect"])
    return out


async def goldens(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    r = await http.get("/Patient", params={"_tag": f"{MPI}|golden", "_count": "1000"})
    return [e["resource"] for e in r.json().get("entry", [])]


def links_of(resource: dict[str, Any], type_: str) -> set[str]:
    return {l["other"]["reference"] for l in resource.get("link", []) if l["type"] == type_}


async def test_each_link_takes_the_planted_decision(planted) -> None:
    wrong = {rid: (r.decision, expect) for rid, (_, _, r, expect) in planted.items() if r.decision != expect}
    assert wrong == {}
    for _, _, result, _ in planted.values():
        assert 0.0 <= result.score <= 1.0
        assert (result.golden is None) == (result.decision == "review")
        if result.decision == "id-match":
            assert result.score == 1.0


async def test_golden_count_equals_the_planted_residents(planted, http) -> None:
    linked = {rid: v for rid, v in planted.items() if v[2].golden}
    residents = {resident for _, resident, _, _ in linked.values()}
    active = [g for g in await goldens(http) if g.get("active") is not False]
    assert len(active) == len(residents) == 11
    # One golden per resident: records of one resident share it, different residents never do.
    golden_of: dict[str, str | None] = {}
    for _, resident, result, _ in linked.values():
        assert golden_of.setdefault(resident, result.golden) == result.golden
    assert len(set(golden_of.values())) == len(residents)


async def test_twins_are_two_residents(planted) -> None:
    assert planted["M-R4a"][2].golden != planted["M-R4b"][2].golden
    assert planted["I-R4a"][2].golden == planted["M-R4a"][2].golden
    assert planted["I-R4b"][2].golden == planted["M-R4b"][2].golden


async def test_invalid_id_number_is_not_evidence(planted) -> None:
    # R7: the mistyped number did not give an id-match, yet the rest of the record linked it.
    assert planted["I-R7"][2].decision == "auto-link"
    assert planted["I-R7"][2].golden == planted["E-R7"][2].golden
    # R8: two residents who share one invalid number stay apart.
    assert planted["E-R8a"][2].golden != planted["I-R8b"][2].golden


async def test_golden_and_sources_are_linked_both_ways_and_sources_keep_their_data(planted, http) -> None:
    data = {r["rid"]: r for res in json.loads(DATA.read_text(encoding="utf-8"))["residents"] for r in res["records"]}
    for rid, (sid, _, result, _) in planted.items():
        source = await read(http, f"Patient/{sid}")
        sent = patient(data[rid])
        assert {k: v for k, v in source.items() if k not in ("id", "meta", "link")} == {k: v for k, v in sent.items() if k != "meta"}
        if result.golden is None:
            assert "link" not in source
            continue
        assert links_of(source, "refer") == {f"Patient/{result.golden}"}
        golden = await read(http, f"Patient/{result.golden}")
        assert f"Patient/{sid}" in links_of(golden, "seealso")
        assert {"system": MPI, "code": "golden"}.items() <= golden["meta"]["tag"][0].items()


async def test_survivorship(planted, http) -> None:
    # R3: the ID number survives from the one source that has it; phones are gathered.
    r3 = await read(http, f"Patient/{planted['E-R3'][2].golden}")
    assert [i["value"] for i in r3["identifier"] if i["system"] == ID_CARD] == ["310106198507200267"]
    assert r3["name"][0]["text"] == "陈静" and r3["birthDate"] == "1985-07-20" and r3["gender"] == "female"
    assert {t["value"] for t in r3["telecom"]} == {"13900001111", "139-0000-1111"}
    # R2: the name of the most recently linked source with name.text.
    r2 = await read(http, f"Patient/{planted['E-R2'][2].golden}")
    assert r2["name"][0]["text"] == "Li Na"
    # R7: only the valid ID number reaches the golden.
    r7 = await read(http, f"Patient/{planted['E-R7'][2].golden}")
    assert [i["value"] for i in r7["identifier"] if i["system"] == ID_CARD] == ["310115197502280247"]


async def test_link_is_idempotent(mpi_app, planted, http) -> None:
    server = mpi_app.state.server
    for rid in ("M-R1", "I-R5", "E-R8a", "M-R9"):
        sid, _, first, _ = planted[rid]
        before = await read(http, f"Patient/{sid}")
        golden_before = await read(http, f"Patient/{first.golden}") if first.golden else None
        again = await link(server, sid)
        assert again == first
        assert (await read(http, f"Patient/{sid}"))["meta"]["versionId"] == before["meta"]["versionId"]
        if golden_before:
            assert (await read(http, f"Patient/{first.golden}"))["meta"]["versionId"] == golden_before["meta"]["versionId"]


async def test_review_task_then_resolve(mpi_app, planted, http) -> None:
    sid, _, result, _ = planted["M-R9"]
    assert result == LinkResult(None, "review", result.score)
    assert 0.60 <= result.score < 0.95
    r = await http.get("/Task", params={"code": f"{MPI}|mpi-review", "status": "requested", "focus": f"Patient/{sid}"})
    tasks = [e["resource"] for e in r.json().get("entry", [])]
    assert len(tasks) == 1
    task = tasks[0]
    expected_golden = planted["E-R9"][2].golden
    assert [i["valueReference"]["reference"] for i in task["input"]] == [f"Patient/{expected_golden}"]
    assert task["input"][0]["extension"][0]["valueDecimal"] == result.score
    r = await http.post(
        "/Patient/$mpi-resolve",
        json={"resourceType": "Parameters", "parameter": [
            {"name": "task", "valueReference": {"reference": f"Task/{task['id']}"}},
            {"name": "golden", "valueReference": {"reference": f"Patient/{expected_golden}"}},
        ]},
    )
    assert r.status_code == 200, r.text
    out = {p["name"]: p for p in r.json()["parameter"]}
    assert out["golden"]["valueReference"]["reference"] == f"Patient/{expected_golden}"
    assert "主索引" in out["outcome"]["resource"]["issue"][0]["details"]["text"]
    done = await read(http, f"Task/{task['id']}")
    assert done["status"] == "completed"
    assert done["output"][0]["valueReference"]["reference"] == f"Patient/{expected_golden}"
    assert await link(mpi_app.state.server, sid) == LinkResult(expected_golden, "review", result.score)
    # Resolving twice is refused, with a message for the clerk.
    r = await http.post(
        "/Patient/$mpi-resolve",
        json={"resourceType": "Parameters", "parameter": [{"name": "task", "valueReference": {"reference": f"Task/{task['id']}"}}]},
    )
    assert r.status_code == 409 and "审核任务" in r.json()["issue"][0]["details"]["text"]


async def test_match_scores_are_graded_and_ordered(planted, http) -> None:
    twin_a = patient({"source": "x", "rid": "Q1", "name": "刘子涵", "family": "刘", "given": "子涵", "gender": "male",
                      "birthDate": "2019-04-02", "phone": "13700002222", "district": "310112",
                      "guardian": {"rel": "52", "name": "赵敏", "phone": "13700002222"}})
    body: dict[str, Any] = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": twin_a}]}
    r = await http.post("/Patient/$match", json=body)
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert bundle["type"] == "searchset"
    entries = bundle["entry"]
    scores = [e["search"]["score"] for e in entries]
    assert scores == sorted(scores, reverse=True)
    assert entries[0]["resource"]["id"] == planted["M-R4a"][2].golden
    assert entries[0]["search"]["extension"] == [{"url": GRADE, "valueCode": "certain"}]
    grades = {e["resource"]["id"]: e["search"]["extension"][0]["valueCode"] for e in entries}
    assert grades.get(planted["M-R4b"][2].golden, "possible") == "possible"  # the twin, if listed at all
    body["parameter"].append({"name": "onlyCertainMatches", "valueBoolean": True})
    r = await http.post("/Patient/$match", json=body)
    assert [e["resource"]["id"] for e in r.json()["entry"]] == [planted["M-R4a"][2].golden]
    # A valid ID number is a certain match whatever the name says.
    by_id = patient({"source": "x", "rid": "Q2", "name": "某某", "gender": "female", "birthDate": "1992-11-03", "id": "310105199211030420"})
    r = await http.post("/Patient/$match", json={"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": by_id}, {"name": "count", "valueInteger": 1}]})
    (entry,) = r.json()["entry"]
    assert entry["resource"]["id"] == planted["E-R2"][2].golden and entry["search"]["score"] == 1.0
    r = await http.post("/Patient/$match", json={"resourceType": "Parameters", "parameter": []})
    assert r.status_code == 400 and "Patient" in r.json()["issue"][0]["details"]["text"]


async def test_merge_and_unmerge_round_trip(planted, http) -> None:
    target, source = planted["E-R8a"][2].golden, planted["I-R8b"][2].golden
    before = {g: await read(http, f"Patient/{g}") for g in (target, source)}
    moved_source = planted["I-R8b"][0]
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "source-patient", "valueReference": {"reference": f"Patient/{source}"}},
        {"name": "target-patient", "valueReference": {"reference": f"Patient/{target}"}},
    ]}
    r = await http.post("/Patient/$merge", json=params)
    assert r.status_code == 200, r.text
    merged_src = await read(http, f"Patient/{source}")
    assert merged_src["active"] is False and links_of(merged_src, "replaced-by") == {f"Patient/{target}"}
    merged_tgt = await read(http, f"Patient/{target}")
    assert links_of(merged_tgt, "seealso") == links_of(before[target], "seealso") | links_of(before[source], "seealso")
    assert links_of(merged_tgt, "replaces") == {f"Patient/{source}"}
    assert links_of(await read(http, f"Patient/{moved_source}"), "refer") == {f"Patient/{target}"}
    everything = (await http.get(f"/Patient/{target}/$everything")).json()
    assert f"Patient/{moved_source}" in {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in everything["entry"]}
    # Merging again is refused with a Chinese message.
    again = await http.post("/Patient/$merge", json=params)
    assert again.status_code == 409 and "已被合并" in again.json()["issue"][0]["details"]["text"]

    r = await http.post("/Patient/$unmerge", json=params)
    assert r.status_code == 200, r.text
    after = {g: await read(http, f"Patient/{g}") for g in (target, source)}
    for g in (target, source):
        assert after[g].get("active") is not False
        assert after[g]["link"] == before[g]["link"]
        assert {k: v for k, v in after[g].items() if k != "meta"} == {k: v for k, v in before[g].items() if k != "meta"}
    assert links_of(await read(http, f"Patient/{moved_source}"), "refer") == {f"Patient/{source}"}
    history = (await http.get(f"/Patient/{source}/_history")).json()
    assert history["total"] >= 3  # created, merged away, restored
    merge_task = (await http.post("/Patient/$unmerge", json=params))
    assert merge_task.status_code == 404 and "合并" in merge_task.json()["issue"][0]["details"]["text"]


async def test_everything_spans_every_linked_source(planted, http) -> None:
    golden = planted["E-R1"][2].golden
    sources = [planted["E-R1"][0], planted["M-R1"][0]]
    made = set()
    for sid in sources:
        r = await http.post("/Observation", json={"resourceType": "Observation", "status": "final", "code": {"text": "体重"}, "subject": {"reference": f"Patient/{sid}"}})
        made.add(f"Observation/{r.json()['id']}")
    r = await http.post("/Immunization", json={"resourceType": "Immunization", "status": "completed", "vaccineCode": {"text": "乙肝疫苗"}, "patient": {"reference": f"Patient/{sources[1]}"}, "occurrenceDateTime": "2020-01-01"})
    made.add(f"Immunization/{r.json()['id']}")
    bundle = (await http.get(f"/Patient/{golden}/$everything")).json()
    found = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]}
    assert found == {f"Patient/{golden}", *(f"Patient/{s}" for s in sources), *made}
    # Asked through a source, the answer is the whole record too.
    via_source = (await http.get(f"/Patient/{sources[0]}/$everything")).json()
    assert via_source["total"] == len(found)
    only = (await http.get(f"/Patient/{golden}/$everything", params={"_type": "Observation"})).json()
    assert {e["resource"]["resourceType"] for e in only["entry"]} == {"Observation"}
    page = (await http.get(f"/Patient/{golden}/$everything", params={"_count": "2"})).json()
    assert len(page["entry"]) == 2 and any(l["relation"] == "next" for l in page["link"])


async def test_concurrent_links_of_one_resident_make_one_golden(mpi_app, http) -> None:
    records = [
        {"source": s, "rid": f"C-{s}", "name": "马晓燕", "family": "马", "given": "晓燕", "gender": "female",
         "birthDate": "1966-06-16", "phone": "13100008888", "district": "310113", "expect": "?"}
        for s in ("emr", "mch", "imm", "emr2")
    ]
    ids = [await store(http, r) for r in records]
    results = await asyncio.gather(*(link(mpi_app.state.server, i) for i in ids))
    assert len({r.golden for r in results}) == 1
    assert sorted(r.decision for r in results) == ["auto-link", "auto-link", "auto-link", "new"]


async def test_operation_errors_speak_chinese(planted, http) -> None:
    source = planted["E-R1"][0]  # a source record, not a golden
    golden = planted["E-R1"][2].golden
    r = await http.post("/Patient/$merge", json={"resourceType": "Parameters", "parameter": [
        {"name": "source-patient", "valueReference": {"reference": f"Patient/{source}"}},
        {"name": "target-patient", "valueReference": {"reference": f"Patient/{golden}"}},
    ]})
    assert r.status_code == 400
    issue = r.json()["issue"][0]
    assert "主索引" in issue["details"]["text"] and "golden" in issue["diagnostics"]
    r = await http.post("/Patient/$mpi-resolve", json={"resourceType": "Parameters", "parameter": [{"name": "task", "valueReference": {"reference": "Task/nope"}}]})
    assert r.status_code == 404 and "不存在" in r.json()["issue"][0]["details"]["text"]
    r = await http.post("/Patient/$merge", json={"resourceType": "Parameters", "parameter": []})
    assert r.status_code == 400 and "缺少参数" in r.json()["issue"][0]["details"]["text"]


async def test_link_many_links_a_batch_in_one_transaction(mpi_app, http) -> None:
    records = [
        {"source": s, "rid": f"B-{s}", "name": "钱文博", "family": "钱", "given": "文博", "gender": "male",
         "birthDate": "1958-12-01", "district": "310117", "line": "人民路12弄3号", "expect": "?"}
        for s in ("emr", "imm")
    ]
    ids = [await store(http, r) for r in records]
    first, second = await link_many(mpi_app.state.server, ids)
    assert first.decision == "new" and second.decision == "auto-link" and second.golden == first.golden
    assert await link_many(mpi_app.state.server, ids) == [first, second]


def test_thresholds_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (load_settings().mpi_auto_link, load_settings().mpi_review) == (0.95, 0.60)
    monkeypatch.setenv("FHIR_MPI_REVIEW", "0.5")
    assert load_settings().mpi_review == 0.5
