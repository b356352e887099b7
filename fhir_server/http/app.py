"""The ASGI application: wiring of settings, storage, interceptors and routes."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable

from fastapi import FastAPI
from pymongo import AsyncMongoClient
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from fhir_server.audit import AuditTrail, install_log_redaction
from fhir_server.config import Settings, load_settings
from fhir_server.http import audit, protection
from fhir_server.http.negotiation import error_response
from fhir_server.http.routes import install_routes
from fhir_server.interactions.context import Server, storage_error
from fhir_server.outcome import FhirError
from fhir_server.storage.base import Conflict, TooLarge
from fhir_server.search.indexes import search_indexes
from fhir_server.storage.mongo import MongoStore

log = logging.getLogger("fhir_server")


def build_server(settings: Settings, store: MongoStore) -> Server:
    """Attach the interceptors the settings ask for."""
    from fhir_server.interactions import validate  # noqa: F401  (registers $validate)
    from fhir_server.interactions import mpi  # noqa: F401  (registers $match, $merge, $everything, ...)
    from fhir_server.interactions import connectors  # noqa: F401  (registers $ingest, $dead-letters, ...)
    from fhir_server.interceptors import search_parameters, validation
    from fhir_server.interceptors.integrity import check_references
    from fhir_server.storage import field_crypto

    # The stored tokens and the blind search index need the field key before the first read or
    # write: every worker passes here with its settings (raises when encryption is on without a key).
    field_crypto.configure(settings)
    server = Server(settings, store)
    if settings.validate_on_write:
        validation.install(server)  # structure; profiles claimed or required
    if settings.referential_integrity:
        server.on_commit.append(check_references)
    # Always, whatever the settings (after validation): an unusable SearchParameter is never stored.
    search_parameters.install(server)
    from fhir_server.conformance import watch as conformance_watch

    conformance_watch.install(server)  # registry updates after commit; terminology operations
    from fhir_server.interceptors import access

    access.install(server)  # who may store what (first of the pre_store interceptors); no-op without a caller
    return server


_SHUTDOWN_STEP_SECONDS = 10.0


async def _bounded(step: Awaitable[None], what: str) -> None:
    try:
        await asyncio.wait_for(step, _SHUTDOWN_STEP_SECONDS)
    except asyncio.TimeoutError:
        log.warning("stopping the %s took over %.0f s; going on", what, _SHUTDOWN_STEP_SECONDS)


def _install_auth(app: FastAPI, settings: Settings) -> None:
    if settings.auth_enabled or settings.auth_dev_server:
        from fhir_server.auth import install

        install(app, settings)  # /auth/* and smart-configuration only when settings.auth_dev_server
    if not settings.auth_enabled:
        log.warning(
            "!!! ACCESS CONTROL IS OFF (FHIR_AUTH_ENABLED=0): every request may read and change every record, "
            "without a token. Never run a server with real data like this. !!!"
        )
    elif not settings.auth_dev_server and not settings.auth_external_issuers:
        log.warning("auth is on but no token issuer is configured (auth_dev_server off, auth_external_issuers empty): every request will be refused")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    if not settings.mongodb_uri:
        raise RuntimeError("MONGODB_URI is not set (use `fhir-server run` to start the embedded mongod)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client: AsyncMongoClient = AsyncMongoClient(settings.mongodb_uri, tz_aware=True, maxPoolSize=200)
        store = MongoStore(client, settings.database, indexes_for=search_indexes)
        await store.open()
        install_log_redaction(("fhir_server", "uvicorn", "pymongo"))  # no ID numbers, phones, names in clear in logs
        trail = app.state.audit_trail = AuditTrail.from_settings(store, settings) if settings.audit_enabled else None
        if trail is not None:
            await trail.start()
        app.state.server = server = build_server(settings, store)
        from fhir_server.interceptors.search_parameters import SearchParameterWatch

        watch = SearchParameterWatch(store)
        await watch.start()  # custom SearchParameters are searchable from the first request
        from fhir_server.conformance.seed import seed
        from fhir_server.conformance.watch import ConformanceWatch

        conformance = ConformanceWatch(store, server.conformance)
        await conformance.start()  # canonical resources known from the first request
        if server.reindexer is not None:
            await server.reindexer.open()
        if settings.load_conformance:
            try:
                await seed(server)
            except Exception:  # the server is still useful without the shipped content
                log.exception("loading the shipped profiles and terminology failed")
        try:
            yield
        finally:
            # Each step is bounded: a change stream stuck in the driver must not hold shutdown.
            if trail is not None:
                await trail.stop()  # drains its queue (bounded itself), before the client closes
            if server.reindexer is not None:
                await _bounded(server.reindexer.close(), "re-index runner")
            await _bounded(conformance.stop(), "conformance watch")
            await _bounded(watch.stop(), "SearchParameter watch")
            await _bounded(client.close(), "MongoDB client")

    app = FastAPI(title="fhir-server-cn", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_routes(app, settings.base_path)
    _install_auth(app, settings)  # token validation (app.state.auth) and the development authorization server
    protection.install(app, settings)  # rate limit, timeout, security headers, CORS
    audit.install(app, settings)  # every FHIR request audited when settings.audit_enabled

    @app.exception_handler(FhirError)
    async def _fhir_error(request: Request, exc: FhirError) -> Response:
        return error_response(exc, request.query_params.get("_pretty") == "true")

    @app.exception_handler(Conflict)
    async def _conflict(request: Request, exc: Conflict) -> Response:
        return error_response(storage_error(exc))

    @app.exception_handler(TooLarge)
    async def _too_large(request: Request, exc: TooLarge) -> Response:
        return error_response(storage_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
        text = {404: f"No FHIR endpoint at {request.url.path[:200]}", 405: f"{request.method} is not allowed on {request.url.path[:200]}"}
        return error_response(FhirError.of(exc.status_code, code, text.get(exc.status_code, str(exc.detail))))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(FhirError.of(500, "exception", "Internal server error; the details are in the server log"))

    return app
