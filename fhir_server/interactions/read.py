"""read and vread (http.html#read, #vread), with conditional read (If-None-Match, If-Modified-Since)."""

from __future__ import annotations

from email.utils import parsedate_to_datetime

from fhir_server.interactions._resource import check_id, check_type, etag, parse_etag, stored_headers
from fhir_server.interactions.context import FhirRequest, FhirResponse, Server, Tx
from fhir_server.outcome import gone, not_found
from fhir_server.storage.base import Stored


def _answer(stored: Stored | None, req: FhirRequest, what: str) -> FhirResponse:
    if stored is None:
        raise not_found(f"{what} is not known")
    headers = stored_headers(stored, req.base_url)
    if stored.deleted:
        raise gone(f"{what} has been deleted", headers=headers)
    if _not_modified(stored, req):
        return FhirResponse(304, headers=headers, stored=stored)
    return FhirResponse(200, raw=stored.raw, headers=headers, stored=stored)


def _not_modified(stored: Stored, req: FhirRequest) -> bool:
    inm = req.header("if-none-match")
    if inm:
        try:
            return any(parse_etag(tag) == stored.version for tag in inm.split(","))
        except Exception:
            return inm.strip() == "*"
    ims = req.header("if-modified-since")
    if ims:
        try:
            since = parsedate_to_datetime(ims)
        except (TypeError, ValueError):
            return False
        return stored.last_updated.replace(microsecond=0) <= since
    return False


async def read(server: Server, req: FhirRequest) -> FhirResponse:
    assert req.type and req.id
    check_type(req.type)
    check_id(req.id)
    stored = await server.store.current(req.type, req.id)
    return _answer(stored, req, f"{req.type}/{req.id}")


async def vread(server: Server, req: FhirRequest) -> FhirResponse:
    assert req.type and req.id and req.version is not None
    check_type(req.type)
    check_id(req.id)
    what = f"{req.type}/{req.id}/_history/{req.version}"
    if not req.version.isdigit():
        raise not_found(f"{what} is not known")
    stored = await server.store.version(req.type, req.id, int(req.version))
    return _answer(stored, req, what)


async def read_in(tx: Tx, req: FhirRequest) -> FhirResponse:
    """A read inside a transaction: sees the transaction's own writes."""
    assert req.type and req.id
    check_type(req.type)
    check_id(req.id)
    stored = await tx.unit.current(req.type, req.id)
    return _answer(stored, req, f"{req.type}/{req.id}")


__all__ = ["read", "vread", "read_in", "etag"]
