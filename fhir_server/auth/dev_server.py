"""The built-in development authorization server (SMART App Launch 2 / Backend Services).

Endpoints: ``{base}/.well-known/smart-configuration``, ``/auth/jwks``, ``/auth/authorize``,
``/auth/token`` (and ``/auth/.well-known/openid-configuration``).

* **Backend services** (hospitals): ``client_credentials`` with a ``private_key_jwt`` client
  assertion signed by a key of the client's registered JWKS: ``iss`` = ``sub`` = client id, ``aud``
  = the token endpoint URL, ``exp`` at most five minutes ahead, ``jti`` never seen before. Used
  ``jti`` values are kept in MongoDB (``_auth_jti``, unique ``_id``, TTL index on their expiry):
  every worker and host sees them, the unique insert is the atomic replay check, and MongoDB
  deletes them once the assertion has expired anyway. Scopes granted: those asked ∩ the client's.
* **Authorization code + PKCE** (S256 only) for residents' and clinicians' apps. For development
  the authorize endpoint does not show a login page: it auto-approves the user named by
  ``login_hint`` (or the client's ``default_user``) — demo users ``resident`` (patient context
  ``demo-resident``), ``clinician`` (user/ scopes; ``patient=ID`` picks a patient for
  ``launch/patient``) and ``auditor``. ``auth_dev_logins`` limits this to clients on this machine
  (default) or turns it off. Codes live 60 s, are stored hashed and work once.
  Scopes granted: asked ∩ the client's ∩ the user's. No refresh tokens (``offline_access`` is
  not granted). With ``openid fhirUser`` an ``id_token`` is returned.

Tokens are RS256 JWTs signed with the key in ``_auth_keys`` (see ``keys.py``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import httpx
import jwt
from fastapi import APIRouter, FastAPI
from jwt import PyJWK
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError
from pymongo.write_concern import WriteConcern
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from fhir_server.auth import _urls, clients
from fhir_server.auth.keys import SigningKeys
from fhir_server.auth.scopes import ScopeSet, parse_scopes
from fhir_server.auth.tokens import ALLOWED_ALGORITHMS, CachedJwks, KeySource, TokenValidator, key_fits, pick_key, remote_jwks
from fhir_server.config import Settings

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JTI = "_auth_jti"
CODES = "_auth_codes"
ASSERTION_MAX_SECONDS = 300
CODE_SECONDS = 60
_VERIFIER = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

DbSource = Any  # AsyncDatabase | MongoStore | Callable[[], AsyncDatabase | MongoStore] | None


class OAuthError(Exception):
    """An RFC 6749 error answer (``invalid_client`` is a 401, the others 400)."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description

    def response(self) -> JSONResponse:
        status = 401 if self.error == "invalid_client" else 400
        return JSONResponse({"error": self.error, "error_description": self.description}, status, headers=_NO_STORE)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def _request_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"


def _loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    return host in ("::1", "localhost") or host.startswith("127.")


class DevAuthServer:
    """State and handlers of the development authorization server."""

    def __init__(self, settings: Settings, database: Callable[[], AsyncDatabase]) -> None:
        self.settings = settings
        self._database = database
        self._db: AsyncDatabase | None = None
        self.keys: SigningKeys | None = None
        self._ready = False

    async def db(self) -> AsyncDatabase:
        """The database, with indexes and the demo seed on first use."""
        if self._db is None:
            self._db = self._database()
            self.keys = SigningKeys(self._db)
        if not self._ready:
            await self._db[JTI].create_index("expires", expireAfterSeconds=0)
            await self._db[CODES].create_index("expires", expireAfterSeconds=0)
            await clients.seed_demo(self._db)
            self._ready = True
        return self._db

    async def jwks(self) -> dict[str, Any]:
        await self.db()
        assert self.keys is not None
        return await self.keys.jwks()

    # -- URLs --------------------------------------------------------------------------------

    def urls(self, request: Request) -> dict[str, str]:
        auth = _urls.origin(self.settings, _request_origin(request)) + "/auth"
        return {
            "issuer": _urls.issuer(self.settings),
            "jwks_uri": auth + "/jwks",
            "authorization_endpoint": auth + "/authorize",
            "token_endpoint": auth + "/token",
        }

    def _token_audiences(self, request: Request) -> list[str]:
        """What a client assertion's ``aud`` may be: this token endpoint, as configured or as called."""
        return sorted({_urls.issuer(self.settings) + "/token", self.urls(request)["token_endpoint"]})

    def _fhir_audiences(self, request: Request) -> set[str]:
        return set(_urls.audiences(self.settings)) | {_urls.fhir_base(self.settings, _request_origin(request))}

    # -- discovery ---------------------------------------------------------------------------

    async def smart_configuration(self, request: Request) -> Response:
        urls = self.urls(request)
        body = {
            **urls,
            "grant_types_supported": ["authorization_code", "client_credentials"],
            "response_types_supported": ["code"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
            "token_endpoint_auth_signing_alg_values_supported": list(ALLOWED_ALGORITHMS),
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": [
                "openid", "fhirUser", "launch/patient",
                "patient/*.rs", "patient/*.read", "user/*.cruds", "user/*.*", "system/*.cruds", "system/*.*",
            ],  # fmt: skip
            "capabilities": [
                "launch-standalone", "client-public", "client-confidential-asymmetric", "context-standalone-patient",
                "permission-patient", "permission-user", "permission-v1", "permission-v2", "sso-openid-connect",
            ],  # fmt: skip
        }
        return JSONResponse(body, headers={"Cache-Control": "max-age=300"})

    async def openid_configuration(self, request: Request) -> Response:
        urls = self.urls(request)
        return JSONResponse(
            {
                **urls,
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "claims_supported": ["sub", "fhirUser", "name"],
            }
        )

    async def jwks_endpoint(self, request: Request) -> Response:
        await self.db()
        return JSONResponse(await self.jwks(), headers={"Cache-Control": "max-age=300"})

    # -- client authentication ---------------------------------------------------------------

    async def _authenticate(self, request: Request, form: dict[str, str]) -> dict[str, Any]:
        """The client a private_key_jwt assertion proves; OAuthError(invalid_client) otherwise."""
        db = await self.db()
        if form.get("client_assertion_type") != JWT_BEARER or not form.get("client_assertion"):
            raise OAuthError("invalid_client", f"client_assertion_type must be {JWT_BEARER} with a client_assertion")
        assertion = form["client_assertion"]
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise OAuthError("invalid_client", "the client assertion is not a JWT") from None
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise OAuthError("invalid_client", f"assertion algorithm {str(alg)[:20]!r} is not allowed")
        client_id = unverified.get("iss")
        if not isinstance(client_id, str) or unverified.get("sub") != client_id:
            raise OAuthError("invalid_client", "the assertion's iss and sub must both be the client id")
        if form.get("client_id") not in (None, client_id):
            raise OAuthError("invalid_client", "client_id does not match the assertion")
        client = await clients.get_client(db, client_id)
        if client is None or client.get("token_endpoint_auth_method") != "private_key_jwt" or not client.get("jwks"):
            raise OAuthError("invalid_client", f"unknown client {client_id[:80]!r} or not registered for private_key_jwt")
        kid = header.get("kid") if isinstance(header.get("kid"), str) else None
        jwk = pick_key(client["jwks"].get("keys") or [], kid, alg)
        if jwk is None or not key_fits(jwk, alg):
            raise OAuthError("invalid_client", "no registered key of the client matches the assertion's kid and alg")
        leeway = self.settings.auth_leeway_seconds
        try:
            claims = jwt.decode(
                assertion,
                key=PyJWK(jwk, algorithm=alg).key,
                algorithms=[alg],
                audience=self._token_audiences(request),
                issuer=client_id,
                leeway=leeway,
                options={"require": ["exp", "jti", "iss", "sub", "aud"]},
            )
        except jwt.PyJWTError as e:
            raise OAuthError("invalid_client", f"client assertion refused: {e}") from None
        if claims["exp"] > time.time() + ASSERTION_MAX_SECONDS + leeway:
            raise OAuthError("invalid_client", f"the assertion's exp is more than {ASSERTION_MAX_SECONDS} s ahead")
        expires = datetime.fromtimestamp(claims["exp"] + leeway, timezone.utc)
        try:
            await db[JTI].insert_one({"_id": f"{client_id}|{claims['jti']}", "expires": expires})
        except DuplicateKeyError:
            raise OAuthError("invalid_client", "this client assertion (jti) was already used") from None
        return client

    # -- token issuing -----------------------------------------------------------------------

    async def _issue(
        self,
        request: Request,
        *,
        subject: str,
        client: dict[str, Any],
        granted: ScopeSet,
        patient: str | None = None,
        fhir_user: str | None = None,
    ) -> JSONResponse:
        assert self.keys is not None
        now = int(time.time())
        lifetime = self.settings.auth_token_lifetime_seconds
        scope = granted.text()
        claims: dict[str, Any] = {
            "iss": _urls.issuer(self.settings),
            "sub": subject,
            "aud": _urls.audiences(self.settings)[0],
            "iat": now,
            "exp": now + lifetime,
            "jti": uuid.uuid4().hex,
            "client_id": client["_id"],
            "scope": scope,
        }
        if patient:
            claims["patient"] = patient
        if fhir_user:
            claims["fhirUser"] = fhir_user
        if client.get("source_restriction"):
            claims["source_restriction"] = client["source_restriction"]
        if client.get("push_sources"):
            claims["push_sources"] = list(client["push_sources"])
        body: dict[str, Any] = {
            "access_token": await self.keys.sign(claims, typ="at+jwt"),
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": scope,
        }
        if patient:
            body["patient"] = patient
        if fhir_user and {"openid", "fhirUser"} <= granted.other:
            id_claims = {k: claims[k] for k in ("iss", "sub", "iat", "exp")}
            body["id_token"] = await self.keys.sign({**id_claims, "aud": client["_id"], "fhirUser": fhir_user})
        return JSONResponse(body, headers=_NO_STORE)

    async def token(self, request: Request) -> Response:
        try:
            content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
            if content_type != "application/x-www-form-urlencoded":
                raise OAuthError("invalid_request", "send the token request as application/x-www-form-urlencoded")
            form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
            grant_type = form.get("grant_type")
            if grant_type == "client_credentials":
                return await self._client_credentials(request, form)
            if grant_type == "authorization_code":
                return await self._authorization_code(request, form)
            raise OAuthError("unsupported_grant_type", f"grant_type {str(grant_type)[:40]!r} is not supported")
        except OAuthError as e:
            return e.response()

    async def _client_credentials(self, request: Request, form: dict[str, str]) -> Response:
        client = await self._authenticate(request, form)
        if "client_credentials" not in client.get("grant_types", ()):
            raise OAuthError("unauthorized_client", "this client may not use client_credentials")
        asked = parse_scopes(form.get("scope"))
        if asked.invalid:
            raise OAuthError("invalid_scope", f"malformed scope(s): {' '.join(asked.invalid)[:200]}")
        granted = _without_offline(asked.intersect(parse_scopes(client.get("scope"))))
        if not granted.resources:
            raise OAuthError("invalid_scope", "none of the requested scopes is allowed for this client")
        return await self._issue(request, subject=client["_id"], client=client, granted=granted)

    async def _authorization_code(self, request: Request, form: dict[str, str]) -> Response:
        db = await self.db()
        client: dict[str, Any] | None
        if form.get("client_assertion"):
            client = await self._authenticate(request, form)
        else:
            client = await clients.get_client(db, form.get("client_id") or "")
            if client is None:
                raise OAuthError("invalid_client", "unknown client_id")
            if client.get("token_endpoint_auth_method") != "none":
                raise OAuthError("invalid_client", "this client must authenticate with a client assertion")
        code = form.get("code") or ""
        doc = await db[CODES].find_one_and_update(
            {"_id": _digest(code), "used": False}, {"$set": {"used": True, "used_at": datetime.now(timezone.utc)}}
        )
        if doc is None:
            used = await db[CODES].find_one({"_id": _digest(code)}, {"_id": 1})
            raise OAuthError("invalid_grant", "the code was already used" if used else "unknown or expired code")
        if doc["expires"].replace(tzinfo=timezone.utc) < datetime.now(timezone.utc):
            raise OAuthError("invalid_grant", "the code has expired")
        if doc["client_id"] != client["_id"]:
            raise OAuthError("invalid_grant", "the code was issued to another client")
        if form.get("redirect_uri") != doc["redirect_uri"]:
            raise OAuthError("invalid_grant", "redirect_uri differs from the authorization request's")
        verifier = form.get("code_verifier") or ""
        if not _VERIFIER.match(verifier):
            raise OAuthError("invalid_grant", "code_verifier must be 43-128 characters of [A-Za-z0-9-._~]")
        if not hmac.compare_digest(_b64(hashlib.sha256(verifier.encode()).digest()), doc["code_challenge"]):
            raise OAuthError("invalid_grant", "code_verifier does not match the code_challenge")
        return await self._issue(
            request,
            subject=doc["user"],
            client=client,
            granted=parse_scopes(doc["scope"]),
            patient=doc.get("patient"),
            fhir_user=doc.get("fhirUser"),
        )

    # -- authorization endpoint --------------------------------------------------------------

    async def authorize(self, request: Request) -> Response:
        db = await self.db()
        q = request.query_params
        client = await clients.get_client(db, q.get("client_id") or "")
        if client is None:
            return OAuthError("invalid_request", "unknown client_id").response()
        registered = client.get("redirect_uris") or []
        redirect_uri = q.get("redirect_uri") or (registered[0] if len(registered) == 1 else None)
        if redirect_uri is None or redirect_uri not in registered:
            return OAuthError("invalid_request", "redirect_uri is not registered for this client").response()
        try:
            location = await self._approve(request, db, client, redirect_uri)
        except OAuthError as e:
            location = _with_query(redirect_uri, error=e.error, error_description=e.description, state=q.get("state"))
        return RedirectResponse(location, status_code=302, headers=_NO_STORE)

    async def _approve(self, request: Request, db: AsyncDatabase, client: dict[str, Any], redirect_uri: str) -> str:
        q = request.query_params
        if q.get("response_type") != "code":
            raise OAuthError("unsupported_response_type", "response_type must be code")
        if "authorization_code" not in client.get("grant_types", ()):
            raise OAuthError("unauthorized_client", "this client may not use the authorization code flow")
        challenge = q.get("code_challenge") or ""
        if q.get("code_challenge_method") != "S256":
            raise OAuthError("invalid_request", "PKCE is required with code_challenge_method=S256 (plain is not accepted)")
        if not re.fullmatch(r"[A-Za-z0-9_-]{43}", challenge):
            raise OAuthError("invalid_request", "code_challenge must be the base64url SHA-256 of the verifier")
        if (q.get("aud") or "").rstrip("/") not in self._fhir_audiences(request):
            raise OAuthError("invalid_request", "aud must be this FHIR server's base URL")
        mode = self.settings.auth_dev_logins
        if mode == "off" or (mode != "any" and not _loopback(request)):
            raise OAuthError("access_denied", "development logins are not available here; use the configured identity provider")
        user = await clients.get_user(db, q.get("login_hint") or client.get("default_user") or "")
        if user is None:
            raise OAuthError("access_denied", "unknown development user (login_hint: resident, clinician, auditor)")
        asked = parse_scopes(q.get("scope"))
        if asked.invalid:
            raise OAuthError("invalid_scope", f"malformed scope(s): {' '.join(asked.invalid)[:200]}")
        granted = _without_offline(asked.intersect(parse_scopes(client.get("scope"))).intersect(parse_scopes(user.get("scope"))))
        if not granted.resources:
            raise OAuthError("invalid_scope", "none of the requested scopes is allowed for this client and user")
        patient = user.get("patient") or (q.get("patient") if "launch/patient" in granted.other else None)
        if any(s.context == "patient" for s in granted.resources) and not patient:
            raise OAuthError("invalid_request", "patient/ scopes need a patient context: add launch/patient and patient=ID")
        code = secrets.token_urlsafe(32)
        await db[CODES].insert_one(
            {
                "_id": _digest(code),
                "client_id": client["_id"],
                "redirect_uri": redirect_uri,
                "code_challenge": challenge,
                "scope": granted.text(),
                "user": user["_id"],
                "fhirUser": user.get("fhirUser"),
                "patient": patient,
                "used": False,
                "expires": datetime.now(timezone.utc) + timedelta(seconds=CODE_SECONDS),
            }
        )
        return _with_query(redirect_uri, code=code, state=q.get("state"))

    # -- routing -----------------------------------------------------------------------------

    def router(self) -> APIRouter:
        router = APIRouter()
        base = self.settings.base_path.rstrip("/")
        router.add_api_route(base + "/.well-known/smart-configuration", self.smart_configuration, methods=["GET"])
        router.add_api_route("/auth/.well-known/openid-configuration", self.openid_configuration, methods=["GET"])
        router.add_api_route("/auth/jwks", self.jwks_endpoint, methods=["GET"])
        router.add_api_route("/auth/authorize", self.authorize, methods=["GET"])
        router.add_api_route("/auth/token", self.token, methods=["POST"])
        return router


def _without_offline(scopes: ScopeSet) -> ScopeSet:
    """No refresh tokens are issued, so ``offline_access`` is never granted."""
    return ScopeSet(scopes.resources, scopes.other - {"offline_access", "online_access"}, scopes.invalid)


def _with_query(url: str, **params: str | None) -> str:
    query = str(httpx.QueryParams({k: v for k, v in params.items() if v is not None}))
    return url + ("&" if "?" in url else "?") + query


def _resolver(settings: Settings, source: DbSource, app: FastAPI) -> Callable[[], AsyncDatabase]:
    """A function giving the database from an AsyncDatabase, a MongoStore, a factory of either, or
    (None) the store of ``app.state.server`` (set by the app's lifespan) when first needed."""

    def as_db(x: Any) -> AsyncDatabase:
        if isinstance(x, AsyncDatabase):
            return x
        if hasattr(x, "client"):  # MongoStore
            return x.client.get_database(settings.database, write_concern=WriteConcern("majority"))
        raise TypeError(f"cannot find a MongoDB database in {type(x).__name__}")

    def resolve() -> AsyncDatabase:
        if source is None:
            return as_db(app.state.server.store)
        return as_db(source() if callable(source) and not isinstance(source, AsyncDatabase) else source)

    return resolve


def install(
    app: FastAPI,
    settings: Settings,
    store_or_db: DbSource = None,
    *,
    http: httpx.AsyncClient | None = None,
) -> TokenValidator:
    """Mount the development server (when ``auth_dev_server``) ahead of the FHIR routes and build the
    token validator for it and the external issuers; both are also put on ``app.state.auth`` and
    ``app.state.auth_server``. ``store_or_db`` may be None: ``app.state.server.store`` is then used."""
    if settings.auth_dev_logins not in ("loopback", "any", "off"):
        raise ValueError(f"auth_dev_logins={settings.auth_dev_logins!r}: use loopback, any or off")
    issuers: dict[str, KeySource] = {}
    server = DevAuthServer(settings, _resolver(settings, store_or_db, app))
    if settings.auth_dev_server:
        router = server.router()
        app.router.routes[0:0] = router.routes  # before the FHIR catch-all under base_path
        issuers[_urls.issuer(settings)] = CachedJwks(server.jwks, ttl=settings.auth_jwks_cache_seconds, min_refetch=5)
    for iss, url in _urls.external_issuers(settings.auth_external_issuers).items():
        issuers[iss] = remote_jwks(url, http, ttl=settings.auth_jwks_cache_seconds)
    validator = TokenValidator(issuers, _urls.audiences(settings), leeway=settings.auth_leeway_seconds)
    app.state.auth = validator
    app.state.auth_server = server
    return validator
