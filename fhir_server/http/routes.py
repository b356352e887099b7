"""URL → interaction. Each route builds a FhirRequest and hands it to one interaction module."""

from __future__ import annotations

from typing import Awaitable, Callable

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from fhir_server.http.negotiation import read_body, render, response_format
from fhir_server.interactions import bundle, capabilities, create, delete, history, patch, read, search, update
from fhir_server.interactions.context import FhirRequest, FhirResponse, Server
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
    type_: str | None = None,
    id_: str | None = None,
    version: str | None = None,
    body: bool = False,
    patch_body: bool = False,
    form: bool = False,
) -> Response:
    server: Server = request.app.state.server
    response_format(request)
    query = list(request.query_params.multi_items())
    payload = None
    if form:
        content_type = (request.headers.get("content-type") or "").split(";")[0].strip()
        if content_type not in ("application/x-www-form-urlencoded", ""):
            raise FhirError.of(415, "not-supported", "POST _search takes application/x-www-form-urlencoded parameters")
        query += [(k, v) for k, v in (await request.form()).multi_items() if isinstance(v, str)]
    elif body or patch_body:
        payload = await read_body(request, server.settings.max_body_bytes, patch=patch_body)
    req = FhirRequest(
        method=request.method,
        type=type_,
        id=id_,
        version=version,
        query=query,
        headers={k.lower(): v for k, v in request.headers.items()},
        body=payload,
        base_url=_base_url(request, server),
    )
    return render(request, await handler(server, req))


router = APIRouter()


@router.get("/metadata")
async def get_metadata(request: Request) -> Response:
    return await _dispatch(request, capabilities.capabilities)


@router.post("/")
@router.post("")
async def post_bundle(request: Request) -> Response:
    return await _dispatch(request, bundle.process, body=True)


@router.get("/")
@router.get("")
async def system_search(request: Request) -> Response:
    return await _dispatch(request, search.search)


@router.get("/_history")
async def system_history(request: Request) -> Response:
    return await _dispatch(request, history.history)


@router.get("/{type_}")
async def type_search(request: Request, type_: str) -> Response:
    return await _dispatch(request, search.search, type_=type_)


@router.post("/{type_}/_search")
async def type_search_post(request: Request, type_: str) -> Response:
    return await _dispatch(request, search.search, type_=type_, form=True)


@router.post("/{type_}")
async def create_resource(request: Request, type_: str) -> Response:
    return await _dispatch(request, create.create, type_=type_, body=True)


@router.put("/{type_}")
async def conditional_update(request: Request, type_: str) -> Response:
    return await _dispatch(request, update.update, type_=type_, body=True)


@router.delete("/{type_}")
async def conditional_delete(request: Request, type_: str) -> Response:
    return await _dispatch(request, delete.delete, type_=type_)


@router.patch("/{type_}")
async def conditional_patch(request: Request, type_: str) -> Response:
    return await _dispatch(request, patch.patch, type_=type_, patch_body=True)


@router.get("/{type_}/_history")
async def type_history(request: Request, type_: str) -> Response:
    return await _dispatch(request, history.history, type_=type_)


@router.get("/{type_}/{id_}")
async def read_resource(request: Request, type_: str, id_: str) -> Response:
    return await _dispatch(request, read.read, type_=type_, id_=id_)


@router.put("/{type_}/{id_}")
async def update_resource(request: Request, type_: str, id_: str) -> Response:
    return await _dispatch(request, update.update, type_=type_, id_=id_, body=True)


@router.delete("/{type_}/{id_}")
async def delete_resource(request: Request, type_: str, id_: str) -> Response:
    return await _dispatch(request, delete.delete, type_=type_, id_=id_)


@router.patch("/{type_}/{id_}")
async def patch_resource(request: Request, type_: str, id_: str) -> Response:
    return await _dispatch(request, patch.patch, type_=type_, id_=id_, patch_body=True)


@router.get("/{type_}/{id_}/_history")
async def instance_history(request: Request, type_: str, id_: str) -> Response:
    return await _dispatch(request, history.history, type_=type_, id_=id_)


@router.get("/{type_}/{id_}/_history/{version}")
async def vread_resource(request: Request, type_: str, id_: str, version: str) -> Response:
    return await _dispatch(request, read.vread, type_=type_, id_=id_, version=version)
