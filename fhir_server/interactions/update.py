"""update (http.html#update): update-as-create with a client id, If-Match, and conditional update."""

from __future__ import annotations

from fhir_server.interactions._conditional import find_matches, too_many
from fhir_server.interactions._resource import (
    check_id,
    check_type,
    new_id,
    parse_etag,
    require_resource,
    store_resource,
    write_response,
)
from fhir_server.interactions.context import FhirRequest, FhirResponse, Server, Tx
from fhir_server.outcome import FhirError, bad_request, precondition_failed


async def update(server: Server, req: FhirRequest) -> FhirResponse:
    assert req.type
    check_type(req.type)
    require_resource(req.body, req.type)
    return await server.transact(lambda tx: update_in(tx, req), {req.type})


def _check_body_id(resource: dict, url_id: str | None) -> None:
    body_id = resource.get("id")
    if url_id is not None:
        if body_id is None:
            raise bad_request("The resource in an update must have an id matching the URL", expression=["id"])
        if body_id != url_id:
            raise bad_request(f"The resource id '{str(body_id)[:64]}' does not match the URL's id '{url_id}'", expression=["id"])


async def update_in(tx: Tx, req: FhirRequest) -> FhirResponse:
    assert req.type
    resource = require_resource(req.body, req.type)
    if req.id is None:
        return await _conditional_update(tx, req, resource)
    check_id(req.id)
    _check_body_id(resource, req.id)
    current = await tx.unit.current(req.type, req.id)
    _check_if_match(req, current.version if current and not current.deleted else None)
    stored, final = await store_resource(tx, resource, req.id, current, "PUT", base_url=req.base_url)
    created = current is None or current.deleted
    return write_response(201 if created else 200, stored, final, req.base_url)


def _check_if_match(req: FhirRequest, version: int | None) -> None:
    if_match = req.header("if-match")
    if if_match is None:
        return
    wanted = parse_etag(if_match)
    if version is None:
        raise precondition_failed(f"If-Match {if_match}: {req.type}/{req.id} does not exist")
    if wanted != version:
        raise precondition_failed(
            f"If-Match {if_match}: {req.type}/{req.id} is at version {version} (the resource was changed by someone else)"
        )


async def _conditional_update(tx: Tx, req: FhirRequest, resource: dict) -> FhirResponse:
    assert req.type
    criteria = [(k, v) for k, v in req.query if not k.startswith("_format") and k != "_pretty"]
    if not criteria:
        raise FhirError.of(405, "not-supported", "PUT on a type needs search criteria (conditional update)")
    found = await find_matches(tx, req.type, criteria, limit=2)
    if len(found) > 1:
        raise too_many(req.type, "&".join(f"{k}={v}" for k, v in criteria))
    body_id = resource.get("id")
    if found:
        current = found[0]
        if body_id is not None and body_id != current.id:
            raise bad_request(
                f"The resource id '{str(body_id)[:64]}' differs from the matching resource {req.type}/{current.id}",
                expression=["id"],
            )
        _check_if_match(req, current.version)
        stored, final = await store_resource(tx, resource, current.id, current, "PUT", base_url=req.base_url)
        return write_response(200, stored, final, req.base_url)
    if body_id is not None:
        check_id(body_id)
        existing = await tx.unit.current(req.type, body_id)
        if existing is not None and not existing.deleted:
            raise FhirError.of(409, "conflict", f"{req.type}/{body_id} exists but does not match the criteria")
        stored, final = await store_resource(tx, resource, body_id, existing, "PUT", base_url=req.base_url)
    else:
        stored, final = await store_resource(tx, resource, new_id(), None, "PUT", base_url=req.base_url)
    return write_response(201, stored, final, req.base_url)
