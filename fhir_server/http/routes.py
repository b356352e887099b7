"""URL → interaction: the path is dispatched to one interaction module, with a FhirRequest built from the HTTP request."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from fhir_server.http.negotiation import read_body, render, response_format
from fhir_server.interactions import bundle, capabilities, create, delete, history, operation, patch, read, search, update
from fhir_server.interactions.context import FhirRequest, FhirResponse, Server
from fhir_server.interceptors import access
from fhir_server.outcome import FhirError

Handler = Callable[[Server, FhirRequest], Awaitable[FhirResponse]]


def _base_url(request: Request, server: Server) -> str:
    if server.settings.public_base_url:
        return server.settings.public_base_url.rstrip("/")
    return f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}{server.settings.base_path}"


async def _dispatch(
    request: Request,
    handler: Handler,
    *,
    interaction: str,
    operation: str | None = None,
    type_: str | None = None,
    id_: str | None = None,
    version: str | None = None,
    body: bool = False,
    patch_body: bool = False,
    form: bool = False,
    compartment: tuple[str, str] | None = None,
) -> Response:
    server: Server = request.app.state.server
    # Authentication first (401 before anything about the request is looked at); /metadata is exempt.
    caller = await access.authenticate(request, server, exempt=interaction == "capabilities")
    response_format(request)
    query = list(request.query_params.multi_items())
    payload, raw = None, None
    if form:
        content_type = (request.headers.get("content-type") or "").split(";")[0].strip()
        if content_type not in ("application/x-www-form-urlencoded", ""):
            raise FhirError.of(415, "not-supported", "POST _search takes application/x-www-form-urlencoded parameters")
        query += [(k, v) for k, v in (await request.form()).multi_items() if isinstance(v, str)]
    elif body or patch_body:
        payload, raw = await read_body(request, server.settings.max_body_bytes, patch=patch_body)
    req = FhirRequest(
        method=request.method,
        type=type_,
        id=id_,
        version=version,
        query=query,
        headers={k.lower(): v for k, v in request.headers.items()},
        body=payload,
        raw_body=raw,
        base_url=_base_url(request, server),
        compartment=compartment,
        access=caller,
    )
    return render(request, await access.guard(server, req, interaction, handler, operation=operation))


_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _not_allowed(request: Request) -> FhirError:
    return FhirError.of(405, "not-supported", f"{request.method} is not allowed on {request.url.path[:200]}")


async def _route(request: Request) -> Response:
    """Dispatch on the path segments after the base (http.html#general).

    One route and a few comparisons: FastAPI's per-route matching and dependency solving cost
    more than a read from MongoDB, and every FHIR request passes through here.
    """
    request.state.principal = None  # the caller, once authenticated (fhir_server/interceptors/access.py)
    path = request.path_params.get("path", "")
    segments = [s for s in path.split("/") if s]
    method = request.method
    n = len(segments)
    if n == 0:
        if method == "GET":
            return await _dispatch(request, search.search, interaction="search")
        if method == "POST":
            return await _dispatch(request, bundle.process, interaction="bundle", body=True)
        raise _not_allowed(request)
    first = segments[0]
    if first == ".well-known":  # smart-configuration is the authorization server's (not served: 404)
        raise FhirError.of(404, "not-found", f"No FHIR endpoint at {request.url.path[:200]}")
    if segments[-1].startswith("$") and n <= 3:
        return await _operation(request, segments)
    if n == 1:
        if first == "metadata":
            if method == "GET":
                return await _dispatch(request, capabilities.capabilities, interaction="capabilities")
            raise _not_allowed(request)
        if first == "_history":
            if method == "GET":
                return await _dispatch(request, history.history, interaction="history")
            raise _not_allowed(request)
        handler, flags = _TYPE_LEVEL.get(method, (None, {}))
        if handler is None:
            raise _not_allowed(request)
        return await _dispatch(request, handler, type_=first, **flags)
    second = segments[1]
    if n == 2:
        if second == "_search":
            if method == "POST":
                return await _dispatch(request, search.search, interaction="search", type_=first, form=True)
            raise _not_allowed(request)
        if second == "_history":
            if method == "GET":
                return await _dispatch(request, history.history, interaction="history", type_=first)
            raise _not_allowed(request)
        handler, flags = _INSTANCE_LEVEL.get(method, (None, {}))
        if handler is None:
            raise _not_allowed(request)
        return await _dispatch(request, handler, type_=first, id_=second, **flags)
    if segments[2] == "_history" and n in (3, 4):
        if method != "GET":
            raise _not_allowed(request)
        if n == 3:
            return await _dispatch(request, history.history, interaction="history", type_=first, id_=second)
        return await _dispatch(request, read.vread, interaction="vread", type_=first, id_=second, version=segments[3])
    if n == 3 and (segments[2] == "*" or segments[2][:1].isupper()):
        # Compartment search: Patient/123/Observation, Patient/123/*
        if method != "GET":
            raise _not_allowed(request)
        type_ = None if segments[2] == "*" else segments[2]
        return await _dispatch(request, search.search, interaction="search", type_=type_, compartment=(first, second))
    raise FhirError.of(404, "not-found", f"No FHIR endpoint at {request.url.path[:200]}")


async def _operation(request: Request, segments: list[str]) -> Response:
    name = segments[-1][1:]
    type_ = segments[0] if len(segments) > 1 else None
    id_ = segments[1] if len(segments) > 2 else None
    has_body = request.method in ("POST", "PUT") and (request.headers.get("content-length") not in (None, "0"))

    async def handler(server: Server, req: FhirRequest) -> FhirResponse:
        return await operation.invoke(server, req, name)

    if request.method == "POST" and (request.headers.get("content-type") or "").startswith(
        "application/x-www-form-urlencoded"
    ):
        return await _dispatch(request, handler, interaction="operation", operation=name, type_=type_, id_=id_, form=True)
    return await _dispatch(request, handler, interaction="operation", operation=name, type_=type_, id_=id_, body=has_body)


_TYPE_LEVEL: dict[str, tuple[Handler, dict[str, Any]]] = {
    "GET": (search.search, {"interaction": "search"}),
    "POST": (create.create, {"interaction": "create", "body": True}),
    "PUT": (update.update, {"interaction": "update", "body": True}),  # conditional update
    "DELETE": (delete.delete, {"interaction": "delete"}),  # conditional delete
    "PATCH": (patch.patch, {"interaction": "patch", "patch_body": True}),  # conditional patch
}
_INSTANCE_LEVEL: dict[str, tuple[Handler, dict[str, Any]]] = {
    "GET": (read.read, {"interaction": "read"}),
    "PUT": (update.update, {"interaction": "update", "body": True}),
    "DELETE": (delete.delete, {"interaction": "delete"}),
    "PATCH": (patch.patch, {"interaction": "patch", "patch_body": True}),
}


def install_routes(app: Starlette, base_path: str) -> None:
    """Serve FHIR under ``base_path`` (with and without a trailing slash)."""
    app.add_route(base_path, _route, methods=_ALL_METHODS)
    app.add_route(base_path + "/{path:path}", _route, methods=_ALL_METHODS)
