"""Every FHIR request audited (issue #6, 等保三级): an ASGI middleware that, once the response
status is known, gives the audit trail (:mod:`fhir_server.audit`) a :class:`RequestRecord`.

What is recorded, for every request under the FHIR base path (reads, searches, writes, refusals
401/403/404/429, faults 5xx, timeouts 503):

- who: the authenticated :class:`~fhir_server.auth.tokens.Principal` the authentication layer
  leaves on ``request.state.principal`` (client id, subject, fhirUser, launch patient); none
  when authentication is off or the caller was refused before being identified;
- from where: the remote address (``scope["client"]``, which uvicorn takes from X-Forwarded-For
  when the proxy is trusted), the User-Agent, the host the client addressed;
- what: method and path (interaction, type, id, version by :func:`fhir_server.audit.classify`),
  the raw query string, and for ``POST [type]/_search`` the form body (its first 64 KB) appended to
  it; the resource a create or update wrote (from its ``Location``); for ``POST [base]`` whether
  the Bundle was a batch or a transaction (from the response, else the request's first bytes);
- whose data: the patients the audit derivation finds in the path, the query and the launch
  context, plus any ids a handler adds to ``request.state.audit_patients`` (a set);
- the X-Request-Id: the client's when it sent a well-formed one, else a new one; echoed in the
  response header and kept in the AuditEvent;
- why refused: a short reason an inner layer may put on ``request.state.audit_reason`` (the rate
  limiter and the timeout do); never the OperationOutcome text, which may quote personal data.

When it is recorded: the response start is held until the first body message, the record is
made, then the response goes out. For requests that may have changed data the trail returns only
once the events are durable (majority, journaled); if that fails (:class:`AuditUnavailable`,
after ``audit_wait_seconds``) the write has **already committed**: the response is still sent,
unchanged, and an ERROR is logged (the events stay queued and are appended when the database
answers again; a crash before then loses them, see fhir_server/audit/chain.py). Reads do not wait.

Where it sits: inside the security headers and CORS (CORS preflights are answered before they get
here and are not audited; a preflight-shaped OPTIONS that does get here is not audited either: a
browser sends no credentials and no data with it), outside the rate limiter and the request
timeout (so their 429 and 503 are audited) and outside the routes, where authentication runs.
An authentication layer written as a middleware must sit inside this one for its 401s to be seen.
"""

from __future__ import annotations

import logging
import re
import uuid
from datetime import datetime, timezone
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_server.audit import AuditUnavailable, RequestRecord

log = logging.getLogger("fhir_server.http.audit")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@+=/-]{1,128}$")
_FORM_CAP = 64 * 1024  # bytes of a POST _search form body kept as the query
_SNIFF = 2048  # bytes of a POST [base] body looked at for the Bundle type
_BUNDLE_RESPONSE = re.compile(rb'"type"\s*:\s*"(transaction|batch)-response"')
_BUNDLE_REQUEST = re.compile(rb'"type"\s*:\s*"(transaction|batch)"')


def install(app: Any, settings: Any) -> None:
    """Audit every FHIR request of ``app`` (when ``settings.audit_enabled``). The trail itself is
    started by the app's lifespan and found on ``app.state.audit_trail``. Placed directly outside
    the protection guard (rate limit, timeout) whichever of the two is installed first."""
    if not settings.audit_enabled:
        return
    mw = Middleware(AuditMiddleware, owner=app, base_path=settings.base_path)
    stack = app.user_middleware
    guard = next((i for i, m in enumerate(stack) if getattr(m.cls, "inside_audit", False)), None)
    if guard is None:
        stack.append(mw)  # innermost for now; the guard, installed later, is appended inside it
    else:
        stack.insert(guard, mw)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    for k, v in headers:
        if k == name:
            return v.decode("latin-1")
    return None


def _written(location: str | None, base_path: str) -> list[str]:
    """``Type/id[/_history/v]`` from a Location header (absolute or relative)."""
    if not location:
        return []
    path = location.split("?", 1)[0]
    if "://" in path:
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    base = base_path.rstrip("/")
    if base and (path == base or path.startswith(base + "/")):
        path = path[len(base) :]
    parts = [p for p in path.split("/") if p]
    if len(parts) >= 4 and parts[2] == "_history":
        return ["/".join(parts[:4])]
    if len(parts) >= 2:
        return ["/".join(parts[:2])]
    return []


class AuditMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware task and stream per request)."""

    def __init__(self, app: ASGIApp, *, owner: Any, base_path: str) -> None:
        self.app = app
        self.owner = owner
        self.base = base_path.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        base = self.base
        trail = getattr(self.owner.state, "audit_trail", None)
        if trail is None or (base and path != base and not path.startswith(base + "/")):
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope.get("headers") or []
        method: str = scope["method"]
        request_id = user_agent = host = content_type = None
        preflight = False
        for k, v in headers:
            if k == b"x-request-id":
                request_id = v.decode("latin-1")
            elif k == b"user-agent":
                user_agent = v.decode("latin-1")
            elif k == b"host":
                host = v.decode("latin-1")
            elif k == b"content-type":
                content_type = v.decode("latin-1")
            elif k == b"access-control-request-method":
                preflight = True
        if method == "OPTIONS" and preflight:
            await self.app(scope, receive, send)
            return
        if not request_id or not _REQUEST_ID.match(request_id):
            request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})  # shared with request.state of the inner layers
        state["request_id"] = request_id
        started = datetime.now(timezone.utc)
        rid_header = (b"x-request-id", request_id.encode("ascii"))

        # Request bytes kept: a POST _search form body (the query) or a POST [base] Bundle's start.
        body = bytearray()
        cap = 0
        if method == "POST":
            if path.endswith("/_search") and (content_type or "").lower().startswith("application/x-www-form-urlencoded"):
                cap = _FORM_CAP
            elif path == base or path == base + "/":
                cap = _SNIFF
        async def capturing_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(body) < cap:
                body.extend(message.get("body", b"")[: cap - len(body)])
            return message

        inner_receive = capturing_receive if cap else receive

        held: Message | None = None
        done = False
        status = 500

        async def audit(first_chunk: bytes, location: str | None, *, wait: bool | None = None) -> None:
            bundle_type = None
            if cap == _SNIFF:
                m = _BUNDLE_RESPONSE.search(first_chunk[:512]) or _BUNDLE_REQUEST.search(bytes(body))
                bundle_type = m.group(1).decode() if m else None
            query = scope.get("query_string", b"").decode("latin-1")
            if cap == _FORM_CAP and body:
                form = bytes(body).decode("latin-1")
                query = f"{query}&{form}" if query else form
            principal = state.get("principal")
            client = scope.get("client")
            rec = RequestRecord(
                method=method,
                path=path,
                status=status,
                query=query,
                request_id=request_id,
                remote_addr=client[0] if client else None,
                user_agent=user_agent,
                server_address=host.rsplit(":", 1)[0] if host and not host.endswith("]") else host,
                started=started,
                ended=datetime.now(timezone.utc),
                patients=tuple(state.get("audit_patients") or ()),
                resources=_written(location, base),
                reason=state.get("audit_reason"),
            )
            if principal is not None:
                rec.client_id = getattr(principal, "client_id", None)
                kind = getattr(principal, "kind", None)
                if kind != "system":  # a system client's subject is the client itself
                    rec.user_id = getattr(principal, "subject", None)
                    claims = getattr(principal, "claims", None) or {}
                    name = claims.get("name") if hasattr(claims, "get") else None
                    rec.user_name = name if isinstance(name, str) else None
                rec.fhir_user = getattr(principal, "fhir_user", None)
                rec.patient_context = getattr(principal, "patient", None)
            try:
                await trail.record(rec, wait=wait, bundle_type=bundle_type)
            except AuditUnavailable as e:
                # The request's work is done (a write has committed): answer anyway, say it loudly.
                log.error(
                    "audit events of %s %s (HTTP %d, X-Request-Id %s) are not durable: %s",
                    method, path[:200], status, request_id, e,
                )
            except Exception:
                log.exception("recording the audit events of %s %s (X-Request-Id %s) failed", method, path[:200], request_id)

        async def audited_send(message: Message) -> None:
            nonlocal held, done, status
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                held = {**message, "headers": [*message.get("headers", ()), rid_header]}
                return  # sent with the first body message, once the audit has the request
            if not done and held is not None:
                done = True
                location = _header(held["headers"], b"location") or _header(held["headers"], b"content-location")
                await audit(message.get("body", b"") if kind == "http.response.body" else b"", location)
                start, held = held, None
                await send(start)
            await send(message)

        try:
            await self.app(scope, inner_receive, audited_send)
        except BaseException as e:
            if not done:
                done = True
                # The server's error handler answers a fault with a 500, outside this layer.
                status = 500
                cancelled = not isinstance(e, Exception)
                await audit(b"", None, wait=False if cancelled else None)
            raise
        if not done and held is not None:  # a response start without a body message
            done = True
            await audit(b"", None)
            await send(held)
