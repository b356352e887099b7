"""Protection of the HTTP surface (fhir_server/http/protection.py): per-client rate limits (429 with
Retry-After), security headers, CORS for configured origins only, the request timeout (503, and a
cancelled transaction leaves nothing), and the body size limit (413). Real mongod, the app through
httpx.ASGITransport; the rate limiter's forged-token rule against a bare ASGI app.
"""

from __future__ import annotations

import asyncio
import base64
import json
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any, AsyncIterator

import httpx
import pytest

from conftest import make_settings
from fhir_server.config import Settings
from fhir_server.http.app import create_app
from fhir_server.http.protection import Guard, TokenBuckets, claimed_client
from helpers import uid

pytestmark = pytest.mark.timeout(180)


def _settings(mongo_uri: str, **overrides: Any) -> Settings:
    if "field_encryption" in Settings.__dataclass_fields__:
        overrides.setdefault("field_encryption", False)
    return make_settings(mongo_uri, **overrides)


@asynccontextmanager
async def served(mongo_uri: str, **overrides: Any) -> AsyncIterator[Any]:
    app = create_app(_settings(mongo_uri, **overrides))
    async with app.router.lifespan_context(app):
        yield app


def client_of(app: Any, address: str = "10.0.0.1", base_url: str = "http://testserver/fhir") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url=base_url, timeout=60)


def token(claims: dict[str, Any], signature: str = "c2ln") -> str:
    """A JWT-shaped token (unsigned: the limiter reads the claims before authentication does)."""

    def b64(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'ES256', 'typ': 'JWT'})}.{b64(claims)}.{signature}"


def _outcome_code(r: httpx.Response) -> str:
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    return body["issue"][0]["code"]


# -- rate limits ----------------------------------------------------------------------------------


async def test_429_after_the_burst_with_retry_after_per_address_and_audited(mongo_uri):
    async with served(mongo_uri, rate_limit_per_second=0.5, rate_limit_burst=3, audit_enabled=True, audit_anchor_seconds=0) as app:
        async with client_of(app, "10.0.0.1") as a, client_of(app, "10.0.0.2") as b, client_of(app, "127.0.0.1") as local:
            statuses = [(await a.get("/metadata")).status_code for _ in range(3)]
            assert statuses == [200, 200, 200]
            r = await a.get("/Patient", headers={"X-Request-Id": "throttled-1"})
            assert r.status_code == 429
            assert _outcome_code(r) == "throttled"
            assert r.headers["retry-after"] == "2"  # one unit at 0.5/s
            assert r.headers["x-request-id"] == "throttled-1"
            assert r.headers["x-content-type-options"] == "nosniff"
            # Another address has its own bucket; loopback (the machine's own tools) is exempt.
            assert (await b.get("/metadata")).status_code == 200
            assert all([(await local.get("/metadata")).status_code == 200 for _ in range(10)])
            # The refusal is audited (outcome 4, with the reason).
            await app.state.audit_trail.flush()
            r = await local.get("/AuditEvent", params={"outcome": "4", "subtype": "search-type"})
            (entry,) = r.json()["entry"]
            assert entry["resource"]["outcomeDesc"] == "HTTP 429: rate limit"


async def test_clients_are_limited_apart_by_their_tokens(mongo_uri):
    async with served(mongo_uri, rate_limit_per_second=0.01, rate_limit_burst=2) as app:
        async with client_of(app, "10.0.0.9") as c:
            app_a = {"Authorization": f"Bearer {token({'azp': 'community-app', 'sub': 'u1'})}"}
            app_b = {"Authorization": f"Bearer {token({'client_id': 'hospital-emr', 'sub': 'svc'})}"}
            assert [(await c.get("/metadata", headers=app_a)).status_code for _ in range(3)] == [200, 200, 429]
            # Same address, another client: its own bucket; no token: the address's bucket.
            assert [(await c.get("/metadata", headers=app_b)).status_code for _ in range(3)] == [200, 200, 429]
            assert [(await c.get("/metadata")).status_code for _ in range(3)] == [200, 200, 429]


def test_claimed_client():
    assert claimed_client(f"Bearer {token({'azp': 'a', 'client_id': 'b', 'sub': 'c'})}") == "client:a"
    assert claimed_client(f"bearer {token({'sub': 'c'})}") == "client:c"
    opaque = claimed_client("Bearer not-a-jwt")
    assert opaque and opaque.startswith("token:") and opaque == claimed_client("Bearer not-a-jwt")
    assert claimed_client("Bearer a.!!!.c").startswith("token:")
    assert claimed_client(None) is None and claimed_client("Basic dXNlcjpwdw==") is None


def test_token_buckets_refill():
    b = TokenBuckets(rate=2, burst=2)
    assert b.take("k", now=0.0) == 0 and b.take("k", now=0.0) == 0
    assert b.take("k", now=0.0) == pytest.approx(0.5)
    assert b.take("k", now=0.5) == 0  # one unit back after 0.5 s at 2/s
    assert b.take("k", now=100.0) == 0 and b.take("k", now=100.0) == 0  # never above the burst
    assert b.take("k", now=100.0) > 0


async def test_forged_tokens_do_not_use_up_the_client_they_name():
    """A token claiming another client's id, refused by authentication (401), is charged to the
    caller's address, not to that client; once the address's bucket is empty it is refused first."""

    async def inner(scope, receive, send):
        auth = dict(scope["headers"]).get(b"authorization", b"")
        status = 401 if auth.endswith(b".forged") else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    settings = SimpleNamespace(rate_limit_per_second=0.001, rate_limit_burst=3, rate_limit_exempt="", request_timeout_seconds=0)
    guard = Guard(inner, settings=settings)
    forged = {"Authorization": f"Bearer {token({'azp': 'victim-app'}, 'forged')}"}
    real = {"Authorization": f"Bearer {token({'azp': 'victim-app'}, 'good')}"}
    attacker = httpx.AsyncClient(transport=httpx.ASGITransport(app=guard, client=("10.6.6.6", 1)), base_url="http://t")
    victim = httpx.AsyncClient(transport=httpx.ASGITransport(app=guard, client=("10.1.1.1", 1)), base_url="http://t")
    async with attacker, victim:
        assert [(await attacker.get("/fhir/Patient", headers=forged)).status_code for _ in range(6)] == [401, 401, 401, 429, 429, 429]
        assert [(await victim.get("/fhir/Patient", headers=real)).status_code for _ in range(4)] == [200, 200, 200, 429]


# -- headers and CORS -----------------------------------------------------------------------------


async def test_security_headers(mongo_uri):
    async with served(mongo_uri) as app:
        async with client_of(app) as c, client_of(app, base_url="https://fhir.sh.example/fhir") as tls:
            for r in (await c.get("/metadata"), await c.get(f"/Patient/{uid()}"), await c.get("/Patient", params={"gender": "x"}), await c.get("/nowhere/at/all/really")):
                assert r.headers["x-content-type-options"] == "nosniff", r.url
                assert r.headers["x-frame-options"] == "DENY"
                assert r.headers["content-security-policy"] == "frame-ancestors 'none'"
                assert r.headers["referrer-policy"] == "no-referrer"
                assert "strict-transport-security" not in r.headers  # plain http
            # Personal data is never cached; the CapabilityStatement may be.
            r = await c.post("/Patient", json={"resourceType": "Patient", "gender": "male"})
            assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
            assert (await c.get(r.headers["location"])).headers["cache-control"] == "no-store"
            assert (await c.get("/Patient", params={"gender": "male"})).headers["cache-control"] == "no-store"
            assert "cache-control" not in (await c.get("/metadata")).headers
            r = await tls.get("/metadata")
            assert r.headers["strict-transport-security"] == "max-age=31536000"


async def test_cors_for_configured_origins_only(mongo_uri):
    allowed, other = "https://jkda.sh.example", "https://evil.example"
    async with served(mongo_uri, cors_origins=f"{allowed}, https://app2.example/") as app:
        async with client_of(app) as c:
            pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
            r = await c.options("/Patient", headers={"Origin": allowed, **pre})
            assert r.status_code == 200
            assert r.headers["access-control-allow-origin"] == allowed
            assert "POST" in r.headers["access-control-allow-methods"]
            allowed_headers = r.headers["access-control-allow-headers"].lower()
            assert "authorization" in allowed_headers and "content-type" in allowed_headers
            assert r.headers["x-content-type-options"] == "nosniff"  # headers on preflights too
            r = await c.options("/Patient", headers={"Origin": "https://app2.example", **pre})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app2.example"
            r = await c.options("/Patient", headers={"Origin": other, **pre})
            assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
            # An actual request: the allowed origin may read Location, ETag, X-Request-Id ...
            r = await c.post("/Patient", json={"resourceType": "Patient"}, headers={"Origin": allowed})
            assert r.status_code == 201 and r.headers["access-control-allow-origin"] == allowed
            exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
            assert {"location", "etag", "content-location", "x-request-id"} <= exposed
            r = await c.get("/metadata", headers={"Origin": other})
            assert "access-control-allow-origin" not in r.headers
    async with served(mongo_uri) as app:  # no origins configured: no CORS at all
        async with client_of(app) as c:
            r = await c.options("/Patient", headers={"Origin": allowed, "Access-Control-Request-Method": "GET"})
            assert "access-control-allow-origin" not in r.headers


def test_cors_origins_must_be_exact():
    from fhir_server.http.protection import cors_origins

    assert cors_origins(" https://a.example/ ,https://b.example:8443") == ["https://a.example", "https://b.example:8443"]
    assert cors_origins("") == []
    for bad in ("*", "a.example"):
        with pytest.raises(ValueError):
            cors_origins(bad)


# -- timeout and body size ------------------------------------------------------------------------


async def test_timeout_is_503_and_the_cancelled_transaction_leaves_nothing(mongo_uri):
    async with served(mongo_uri, request_timeout_seconds=0.5, audit_enabled=True, audit_anchor_seconds=0) as app:
        server = app.state.server
        reached = asyncio.Event()

        async def slow(tx) -> None:
            await tx.unit.flush()  # the writes are in the open transaction now
            reached.set()
            await asyncio.sleep(30)

        system = f"urn:test:{uid()}"
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": f"urn:uuid:{uid()[:8]}-0000-4000-8000-{uid()[:12]}",
                    "resource": {"resourceType": "Patient", "identifier": [{"system": system, "value": str(i)}]},
                    "request": {"method": "POST", "url": "Patient"},
                }
                for i in range(2)
            ],
        }
        server.on_commit.append(slow)
        try:
            async with client_of(app) as c:
                r = await c.post("", json=bundle, headers={"X-Request-Id": "slow-tx"})
                assert reached.is_set()
                assert r.status_code == 503, r.text
                assert _outcome_code(r) == "timeout"
                assert r.headers["x-request-id"] == "slow-tx" and r.headers["cache-control"] == "no-store"
        finally:
            server.on_commit.remove(slow)
        async with client_of(app) as c:
            await asyncio.sleep(0.5)
            r = await c.get("/Patient", params={"identifier": f"{system}|"})
            assert r.json()["total"] == 0  # rolled back: neither entry is there
            assert (await c.get("/Patient/_history", params={"_count": "1000"})).json().get("total", 0) == 0
            r = await c.post("", json=bundle)  # and the same transaction goes through once not slowed
            assert r.status_code == 200, r.text
            assert (await c.get("/Patient", params={"identifier": f"{system}|"})).json()["total"] == 2
            await app.state.audit_trail.flush()
            r = await c.get("/AuditEvent", params={"outcome": "12"})
            (entry,) = r.json()["entry"]
            event = entry["resource"]
            assert event["subtype"][0]["code"] == "transaction" and event["outcomeDesc"] == "HTTP 503: request timeout"


async def test_oversized_body_is_413(mongo_uri):
    async with served(mongo_uri, max_body_bytes=2000) as app:
        async with client_of(app) as c:
            big = {"resourceType": "Patient", "name": [{"text": "张" * 2000}]}
            r = await c.post("/Patient", json=big)
            assert r.status_code == 413 and _outcome_code(r) == "too-costly"
            assert r.headers["x-content-type-options"] == "nosniff"
            r = await c.post("/Patient", json={"resourceType": "Patient"})
            assert r.status_code == 201
