"""Custom SearchParameter resources at run time: refused when unusable, registered on commit,
existing data re-indexed in the background ($reindex reports it), new data indexed on write,
unregistered on retire/delete, resumed after a restart, and learnt by another server process
through the change stream. Stored search values are checked in MongoDB itself."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from fhir_server.config import load_settings
from fhir_server.http.app import create_app
from tests.helpers import stop_process_group
from fhir_server.search.parameters import custom_parameters, params_for
from fhir_server.search.reindex import percent
from fhir_server.storage import field_crypto, mongod as embedded
from tests.conftest import make_settings

ETHNICITY_EXT = "http://example.org/fhir/StructureDefinition/ethnicity"
ETHNICITY_SYS = "urn:oid:2.16.156.10011.2.3.3.3"  # GB/T 3304 民族
ID_CARD = "urn:oid:2.16.156.10011.1.3"  # 居民身份证号
HEALTH_TAG_EXT = "http://example.org/fhir/StructureDefinition/health-tag"
_BIN = Path(sys.executable).parent / "fhir-server"
_CHINESE = re.compile(r"[\u4e00-\u9fff]")


def _sp(code: str, expression: str | None, *, type_: str = "token", base: list[str] | None = None, **more: Any) -> dict[str, Any]:
    sp: dict[str, Any] = {
        "resourceType": "SearchParameter",
        "url": f"http://example.org/fhir/SearchParameter/{code}-{uuid.uuid4().hex[:8]}",
        "name": code.replace("-", "_"),
        "status": "active",
        "description": f"test parameter {code}",
        "code": code,
        "base": base or ["Patient"],
        "type": type_,
    }
    if expression is not None:
        sp["expression"] = expression
    sp.update(more)
    return sp


def _ethnicity_sp(code: str = "ethnicity") -> dict[str, Any]:
    return _sp(code, f"Patient.extension.where(url='{ETHNICITY_EXT}').value.as(CodeableConcept)")


def _id_card_sp(code: str = "id-card") -> dict[str, Any]:
    return _sp(code, f"Patient.identifier.where(system='{ID_CARD}')")


def _patient(ethnicity: str, id_card: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "extension": [{"url": ETHNICITY_EXT, "valueCodeableConcept": {"coding": [{"system": ETHNICITY_SYS, "code": ethnicity}]}}],
        "identifier": [{"system": ID_CARD, "value": id_card}],
        "name": [{"family": "王", "given": ["芳"]}],
    }


@dataclass
class Own:
    """An app on its own database, a client for it, and the database seen directly."""

    app: Any
    client: httpx.AsyncClient
    db: AsyncDatabase


@pytest.fixture(scope="module")
async def mongo(mongo_uri: str) -> AsyncIterator[AsyncMongoClient]:
    client: AsyncMongoClient = AsyncMongoClient(mongo_uri, tz_aware=True)
    yield client
    await client.close()


@pytest.fixture(scope="module")
async def own(mongo_uri: str, mongo: AsyncMongoClient) -> AsyncIterator[Own]:
    settings = make_settings(mongo_uri)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver/fhir", timeout=60) as c:
            yield Own(app, c, mongo[settings.database])


async def _post_patients(c: httpx.AsyncClient, patients: list[dict[str, Any]]) -> list[str]:
    entries = [{"resource": p, "request": {"method": "POST", "url": "Patient"}} for p in patients]
    r = await c.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert r.status_code == 200, r.text
    return [e["response"]["location"].split("/")[1] for e in r.json()["entry"]]


async def _create(c: httpx.AsyncClient, resource: dict[str, Any]) -> dict[str, Any]:
    r = await c.post(f"/{resource['resourceType']}", json=resource)
    assert r.status_code == 201, r.text
    return r.json()


async def _job_for(db: AsyncDatabase, url: str, timeout: float = 60) -> dict[str, Any]:
    """The re-index job started for the SearchParameter ``url``, once it has ended."""
    deadline = time.monotonic() + timeout
    while True:
        job = await db["_jobs"].find_one({"params": url}, sort=[("started", -1)])
        if job is not None and job["status"] in ("done", "failed"):
            return job
        assert time.monotonic() < deadline, f"no finished re-index job for {url}: {job}"
        await asyncio.sleep(0.1)


async def _wait_status(c: httpx.AsyncClient, job_id: str, timeout: float = 60) -> list[dict[str, Any]]:
    """Every status GET $reindex reported until the job ended."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        r = await c.get("/$reindex", params={"job": job_id})
        assert r.status_code == 200, r.text
        seen.append(_values(r.json()))
        if seen[-1]["status"] in ("done", "failed"):
            return seen
        assert time.monotonic() < deadline, seen[-1]
        await asyncio.sleep(0.02)


def _values(parameters: dict[str, Any]) -> dict[str, Any]:
    assert parameters["resourceType"] == "Parameters"
    out: dict[str, Any] = {}
    for p in parameters["parameter"]:
        value = next(v for k, v in p.items() if k.startswith("value"))
        if p["name"] in ("url", "type"):
            out.setdefault(p["name"], []).append(value)
        else:
            out[p["name"]] = value
    return out


def _capability_params(statement: dict[str, Any], type_: str) -> dict[str, dict[str, Any]]:
    resource = next(r for r in statement["rest"][0]["resource"] if r["type"] == type_)
    return {p["name"]: p for p in resource["searchParam"]}


# -- registering and re-indexing ------------------------------------------------------------------


async def test_existing_data_is_reindexed_and_new_data_indexed_on_write(own: Own) -> None:
    c, db = own.client, own.db
    n = 450  # more than two batches of the job
    ids = await _post_patients(c, [_patient("01" if i % 3 else "02", f"1101011990{i:08d}") for i in range(n)])
    before = await db["Patient"].find_one({"_id": ids[0]})
    assert "ethnicity" not in before["s"] and "id-card" not in before["s"]

    ethnicity = await _create(c, _ethnicity_sp())
    id_card = await _create(c, _id_card_sp())
    for sp in (ethnicity, id_card):
        job = await _job_for(db, sp["url"])
        assert job["status"] == "done", job
        assert job["types"] == ["Patient"] and job["total"] == n and job["done"] == n

    # The stored search values, straight from MongoDB.
    han = await db["Patient"].count_documents({"s.ethnicity": f"{ETHNICITY_SYS}|01"})
    mongol = await db["Patient"].count_documents({"s.ethnicity": "02"})
    assert (han, mongol) == (n - len(range(0, n, 3)), len(range(0, n, 3)))
    doc = await db["Patient"].find_one({"_id": ids[7]})
    crypto = field_crypto.active()  # an ID number is indexed by its blind form when encryption is on
    number = f"1101011990{7:08d}"
    assert f"{ID_CARD}|{crypto.blind(number) if crypto else number}" in doc["s"]["id-card"]
    assert doc["s"].get("_refs") == before["s"].get("_refs")  # kept as written
    indexes = await db["Patient"].index_information()
    assert indexes["s_ethnicity"]["key"] == [("s.ethnicity", 1)] and indexes["s_ethnicity"].get("sparse")
    assert "s_id-card" in indexes

    # Written after registration: indexed on write, no job needed.
    later = await _create(c, _patient("03", "110101200001011234"))
    doc = await db["Patient"].find_one({"_id": later["id"]})
    later_number = crypto.blind("110101200001011234") if crypto else "110101200001011234"
    assert f"{ETHNICITY_SYS}|03" in doc["s"]["ethnicity"] and later_number in doc["s"]["id-card"]

    # Search by the new codes (the query compiler reads the same registry).
    r = await c.get("/Patient", params={"ethnicity": f"{ETHNICITY_SYS}|02", "_summary": "count"})
    assert r.status_code == 200, r.text
    assert r.json()["total"] == len(range(0, n, 3))
    r = await c.get("/Patient", params={"id-card": "110101200001011234"})
    assert r.status_code == 200, r.text
    assert [e["resource"]["id"] for e in r.json()["entry"]] == [later["id"]]

    # The CapabilityStatement lists them.
    statement = (await c.get("/metadata")).json()
    listed = _capability_params(statement, "Patient")
    assert listed["ethnicity"] == {"name": "ethnicity", "definition": ethnicity["url"], "type": "token"}
    assert "id-card" in listed

    # $reindex reports the job that registration started.
    job = await _job_for(db, ethnicity["url"])
    status = _values((await c.get("/$reindex", params={"job": job["_id"]})).json())
    assert status["status"] == "done" and status["total"] == n and status["done"] == n and status["percent"] == 100
    assert status["url"] == [ethnicity["url"]] and status["type"] == ["Patient"]


_BAD = [
    ("missing code", {"code": None}, "SearchParameter.code"),
    ("code not usable", {"code": "a.b"}, "SearchParameter.code"),
    ("built-in code", {"code": "name"}, "SearchParameter.code"),
    ("unknown base", {"base": ["Patient", "NoSuchType"]}, "SearchParameter.base[1]"),
    ("composite type", {"type": "composite"}, "SearchParameter.type"),
    ("unknown type", {"type": "fancy"}, "SearchParameter.type"),
    ("missing expression", {"expression": None}, "SearchParameter.expression"),
    ("syntax error", {"expression": "Patient.name["}, "SearchParameter.expression"),
    ("another type's path", {"expression": "Observation.code"}, "SearchParameter.expression"),
    ("unknown function", {"expression": "Patient.name.frst()"}, "SearchParameter.expression"),
    ("unknown target", {"type": "reference", "expression": "Patient.generalPractitioner", "target": ["Nope"]}, "SearchParameter.target[0]"),
]


@pytest.mark.parametrize(("case", "change", "element"), _BAD, ids=[b[0] for b in _BAD])
async def test_unusable_search_parameter_is_refused_and_not_stored(own: Own, case: str, change: dict[str, Any], element: str) -> None:
    sp = _sp("blood-type", "Patient.extension.where(url='http://example.org/bt').value")
    for key, value in change.items():
        if value is None:
            sp.pop(key, None)
        else:
            sp[key] = value
    r = await own.client.post("/SearchParameter", json=sp)
    assert r.status_code == 400, r.text
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome"
    issue = next(i for i in outcome["issue"] if element in i.get("expression", ()))
    assert issue["severity"] == "error"
    assert _CHINESE.search(issue["details"]["text"]), issue
    assert await own.db["SearchParameter"].count_documents({"s.url": sp["url"]}) == 0
    assert sp["url"] not in {p.url for p in custom_parameters()}


async def test_unusable_search_parameter_is_refused_without_validation(mongo_uri: str, mongo: AsyncMongoClient) -> None:
    # Structural validation catches some of these first (required bindings); the check does not rely on it.
    settings = make_settings(mongo_uri, validate_on_write=False)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver/fhir") as c:
            for case, change, element in _BAD:
                sp = _sp("blood-type", "Patient.extension.where(url='http://example.org/bt').value")
                sp.update(change)
                sp = {k: v for k, v in sp.items() if v is not None}
                r = await c.post("/SearchParameter", json=sp)
                assert r.status_code == 400, (case, r.text)
                issue = r.json()["issue"][0]
                assert issue["expression"] == [element] and _CHINESE.search(issue["details"]["text"]), (case, issue)
    assert await mongo[settings.database]["SearchParameter"].count_documents({}) == 0


async def test_duplicates_are_refused_drafts_stored_but_not_used(own: Own) -> None:
    c = own.client
    first = await _create(c, _sp("blood-group", "Patient.extension.where(url='http://example.org/bg').value"))
    same_url = {**_sp("blood-group-2", "Patient.extension.where(url='http://example.org/bg').value"), "url": first["url"]}
    r = await c.post("/SearchParameter", json=same_url)
    assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["SearchParameter.url"], r.text
    same_code = _sp("blood-group", "Patient.extension.where(url='http://example.org/bg2').value")
    r = await c.post("/SearchParameter", json=same_code)
    assert r.status_code == 400 and r.json()["issue"][0]["expression"] == ["SearchParameter.code"], r.text

    # A draft is a definition being written: stored as it is, never used.
    draft = await _create(c, {**_sp("name", "Observation.code"), "status": "draft"})
    assert draft["url"] not in {p.url for p in custom_parameters()}
    assert params_for("Patient")["name"].url == "http://hl7.org/fhir/SearchParameter/Patient-name"
    assert (await c.delete(f"/SearchParameter/{first['id']}")).status_code in (200, 204)


async def test_an_update_may_change_the_url(own: Own) -> None:
    c = own.client
    sp = await _create(c, _sp("hukou", "Patient.extension.where(url='http://example.org/hukou').value"))
    moved = {**sp, "url": sp["url"] + "-v2"}
    r = await c.put(f"/SearchParameter/{sp['id']}", json=moved)
    assert r.status_code == 200, r.text
    urls = {p.url for p in custom_parameters()}
    assert moved["url"] in urls and sp["url"] not in urls
    assert params_for("Patient")["hukou"].url == moved["url"]
    assert (await c.delete(f"/SearchParameter/{sp['id']}")).status_code in (200, 204)
    assert "hukou" not in params_for("Patient")


async def test_retire_and_delete_unregister(own: Own) -> None:
    c, db = own.client, own.db
    sp = await _create(c, _sp("health-tag", f"Patient.extension.where(url='{HEALTH_TAG_EXT}').value.as(Coding)"))
    tagged = {"resourceType": "Patient", "extension": [{"url": HEALTH_TAG_EXT, "valueCoding": {"system": "urn:tag", "code": "diabetes"}}]}

    async def listed() -> bool:
        return "health-tag" in _capability_params((await c.get("/metadata")).json(), "Patient")

    assert "health-tag" in params_for("Patient") and await listed()
    one = await _create(c, tagged)
    assert (await db["Patient"].find_one({"_id": one["id"]}))["s"]["health-tag"] == ["urn:tag|diabetes", "diabetes"]

    r = await c.put(f"/SearchParameter/{sp['id']}", json={**sp, "status": "retired"})
    assert r.status_code == 200, r.text
    assert "health-tag" not in params_for("Patient") and not await listed()
    two = await _create(c, tagged)
    assert "health-tag" not in (await db["Patient"].find_one({"_id": two["id"]}))["s"]
    assert "s_health-tag" not in await db["Patient"].index_information()

    r = await c.put(f"/SearchParameter/{sp['id']}", json={**sp, "status": "active"})
    assert r.status_code == 200, r.text
    assert "health-tag" in params_for("Patient") and await listed()
    await _job_for(db, sp["url"])  # the re-activation re-indexed Patient again
    assert "health-tag" in (await db["Patient"].find_one({"_id": two["id"]}))["s"]

    assert (await c.delete(f"/SearchParameter/{sp['id']}")).status_code in (200, 204)
    assert "health-tag" not in params_for("Patient") and not await listed()
    three = await _create(c, tagged)
    assert "health-tag" not in (await db["Patient"].find_one({"_id": three["id"]}))["s"]
    assert "s_health-tag" not in await db["Patient"].index_information()
    r = await c.get("/Patient", params={"health-tag": "diabetes"})
    assert r.status_code == 400  # an unknown parameter again


# -- $reindex --------------------------------------------------------------------------------------


async def test_reindex_operation_reports_progress(own: Own) -> None:
    c, db = own.client, own.db
    await _post_patients(c, [_patient("05", f"3101011980{i:08d}") for i in range(60)])
    await _create(c, {"resourceType": "Observation", "status": "final", "code": {"text": "体重"}})
    reindexer = own.app.state.server.reindexer
    reindexer._batch_size = 7  # many small steps, so that progress is seen moving

    r = await c.post("/$reindex")
    assert r.status_code == 202, r.text
    started = _values(r.json())
    assert started["status"] == "queued" and started["done"] == 0 and started["percent"] == 0
    assert r.headers["content-location"].endswith(f"/$reindex?job={started['job']}")
    seen = await _wait_status(c, started["job"])
    reindexer._batch_size = 200
    final = seen[-1]
    live = 0
    for name in await db.list_collection_names():
        if name[:1].isupper():
            live += await db[name].count_documents({"d": False})
    assert final["status"] == "done" and final["percent"] == 100
    assert final["total"] == final["done"] == live
    assert set(final["type"]) >= {"Patient", "Observation", "SearchParameter"}
    dones = [s["done"] for s in seen]
    assert dones == sorted(dones)  # progress only moves forward

    # One parameter: the job covers its base types only (built-in urls too).
    url = next(p.url for p in custom_parameters() if p.code == "ethnicity")
    r = await c.post("/$reindex", params={"url": url})
    assert r.status_code == 202, r.text
    assert _values(r.json())["type"] == ["Patient"]
    body = {"resourceType": "Parameters", "parameter": [{"name": "url", "valueUri": "http://hl7.org/fhir/SearchParameter/Observation-status"}]}
    r = await c.post("/$reindex", json=body, headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 202, r.text
    job = _values(r.json())
    assert job["type"] == ["Observation"]
    assert (await _wait_status(c, job["job"]))[-1]["status"] == "done"

    assert (await c.post("/$reindex", params={"url": "http://example.org/no-such-parameter"})).status_code == 400
    assert (await c.post("/$reindex", json={"resourceType": "Patient"}, headers={"Content-Type": "application/fhir+json"})).status_code == 400
    assert (await c.get("/$reindex")).status_code == 400
    assert (await c.get("/$reindex", params={"job": "nope"})).status_code == 404
    assert (await c.post("/Patient/$reindex")).status_code == 404  # system level only


def test_percent() -> None:
    assert percent({"status": "running", "total": 200, "done": 50}) == 25.0
    assert percent({"status": "running", "total": None, "done": 0}) == 0.0
    assert percent({"status": "running", "total": 10, "done": 12}) == 100.0
    assert percent({"status": "done", "total": 0, "done": 0}) == 100.0


async def test_a_job_left_running_is_resumed_after_a_restart(mongo_uri: str, mongo: AsyncMongoClient) -> None:
    settings = make_settings(mongo_uri)
    db = mongo[settings.database]
    first = create_app(settings)
    async with first.router.lifespan_context(first):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=first), base_url="http://testserver/fhir") as c:
            ids = sorted(await _post_patients(c, [_patient("01", f"4401011970{i:08d}") for i in range(30)]))
            sp = await _create(c, _ethnicity_sp("ethnicity-r"))
            await _job_for(db, sp["url"])
    # The server stopped in the middle of a job: 10 of 30 done, then silence.
    await db["Patient"].update_many({}, {"$unset": {"s.ethnicity-r": ""}})
    old = datetime.now(timezone.utc) - timedelta(hours=1)
    await db["_jobs"].insert_one(
        {
            "_id": "left-behind",
            "kind": "reindex",
            "params": [sp["url"]],
            "types": ["Patient"],
            "total": 30,
            "done": 10,
            "status": "running",
            "started": old,
            "finished": None,
            "error": None,
            "owner": "gone-host:1:dead",
            "hb": old,
            "position": {"type": "Patient", "after": ids[9]},
        }
    )
    second = create_app(settings)
    async with second.router.lifespan_context(second):
        deadline = time.monotonic() + 30
        while (job := await db["_jobs"].find_one({"_id": "left-behind"}))["status"] != "done":
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.1)
        assert job["done"] == 30 and job["owner"] == second.state.server.reindexer.owner and job["finished"]
        # Resumed from where it stopped: the first ten were not visited again.
        for i, id_ in enumerate(ids):
            doc = await db["Patient"].find_one({"_id": id_})
            assert ("ethnicity-r" in doc["s"]) == (i >= 10), (i, doc["s"])
        assert "ethnicity-r" in params_for("Patient")  # loaded from the database at startup
    assert "ethnicity-r" not in params_for("Patient")  # and forgotten with the server


# -- another server process -----------------------------------------------------------------------


@pytest.fixture
def serve(mongo_uri: str, tmp_path: Path) -> Iterator[Any]:
    """Start ``fhir-server serve`` (a separate process) on a database; returns its base URL."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(database: str) -> str:
        port = embedded.free_port()
        log = tmp_path / f"server-{port}.log"
        env = {**os.environ, "MONGODB_URI": mongo_uri, "FHIR_DATABASE": database, "FHIR_AUTH_ENABLED": "0"}
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(_BIN), "serve", "--host", "127.0.0.1", "--port", str(port)],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}/fhir"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/metadata", timeout=5, trust_env=False).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)

    yield start
    for proc in procs:
        stop_process_group(proc)


async def _until(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.2)


async def test_another_server_process_learns_parameters(mongo_uri: str, mongo: AsyncMongoClient, serve: Any) -> None:
    database = f"test_{uuid.uuid4().hex[:8]}"
    db = mongo[database]
    here = create_app(load_settings(mongodb_uri=mongo_uri, database=database, auth_enabled=False))
    async with here.router.lifespan_context(here):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=here), base_url="http://testserver/fhir") as c:
            await _post_patients(c, [_patient("01", f"5101011960{i:08d}") for i in range(20)])
            ethnicity = await _create(c, _ethnicity_sp("ethnicity-x"))
            other = serve(database)
            async with httpx.AsyncClient(base_url=other, timeout=30, trust_env=False) as remote:

                async def remote_params() -> dict[str, Any]:
                    return _capability_params((await remote.get("/metadata")).json(), "Patient")

                # Stored before the other server started: loaded at its startup.
                assert "ethnicity-x" in await remote_params()
                # Created after: learnt through the change stream, and used on its writes.
                id_card = await _create(c, _id_card_sp("id-card-x"))

                async def knows_id_card() -> bool:
                    return "id-card-x" in await remote_params()

                await _until(knows_id_card)
                r = await remote.post("/Patient", json=_patient("04", "510101200101011111"))
                assert r.status_code == 201, r.text
                doc = await db["Patient"].find_one({"_id": r.json()["id"]})
                crypto = field_crypto.active()  # the other process has the same key (FHIR_FIELD_KEY)
                number = crypto.blind("510101200101011111") if crypto else "510101200101011111"
                assert number in doc["s"]["id-card-x"] and "04" in doc["s"]["ethnicity-x"]
                r = await remote.get("/Patient", params={"id-card-x": "510101200101011111", "_summary": "count"})
                assert r.status_code == 200 and r.json()["total"] == 1, r.text

                # Deleted here: forgotten there.
                assert (await c.delete(f"/SearchParameter/{id_card['id']}")).status_code in (200, 204)

                async def forgot_id_card() -> bool:
                    return "id-card-x" not in await remote_params()

                await _until(forgot_id_card)

                # The command line: start a job on the other server and follow it to the end.
                await db["Patient"].update_many({}, {"$unset": {"s.ethnicity-x": ""}})
                cli = await asyncio.to_thread(
                    subprocess.run,
                    [str(_BIN), "reindex", "--url", other, "--param", ethnicity["url"], "--interval", "0.1"],
                    capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
                )
                assert cli.returncode == 0, cli.stdout + cli.stderr
                assert "done: 21 resources" in cli.stdout, cli.stdout
                assert await db["Patient"].count_documents({"s.ethnicity-x": {"$exists": True}}) == 21

                bad = await asyncio.to_thread(
                    subprocess.run, [str(_BIN), "reindex", "--url", other, "--param", "http://example.org/nope"],
                    capture_output=True, text=True, timeout=60,
                )
                assert bad.returncode != 0 and "http://example.org/nope" in bad.stderr, bad.stderr
