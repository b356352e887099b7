"""Access-control core (issue #6): SMART scopes and grants, token validation, the development
authorization server end to end. Real keys, a real HTTP JWKS server, a real mongod."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, AsyncIterator, Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import FastAPI
from pymongo import AsyncMongoClient
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from fhir_server.auth import Grant, ScopeError, TokenError, TokenValidator, bearer_token, install, parse_scope, parse_scopes
from fhir_server.auth import _urls, clients, keys
from fhir_server.auth.scopes import permission_for
from fhir_server.auth.tokens import StaticKeys, remote_jwks
from tests.conftest import make_settings

ISS = "https://auth.test"
AUD = "https://fhir.test/fhir"

# --------------------------------------------------------------------------------------------
# scopes


@pytest.mark.parametrize(
    "text, context, type_, perms, version",
    [
        ("patient/Observation.rs", "patient", "Observation", "rs", 2),
        ("user/*.cruds", "user", "*", "cruds", 2),
        ("system/Patient.c", "system", "Patient", "c", 2),
        ("patient/*.read", "patient", "*", "rs", 1),
        ("user/Observation.write", "user", "Observation", "cud", 1),
        ("system/*.*", "system", "*", "cruds", 1),
    ],
)
def test_parse_scope(text: str, context: str, type_: str, perms: str, version: int) -> None:
    s = parse_scope(text)
    assert (s.context, s.type, s.permissions, s.version) == (context, type_, frozenset(perms), version)
    assert s.text() == text  # round trip in the syntax it came in


def test_query_restricted_scope_is_kept_but_grants_nothing() -> None:
    s = parse_scope("system/Observation.rs?category=laboratory")
    assert s.query == (("category", "laboratory"),) and s.restricted
    assert s.text() == "system/Observation.rs?category=laboratory"
    grant = Grant.of("system/Observation.rs?category=laboratory")
    assert grant.unsupported == (s,)
    assert not grant.allows("search", "Observation")


@pytest.mark.parametrize(
    "bad",
    [
        "patient/Observation.sr",  # not in cruds order
        "patient/Observation.rr",
        "patient/Observation.x",
        "patient/Observation.",
        "admin/Observation.rs",
        "patient/observation.rs",  # types start upper-case
        "patient/Observation",
        "patient/*.read?x=1",  # v1 has no queries
        "patient/Observation.rs?",
        "Observation.rs",
    ],
)
def test_bad_scopes(bad: str) -> None:
    with pytest.raises(ScopeError):
        parse_scope(bad)
    assert parse_scopes(bad).invalid == (bad,)
    with pytest.raises(ScopeError):
        parse_scopes(bad, strict=True)


def test_parse_scope_string_with_other_scopes() -> None:
    parsed = parse_scopes("launch/patient openid fhirUser offline_access patient/*.rs bogus")
    assert parsed.other == {"launch/patient", "openid", "fhirUser", "offline_access"}
    assert [s.text() for s in parsed.resources] == ["patient/*.rs"]
    assert parsed.invalid == ("bogus",)
    assert parse_scopes(["user/*.rs", "openid"]).text() == "user/*.rs openid"  # an scp list claim


def test_intersection_narrows_type_and_letters() -> None:
    asked = parse_scopes("system/*.cruds user/Patient.rs launch/patient")
    allowed = parse_scopes("system/Patient.rs system/Observation.cu launch/patient")
    assert asked.intersect(allowed).text() == "system/Patient.rs system/Observation.cu launch/patient"
    # v1 asked, v1 kept when the letters still read as v1; otherwise v2
    assert parse_scopes("patient/*.read").intersect(parse_scopes("patient/*.cruds")).text() == "patient/*.read"
    assert parse_scopes("patient/*.*").intersect(parse_scopes("patient/*.rs")).text() == "patient/*.read"
    assert parse_scopes("patient/*.*").intersect(parse_scopes("patient/*.r")).text() == "patient/*.r"
    # subsumed results collapse
    assert parse_scopes("user/*.rs user/Patient.r").intersect(parse_scopes("user/*.cruds")).text() == "user/*.rs"


# interaction, type, instance, expected letter
_LETTERS = [
    ("read", "r", False),
    ("vread", "r", False),
    ("history", "r", True),
    ("history", "s", False),
    ("search", "s", False),
    ("create", "c", False),
    ("update", "u", False),
    ("patch", "u", False),
    ("delete", "d", False),
]


@pytest.mark.parametrize("interaction, letter, instance", _LETTERS)
def test_permission_letters(interaction: str, letter: str, instance: bool) -> None:
    assert permission_for(interaction, instance=instance) == letter
    assert Grant.of(f"user/Observation.{letter}").allows(interaction, "Observation", instance=instance)
    others = "".join(c for c in "cruds" if c != letter)
    assert not Grant.of(f"user/Observation.{others}").allows(interaction, "Observation", instance=instance)


_TABLE = [
    # scopes, patient, interaction, type, expected (None: denied; "": unconfined; id: confined)
    ("user/*.cruds", None, "delete", "Patient", ""),
    ("user/*.read", None, "search", "Observation", ""),
    ("user/*.read", None, "create", "Observation", None),
    ("user/Observation.write", None, "create", "Observation", ""),
    ("user/Observation.write", None, "patch", "Observation", ""),
    ("user/Observation.write", None, "read", "Observation", None),
    ("user/Observation.write", None, "create", "Condition", None),
    ("system/*.*", None, "history", None, ""),  # system-level: only * grants it
    ("system/Patient.rs", None, "search", None, None),
    ("patient/*.rs", "p1", "search", "Observation", "p1"),
    ("patient/*.rs", None, "search", "Observation", None),  # patient/ scopes without a patient context
    ("patient/*.rs user/Practitioner.rs", "p1", "read", "Practitioner", ""),
    ("patient/*.rs user/Observation.rs", "p1", "search", "Observation", ""),  # unconfined wins
    ("patient/*.rs", "p1", "operation:everything", "Patient", "p1"),
    ("patient/*.rs", "p1", "operation:merge", "Patient", None),
    ("system/Patient.cu", None, "operation:merge", "Patient", ""),
    ("system/*.rs", None, "operation:unknown-op", "Patient", None),  # unknown operations need update
    ("system/CodeSystem.r", None, "operation:lookup", "CodeSystem", ""),
    ("openid fhirUser", None, "read", "Patient", None),
]


@pytest.mark.parametrize("scope, patient, interaction, type_, expected", _TABLE)
def test_grant_decisions(scope: str, patient: str | None, interaction: str, type_: str | None, expected: str | None) -> None:
    grant = Grant.of(scope, patient)
    op = None
    if interaction.startswith("operation:"):
        interaction, op = interaction.split(":")
    decision = grant.decide(interaction, type_, operation=op)
    if expected is None:
        assert decision is None
    else:
        assert decision is not None and (decision.patient or "") == expected


def test_confinement_and_auditor() -> None:
    resident = Grant.of("patient/*.rs patient/Observation.c launch/patient", "p9")
    assert resident.confined_to == "p9"
    assert resident.permissions("Observation") == {"c", "r", "s"}
    assert Grant.of("patient/*.rs user/Practitioner.r", "p9").confined_to is None
    assert Grant.of("user/AuditEvent.rs").auditor
    assert Grant.of("system/AuditEvent.rs").auditor
    assert not Grant.of("user/*.cruds").auditor  # a wildcard does not make an auditor
    assert not Grant.of("patient/AuditEvent.rs", "p1").auditor
    assert not Grant.of("user/AuditEvent.r").auditor
    assert Grant.of("openid launch/patient").has("launch/patient")


# --------------------------------------------------------------------------------------------
# tokens

_RSA = keys.generate("RS256")
_OTHER_RSA = {**keys.generate("RS256"), "kid": _RSA["kid"]}  # same kid, another key
_EC = keys.generate("ES256")


def _claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    out = {"iss": ISS, "sub": "client-1", "aud": AUD, "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex, "scope": "system/*.rs"}
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def _validator(**kw: Any) -> TokenValidator:
    jwks = {"keys": [keys.public(_RSA), keys.public(_EC)]}
    return TokenValidator({ISS: StaticKeys(jwks)}, AUD, **kw)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _raw_token(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> tuple[str, str]:
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    return signing_input, signing_input + "." + _b64(signature)


async def _reason(token: str, validator: TokenValidator | None = None) -> str:
    with pytest.raises(TokenError) as e:
        await (validator or _validator()).validate(token)
    return e.value.reason


async def test_good_token() -> None:
    token = keys.sign(_claims(source_restriction="http://h.example/emr"), _RSA)
    p = await _validator().validate(token)
    assert (p.subject, p.client_id, p.kind, p.issuer) == ("client-1", "client-1", "system", ISS)
    assert p.grant.allows("read", "Patient") and not p.grant.allows("create", "Patient")
    assert p.source_restriction == "http://h.example/emr" and p.token_id
    ec = await _validator().validate(keys.sign(_claims(), _EC))
    assert ec.kind == "system"


async def test_token_failures() -> None:
    now = int(time.time())
    assert await _reason(keys.sign(_claims(exp=now - 120, iat=now - 600), _RSA)) == "expired"
    assert await _validator(leeway=60).validate(keys.sign(_claims(exp=now - 30), _RSA))  # within the leeway
    assert await _reason(keys.sign(_claims(nbf=now + 600), _RSA)) == "not-yet-valid"
    assert await _reason(keys.sign(_claims(iat=now + 600, exp=now + 900), _RSA)) == "not-yet-valid"
    assert await _reason(keys.sign(_claims(), _OTHER_RSA)) == "bad-signature"
    assert await _reason(keys.sign(_claims(aud="https://other.test/fhir"), _RSA)) == "wrong-audience"
    assert await _reason(keys.sign(_claims(aud=None), _RSA)) == "wrong-audience"
    assert await _reason(keys.sign(_claims(iss="https://evil.test"), _RSA)) == "wrong-issuer"
    assert await _reason(keys.sign(_claims(), {**_RSA, "kid": "nobody"})) == "bad-signature"
    assert await _reason(keys.sign(_claims(exp=None), _RSA)) == "malformed"
    assert await _reason("not.a.jwt") == "malformed"
    assert await _reason("") == "malformed"


async def test_alg_none_and_hmac_confusion_are_refused() -> None:
    _, unsigned = _raw_token({"alg": "none", "typ": "JWT"}, _claims())
    assert await _reason(unsigned) == "alg-not-allowed"
    # The classic confusion attack: HS256 with the issuer's public key (PEM) as the HMAC secret.
    pem = jwt.PyJWK(keys.public(_RSA)).key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    signing_input, _ = _raw_token({"alg": "HS256", "kid": _RSA["kid"]}, _claims())
    forged = signing_input + "." + _b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())
    assert await _reason(forged) == "alg-not-allowed"
    # An RSA key presented for an EC algorithm
    signing_input, _ = _raw_token({"alg": "ES256", "kid": _RSA["kid"]}, _claims())
    assert await _reason(signing_input + "." + _b64(b"x" * 64)) == "alg-not-allowed"
    with pytest.raises(ValueError):
        TokenValidator({}, AUD, algorithms=["HS256"])


async def test_principal_kinds() -> None:
    v = _validator()
    resident = await v.validate(keys.sign(_claims(sub="u1", scope="patient/*.rs openid", fhirUser="https://fhir.test/fhir/Patient/p7"), _RSA))
    assert resident.kind == "patient" and resident.patient == "p7" and resident.grant.confined_to == "p7"
    clinician = await v.validate(keys.sign(_claims(sub="u2", scope="user/*.cruds", fhirUser="Practitioner/d1", client_id="app"), _RSA))
    assert clinician.kind == "user" and clinician.client_id == "app" and clinician.patient is None
    scp = await v.validate(keys.sign(_claims(scope=None, scp=["user/*.rs"], patient="p2", azp="app2"), _RSA))
    assert scp.kind == "user" and scp.patient == "p2" and scp.client_id == "app2"


def test_errors_for_the_http_layer() -> None:
    e = TokenError("expired", 'the "token" expired').to_fhir_error()
    assert e.status == 401 and e.issues[0].code == "login"
    assert e.headers["WWW-Authenticate"].startswith('Bearer realm="fhir", error="invalid_token"')
    assert bearer_token(None) is None
    assert bearer_token("Bearer abc.def.ghi") == "abc.def.ghi"
    assert bearer_token("bearer  x") == "x"
    with pytest.raises(TokenError):
        bearer_token("Basic dXNlcjpwYXNz")


def test_external_issuer_setting() -> None:
    assert _urls.external_issuers("https://a.test/realms/x=https://a.test/certs, https://b.test/=https://b.test/jwks") == {
        "https://a.test/realms/x": "https://a.test/certs",
        "https://b.test": "https://b.test/jwks",
    }
    with pytest.raises(ValueError):
        _urls.external_issuers("https://a.test")


# --------------------------------------------------------------------------------------------
# an external OpenID Connect provider, its JWKS served over real HTTP


class _Provider:
    def __init__(self) -> None:
        self.keys = [keys.generate("RS256")]
        self.fetches = 0
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                provider.fetches += 1
                body = json.dumps({"keys": [keys.public(k) for k in provider.keys]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture()
def provider() -> Iterator[_Provider]:
    p = _Provider()
    try:
        yield p
    finally:
        p.httpd.shutdown()
        p.httpd.server_close()


async def test_external_provider_jwks_cached_and_refetched_on_unknown_kid(provider: _Provider) -> None:
    iss = provider.url + "/realms/cn"
    v = TokenValidator({iss: remote_jwks(provider.url + "/certs", ttl=300, min_refetch=0)}, AUD)
    p = await v.validate(keys.sign(_claims(iss=iss, sub="doc", fhirUser="Practitioner/1", scope="user/*.rs"), provider.keys[0]))
    assert p.issuer == iss and p.kind == "user"
    await v.validate(keys.sign(_claims(iss=iss), provider.keys[0]))
    assert provider.fetches == 1  # cached
    provider.keys.append(keys.generate("ES256"))  # the provider rotates in a new key
    assert (await v.validate(keys.sign(_claims(iss=iss), provider.keys[1]))).issuer == iss
    assert provider.fetches == 2  # the unknown kid refetched once
    assert await _reason(keys.sign(_claims(iss=iss), {**keys.generate("RS256"), "kid": "gone"}), v) == "bad-signature"
    assert await _reason(keys.sign(_claims(iss=iss), _RSA), v) == "bad-signature"  # our key is not the provider's


async def test_external_provider_refetch_is_rate_limited(provider: _Provider) -> None:
    iss = provider.url
    v = TokenValidator({iss: remote_jwks(provider.url + "/certs", ttl=300, min_refetch=60)}, AUD)
    await v.validate(keys.sign(_claims(iss=iss), provider.keys[0]))
    for i in range(5):
        await _reason(keys.sign(_claims(iss=iss), {**_RSA, "kid": f"random-{i}"}), v)
    assert provider.fetches == 1


async def test_unreachable_provider() -> None:
    v = TokenValidator({"https://down.test": remote_jwks("http://127.0.0.1:9/jwks")}, AUD)
    assert await _reason(keys.sign(_claims(iss="https://down.test"), _RSA), v) == "bad-signature"


# --------------------------------------------------------------------------------------------
# the development authorization server, end to end

BASE = "http://testserver"
TOKEN_URL = BASE + "/auth/token"


@pytest.fixture(scope="module")
async def mongo(mongo_uri: str) -> AsyncIterator[Any]:
    client: AsyncMongoClient = AsyncMongoClient(mongo_uri, tz_aware=True)
    try:
        yield client.get_database(f"test_auth_{uuid.uuid4().hex[:8]}")
    finally:
        await client.close()


def _app(mongo_uri: str, db: Any, **overrides: Any) -> FastAPI:
    settings = make_settings(mongo_uri, public_base_url=BASE + "/fhir", **overrides)
    app = FastAPI()

    async def fhir_catch_all(request: Request) -> PlainTextResponse:
        return PlainTextResponse("fhir", status_code=404)

    app.add_route("/fhir/{path:path}", fhir_catch_all)  # as the FHIR routes do, registered first
    install(app, settings, db)
    return app


@pytest.fixture(scope="module")
async def auth_app(mongo_uri: str, mongo: Any) -> FastAPI:
    return _app(mongo_uri, mongo)


@pytest.fixture()
async def http(auth_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=auth_app), base_url=BASE) as c:
        yield c


_CLIENT_KEY = keys.generate("ES384")


@pytest.fixture(scope="module")
async def hospital(mongo: Any) -> str:
    await clients.register_client(
        mongo,
        "test-hospital",
        scope="system/Patient.rs system/Observation.crus",
        jwks={"keys": [keys.public(_CLIENT_KEY)]},
        source_restriction="http://test-hospital.example/his",
    )
    return "test-hospital"


def _assertion(client_id: str, key: dict[str, Any] = _CLIENT_KEY, **extra: Any) -> str:
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "exp": now + 240, "jti": uuid.uuid4().hex, "iat": now}
    claims.update(extra)
    return keys.sign({k: v for k, v in claims.items() if v is not None}, key)


async def _client_credentials(http: httpx.AsyncClient, assertion: str, scope: str = "system/Patient.rs") -> httpx.Response:
    return await http.post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "scope": scope,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion,
        },
    )


async def test_smart_configuration_and_jwks(http: httpx.AsyncClient) -> None:
    resp = await http.get("/fhir/.well-known/smart-configuration")
    assert resp.status_code == 200
    conf = resp.json()
    assert conf["token_endpoint"] == TOKEN_URL
    assert conf["authorization_endpoint"] == BASE + "/auth/authorize"
    assert conf["jwks_uri"] == BASE + "/auth/jwks" and conf["issuer"] == BASE + "/auth"
    assert conf["code_challenge_methods_supported"] == ["S256"]
    assert "private_key_jwt" in conf["token_endpoint_auth_methods_supported"]
    assert {"client-confidential-asymmetric", "launch-standalone", "permission-v2", "context-standalone-patient"} <= set(conf["capabilities"])
    jwks = (await http.get("/auth/jwks")).json()
    assert len(jwks["keys"]) == 1 and jwks["keys"][0]["kty"] == "RSA" and "d" not in jwks["keys"][0]
    assert (await http.get("/fhir/Patient")).text == "fhir"  # the FHIR routes are still there


async def test_signing_key_is_shared_through_mongodb(mongo_uri: str, mongo: Any, http: httpx.AsyncClient) -> None:
    other = _app(mongo_uri, mongo)  # another worker on the same database
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other), base_url=BASE) as c:
        assert (await c.get("/auth/jwks")).json() == (await http.get("/auth/jwks")).json()


async def test_client_credentials(http: httpx.AsyncClient, auth_app: FastAPI, hospital: str) -> None:
    resp = await _client_credentials(http, _assertion(hospital), "system/Patient.rs system/Observation.cu")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert body["scope"] == "system/Patient.rs system/Observation.cu"
    assert resp.headers["cache-control"] == "no-store"
    p = await auth_app.state.auth.validate(body["access_token"])
    assert (p.kind, p.client_id, p.subject) == ("system", hospital, hospital)
    assert p.source_restriction == "http://test-hospital.example/his"
    assert p.grant.allows("create", "Observation") and not p.grant.allows("delete", "Observation")
    # tampering with the token breaks its signature
    head, payload, sig = body["access_token"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["scope"] = "system/*.cruds"
    forged = ".".join([head, _b64(json.dumps(claims).encode()), sig])
    assert await _reason(forged, auth_app.state.auth) == "bad-signature"


async def test_replayed_assertion_is_refused(http: httpx.AsyncClient, hospital: str) -> None:
    assertion = _assertion(hospital)
    assert (await _client_credentials(http, assertion)).status_code == 200
    again = await _client_credentials(http, assertion)
    assert again.status_code == 401 and again.json()["error"] == "invalid_client"
    assert "already used" in again.json()["error_description"]


@pytest.mark.parametrize(
    "change, why",
    [
        ({"aud": BASE + "/fhir"}, "audience"),
        ({"aud": "https://elsewhere.test/auth/token"}, "audience"),
        ({"exp": int(time.time()) - 600}, "expired"),
        ({"exp": int(time.time()) + 3600}, "ahead"),
        ({"jti": None}, "jti"),
        ({"sub": "someone-else"}, "iss and sub"),
    ],
)
async def test_bad_assertions_are_refused(http: httpx.AsyncClient, hospital: str, change: dict[str, Any], why: str) -> None:
    resp = await _client_credentials(http, _assertion(hospital, **change))
    assert resp.status_code == 401 and resp.json()["error"] == "invalid_client"
    assert why in resp.json()["error_description"].lower() or why in resp.json()["error_description"]


async def test_assertion_signed_by_another_key_or_unknown_client(http: httpx.AsyncClient, hospital: str) -> None:
    wrong = {**keys.generate("ES384"), "kid": _CLIENT_KEY["kid"]}
    assert (await _client_credentials(http, _assertion(hospital, key=wrong))).status_code == 401
    assert (await _client_credentials(http, _assertion("nobody"))).status_code == 401
    _, unsigned = _raw_token({"alg": "none"}, {"iss": hospital, "sub": hospital, "aud": TOKEN_URL, "exp": int(time.time()) + 60, "jti": "x"})
    assert (await _client_credentials(http, unsigned)).status_code == 401


async def test_scope_escalation(http: httpx.AsyncClient, hospital: str) -> None:
    resp = await _client_credentials(http, _assertion(hospital), "system/*.cruds")
    assert resp.status_code == 200 and resp.json()["scope"] == "system/Patient.rs system/Observation.crus"
    resp = await _client_credentials(http, _assertion(hospital), "system/Encounter.rs user/*.cruds")
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_scope"
    resp = await _client_credentials(http, _assertion(hospital), "system/Patient.rs nonsense")
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_scope"


async def test_demo_hospital(http: httpx.AsyncClient, auth_app: FastAPI, mongo: Any) -> None:
    await http.get("/auth/jwks")  # seeds
    key = await clients.demo_private_key(mongo)
    assert key is not None and "d" in key
    resp = await _client_credentials(http, _assertion(clients.DEMO_HOSPITAL, key=key), "system/*.rs system/Observation.cu")
    assert resp.status_code == 200, resp.text
    p = await auth_app.state.auth.validate(resp.json()["access_token"])
    assert p.source_restriction == clients.DEMO_SOURCE and p.grant.allows("search", "Immunization")


async def test_grant_type_checks(http: httpx.AsyncClient) -> None:
    resp = await http.post("/auth/token", data={"grant_type": "password", "username": "x"})
    assert resp.status_code == 400 and resp.json()["error"] == "unsupported_grant_type"
    resp = await http.post("/auth/token", json={"grant_type": "client_credentials"})
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_request"


# authorization code + PKCE


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    return verifier, _b64(hashlib.sha256(verifier.encode()).digest())


async def _authorize(http: httpx.AsyncClient, client_id: str, scope: str, challenge: str, **extra: str) -> dict[str, str]:
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": clients.DEMO_REDIRECT_URI,
        "scope": scope,
        "state": "st-1",
        "aud": BASE + "/fhir",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **extra,
    }
    resp = await http.get("/auth/authorize", params=params)
    assert resp.status_code == 302, resp.text
    location = resp.headers["location"]
    assert location.startswith(clients.DEMO_REDIRECT_URI + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def _exchange(http: httpx.AsyncClient, client_id: str, code: str, verifier: str) -> httpx.Response:
    return await http.post(
        "/auth/token",
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": clients.DEMO_REDIRECT_URI, "client_id": client_id, "code_verifier": verifier},
    )


async def test_resident_app_with_patient_context(http: httpx.AsyncClient, auth_app: FastAPI) -> None:
    verifier, challenge = _pkce()
    got = await _authorize(http, clients.DEMO_RESIDENT_APP, "launch/patient openid fhirUser offline_access patient/*.rs patient/*.cud", challenge)
    assert got["state"] == "st-1" and "code" in got
    resp = await _exchange(http, clients.DEMO_RESIDENT_APP, got["code"], verifier)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["patient"] == "demo-resident"
    assert body["scope"] == "patient/*.rs patient/Observation.c fhirUser launch/patient openid"  # no offline_access
    id_token = jwt.decode(body["id_token"], options={"verify_signature": False})
    assert id_token["aud"] == clients.DEMO_RESIDENT_APP and id_token["fhirUser"] == "Patient/demo-resident"
    p = await auth_app.state.auth.validate(body["access_token"])
    assert p.kind == "patient" and p.patient == "demo-resident" and p.grant.confined_to == "demo-resident"
    decision = p.grant.decide("search", "Observation")
    assert decision is not None and decision.patient == "demo-resident"
    assert not p.grant.allows("delete", "Observation")


async def test_clinician_and_auditor(http: httpx.AsyncClient, auth_app: FastAPI) -> None:
    verifier, challenge = _pkce()
    got = await _authorize(http, clients.DEMO_CLINICIAN_APP, "user/*.cruds launch/patient openid fhirUser", challenge, patient="p-123")
    p = await auth_app.state.auth.validate((await _exchange(http, clients.DEMO_CLINICIAN_APP, got["code"], verifier)).json()["access_token"])
    assert p.kind == "user" and p.fhir_user == "Practitioner/demo-clinician" and p.patient == "p-123"
    assert p.grant.decide("delete", "Observation").patient is None  # type: ignore[union-attr]
    assert not p.grant.auditor
    verifier, challenge = _pkce()
    got = await _authorize(http, clients.DEMO_CLINICIAN_APP, "user/*.rs openid fhirUser", challenge, login_hint="auditor")
    p = await auth_app.state.auth.validate((await _exchange(http, clients.DEMO_CLINICIAN_APP, got["code"], verifier)).json()["access_token"])
    assert p.grant.auditor and p.grant.text() == "user/AuditEvent.rs fhirUser openid"
    assert not p.grant.allows("read", "Patient")


async def test_wrong_verifier_and_code_reuse(http: httpx.AsyncClient) -> None:
    verifier, challenge = _pkce()
    got = await _authorize(http, clients.DEMO_RESIDENT_APP, "patient/*.rs launch/patient", challenge)
    wrong = await _exchange(http, clients.DEMO_RESIDENT_APP, got["code"], _pkce()[0])
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"

    verifier, challenge = _pkce()
    got = await _authorize(http, clients.DEMO_RESIDENT_APP, "patient/*.rs launch/patient", challenge)
    assert (await _exchange(http, clients.DEMO_RESIDENT_APP, got["code"], verifier)).status_code == 200
    reused = await _exchange(http, clients.DEMO_RESIDENT_APP, got["code"], verifier)
    assert reused.status_code == 400 and "already used" in reused.json()["error_description"]

    verifier, challenge = _pkce()
    got = await _authorize(http, clients.DEMO_RESIDENT_APP, "patient/*.rs launch/patient", challenge)
    other = await _exchange(http, clients.DEMO_CLINICIAN_APP, got["code"], verifier)
    assert other.status_code == 400 and other.json()["error"] == "invalid_grant"  # issued to another client


@pytest.mark.parametrize(
    "extra, error",
    [
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge_method": ""}, "invalid_request"),
        ({"aud": "https://other.test/fhir"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"login_hint": "nobody"}, "access_denied"),
        ({"scope": "system/*.rs"}, "invalid_scope"),
    ],
)
async def test_authorize_errors_redirect(http: httpx.AsyncClient, extra: dict[str, str], error: str) -> None:
    _, challenge = _pkce()
    extra = dict(extra)
    scope = extra.pop("scope", "patient/*.rs launch/patient")
    got = await _authorize(http, clients.DEMO_RESIDENT_APP, scope, challenge, **extra)
    assert got["error"] == error and got["state"] == "st-1" and "code" not in got


async def test_plain_pkce_challenge_is_refused(http: httpx.AsyncClient) -> None:
    verifier, _ = _pkce()
    got = await _authorize(http, clients.DEMO_RESIDENT_APP, "patient/*.rs launch/patient", verifier, code_challenge_method="plain")
    assert got["error"] == "invalid_request" and "S256" in got["error_description"]


async def test_unregistered_redirect_is_not_followed(http: httpx.AsyncClient) -> None:
    _, challenge = _pkce()
    resp = await http.get(
        "/auth/authorize",
        params={"response_type": "code", "client_id": clients.DEMO_RESIDENT_APP, "redirect_uri": "https://evil.test/cb", "code_challenge": challenge, "code_challenge_method": "S256"},
    )
    assert resp.status_code == 400 and "location" not in resp.headers


async def test_dev_logins_only_from_this_machine(mongo_uri: str, mongo: Any) -> None:
    _, challenge = _pkce()
    for overrides, client_addr in [({}, ("10.1.2.3", 5000)), ({"auth_dev_logins": "off"}, ("127.0.0.1", 5000))]:
        app = _app(mongo_uri, mongo, **overrides)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=client_addr), base_url=BASE) as c:
            got = await _authorize(c, clients.DEMO_RESIDENT_APP, "patient/*.rs launch/patient", challenge)
            assert got["error"] == "access_denied"
    app = _app(mongo_uri, mongo, auth_dev_logins="any")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.1.2.3", 5000)), base_url=BASE) as c:
        assert "code" in await _authorize(c, clients.DEMO_RESIDENT_APP, "patient/*.rs launch/patient", challenge)


def test_bad_dev_logins_setting_is_refused(mongo_uri: str) -> None:
    with pytest.raises(ValueError, match="auth_dev_logins"):
        install(FastAPI(), make_settings(mongo_uri, auth_dev_logins="yes"), None)


def test_dev_server_can_be_left_out(mongo_uri: str) -> None:
    app = FastAPI()
    settings = make_settings(mongo_uri, auth_dev_server=False, auth_external_issuers="https://idp.test=https://idp.test/jwks")
    validator = install(app, settings, None)
    assert validator.issuers == ["https://idp.test"]
    assert not any(getattr(r, "path", "").startswith("/auth") for r in app.router.routes)
