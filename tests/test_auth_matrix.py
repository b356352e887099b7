"""Access control enforced on the FHIR interactions (issue #6): an authorization matrix over the
three kinds of caller — a hospital's system token (real client_credentials + private_key_jwt), a
clinician's user token and a resident's patient token (real authorization code + PKCE) — and the
escape attempts of resident A towards resident B's record.

Each resident has a golden Patient and two source Patients linked both ways (fhir_server/mpi/golden.py);
clinical data references the sources. Every id of B contains "zeta", B's name is 欧阳娜娜: a
resident's answers must contain neither (searches echo the client's own query in Bundle.link; the
check then runs on the rest of the body and on the links without the echoed query).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import uuid
from typing import Any, AsyncIterator
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest

from fhir_server.auth import _urls, clients, keys
from fhir_server.config import load_settings
from fhir_server.http.app import create_app
from fhir_server.mpi.golden import GOLDEN_TAG

pytestmark = pytest.mark.timeout(180)

BASE = "http://testserver"
FHIR = BASE + "/fhir"
HOSPITAL_SOURCE = "http://hosp-a.example.cn/emr"
B_MARKERS = ("zeta", "欧阳娜娜", "欧阳", "娜娜")
_HOSPITAL_KEY = keys.generate("ES384")


# -- the server, its data ----------------------------------------------------------------------


def _settings(mongo_uri: str, database: str, **kw: Any):
    return load_settings(
        mongodb_uri=mongo_uri, database=database, load_conformance=False, audit_enabled=False, public_base_url=FHIR, **kw
    )


def _patients(prefix: str, name: str, family: str, given: str) -> list[dict[str, Any]]:
    golden = {
        "resourceType": "Patient",
        "id": f"{prefix}-golden",
        "meta": {"tag": [dict(GOLDEN_TAG)]},
        "name": [{"text": name, "family": family, "given": [given]}],
        "link": [{"other": {"reference": f"Patient/{prefix}-src{i}"}, "type": "seealso"} for i in (1, 2)],
    }
    sources = [
        {
            "resourceType": "Patient",
            "id": f"{prefix}-src{i}",
            "meta": {"source": f"http://other-hospital.example/his#{prefix}-p{i}"},
            "name": [{"text": name, "family": family, "given": [given]}],
            "link": [{"other": {"reference": f"Patient/{prefix}-golden"}, "type": "refer"}],
        }
        for i in (1, 2)
    ]
    return [golden, *sources]


def _obs(id_: str, subject: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": id_,
        "meta": {"source": f"http://other-hospital.example/his#{id_}"},
        "status": "final",
        "code": {"text": "体重"},
        "subject": {"reference": f"Patient/{subject}"},
        "valueQuantity": {"value": 60, "unit": "kg"},
        **extra,
    }


def _condition(id_: str, subject: str) -> dict[str, Any]:
    return {"resourceType": "Condition", "id": id_, "code": {"text": "高血压"}, "subject": {"reference": f"Patient/{subject}"}}


def _audit(id_: str, patient: str) -> dict[str, Any]:
    return {
        "resourceType": "AuditEvent",
        "id": id_,
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
        "recorded": "2024-05-01T08:00:00+08:00",
        "agent": [{"requestor": True, "who": {"display": "someone"}}],
        "source": {"observer": {"display": "fhir-server-cn"}},
        "entity": [{"what": {"reference": f"Patient/{patient}"}}],
    }


def _seed() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    out += _patients("alpha", "王小明", "王", "小明")
    out += _patients("zeta", "欧阳娜娜", "欧阳", "娜娜")
    out += [
        _obs("alpha-obs1", "alpha-src1"),
        _obs("alpha-obs2", "alpha-src2"),
        _obs("alpha-obs-del", "alpha-src1"),
        _obs("zeta-obs1", "zeta-src1", identifier=[{"system": "http://lab.example/obs", "value": "zeta-lab-1"}]),
        _obs("zeta-obs2", "zeta-src2"),
        # B's observation that points at A's Patient through a parameter outside the compartment.
        _obs("zeta-obs3", "zeta-src1", focus=[{"reference": "Patient/alpha-src1"}]),
        _condition("alpha-cond1", "alpha-src1"),
        _condition("zeta-cond1", "zeta-src1"),
        _audit("alpha-audit", "alpha-src1"),
        _audit("zeta-audit", "zeta-src1"),
    ]
    return out


@pytest.fixture(scope="module")
async def env(mongo_uri: str) -> AsyncIterator[dict[str, Any]]:
    database = f"test_authz_{uuid.uuid4().hex[:8]}"
    # The data is loaded through a server without access control (AuditEvents included), then
    # served by one with it on, on the same database.
    seeder = create_app(_settings(mongo_uri, database, auth_enabled=False))
    async with seeder.router.lifespan_context(seeder):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=seeder), base_url=FHIR, timeout=60) as c:
            entries = [{"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}} for r in _seed()]
            resp = await c.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": entries})
            assert resp.status_code == 200, resp.text
    settings = _settings(mongo_uri, database, auth_enabled=True)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=FHIR, timeout=60) as http:
            db = await app.state.auth_server.db()
            await clients.register_client(
                db, "hosp-a", scope="system/*.rs system/Observation.cu system/Patient.cu",
                jwks={"keys": [keys.public(_HOSPITAL_KEY)]}, source_restriction=HOSPITAL_SOURCE, push_sources=["sh-demo-hosp-a"],
            )  # fmt: skip
            await db[clients.USERS].replace_one(
                {"_id": "resident-a"},
                {"_id": "resident-a", "name": "王小明", "fhirUser": "Patient/alpha-src1", "patient": "alpha-src1",
                 "scope": "patient/*.rs patient/Observation.c launch/patient openid fhirUser"},
                upsert=True,
            )  # fmt: skip
            tokens = {
                "hospital": await _hospital_token(http),
                "clinician": await _code_token(http, clients.DEMO_CLINICIAN_APP, "clinician", "user/*.cruds openid fhirUser"),
                "resident": await _code_token(http, clients.DEMO_RESIDENT_APP, "resident-a", "launch/patient patient/*.rs patient/Observation.c openid fhirUser"),
                "auditor": await _code_token(http, clients.DEMO_CLINICIAN_APP, "auditor", "user/AuditEvent.rs openid fhirUser"),
            }
            yield {"app": app, "http": http, "settings": settings, "tokens": tokens}


async def _hospital_token(http: httpx.AsyncClient) -> str:
    now = int(time.time())
    assertion = keys.sign(
        {"iss": "hosp-a", "sub": "hosp-a", "aud": BASE + "/auth/token", "iat": now, "exp": now + 240, "jti": uuid.uuid4().hex}, _HOSPITAL_KEY
    )
    resp = await http.post(
        BASE + "/auth/token",
        data={
            "grant_type": "client_credentials",
            "scope": "system/*.rs system/Observation.cu system/Patient.cu",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        },
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["access_token"]


async def _code_token(http: httpx.AsyncClient, client_id: str, user: str, scope: str) -> str:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    resp = await http.get(
        BASE + "/auth/authorize",
        params={
            "response_type": "code", "client_id": client_id, "redirect_uri": clients.DEMO_REDIRECT_URI, "scope": scope,
            "state": "s", "aud": FHIR, "code_challenge": challenge, "code_challenge_method": "S256", "login_hint": user,
        },
    )  # fmt: skip
    assert resp.status_code == 302, resp.text
    got = {k: v[0] for k, v in parse_qs(urlsplit(resp.headers["location"]).query).items()}
    assert "code" in got, got
    resp = await http.post(
        BASE + "/auth/token",
        data={"grant_type": "authorization_code", "code": got["code"], "redirect_uri": clients.DEMO_REDIRECT_URI, "client_id": client_id, "code_verifier": verifier},
    )
    assert resp.status_code == 200, resp.text
    return resp.json()["access_token"]


async def _mint(env: dict[str, Any], **claims: Any) -> str:
    """A token signed by the development server's own key (to vary the claims at will)."""
    settings = env["settings"]
    now = int(time.time())
    base = {"iss": _urls.issuer(settings), "aud": _urls.audiences(settings)[0], "sub": "t", "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex}
    base.update(claims)
    return await env["app"].state.auth_server.keys.sign({k: v for k, v in base.items() if v is not None}, typ="at+jwt")


async def _call(env: dict[str, Any], who: str | None, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> httpx.Response:
    h = dict(headers or {})
    if who is not None:
        h["Authorization"] = "Bearer " + (env["tokens"][who] if who in env["tokens"] else who)
    if body is not None:
        h.setdefault("Content-Type", "application/fhir+json")
        return await env["http"].request(method, path, content=json.dumps(body, ensure_ascii=False).encode(), headers=h)
    return await env["http"].request(method, path, headers=h)


def _nothing_of_b(resp: httpx.Response) -> None:
    """No id or name of B in the answer. A search's links repeat the client's own query: they are
    checked without it (the path and the server's cursor must not name B)."""
    text = resp.text
    try:
        body = resp.json()
    except ValueError:
        body = None

    def without_query(node: Any) -> Any:
        if isinstance(node, list):
            return [without_query(n) for n in node]
        if not isinstance(node, dict):
            return node
        out = {k: without_query(v) for k, v in node.items()}
        if node.get("resourceType") == "Bundle" and isinstance(node.get("link"), list):
            out["link"] = [urlsplit(l["url"]).path for l in node["link"]]
        return out

    if body is not None:
        text = json.dumps(without_query(body), ensure_ascii=False)
    for marker in B_MARKERS:
        assert marker not in text, f"{marker!r} leaked: {text[:600]}"


def _ids(resp: httpx.Response) -> set[str]:
    body = resp.json()
    return {e["resource"]["id"] for e in body.get("entry", ()) if "resource" in e and "id" in e["resource"]}


# -- the matrix --------------------------------------------------------------------------------

_NEW_OBS = {"resourceType": "Observation", "status": "final", "code": {"text": "心率"}, "subject": {"reference": "Patient/alpha-src1"}}
_NEW_COND = {"resourceType": "Condition", "code": {"text": "糖尿病"}, "subject": {"reference": "Patient/alpha-src1"}}
_UPDATED_OBS = {**_obs("alpha-obs1", "alpha-src1"), "status": "amended"}
_BATCH_READS = {
    "resourceType": "Bundle", "type": "batch",
    "entry": [{"request": {"method": "GET", "url": "Observation/alpha-obs1"}}, {"request": {"method": "GET", "url": "Observation/zeta-obs1"}}],
}  # fmt: skip
_TX_CREATE = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": _NEW_OBS, "request": {"method": "POST", "url": "Observation"}}]}

# name, method, path, body, expected status for (hospital, clinician, resident)
MATRIX: list[tuple[str, str, str, Any, tuple[int, int, int]]] = [
    ("read Patient (A golden)", "GET", "/Patient/alpha-golden", None, (200, 200, 200)),
    ("read Patient (A other source)", "GET", "/Patient/alpha-src2", None, (200, 200, 200)),
    ("read Observation (A, via other source)", "GET", "/Observation/alpha-obs2", None, (200, 200, 200)),
    ("read Condition (A)", "GET", "/Condition/alpha-cond1", None, (200, 200, 200)),
    ("read Patient (B)", "GET", "/Patient/zeta-golden", None, (200, 200, 404)),
    ("read Observation (B)", "GET", "/Observation/zeta-obs1", None, (200, 200, 404)),
    ("vread Observation (A)", "GET", "/Observation/alpha-obs1/_history/1", None, (200, 200, 200)),
    ("vread Observation (B)", "GET", "/Observation/zeta-obs1/_history/1", None, (200, 200, 404)),
    ("search Observation", "GET", "/Observation", None, (200, 200, 200)),
    ("search Condition by subject", "GET", "/Condition?subject=Patient/alpha-src1", None, (200, 200, 200)),
    ("history instance (A)", "GET", "/Observation/alpha-obs1/_history", None, (200, 200, 200)),
    ("history instance (B)", "GET", "/Patient/zeta-golden/_history", None, (200, 200, 404)),
    ("history type", "GET", "/Observation/_history", None, (200, 200, 200)),
    ("create Observation", "POST", "/Observation", _NEW_OBS, (201, 201, 201)),
    ("create Condition", "POST", "/Condition", _NEW_COND, (403, 201, 403)),
    ("update Observation (another source's)", "PUT", "/Observation/alpha-obs1", _UPDATED_OBS, (403, 200, 403)),
    ("delete Observation", "DELETE", "/Observation/alpha-obs-del", None, (403, 200, 403)),
    ("$everything (A)", "GET", "/Patient/alpha-golden/$everything", None, (200, 200, 200)),
    ("$everything (B)", "GET", "/Patient/zeta-golden/$everything", None, (200, 200, 404)),
    ("batch of reads", "POST", "", _BATCH_READS, (200, 200, 200)),
    ("transaction create", "POST", "", _TX_CREATE, (200, 200, 200)),
]
KINDS = ("hospital", "clinician", "resident")


@pytest.mark.parametrize("name, method, path, body, expected", MATRIX, ids=[m[0] for m in MATRIX])
@pytest.mark.parametrize("kind", KINDS)
async def test_matrix(env: dict[str, Any], kind: str, name: str, method: str, path: str, body: Any, expected: tuple[int, int, int]) -> None:
    resp = await _call(env, kind, method, path, body)
    want = expected[KINDS.index(kind)]
    assert resp.status_code == want, f"{kind} {name}: {resp.status_code} {resp.text[:400]}"
    if resp.status_code >= 400:
        assert resp.json()["resourceType"] == "OperationOutcome"
        if resp.status_code == 403:
            assert 'error="insufficient_scope"' in resp.headers.get("www-authenticate", "") or "source" in resp.text
    if kind == "resident":
        _nothing_of_b(resp)
    if name == "batch of reads":
        statuses = [e["response"]["status"][:3] for e in resp.json()["entry"]]
        assert statuses == (["200", "404"] if kind == "resident" else ["200", "200"])
    if name == "transaction create":
        assert resp.json()["entry"][0]["response"]["status"].startswith("201")
    if kind == "hospital" and name == "create Observation":
        assert resp.json()["meta"]["source"] == HOSPITAL_SOURCE  # stamped: the hospital's data
    if kind == "resident" and method == "GET" and resp.status_code == 200 and "Bundle" in resp.text[:200]:
        assert all(i.startswith("alpha") or len(i) > 20 for i in _ids(resp))  # server ids of new resources are long


# -- resident A trying to reach B --------------------------------------------------------------

ESCAPES: list[tuple[str, str, str, Any, int]] = [
    ("read B's golden", "GET", "/Patient/zeta-golden", None, 404),
    ("read B's source", "GET", "/Patient/zeta-src1", None, 404),
    ("read B's observation", "GET", "/Observation/zeta-obs1", None, 404),
    ("read B's condition", "GET", "/Condition/zeta-cond1", None, 404),
    ("search by B as subject", "GET", "/Observation?subject=Patient/zeta-src1", None, 200),
    ("search by B as patient", "GET", "/Observation?patient=zeta-src2", None, 200),
    ("search by B's id", "GET", "/Observation?_id=zeta-obs1,zeta-obs2", None, 200),
    ("search by B's identifier", "GET", "/Observation?identifier=zeta-lab-1", None, 200),
    ("chain to B's name", "GET", "/Observation?subject:Patient.name=欧阳娜娜", None, 200),
    ("chain to B's family", "GET", "/Condition?subject:Patient.family=欧阳", None, 200),
    ("_has from B's observation", "GET", "/Patient?_has:Observation:subject:_id=zeta-obs1", None, 200),
    ("_has through a B resource pointing at A", "GET", "/Patient?_has:Observation:focus:_id=zeta-obs3", None, 200),
    ("_revinclude of a B resource pointing at A", "GET", "/Patient?_id=alpha-src1&_revinclude=Observation:focus", None, 200),
    ("_revinclude of observations", "GET", "/Patient?_revinclude=Observation:subject", None, 200),
    ("_include from all observations", "GET", "/Observation?_include=Observation:subject", None, 200),
    ("B's instance history", "GET", "/Patient/zeta-golden/_history", None, 404),
    ("B's observation history", "GET", "/Observation/zeta-obs1/_history", None, 404),
    ("type history", "GET", "/Observation/_history", None, 200),
    ("system history", "GET", "/_history", None, 200),
    ("B's $everything", "GET", "/Patient/zeta-golden/$everything", None, 404),
    ("B's source's $everything", "GET", "/Patient/zeta-src2/$everything", None, 404),
    ("_type system search", "GET", "/?_type=Patient,Observation,Condition", None, 200),
    ("system search of every type", "GET", "/", None, 200),
    ("compartment search in B", "GET", "/Patient/zeta-golden/Observation", None, 404),
    ("compartment * in B's source", "GET", "/Patient/zeta-src1/*", None, 404),
    ("AuditEvents", "GET", "/AuditEvent", None, 200),
    ("AuditEvents about B", "GET", "/AuditEvent?patient=zeta-src1", None, 200),
    ("$match of B's demographics", "POST", "/Patient/$match",
     {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": {"resourceType": "Patient", "name": [{"text": "欧阳娜娜"}]}}]}, 403),
    ("batch reading B", "POST", "",
     {"resourceType": "Bundle", "type": "batch", "entry": [
         {"request": {"method": "GET", "url": "Patient/zeta-golden"}},
         {"request": {"method": "GET", "url": "Observation/zeta-obs1"}},
         {"request": {"method": "GET", "url": "Observation?subject=Patient/zeta-src1"}},
         {"request": {"method": "GET", "url": "Patient/zeta-golden/_history"}},
     ]}, 200),
    ("transaction writing into B's compartment", "POST", "",
     {"resourceType": "Bundle", "type": "transaction", "entry": [
         {"resource": {**_NEW_OBS, "subject": {"reference": "Patient/zeta-src1"}}, "request": {"method": "POST", "url": "Observation"}}]}, 403),
    ("transaction reading B", "POST", "",
     {"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "GET", "url": "Observation/zeta-obs1"}}]}, 404),
    ("create into B's compartment", "POST", "/Observation", {**_NEW_OBS, "subject": {"reference": "Patient/zeta-src2"}}, 403),
]  # fmt: skip


# Searches that must find nothing at all (not even A's own resources).
_EMPTY = {
    "search by B as subject", "search by B as patient", "search by B's id", "search by B's identifier", "chain to B's name",
    "chain to B's family", "_has from B's observation", "_has through a B resource pointing at A", "AuditEvents about B",
}  # fmt: skip


@pytest.mark.parametrize("name, method, path, body, expected", ESCAPES, ids=[e[0] for e in ESCAPES])
async def test_resident_cannot_reach_b(env: dict[str, Any], name: str, method: str, path: str, body: Any, expected: int) -> None:
    resp = await _call(env, "resident", method, path, body)
    assert resp.status_code == expected, f"{name}: {resp.status_code} {resp.text[:400]}"
    _nothing_of_b(resp)
    if expected == 200 and resp.json().get("type") == "searchset":
        assert all(i.startswith("alpha") or len(i) > 20 for i in _ids(resp)), _ids(resp)
    if name in _EMPTY:
        assert _ids(resp) == set(), (name, _ids(resp))
    if name == "batch reading B":
        statuses = [e["response"]["status"][:3] for e in resp.json()["entry"]]
        assert statuses == ["404", "404", "200", "404"]


async def test_resident_sees_the_whole_own_record(env: dict[str, Any]) -> None:
    """Through its golden, the resident's token (context: one source) reaches both sources' data."""
    resp = await _call(env, "resident", "GET", "/Observation?_count=100")
    assert {"alpha-obs1", "alpha-obs2"} <= _ids(resp)
    resp = await _call(env, "resident", "GET", "/Patient/alpha-golden/$everything")
    assert {"alpha-golden", "alpha-src1", "alpha-src2", "alpha-obs1", "alpha-obs2", "alpha-cond1"} <= _ids(resp)
    resp = await _call(env, "resident", "GET", "/Observation?_id=alpha-obs1&_include=Observation:subject")
    assert _ids(resp) == {"alpha-obs1", "alpha-src1"}
    resp = await _call(env, "resident", "GET", "/Observation?subject:Patient.name=王小明&_count=100")
    assert {"alpha-obs1", "alpha-obs2"} <= _ids(resp)
    resp = await _call(env, "resident", "GET", "/Patient/alpha-src1/*")
    assert {"alpha-src1", "alpha-obs1", "alpha-cond1"} <= _ids(resp)
    resp = await _call(env, "resident", "GET", "/AuditEvent")
    assert resp.status_code == 200 and _ids(resp) == {"alpha-audit"}  # about its own record only
    hist = (await _call(env, "resident", "GET", "/Observation/_history?_count=1000")).json()
    assert "total" not in hist  # a count of everyone's versions would say too much


async def test_resident_with_write_scopes_stays_in_its_compartment(env: dict[str, Any]) -> None:
    token = await _mint(env, sub="resident-a", scope="patient/*.cruds", patient="alpha-golden", fhirUser="Patient/alpha-golden")
    assert (await _call(env, token, "PUT", "/Observation/zeta-obs2", _obs("zeta-obs2", "alpha-src1"))).status_code == 404
    r = await _call(env, token, "PUT", "/Observation/alpha-obs2", _obs("alpha-obs2", "zeta-src1"))
    assert r.status_code == 403  # moving own data into B's record
    r = await _call(env, token, "DELETE", "/Observation/zeta-obs2")
    assert r.status_code == 404
    assert (await _call(env, "clinician", "GET", "/Observation/zeta-obs2")).status_code == 200  # still there
    r = await _call(env, token, "PATCH", "/Observation/zeta-obs2", [{"op": "replace", "path": "/status", "value": "cancelled"}],
                    headers={"Content-Type": "application/json-patch+json"})  # fmt: skip
    assert r.status_code == 404
    # A conditional create whose criteria match B's resource must not answer with it.
    r = await _call(env, token, "POST", "/Observation", _NEW_OBS, headers={"If-None-Exist": "identifier=zeta-lab-1"})
    assert r.status_code == 201 and r.json()["subject"]["reference"] == "Patient/alpha-src1"
    _nothing_of_b(r)
    # A conditional update whose criteria match B's resource creates in A's record instead.
    r = await _call(env, token, "PUT", "/Observation?identifier=zeta-lab-1", {**_NEW_OBS, "identifier": [{"system": "http://lab.example/obs", "value": "alpha-lab-9"}]})
    assert r.status_code == 201
    assert (await _call(env, "clinician", "GET", "/Observation/zeta-obs1")).json()["subject"]["reference"] == "Patient/zeta-src1"
    # A conditional reference resolved in a transaction must not find B's Patient.
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {**_NEW_OBS, "performer": [{"reference": "Patient?_id=zeta-src1"}]}, "request": {"method": "POST", "url": "Observation"}}]}  # fmt: skip
    r = await _call(env, token, "POST", "", tx)
    assert r.status_code == 404
    _nothing_of_b(r)
    r = await _call(env, token, "POST", "", {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "DELETE", "url": "Observation/zeta-obs2"}},
        {"resource": _obs("zeta-obs2", "alpha-src1"), "request": {"method": "PUT", "url": "Observation/zeta-obs2"}}]})  # fmt: skip
    assert [e["response"]["status"][:3] for e in r.json()["entry"]] == ["404", "404"]


# -- tokens ------------------------------------------------------------------------------------


async def test_no_token(env: dict[str, Any]) -> None:
    resp = await _call(env, None, "GET", "/Patient/alpha-golden")
    assert resp.status_code == 401 and resp.json()["resourceType"] == "OperationOutcome"
    header = resp.headers["www-authenticate"]
    assert header.startswith("Bearer") and "error=" not in header


@pytest.mark.parametrize("what", ["expired", "not-yet-valid", "wrongly-signed", "alg-none", "wrong-audience", "wrong-issuer", "garbage", "basic"])
async def test_bad_tokens(env: dict[str, Any], what: str) -> None:
    now = int(time.time())
    scope = "user/*.cruds"
    if what == "expired":
        token = await _mint(env, scope=scope, iat=now - 7200, exp=now - 3600)
    elif what == "not-yet-valid":
        token = await _mint(env, scope=scope, nbf=now + 3600)
    elif what == "wrongly-signed":
        real = await env["app"].state.auth_server.keys.private_jwk()
        token = keys.sign({"iss": _urls.issuer(env["settings"]), "aud": FHIR, "sub": "x", "iat": now, "exp": now + 60, "scope": scope},
                          {**keys.generate("RS256"), "kid": real["kid"]})  # fmt: skip
    elif what == "alg-none":
        token = jwt.encode({"iss": _urls.issuer(env["settings"]), "aud": FHIR, "sub": "x", "iat": now, "exp": now + 60, "scope": scope}, None, algorithm="none")
    elif what == "wrong-audience":
        token = await _mint(env, scope=scope, aud="https://elsewhere.example/fhir")
    elif what == "wrong-issuer":
        token = keys.sign({"iss": "https://evil.example", "aud": FHIR, "sub": "x", "iat": now, "exp": now + 60, "scope": scope}, keys.generate("RS256"))
    elif what == "garbage":
        token = "not-a-token"
    else:
        token = None
    headers = {"Authorization": "Basic dXNlcjpwYXNz"} if token is None else {"Authorization": "Bearer " + token}
    resp = await env["http"].get("/Patient/alpha-golden", headers=headers)
    assert resp.status_code == 401, resp.text
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]
    assert resp.json()["resourceType"] == "OperationOutcome" and "王小明" not in resp.text


async def test_scope_escalation(env: dict[str, Any]) -> None:
    token = await _mint(env, sub="resident-a", scope="patient/Observation.rs", patient="alpha-src1")
    assert (await _call(env, token, "GET", "/Observation/alpha-obs1")).status_code == 200
    for method, path, body in [
        ("GET", "/Condition/alpha-cond1", None),
        ("GET", "/Condition", None),
        ("GET", "/?_type=Condition", None),
        ("GET", "/", None),  # every type: needs a * scope
        ("GET", "/Patient/alpha-golden/$everything", None),
        ("POST", "/Observation", _NEW_OBS),
        ("PUT", "/Observation/alpha-obs1", _UPDATED_OBS),
        ("DELETE", "/Observation/alpha-obs1", None),
    ]:
        resp = await _call(env, token, method, path, body)
        assert resp.status_code == 403, (method, path, resp.status_code, resp.text[:300])
        assert 'error="insufficient_scope"' in resp.headers["www-authenticate"]
    # _include of a type the token cannot read adds nothing
    resp = await _call(env, token, "GET", "/Observation?_id=alpha-obs1&_include=Observation:subject")
    assert _ids(resp) == {"alpha-obs1"}
    # a patient/ token without a patient context grants nothing
    token = await _mint(env, sub="x", scope="patient/*.rs")
    assert (await _call(env, token, "GET", "/Observation")).status_code == 403


# -- hospitals -----------------------------------------------------------------------------------


async def test_hospital_writes_only_its_own_source(env: dict[str, Any]) -> None:
    other = {**_NEW_OBS, "meta": {"source": "http://other-hospital.example/his#x1"}}
    r = await _call(env, "hospital", "POST", "/Observation", other)
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    lookalike = {**_NEW_OBS, "meta": {"source": HOSPITAL_SOURCE + "-not#x"}}
    assert (await _call(env, "hospital", "POST", "/Observation", lookalike)).status_code == 403
    own = {**_NEW_OBS, "meta": {"source": HOSPITAL_SOURCE + "#r1"}}
    r = await _call(env, "hospital", "POST", "/Observation", own)
    assert r.status_code == 201
    created = r.json()
    r = await _call(env, "hospital", "PUT", f"/Observation/{created['id']}", {**created, "status": "amended"})
    assert r.status_code == 200
    # taking over another source's resource by stamping its own source
    taken = {**_obs("zeta-obs2", "zeta-src2"), "meta": {"source": HOSPITAL_SOURCE + "#mine"}}
    assert (await _call(env, "hospital", "PUT", "/Observation/zeta-obs2", taken)).status_code == 403
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": other, "request": {"method": "POST", "url": "Observation"}}]}
    assert (await _call(env, "hospital", "POST", "", tx)).status_code == 403
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [{"resource": other, "request": {"method": "POST", "url": "Observation"}}]}
    r = await _call(env, "hospital", "POST", "", batch)
    assert r.status_code == 200 and r.json()["entry"][0]["response"]["status"] == "403"


def _push_bundle() -> dict[str, Any]:
    u = uuid.uuid4().hex[:8]
    patient = {"resourceType": "Patient", "identifier": [{"system": "http://hosp.example/mrn", "value": u}], "name": [{"text": "李娜"}], "gender": "female"}
    obs = {
        "resourceType": "Observation", "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
        "subject": {"reference": "urn:uuid:00000000-0000-4000-8000-000000000001"}, "identifier": [{"system": "http://hosp.example/obs", "value": u}],
    }  # fmt: skip
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000001", "resource": patient, "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000002", "resource": obs, "request": {"method": "POST", "url": "Observation"}},
    ]}  # fmt: skip


async def test_ingest_needs_the_push_source(env: dict[str, Any]) -> None:
    r = await _call(env, "hospital", "POST", "/$ingest?source=sh-demo-hosp-b", _push_bundle())
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    r = await _call(env, "hospital", "POST", "/$ingest?source=sh-demo-hosp-a", _push_bundle())
    assert r.status_code == 200, r.text
    assert (await _call(env, "resident", "POST", "/$ingest?source=sh-demo-hosp-a", _push_bundle())).status_code == 403
    assert (await _call(env, "clinician", "POST", "/$ingest?source=sh-demo-hosp-a", _push_bundle())).status_code == 403


async def test_demo_hospital_may_push_as_demo_source(env: dict[str, Any]) -> None:
    db = await env["app"].state.auth_server.db()
    assert (await clients.get_client(db, clients.DEMO_HOSPITAL))["push_sources"] == ["sh-demo-hosp-a"]


# -- the audit trail ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hospital", "clinician", "auditor", "resident"])
async def test_audit_events_are_never_written_over_rest(env: dict[str, Any], kind: str) -> None:
    r = await _call(env, kind, "POST", "/AuditEvent", _audit("x", "alpha-src1"))
    assert r.status_code == 405 and r.json()["resourceType"] == "OperationOutcome"
    assert (await _call(env, kind, "PUT", "/AuditEvent/alpha-audit", _audit("alpha-audit", "alpha-src1"))).status_code == 405
    assert (await _call(env, kind, "DELETE", "/AuditEvent/alpha-audit")).status_code == 405
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "DELETE", "url": "AuditEvent/alpha-audit"}}]}
    assert (await _call(env, kind, "POST", "", tx)).status_code == 405


async def test_reading_the_audit_trail(env: dict[str, Any]) -> None:
    r = await _call(env, "clinician", "GET", "/AuditEvent")
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    assert (await _call(env, "clinician", "GET", "/AuditEvent/alpha-audit")).status_code == 403
    assert (await _call(env, "clinician", "GET", "/?_type=AuditEvent")).status_code == 403
    # a clinician's searches across types and $everything leave the audit trail out
    assert not any(i.endswith("-audit") for i in _ids(await _call(env, "clinician", "GET", "/Patient/alpha-src1/*")))
    assert not any(i.endswith("-audit") for i in _ids(await _call(env, "clinician", "GET", "/Patient/alpha-golden/$everything")))
    assert not any(i.endswith("-audit") for i in _ids(await _call(env, "clinician", "GET", "/_history?_count=1000")))
    r = await _call(env, "auditor", "GET", "/AuditEvent")
    assert r.status_code == 200 and {"alpha-audit", "zeta-audit"} <= _ids(r)
    assert (await _call(env, "auditor", "GET", "/AuditEvent/zeta-audit")).status_code == 200
    assert (await _call(env, "auditor", "GET", "/Patient/alpha-golden")).status_code == 403  # an auditor reads the trail only


# -- what needs no token, and what the audit trail reads ----------------------------------------


async def test_exempt_endpoints_and_security_statement(env: dict[str, Any]) -> None:
    r = await env["http"].get("/metadata")
    assert r.status_code == 200
    security = r.json()["rest"][0]["security"]
    assert security["cors"] is True
    assert security["service"][0]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"
    }
    uris = {e["url"]: e["valueUri"] for e in security["extension"][0]["extension"]}
    assert uris == {"token": BASE + "/auth/token", "authorize": BASE + "/auth/authorize"}
    assert (await env["http"].get("/metadata", headers={"Authorization": "Bearer nonsense"})).status_code == 200
    conf = await env["http"].get("/.well-known/smart-configuration")
    assert conf.status_code == 200 and conf.json()["token_endpoint"] == BASE + "/auth/token"
    assert (await env["http"].get(BASE + "/auth/jwks")).status_code == 200


async def test_principal_on_request_state(env: dict[str, Any]) -> None:
    seen: list[Any] = []
    app = env["app"]

    async def outer(scope: dict, receive: Any, send: Any) -> None:  # as an audit middleware would
        await app(scope, receive, send)
        seen.append(scope.get("state", {}).get("principal", "absent"))

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url=FHIR) as c:
        await c.get("/Patient/alpha-golden", headers={"Authorization": "Bearer " + env["tokens"]["clinician"]})
        await c.get("/Patient/alpha-golden")
        await c.get("/metadata")
    principal = seen[0]
    assert principal.kind == "user" and principal.fhir_user == "Practitioner/demo-clinician"
    assert seen[1:] == [None, None]


async def test_a_resident_with_user_scopes_is_still_confined(env: dict[str, Any]) -> None:
    """user/ scopes mean what the user may do; a resident (fhirUser Patient/…) may see their own record."""
    token = await _mint(env, sub="resident-a", scope="user/*.rs user/AuditEvent.rs", patient="alpha-src1", fhirUser="Patient/alpha-src1")
    assert (await _call(env, token, "GET", "/Observation/zeta-obs1")).status_code == 404
    r = await _call(env, token, "GET", "/Observation?_count=100")
    assert r.status_code == 200 and {"alpha-obs1", "alpha-obs2"} <= _ids(r)
    _nothing_of_b(r)
    r = await _call(env, token, "GET", "/AuditEvent")
    assert _ids(r) == {"alpha-audit"}
