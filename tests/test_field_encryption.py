"""ID-card and phone numbers at rest (issue #6, fhir_server/storage/field_crypto.py).

A database dump alone must not reveal them: every document of the database (current versions,
``_history``, search index values, locks) is scanned as BSON for the numbers. Every read path gives
them back in clear, and exact search (identifier with and without system, phone, telecom, a
reference's ``:identifier``) still finds them.
"""

from __future__ import annotations

import base64
import os
import random
import stat
import time
from pathlib import Path
from typing import Any, AsyncIterator

import bson
import httpx
import orjson
import pytest
from click.testing import CliRunner
from pymongo import AsyncMongoClient

from fhir_server.cli import _embedded_field_key, cli
from fhir_server.config import load_settings
from fhir_server.http.app import create_app
from fhir_server.storage import field_crypto
from fhir_server.storage.field_crypto import FieldCrypto, FieldCryptoError
from fhir_server.validation.cn_identity import ID_CARD_SYSTEM, check_character
from tests.conftest import make_settings

DOC_TYPE = "https://fhir.cn-ehr.org/CodeSystem/cv02-01-101-id-document-type"


def _id_number(rng: random.Random) -> str:
    first17 = f"310104{rng.randint(1950, 2005)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(100, 999)}"
    return first17 + check_character(first17)


@pytest.fixture(scope="module")
async def env(mongo_uri: str) -> AsyncIterator[dict[str, Any]]:
    """An app on a database of its own (so that the scan sees only this module's data)."""
    app = create_app(make_settings(mongo_uri))
    async with app.router.lifespan_context(app):
        db = AsyncMongoClient(mongo_uri)[app.state.server.settings.database]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver/fhir", timeout=60) as http:
            yield {"app": app, "http": http, "db": db}


@pytest.fixture(scope="module")
async def resident(env: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random()
    number = _id_number(rng)
    phone = f"139{rng.randint(0, 99_999_999):08d}"
    contact_phone = f"136{rng.randint(0, 99_999_999):08d}"
    passport = f"E{rng.randint(0, 99_999_999):08d}"
    http = env["http"]
    patient = {
        "resourceType": "Patient",
        "text": {"status": "generated", "div": f'<div xmlns="http://www.w3.org/1999/xhtml">张三 身份证 {number} 电话 {phone}</div>'},
        "identifier": [
            {"system": ID_CARD_SYSTEM, "value": number},
            {"type": {"coding": [{"system": DOC_TYPE, "code": "03"}]}, "system": "urn:example:passport", "value": passport},
            {"system": "urn:example:mrn", "value": "MRN-77"},
        ],
        "name": [{"family": "张", "given": ["三"], "text": "张三"}],
        "telecom": [{"system": "phone", "value": phone, "use": "mobile"}, {"system": "email", "value": "zs@example.cn"}],
        "gender": "male",
        "birthDate": f"{number[6:10]}-{number[10:12]}-{number[12:14]}",
        "contact": [{"name": {"text": "李四"}, "telecom": [{"system": "phone", "value": contact_phone}]}],
    }
    r = await http.post("/Patient", json=patient)
    assert r.status_code == 201, r.text
    created = r.json()
    # A second version, so that _history holds two.
    created["active"] = True
    r = await http.put(f"/Patient/{created['id']}", json=created)
    assert r.status_code == 200, r.text
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "体重"},
        "subject": {"identifier": {"system": ID_CARD_SYSTEM, "value": number}, "display": "张三"},
        "valueQuantity": {"value": 60, "unit": "kg"},
    }
    r = await http.post("/Observation", json=obs)
    assert r.status_code == 201, r.text
    source = f"<ClinicalDocument><patient><id extension='{number}'/><telecom value='tel:{phone}'/></patient></ClinicalDocument>"
    binary = {"resourceType": "Binary", "contentType": "application/xml", "data": base64.b64encode(source.encode()).decode()}
    r = await http.post("/Binary", json=binary)
    assert r.status_code == 201, r.text
    return {
        "id": created["id"], "number": number, "phone": phone, "contact_phone": contact_phone, "passport": passport,
        "binary": binary, "binary_id": r.json()["id"],
    }


async def _all_documents(db: Any) -> list[tuple[str, bytes]]:
    out = []
    for name in await db.list_collection_names():
        async for doc in db[name].find({}):
            out.append((name, bson.encode(doc)))
    return out


async def test_every_read_path_gives_plaintext(env, resident) -> None:
    http, pid, number, phone = env["http"], resident["id"], resident["number"], resident["phone"]

    def check(res: dict[str, Any]) -> None:
        assert res["identifier"][0]["value"] == number
        assert res["identifier"][1]["value"] == resident["passport"]
        assert res["telecom"][0]["value"] == phone
        assert res["contact"][0]["telecom"][0]["value"] == resident["contact_phone"]
        assert number in res["text"]["div"] and phone in res["text"]["div"]

    check((await http.get(f"/Patient/{pid}")).json())
    check((await http.get(f"/Patient/{pid}/_history/1")).json())
    hist = (await http.get(f"/Patient/{pid}/_history")).json()
    assert len(hist["entry"]) == 2
    for e in hist["entry"]:
        check(e["resource"])
    bundle = (await http.get("/Observation", params={"subject:identifier": f"{ID_CARD_SYSTEM}|{number}", "_include": "Observation:subject"})).json()
    obs = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert len(obs) == 1 and obs[0]["subject"]["identifier"]["value"] == number
    b = (await http.get(f"/Binary/{resident['binary_id']}", headers={"Accept": "application/fhir+json"})).json()
    assert b["data"] == resident["binary"]["data"]


@pytest.mark.parametrize(
    "query",
    [
        {"identifier": f"{ID_CARD_SYSTEM}|{{number}}"},
        {"identifier": "{number}"},
        {"identifier": "{number_lower}"},
        {"identifier": "urn:example:passport|{passport}"},
        {"identifier": "urn:example:mrn|MRN-77"},
        {"identifier": f"{ID_CARD_SYSTEM}|"},
        {"phone": "{phone}"},
        {"phone": "{phone_dashed}"},
        {"telecom": "{phone}"},
        {"telecom": "phone|{phone}"},
        {"phone": "{contact_phone},{phone}"},
        {"identifier": f"{ID_CARD_SYSTEM}|{{number}}", "phone": "{phone}"},
    ],
)
async def test_exact_search_finds_protected_values(env, resident, query) -> None:
    values = {
        "number": resident["number"],
        "number_lower": resident["number"].lower(),
        "passport": resident["passport"],
        "phone": resident["phone"],
        "phone_dashed": f"{resident['phone'][:3]}-{resident['phone'][3:7]}-{resident['phone'][7:]}",
        "contact_phone": resident["contact_phone"],
    }
    params = {k: v.format(**values) for k, v in query.items()}
    r = await env["http"].get("/Patient", params=params)
    assert r.status_code == 200, r.text
    assert [e["resource"]["id"] for e in r.json().get("entry", [])] == [resident["id"]], params


async def test_search_misses_and_negations(env, resident) -> None:
    http = env["http"]
    other = _id_number(random.Random(1))
    r = await http.get("/Patient", params={"identifier": f"{ID_CARD_SYSTEM}|{other}"})
    assert r.json()["total"] == 0
    r = await http.get("/Patient", params={"identifier:not": f"{ID_CARD_SYSTEM}|{resident['number']}"})
    assert resident["id"] not in {e["resource"]["id"] for e in r.json().get("entry", [])}
    # A contact's phone is not the Patient's phone (Patient.telecom only), as without encryption.
    r = await http.get("/Patient", params={"phone": resident["contact_phone"]})
    assert r.json()["total"] == 0


async def test_conditional_create_on_an_id_number_finds_the_resident(env, resident) -> None:
    r = await env["http"].post(
        "/Patient",
        json={"resourceType": "Patient", "identifier": [{"system": ID_CARD_SYSTEM, "value": resident["number"]}]},
        headers={"If-None-Exist": f"identifier={ID_CARD_SYSTEM}|{resident['number']}"},
    )
    assert r.status_code == 200 and r.json()["id"] == resident["id"]


async def test_text_that_looks_like_a_token_is_kept_verbatim(env) -> None:
    http = env["http"]
    looks = "enc:v1:AAAAAA.QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo~"
    patient = {"resourceType": "Patient", "name": [{"text": looks}], "identifier": [{"system": "urn:x", "value": "enc:v1:"}]}
    r = await http.post("/Patient", json=patient)
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    got = (await http.get(f"/Patient/{pid}")).json()
    assert got["name"][0]["text"] == looks and got["identifier"][0]["value"] == "enc:v1:"
    doc = await env["db"]["Patient"].find_one({"_id": pid})
    assert looks.encode() not in doc["r"]  # stored as a token of itself, so it reads back exactly


async def test_the_mpi_lock_keys_are_not_numbers(env, resident) -> None:
    store = env["app"].state.server.store

    async def work(unit: Any) -> None:
        await unit.lock(f"id:{resident['number']}")

    await store.transact(work)
    keys = [d["_id"] async for d in env["db"]["_locks"].find({})]
    assert keys and not any(resident["number"] in k for k in keys)


async def test_a_wrong_key_cannot_decrypt(env, resident) -> None:
    doc = await env["db"]["Patient"].find_one({"_id": resident["id"]})
    wrong = FieldCrypto(os.urandom(32))
    with pytest.raises(FieldCryptoError, match="encrypted with field key .* but the configured key is"):
        wrong.decrypt_raw(doc["r"])
    # An altered token fails authentication.
    right = field_crypto.active()
    assert right is not None
    tampered = bytearray(doc["r"])
    i = bytes(tampered).index(b"enc:v1:") + 7 + 6 + 1 + 20
    tampered[i : i + 1] = b"A" if tampered[i : i + 1] != b"A" else b"B"
    with pytest.raises(FieldCryptoError, match="fails authentication"):
        right.decrypt_raw(bytes(tampered))
    # The previous key still decrypts after a change of key (rotation).
    old_key = os.urandom(32)
    old = FieldCrypto(old_key)
    sealed = old.encrypt_raw(orjson.dumps({"telecom": [{"system": "phone", "value": "13912345678"}]}))
    rotated = FieldCrypto(os.urandom(32), previous=[old_key])
    assert b"13912345678" in rotated.decrypt_raw(sealed)


async def test_a_dump_reveals_no_id_or_phone_number(env, resident) -> None:
    # Last of the tests on this database: after the searches, the conditional create and the locks.
    secrets = [resident["number"], resident["phone"], resident["contact_phone"], resident["passport"]]
    docs = await _all_documents(env["db"])
    assert any(name == "_history" for name, _ in docs) and any(name == "Patient" for name, _ in docs)
    for name, data in docs:
        for s in secrets:
            assert s.encode() not in data, f"{s} found in {name}"
            assert s.encode("utf-16-le") not in data
        # The Binary's base64 source record either.
        assert resident["binary"]["data"][:40].encode() not in data, f"the source record is in {name}"
    # The search index holds the blind form instead.
    doc = await env["db"]["Patient"].find_one({"_id": resident["id"]})
    assert any(v.startswith(f"{ID_CARD_SYSTEM}|h1:") for v in doc["s"]["identifier"])
    assert any(v.startswith("urn:example:passport|h1:") for v in doc["s"]["identifier"])
    assert any(v.startswith("h1:") for v in doc["s"]["phone"])
    assert "urn:example:mrn|MRN-77" in doc["s"]["identifier"]  # other identifiers stay plain
    assert b"enc:v1:" in doc["r"] and b"zs@example.cn" in doc["r"]  # e-mail is not protected


def test_round_trip_is_byte_exact_and_randomised() -> None:
    c = FieldCrypto(os.urandom(32))
    raw = orjson.dumps(
        {
            "resourceType": "Patient",
            "identifier": [{"system": ID_CARD_SYSTEM, "value": "11010519491231002X"}],
            "telecom": [{"system": "phone", "value": "138 0013 8000"}, {"system": "sms", "value": "x\"y\\z"}],
            "note": [{"text": "call 138 0013 8000; enc:v1: enc:v1:AAAAAA.AAAA~"}],
        }
    )
    a, b = c.encrypt_raw(raw), c.encrypt_raw(raw)
    assert a != b and c.decrypt_raw(a) == raw and c.decrypt_raw(b) == raw
    assert b"11010519491231002X" not in a and b"138 0013 8000" not in a and b'x\\"y' not in a
    plain = orjson.dumps({"resourceType": "Observation", "status": "final", "code": {"text": "x"}})
    assert c.encrypt_raw(plain) is plain and c.decrypt_raw(plain) is plain  # untouched, not copied
    assert c.blind("11010519491231002x") == c.blind("11010519491231002X") != FieldCrypto(os.urandom(32)).blind("11010519491231002X")
    # A connector's source record number (typed 99 only to satisfy cn-patient) is not an ID document.
    source = {"system": "https://s", "value": "c1", "type": {"coding": [{"system": DOC_TYPE, "code": "99"}]}}
    assert c.protects(source)
    source["type"]["coding"].append({"system": "https://fhir.cn-ehr.org/CodeSystem/cn-identifier-type", "code": "source-record"})
    assert not c.protects(source)


def test_settings_and_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no .data/field.key here
    monkeypatch.delenv("FHIR_FIELD_KEY", raising=False)
    with pytest.raises(FieldCryptoError, match="no key is configured"):
        field_crypto.from_settings(load_settings())
    assert field_crypto.from_settings(load_settings(field_encryption=False)) is None
    with pytest.raises(FieldCryptoError, match="16 bytes, expected 32"):
        field_crypto.from_settings(load_settings(field_key=base64.b64encode(os.urandom(16)).decode()))
    # `fhir-server run` makes a key file beside the embedded data folder, readable by its owner only.
    monkeypatch.delenv("FHIR_FIELD_KEY_FILE", raising=False)
    _embedded_field_key(tmp_path / "data" / "mongod", None)
    key_file = tmp_path / "data" / "field.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert os.environ["FHIR_FIELD_KEY_FILE"] == str(key_file.resolve())
    first = key_file.read_text()
    _embedded_field_key(tmp_path / "data" / "mongod", None)
    assert key_file.read_text() == first  # kept on later starts
    assert field_crypto.from_settings(load_settings()) is not None
    # `serve` without a key refuses to start.
    monkeypatch.delenv("FHIR_FIELD_KEY_FILE")
    monkeypatch.setenv("MONGODB_URI", "mongodb://127.0.0.1:1")
    result = CliRunner().invoke(cli, ["serve", "--port", "1"])
    assert result.exit_code != 0 and "FHIR_FIELD_KEY" in result.output and "Traceback" not in result.output


def test_overhead_per_resource() -> None:
    """Not a gate: prints the cost of protection per resource (a typical CN Patient, and an
    Observation, which has nothing to protect)."""
    c = FieldCrypto(os.urandom(32))
    patient = orjson.dumps(
        {
            "resourceType": "Patient", "id": "p1", "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"},
            "identifier": [{"system": ID_CARD_SYSTEM, "value": "11010519491231002X"}, {"system": "urn:oid:2.16.156.10011.1.2", "value": "31010400000000001"}],
            "name": [{"family": "张", "given": ["三"], "text": "张三"}], "gender": "male", "birthDate": "1949-12-31",
            "telecom": [{"system": "phone", "value": "13800138000", "use": "mobile"}],
            "address": [{"text": "上海市徐汇区漕溪北路 1 号", "city": "上海市", "district": "徐汇区"}],
            "contact": [{"name": {"text": "李四"}, "telecom": [{"system": "phone", "value": "13600136000"}]}],
        }
    )
    obs = orjson.dumps({"resourceType": "Observation", "id": "o1", "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]}, "subject": {"reference": "Patient/p1"}, "valueQuantity": {"value": 60, "unit": "kg"}})
    n = 3000
    rows = []
    for label, raw in (("Patient (3 protected values)", patient), ("Observation (none)", obs)):
        t0 = time.perf_counter()
        for _ in range(n):
            sealed = c.encrypt_raw(raw)
        t1 = time.perf_counter()
        for _ in range(n):
            c.decrypt_raw(sealed)
        t2 = time.perf_counter()
        rows.append(f"{label}: write +{(t1 - t0) / n * 1e6:.1f} µs, read +{(t2 - t1) / n * 1e6:.1f} µs")
    t0 = time.perf_counter()
    for _ in range(n):
        c.blind("11010519491231002X")
    rows.append(f"blind index value: {(time.perf_counter() - t0) / n * 1e6:.1f} µs")
    print("\nfield encryption overhead per resource:\n  " + "\n  ".join(rows))
