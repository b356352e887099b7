"""Content negotiation, request bodies and response rendering (http.html#mime-type, #parameters)."""

from __future__ import annotations

import json
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from fhir_server.interactions._representation import shape, shape_raw
from fhir_server.interactions._resource import prefer
from fhir_server.interactions.context import FhirResponse
from fhir_server.strict_json import reject_duplicate_keys, reject_non_finite
from fhir_server.outcome import FhirError, bad_request

FHIR_JSON = "application/fhir+json"
_JSON_TYPES = {"application/fhir+json", "application/json", "application/json+fhir", "json", "text/json"}
_XML_TYPES = {"application/fhir+xml", "application/xml", "application/xml+fhir", "xml", "text/xml", "html", "text/html"}
_PATCH_TYPES = {"application/json-patch+json"}


def response_format(request: Request) -> None:
    """Refuse (406) what cannot be answered: only JSON is produced."""
    fmt = request.query_params.get("_format")
    if fmt is not None:
        if fmt.split(";")[0].strip().lower() not in _JSON_TYPES:
            raise FhirError.of(406, "not-supported", f"_format '{fmt[:60]}' is not supported; this server speaks application/fhir+json")
        return
    accept = request.headers.get("accept")
    if not accept:
        return
    kinds = [a.split(";")[0].strip().lower() for a in accept.split(",")]
    if any(k in _JSON_TYPES or k in ("*/*", "application/*") for k in kinds):
        return
    raise FhirError.of(406, "not-supported", f"Cannot produce '{accept[:80]}'; this server speaks application/fhir+json")


async def read_body(request: Request, max_bytes: int, *, patch: bool = False) -> tuple[Any, bytes]:
    """(the parsed JSON body, its bytes): 413 when too large, 415 for a non-JSON type, 400 for
    malformed JSON."""
    content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    allowed = _JSON_TYPES | (_PATCH_TYPES if patch else set())
    if content_type and content_type not in allowed and content_type != "application/x-www-form-urlencoded":
        raise FhirError.of(415, "not-supported", f"Content-Type '{content_type[:80]}' is not supported; send application/fhir+json")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise FhirError.of(413, "too-costly", f"The request body is larger than {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise FhirError.of(413, "too-costly", f"The request body is larger than {max_bytes} bytes")
        chunks.append(chunk)
    data = b"".join(chunks)
    if not data.strip():
        raise bad_request("The request has no body", code="structure")
    return parse_json(data), data


def parse_json(data: bytes) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"The body is not valid UTF-8 (byte {e.start})", code="structure") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        # The stdlib parser is used (not orjson) because FHIR forbids duplicate properties and
        # NaN/Infinity, and only it lets us see them.
        return json.loads(text, object_pairs_hook=reject_duplicate_keys, parse_constant=reject_non_finite)
    except RecursionError:
        raise bad_request("The JSON is nested too deeply", code="structure") from None
    except ValueError as e:
        raise bad_request(f"Malformed JSON: {str(e)[:200]}", code="structure") from None


def render(request: Request, resp: FhirResponse) -> Response:
    """Serialise ``resp`` honouring _pretty, _summary, _elements and Prefer: return."""
    headers = dict(resp.headers)
    media = FHIR_JSON + "; charset=utf-8"
    if resp.status == 304:
        return Response(status_code=304, headers=headers)
    prefer_return = prefer(request.headers, "return")
    body: bytes | dict[str, Any] | None
    if request.method in ("POST", "PUT", "PATCH") and resp.stored is not None and prefer_return is not None:
        if prefer_return == "minimal":
            return Response(status_code=resp.status, headers=headers)
        if prefer_return == "OperationOutcome":
            outcome = resp.outcome or {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "information", "code": "informational", "diagnostics": f"{resp.status} {resp.stored.type}/{resp.stored.id} version {resp.stored.version}"}],
            }
            return Response(orjson.dumps(outcome), status_code=resp.status, headers=headers, media_type=media)
    params = request.query_params
    summary = params.get("_summary")
    elements_param = params.get("_elements")
    elements = [e.strip() for e in elements_param.split(",") if e.strip()] if elements_param else None
    pretty = params.get("_pretty") == "true"
    shaped_here = request.method == "GET" and (summary or elements) and resp.stored is not None
    if resp.raw is not None:
        body = shape_raw(resp.raw, summary, elements) if shaped_here else resp.raw
    elif resp.resource is not None:
        body = shape(resp.resource, summary, elements) if shaped_here else resp.resource
    else:
        return Response(status_code=resp.status, headers=headers)
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    if pretty:  # stored bytes and Fragments are emitted verbatim, so indent after re-parsing
        content = orjson.dumps(orjson.loads(content), option=orjson.OPT_INDENT_2)
    return Response(content, status_code=resp.status, headers=headers, media_type=media)


def error_response(error: FhirError, pretty: bool = False) -> Response:
    content = orjson.dumps(error.outcome(), option=orjson.OPT_INDENT_2 if pretty else 0)
    return Response(content, status_code=error.status, headers=error.headers, media_type=FHIR_JSON + "; charset=utf-8")
