"""The conformance registry (canonical resolution, versions, generation, deletions) and the seeding
of shipped content at startup: created once, a no-op on restart, upgraded when a seed-tagged
resource's file changes, left alone when an operator changed it, safe when workers start together,
rebased to another canonical base. Seeding time is measured and printed (-s)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest
from pymongo import AsyncMongoClient

from fhir_server.config import load_settings
from fhir_server.conformance import seed as seed_module
from fhir_server.conformance.registry import ConformanceRegistry
from fhir_server.conformance.seed import SEED_TAG_SYSTEM, SeedReport, seed, shipped_files
from fhir_server.http.app import create_app
from tests.conftest import REPO, make_settings

FIXTURE = Path(__file__).parent / "data" / "terminology-fixture"
B = "https://fhir.cn-ehr.org"
# The fixture: 13 terminology resources and 1 profile (profiles/examples/ is not loaded).
FIXTURE_COUNT = 14


# -- the registry ----------------------------------------------------------------------------------


def _cs(id_: str, url: str, version: str | None = None, status: str = "active", **more: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"resourceType": "CodeSystem", "id": id_, "url": url, "status": status, "content": "complete"}
    if version:
        r["version"] = version
    r.update(more)
    return r


def test_resolution_by_url_and_version() -> None:
    reg = ConformanceRegistry()
    url = "http://example.org/cs"
    reg.apply("CodeSystem", "a", 1, _cs("a", url, "1.2.9"))
    reg.apply("CodeSystem", "b", 1, _cs("b", url, "1.2.10"))
    reg.apply("CodeSystem", "c", 1, _cs("c", url, "2.0.0", status="draft"))
    reg.apply("CodeSystem", "d", 1, _cs("d", url, "3.0.0", status="retired"))
    # Without a version: active first, then the highest version (numerically: 1.2.10 > 1.2.9).
    assert reg.get("CodeSystem", url)["id"] == "b"
    assert reg.get("CodeSystem", url + "|1.2.9")["id"] == "a"
    assert reg.get("CodeSystem", url + "|2.0.0")["id"] == "c"
    assert reg.get("CodeSystem", url + "|9") is None
    assert reg.get("CodeSystem", "http://example.org/other") is None
    assert reg.get("ValueSet", url) is None
    assert sorted(r["id"] for r in reg.all("CodeSystem")) == ["a", "b", "c", "d"]
    assert reg.by_id("CodeSystem", "c")["version"] == "2.0.0"
    # Not a canonical type: ignored.
    assert not reg.apply("Patient", "p", 1, {"resourceType": "Patient"})


def test_changes_generation_and_deletion() -> None:
    reg = ConformanceRegistry()
    url = "http://example.org/vs"
    g0 = reg.generation
    assert reg.apply("ValueSet", "v", 1, {"resourceType": "ValueSet", "id": "v", "url": url, "status": "active"})
    g1 = reg.generation
    assert g1 > g0 and reg.get("ValueSet", url)["id"] == "v"
    assert len(reg.all("ValueSet")) == 1
    # A new version with another url: the old url no longer resolves.
    reg.apply("ValueSet", "v", 2, b'{"resourceType": "ValueSet", "id": "v", "url": "http://example.org/vs2", "status": "active"}')
    assert reg.generation > g1 and reg.get("ValueSet", url) is None and reg.get("ValueSet", url + "2")["id"] == "v"
    # A late, older version changes nothing.
    g2 = reg.generation
    assert not reg.apply("ValueSet", "v", 1, {"resourceType": "ValueSet", "id": "v", "url": url})
    assert reg.generation == g2 and reg.get("ValueSet", url + "2") is not None
    # Deletion removes.
    assert reg.apply("ValueSet", "v", 3, None)
    assert reg.get("ValueSet", url + "2") is None and reg.all("ValueSet") == [] and reg.generation > g2
    assert not reg.apply("ValueSet", "v", 3, None)


def test_resync_forgets_what_is_no_longer_stored_but_keeps_fresh_writes() -> None:
    reg = ConformanceRegistry()
    for id_ in ("a", "b"):
        reg.apply("CodeSystem", id_, 1, _cs(id_, f"http://example.org/{id_}"))
    reg.begin_resync("CodeSystem")
    reg.apply("CodeSystem", "a", 1, _cs("a", "http://example.org/a"))  # what the reload read
    reg.apply("CodeSystem", "c", 1, _cs("c", "http://example.org/c"))  # committed meanwhile
    reg.end_resync("CodeSystem", ["a"])
    assert sorted(r["id"] for r in reg.all("CodeSystem")) == ["a", "c"]


def test_shipped_files_skip_examples_and_rebase() -> None:
    files = shipped_files([(FIXTURE / "terminology", True), (FIXTURE / "profiles", False)], "https://fhir.example.cn/ehr/")
    assert len(files) == FIXTURE_COUNT
    assert "Patient" not in {f.type for f in files}
    assert [f.type for f in files][:5] == ["CodeSystem"] * 5  # code systems first
    vs = next(f.resource for f in files if f.id == "health-tag-chronic-and-married")
    assert vs["url"] == "https://fhir.example.cn/ehr/ValueSet/health-tag-chronic-and-married"
    assert vs["compose"]["include"][0]["valueSet"] == ["https://fhir.example.cn/ehr/ValueSet/health-tag-chronic-disease"]
    cs = next(f.resource for f in files if f.id == "gb-t-2261-2-marital")
    assert cs["url"] == "urn:oid:2.16.156.10011.2.3.3.5"  # not under the base: unchanged


# -- seeding ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def mongo(mongo_uri: str) -> AsyncIterator[AsyncMongoClient]:
    client: AsyncMongoClient = AsyncMongoClient(mongo_uri, tz_aware=True)
    yield client
    await client.close()


def _copy_fixture(tmp_path: Path) -> list[tuple[Path, bool]]:
    shutil.copytree(FIXTURE, tmp_path / "content")
    return [(tmp_path / "content" / "terminology", True), (tmp_path / "content" / "profiles", False)]


def _edit(path: Path, change: Any) -> None:
    resource = json.loads(path.read_text(encoding="utf-8"))
    change(resource)
    path.write_text(json.dumps(resource, ensure_ascii=False), encoding="utf-8")


async def _versions(mongo: AsyncMongoClient, database: str) -> dict[str, int]:
    db = mongo[database]
    out = {}
    for type_ in ("CodeSystem", "ValueSet", "ConceptMap", "StructureDefinition", "Patient"):
        async for doc in db[type_].find({}, {"v": 1}):
            out[f"{type_}/{doc['_id']}"] = doc["v"]
    return out


async def test_startup_seeds_once_then_upgrades_and_respects_operators(
    mongo_uri: str, mongo: AsyncMongoClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dirs = _copy_fixture(tmp_path)
    monkeypatch.setattr(seed_module, "default_dirs", lambda: dirs)
    settings = make_settings(mongo_uri, load_conformance=True)

    started = time.perf_counter()
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        first_start = time.perf_counter() - started
        versions = await _versions(mongo, settings.database)
        assert len(versions) == FIXTURE_COUNT and set(versions.values()) == {1}
        assert "Patient/example" not in versions
        server = app.state.server
        # In the registry at once, searchable, and tagged.
        assert server.conformance.get("ValueSet", f"{B}/ValueSet/marital-married")["id"] == "marital-married"
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/fhir") as c:
            r = await c.get("/StructureDefinition/cn-test-patient")
            tag = r.json()["meta"]["tag"]
            assert [t["system"] for t in tag] == [SEED_TAG_SYSTEM]
            r = await c.get("/ValueSet", params={"_tag": f"{SEED_TAG_SYSTEM}|", "_summary": "count"})
            assert r.status_code == 200

    # A restart with nothing changed: nothing written.
    started = time.perf_counter()
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        restart = time.perf_counter() - started
        assert await _versions(mongo, settings.database) == versions
        report = await seed(app.state.server, dirs)
        assert (report.created, report.updated, report.kept, report.failed) == ([], [], [], [])
        assert report.unchanged == FIXTURE_COUNT
        print(f"\nstartup seeding {FIXTURE_COUNT} fixture resources: first start {first_start:.2f} s, "
              f"restart {restart:.2f} s, seed no-op {report.seconds * 1000:.1f} ms")

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/fhir") as c:
            # An operator edits one value set keeping the tag, replaces another without it, deletes a map.
            vs = (await c.get("/ValueSet/marital-married")).json()
            vs["title"] = "已婚（运营方修改）"
            assert (await c.put("/ValueSet/marital-married", json=vs)).status_code == 200
            vs = (await c.get("/ValueSet/marital-remarried")).json()
            vs["meta"] = {}
            assert (await c.put("/ValueSet/marital-remarried", json=vs)).status_code == 200
            assert (await c.delete("/ConceptMap/gb-sex-to-fhir-gender")).status_code in (200, 204)

        # A new product version changes four files (one per case above and one untouched by operators).
        t = dirs[0][0]
        _edit(t / "ValueSet-marital-married.json", lambda r: r.update(version="0.2.0"))
        _edit(t / "ValueSet-marital-remarried.json", lambda r: r.update(version="0.2.0"))
        _edit(t / "ConceptMap-gb-sex-to-fhir-gender.json", lambda r: r.update(version="0.2.0"))
        _edit(t / "CodeSystem-gb-t-3304-ethnicity.json", lambda r: r["concept"].append({"code": "09", "display": "布依族"}))
        report = await seed(app.state.server, dirs)
        assert report.updated == ["CodeSystem/gb-t-3304-ethnicity"], report
        assert sorted(report.kept) == ["ConceptMap/gb-sex-to-fhir-gender", "ValueSet/marital-married", "ValueSet/marital-remarried"]
        assert report.created == [] and report.failed == []
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/fhir") as c:
            assert (await c.get("/ValueSet/marital-married")).json()["title"] == "已婚（运营方修改）"
            assert "version" in (await c.get("/ValueSet/marital-remarried")).json()
            assert (await c.get("/ValueSet/marital-remarried")).json()["version"] == "0.1.0"
            assert (await c.get("/ConceptMap/gb-sex-to-fhir-gender")).status_code == 410
            cs = (await c.get("/CodeSystem/gb-t-3304-ethnicity")).json()
            assert cs["meta"]["versionId"] == "2" and cs["concept"][-1]["code"] == "09"
            # The upgrade is in force at once.
            r = await c.get("/ValueSet/$expand", params={"url": f"{B}/ValueSet/gb-t-3304-ethnicity", "filter": "buyi"})
            assert [x["code"] for x in r.json()["expansion"]["contains"]] == ["09"]
        # And then a no-op again.
        again = await seed(app.state.server, dirs)
        assert (again.created, again.updated, again.failed) == ([], [], []) and len(again.kept) == 3


async def test_workers_starting_together_seed_once(mongo_uri: str, mongo: AsyncMongoClient) -> None:
    database = make_settings(mongo_uri).database
    dirs = [(FIXTURE / "terminology", True), (FIXTURE / "profiles", False)]
    apps = [create_app(load_settings(mongodb_uri=mongo_uri, database=database, load_conformance=False)) for _ in range(3)]
    contexts = [a.router.lifespan_context(a) for a in apps]
    await asyncio.gather(*(ctx.__aenter__() for ctx in contexts))
    try:
        reports: list[SeedReport] = await asyncio.gather(*(seed(a.state.server, dirs) for a in apps))
        assert sum(len(r.created) for r in reports) == FIXTURE_COUNT, [str(r) for r in reports]
        assert all(not r.failed and not r.updated and not r.kept for r in reports)
        versions = await _versions(mongo, database)
        assert len(versions) == FIXTURE_COUNT and set(versions.values()) == {1}
        assert await mongo[database]["_history"].count_documents({}) == FIXTURE_COUNT
        # Every worker's registry has everything (its own writes at once, the others' by change stream).
        for a in apps:
            reg = a.state.server.conformance
            for _ in range(100):
                if len(reg) == FIXTURE_COUNT:
                    break
                await asyncio.sleep(0.1)
            assert len(reg) == FIXTURE_COUNT
    finally:
        for ctx in contexts:
            await ctx.__aexit__(None, None, None)


async def test_seeding_to_another_canonical_base(mongo_uri: str) -> None:
    base = "https://fhir.example.cn/ehr"
    app = create_app(make_settings(mongo_uri, canonical_base=base))
    async with app.router.lifespan_context(app):
        report = await seed(app.state.server, [(FIXTURE / "terminology", True)])
        assert len(report.created) == FIXTURE_COUNT - 1 and not report.failed
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/fhir") as c:
            r = await c.get("/ValueSet/$expand", params={"url": f"{base}/ValueSet/health-tag-chronic-and-married"})
            assert r.status_code == 200, r.text
            assert [x["code"] for x in r.json()["expansion"]["contains"]] == ["hypertension", "t2dm", "20", "21", "22", "23"]
            assert (await c.get("/ValueSet/$expand", params={"url": f"{B}/ValueSet/marital-married"})).status_code == 404


# -- the shipped content -----------------------------------------------------------------------------


async def test_shipped_content_seeds_and_expands(mongo_uri: str) -> None:
    if not list((REPO / "terminology").glob("CodeSystem-*.json")):
        pytest.skip("terminology/ holds no CodeSystem yet")
    settings = make_settings(mongo_uri, load_conformance=True)
    app = create_app(settings)
    started = time.perf_counter()
    async with app.router.lifespan_context(app):
        elapsed = time.perf_counter() - started
        report = await seed(app.state.server)
        shipped = len(report.created) + len(report.updated) + report.unchanged + len(report.kept) + len(report.failed)
        print(f"\nstartup with the shipped content ({shipped} resources) on a fresh database: {elapsed:.2f} s; "
              f"no-op seed: {report.seconds * 1000:.0f} ms")
        assert report.created == [] and report.updated == [] and report.failed == [], report
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/fhir") as c:
            r = await c.get("/ValueSet/$expand", params={"url": f"{B}/ValueSet/gb-t-3304-ethnicity", "filter": "hz"})
            assert r.status_code == 200, r.text
            found = {(x["code"], x.get("display")) for x in r.json()["expansion"].get("contains", [])}
            assert ("01", "汉族") in found
            r = await c.get("/CodeSystem", params={"url": "urn:oid:2.16.156.10011.2.3.3.3"})
            assert r.json()["total"] == 1
