"""patch (http.html#patch) with JSON Patch or FHIRPath Patch, including conditional patch."""

from __future__ import annotations

import base64

import orjson

from fhir_server.interactions._conditional import find_matches, too_many
from fhir_server.interactions._resource import (
    check_id,
    check_type,
    parse_etag,
    store_resource,
    write_response,
)
from fhir_server.interactions.context import FhirRequest, FhirResponse, Server, Tx
from fhir_server.outcome import FhirError, bad_request, gone, not_found, precondition_failed
from fhir_server.patch import apply_fhirpath_patch, apply_json_patch

JSON_PATCH = "application/json-patch+json"


async def patch(server: Server, req: FhirRequest) -> FhirResponse:
    assert req.type
    check_type(req.type)
    return await server.transact(lambda tx: patch_in(tx, req), {req.type})


def _binary_json_patch(binary: dict) -> list:
    """The JSON Patch carried by a Binary, as batch and transaction entries send it (http.html#patch)."""
    try:
        return orjson.loads(base64.b64decode(binary.get("data") or "", validate=True))
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise bad_request("The Binary's data is not a base64-encoded JSON Patch", expression=["Binary.data"]) from None


def _apply(req: FhirRequest, resource: dict) -> dict:
    content_type = (req.header("content-type") or "").split(";")[0].strip().lower()
    if content_type == JSON_PATCH or isinstance(req.body, list):
        return apply_json_patch(resource, req.body)
    body = req.body
    if isinstance(body, dict) and body.get("resourceType") == "Binary" and body.get("contentType") == JSON_PATCH:
        return apply_json_patch(resource, _binary_json_patch(body))
    if isinstance(req.body, dict) and req.body.get("resourceType") == "Parameters":
        return apply_fhirpath_patch(resource, req.body)
    raise FhirError.of(
        415,
        "not-supported",
        "PATCH takes a JSON Patch (application/json-patch+json) or a FHIRPath Patch Parameters resource",
    )


async def patch_in(tx: Tx, req: FhirRequest) -> FhirResponse:
    assert req.type
    if req.id is None:
        criteria = [(k, v) for k, v in req.query if k not in ("_format", "_pretty")]
        if not criteria:
            raise FhirError.of(405, "not-supported", "PATCH on a type needs search criteria (conditional patch)")
        found = await find_matches(tx, req.type, criteria, limit=2)
        if len(found) > 1:
            raise too_many(req.type, "&".join(f"{k}={v}" for k, v in criteria))
        if not found:
            raise not_found(f"No {req.type} matches the criteria")
        current = found[0]
    else:
        check_id(req.id)
        current = await tx.unit.current(req.type, req.id)
        if current is None:
            raise not_found(f"{req.type}/{req.id} is not known")
        if current.deleted:
            raise gone(f"{req.type}/{req.id} has been deleted")
    if_match = req.header("if-match")
    if if_match is not None and parse_etag(if_match) != current.version:
        raise precondition_failed(f"If-Match {if_match}: {req.type}/{current.id} is at version {current.version}")
    assert current.raw is not None
    original = orjson.loads(current.raw)
    patched = _apply(req, original)
    if not isinstance(patched, dict) or patched.get("resourceType") != req.type or patched.get("id") != current.id:
        raise FhirError.of(422, "processing", "A patch must not change the resource's type or id")
    stored, final = await store_resource(tx, patched, current.id, current, "PATCH", base_url=req.base_url)
    return write_response(200, stored, final, req.base_url)
