"""delete (http.html#delete): versioned deletion, and conditional delete (single or multiple)."""

from __future__ import annotations

from fhir_server.interactions._conditional import find_matches, too_many
from fhir_server.interactions._resource import check_id, check_type, parse_etag, stage_deletion, stored_headers
from fhir_server.interactions.context import FhirRequest, FhirResponse, Server, Tx
from fhir_server.outcome import FhirError, Issue, operation_outcome, precondition_failed


async def delete(server: Server, req: FhirRequest) -> FhirResponse:
    assert req.type
    check_type(req.type)
    return await server.transact(lambda tx: delete_in(tx, req), {req.type})


async def delete_in(tx: Tx, req: FhirRequest) -> FhirResponse:
    assert req.type
    if req.id is None:
        return await _conditional_delete(tx, req)
    check_id(req.id)
    current = await tx.unit.current(req.type, req.id)
    if_match = req.header("if-match")
    if if_match is not None:
        wanted = parse_etag(if_match)
        if current is None or current.deleted or current.version != wanted:
            raise precondition_failed(f"If-Match {if_match}: {req.type}/{req.id} is not at that version")
    if current is None or current.deleted:
        # Deleting what is not there (or is already deleted) succeeds and changes nothing.
        return _deleted_response(f"{req.type}/{req.id} was already deleted or never existed", None)
    stored = stage_deletion(tx, current)
    return _deleted_response(f"Deleted {req.type}/{req.id}", stored)


def _deleted_response(message: str, stored) -> FhirResponse:
    headers = {"ETag": f'W/"{stored.version}"'} if stored else {}
    outcome = operation_outcome([Issue("informational", message, severity="information")])
    return FhirResponse(200, resource=outcome, headers=headers, stored=stored, outcome=outcome)


async def _conditional_delete(tx: Tx, req: FhirRequest) -> FhirResponse:
    assert req.type
    criteria = [(k, v) for k, v in req.query if k not in ("_format", "_pretty")]
    if not criteria:
        raise FhirError.of(405, "not-supported", "DELETE on a type needs search criteria (conditional delete)")
    limit = tx.settings.max_conditional_delete
    found = await find_matches(tx, req.type, criteria, limit=limit + 1)
    if tx.settings.conditional_delete == "single" and len(found) > 1:
        raise too_many(req.type, "&".join(f"{k}={v}" for k, v in criteria))
    if len(found) > limit:
        raise FhirError.of(412, "too-costly", f"Conditional delete matches more than {limit} resources")
    for current in found:
        stage_deletion(tx, current)
    message = f"Deleted {len(found)} {req.type} resource(s)" if found else "No resource matched; nothing deleted"
    return _deleted_response(message, None)


__all__ = ["delete", "delete_in", "stored_headers"]
