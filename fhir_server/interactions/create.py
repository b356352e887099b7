"""create (http.html#create), with conditional create (If-None-Exist)."""

from __future__ import annotations

from fhir_server.interactions._conditional import find_matches, parse_criteria, too_many
from fhir_server.interactions._resource import (
    check_type,
    new_id,
    require_resource,
    store_resource,
    stored_headers,
    write_response,
)
from fhir_server.interactions.context import FhirRequest, FhirResponse, Server, Tx


async def create(server: Server, req: FhirRequest) -> FhirResponse:
    assert req.type
    check_type(req.type)
    require_resource(req.body, req.type)
    return await server.transact(lambda tx: create_in(tx, req), {req.type})


async def create_in(tx: Tx, req: FhirRequest, *, id_: str | None = None) -> FhirResponse:
    """Create inside ``tx``; ``id_`` lets a transaction assign the id before references are rewritten."""
    assert req.type
    resource = require_resource(req.body, req.type)
    condition = req.header("if-none-exist")
    if condition:
        criteria = parse_criteria(condition)
        found = await find_matches(tx, req.type, criteria, limit=2)
        if len(found) > 1:
            raise too_many(req.type, condition)
        if found:
            existing = found[0]
            return FhirResponse(200, raw=existing.raw, headers=stored_headers(existing, req.base_url, location=True), stored=existing)
    # The server assigns the id; a client-supplied id in a create is ignored (http.html#create).
    stored, final = await store_resource(tx, resource, id_ or new_id(), None, "POST", base_url=req.base_url)
    return write_response(201, stored, final, req.base_url)
