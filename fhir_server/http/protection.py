"""Protection of the HTTP surface (issue #6): rate limits, a request timeout, security headers and
CORS. ``install(app, settings)`` adds, from the outside in:

1. :class:`SecurityHeaders` — on every response (CORS preflights, 429, 503 and 500 included):
   ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY`` and
   ``Content-Security-Policy: frame-ancestors 'none'``, ``Referrer-Policy: no-referrer``;
   ``Cache-Control: no-store`` on FHIR responses (everything under the base path but
   ``/metadata``: resources, bundles and outcomes may hold personal data) unless the handler set
   its own; ``Strict-Transport-Security`` when the request came over https (uvicorn takes the
   scheme from X-Forwarded-Proto of a trusted proxy) or ``hsts_always``. A fault that escaped
   every handler is answered here as the app answers it (a 500 OperationOutcome, logged), so that
   it carries the headers too.
2. Starlette's ``CORSMiddleware`` when ``cors_origins`` names origins: exactly those origins,
   the FHIR methods, ``Authorization``, ``Content-Type`` and the FHIR request headers allowed,
   ``Location``, ``ETag``, ``Content-Location``, ``Last-Modified``, ``X-Request-Id`` and
   ``Retry-After`` exposed; no credentials mode (tokens travel in ``Authorization``, not cookies).
   A preflight from another origin is refused (400, no ``Access-Control-Allow-Origin``).
3. (the audit middleware, :mod:`fhir_server.http.audit`, when auditing is on)
4. :class:`Guard` — the rate limit, then the request timeout, around the routes.

Rate limits: a token bucket (``rate_limit_per_second``, ``rate_limit_burst``) per client, in this
worker process (N workers: N times the rate overall; no shared state, no database round trip).
The limiter runs before authentication, which happens in the routes, so the verified client is
not known yet. The key is therefore the client the bearer token *claims* (``azp``, else
``client_id``, else ``sub`` of its unverified payload; a token that is not a JWT: its hash), and
the remote address for requests without a token. Verifying the token here would do the
authentication's work twice. A forged token naming another client must not use up that client's
bucket: when the routes refuse the token (401), its unit is given back to the claimed client's
bucket and charged to the caller's address instead, and an address whose bucket is empty is
refused before its tokens' claims are looked at. So a forger gets at most the burst, then is
limited by address; the real client loses nothing but the units of the forged requests in flight.
Addresses in ``rate_limit_exempt`` (loopback by default: the machine's own tools) are not limited.
A refused request gets 429 with an OperationOutcome (``throttled``) and ``Retry-After`` seconds.

Timeout: a request still running after ``request_timeout_seconds`` is cancelled and answered 503
(``timeout``). Cancelling a write inside :meth:`MongoStore.transact` aborts its MongoDB
transaction (its ``except BaseException`` branch aborts and re-raises; a transaction whose session
ends uncommitted is aborted by the server anyway), and a transaction is all or nothing: nothing of
it is visible. One window remains: if the cancellation lands while ``commitTransaction`` is on the
wire, the commit may have happened although the client gets 503 — as with any lost response, the
client must read before retrying a non-idempotent write (or use conditional create / If-Match).
A response already started is not replaced: the connection is aborted instead.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import time
from collections import OrderedDict
from typing import Any

import orjson
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_server.http.negotiation import error_response
from fhir_server.outcome import FhirError

log = logging.getLogger("fhir_server.http.protection")

CORS_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
CORS_ALLOW_HEADERS = [
    "Authorization",
    "Content-Type",
    "Accept",
    "Prefer",
    "If-Match",
    "If-None-Match",
    "If-None-Exist",
    "If-Modified-Since",
    "X-Request-Id",
]
CORS_EXPOSE_HEADERS = ["Location", "ETag", "Content-Location", "Last-Modified", "X-Request-Id", "Retry-After"]
HSTS = b"max-age=31536000"


def install(app: Any, settings: Any) -> None:
    """Add the protection layers to ``app`` (before it starts)."""
    # Innermost: the guard runs after the audit middleware has seen the request, so its 429 and
    # 503 are audited. fhir_server.http.audit.install puts itself just outside it.
    app.user_middleware.append(Middleware(Guard, settings=settings))
    origins = cors_origins(settings.cors_origins)
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=CORS_METHODS,
            allow_headers=CORS_ALLOW_HEADERS,
            expose_headers=CORS_EXPOSE_HEADERS,
            allow_credentials=False,
            max_age=600,
        )
    app.add_middleware(SecurityHeaders, base_path=settings.base_path, hsts_always=settings.hsts_always)


def cors_origins(value: str) -> list[str]:
    origins = [o.strip().rstrip("/") for o in (value or "").split(",") if o.strip()]
    for o in origins:
        if o == "*" or "://" not in o:
            raise ValueError(f"cors_origins takes exact origins such as https://app.example, not {o!r}")
    return origins


# -- security headers ---------------------------------------------------------------------------

_ALWAYS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"referrer-policy", b"no-referrer"),
)


class SecurityHeaders:
    def __init__(self, app: ASGIApp, *, base_path: str, hsts_always: bool = False) -> None:
        self.app = app
        self.base = base_path.rstrip("/")
        self.metadata = self.base + "/metadata"
        self.hsts_always = hsts_always

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        base = self.base
        fhir = (not base or path == base or path.startswith(base + "/")) and path != self.metadata
        hsts = self.hsts_always or scope.get("scheme") == "https"
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", ()))
                present = {k.lower() for k, _ in headers}
                headers.extend(h for h in _ALWAYS if h[0] not in present)
                if fhir and b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                if hsts and b"strict-transport-security" not in present:
                    headers.append((b"strict-transport-security", HSTS))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            if started:
                raise
            # As the app's own handler answers (fhir_server/http/app.py), with the headers.
            log.exception("unhandled error on %s %s", scope.get("method"), path[:200])
            error = FhirError.of(500, "exception", "Internal server error; the details are in the server log")
            await error_response(error)(scope, receive, send_with_headers)


# -- rate limit and timeout ---------------------------------------------------------------------


class TokenBuckets:
    """Token buckets by key: ``rate`` units per second up to ``burst``. Idle buckets refill to full,
    so forgetting the least recently used one (beyond ``max_keys``) loses nothing but a penalty."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = float(rate)
        self.burst = float(max(1, burst))
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def _level(self, key: str, now: float) -> list[float]:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = [self.burst, now]
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
        return b

    def take(self, key: str, now: float | None = None) -> float:
        """0 when a unit was taken; else the seconds until one is there."""
        b = self._level(key, time.monotonic() if now is None else now)
        if b[0] >= 1.0:
            b[0] -= 1.0
            return 0.0
        return (1.0 - b[0]) / self.rate

    def wait(self, key: str, now: float | None = None) -> float:
        """Seconds until ``key`` has a unit (0: it has one), taking nothing."""
        if key not in self._buckets:
            return 0.0
        b = self._level(key, time.monotonic() if now is None else now)
        return 0.0 if b[0] >= 1.0 else (1.0 - b[0]) / self.rate

    def give(self, key: str, units: float) -> None:
        """Add (or, negative, remove) units; never above the burst nor below zero."""
        b = self._level(key, time.monotonic())
        b[0] = max(0.0, min(self.burst, b[0] + units))


def claimed_client(authorization: str | None) -> str | None:
    """The client a bearer token claims to be (unverified): ``azp``, ``client_id`` or ``sub`` of a
    JWT payload; for a token that is not a readable JWT, a hash of the token. None without one."""
    if not authorization or len(authorization) > 16_384:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    parts = token.split(".")
    if len(parts) == 3:
        try:
            payload = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        except (ValueError, TypeError):
            payload = None
        if isinstance(payload, dict):
            for claim in ("azp", "client_id", "sub"):
                value = payload.get(claim)
                if isinstance(value, str) and 0 < len(value) <= 256:
                    return "client:" + value
    return "token:" + hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:32]


class Guard:
    """Rate limit, then timeout, around the inner app. Sits inside the audit middleware."""

    inside_audit = True  # fhir_server.http.audit.install places the audit middleware outside this

    def __init__(self, app: ASGIApp, *, settings: Any) -> None:
        self.app = app
        rate, burst = float(settings.rate_limit_per_second), int(settings.rate_limit_burst)
        self.buckets = TokenBuckets(rate, burst) if rate > 0 and burst > 0 else None
        self.exempt = frozenset(a.strip() for a in (settings.rate_limit_exempt or "").split(",") if a.strip())
        self.timeout = float(settings.request_timeout_seconds or 0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        buckets = self.buckets
        key = address = None
        if buckets is not None:
            client = scope.get("client")
            addr = client[0] if client else "unknown"
            if addr not in self.exempt:
                address = "addr:" + addr
                authorization = None
                for k, v in scope.get("headers") or ():
                    if k == b"authorization":
                        authorization = v.decode("latin-1")
                        break
                key = claimed_client(authorization)
                if key is None:
                    wait = buckets.take(address)
                else:
                    # An address that used up its bucket with refused tokens is limited first.
                    wait = buckets.wait(address) or buckets.take(key)
                if wait:
                    await self._throttled(scope, receive, send, wait)
                    return
        status = 0
        started = False

        async def watched(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
            await send(message)

        try:
            if self.timeout > 0:
                deadline = asyncio.timeout(self.timeout)
                try:
                    async with deadline:
                        await self.app(scope, receive, watched)
                except TimeoutError:
                    if started or not deadline.expired():
                        raise
                    await self._timed_out(scope, receive, send)
            else:
                await self.app(scope, receive, watched)
        finally:
            if key is not None and address is not None and status == 401 and buckets is not None:
                buckets.give(key, 1.0)  # a refused token does not spend the client it names
                buckets.give(address, -1.0)

    async def _throttled(self, scope: Scope, receive: Receive, send: Send, wait: float) -> None:
        assert self.buckets is not None
        retry = max(1, math.ceil(wait))
        scope.setdefault("state", {})["audit_reason"] = "rate limit"
        error = FhirError.of(
            429,
            "throttled",
            f"Too many requests: at most {self.buckets.rate:g} per second (bursts of {self.buckets.burst:g}) per client; retry after {retry} s",
            details_zh=f"请求过于频繁，请 {retry} 秒后重试",
            headers={"Retry-After": str(retry)},
        )
        await error_response(error)(scope, receive, send)

    async def _timed_out(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("state", {})["audit_reason"] = "request timeout"
        log.warning("%s %s ran over %.0f s: cancelled, answered 503", scope.get("method"), scope.get("path", "")[:200], self.timeout)
        error = FhirError.of(
            503,
            "timeout",
            f"The request took longer than {self.timeout:g} s and was cancelled (an unfinished transaction is rolled back)",
            details_zh="请求处理超时，已取消",
        )
        await error_response(error)(scope, receive, send)
