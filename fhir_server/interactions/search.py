"""search (search.html) at type level, GET and POST _search: a searchset Bundle with paging links.

Issue #3 grows this to the full grammar (chains, _has, _include, composite, system and compartment
search); what is not supported yet is refused with a 400, never silently ignored.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import orjson

from fhir_server.config import Settings
from fhir_server.interactions._representation import shape_raw
from fhir_server.interactions._resource import check_type, prefer
from fhir_server.interactions.context import FhirRequest, FhirResponse, Server, Tx
from fhir_server.outcome import FhirError, operation_outcome
from fhir_server.search.query import compile_search
from fhir_server.storage.base import Store, UnitOfWork


async def search(server: Server, req: FhirRequest) -> FhirResponse:
    return await _search(server.settings, server.store, req)


async def search_in(tx: Tx, req: FhirRequest) -> FhirResponse:
    """A search inside a transaction: sees the transaction's own writes."""
    return await _search(tx.settings, tx.unit, req)


async def _search(settings: Settings, store: Store | UnitOfWork, req: FhirRequest) -> FhirResponse:
    if req.type is None:
        types = [v for k, v in req.query if k == "_type"]
        if len(types) == 1 and "," not in types[0]:
            req.type = types[0]
            req.query = [(k, v) for k, v in req.query if k != "_type"]
        else:
            raise FhirError.of(400, "not-supported", "System-level search needs exactly one _type (more is not supported yet)")
    check_type(req.type)
    compiled = compile_search(
        req.type,
        [(k, v) for k, v in req.query if k not in ("_format", "_pretty")],
        default_count=settings.default_count,
        max_count=settings.max_count,
        lenient=prefer(req.headers, "handling") == "lenient",
        base_url=req.base_url,
    )
    self_url = f"{req.base_url}/{req.type}"
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if compiled.summary == "count":
        bundle["total"] = await store.count(req.type, compiled.filter)
        bundle["link"] = [{"relation": "self", "url": _url(self_url, compiled.used)}]
        return FhirResponse(200, resource=bundle)
    found = await store.find(
        req.type, compiled.filter, sort=compiled.sort, limit=compiled.count + 1, skip=compiled.offset
    )
    has_next = len(found) > compiled.count
    found = found[: compiled.count]
    if compiled.total != "none":
        if compiled.offset == 0 and not has_next:
            bundle["total"] = len(found)
        else:
            bundle["total"] = await store.count(req.type, compiled.filter)
    base_params = [(k, v) for k, v in compiled.used if k != "_offset"]
    links = [{"relation": "self", "url": _url(self_url, compiled.used)}]
    links.append({"relation": "first", "url": _url(self_url, base_params)})
    if compiled.offset > 0:
        prev = max(0, compiled.offset - compiled.count)
        links.append({"relation": "previous", "url": _url(self_url, base_params + [("_offset", str(prev))])})
    if has_next:
        links.append(
            {"relation": "next", "url": _url(self_url, base_params + [("_offset", str(compiled.offset + compiled.count))])}
        )
    bundle["link"] = links
    entries: list[dict[str, Any]] = []
    for s in found:
        assert s.raw is not None
        shaped = shape_raw(s.raw, compiled.summary, compiled.elements)
        entries.append(
            {
                "fullUrl": f"{req.base_url}/{s.type}/{s.id}",
                "resource": orjson.Fragment(shaped) if isinstance(shaped, bytes) else shaped,
                "search": {"mode": "match"},
            }
        )
    if compiled.ignored:
        entries.append({"resource": operation_outcome(compiled.ignored), "search": {"mode": "outcome"}})
    if entries:
        bundle["entry"] = entries
    return FhirResponse(200, resource=bundle)


def _url(base: str, params: list[tuple[str, str]]) -> str:
    return base + ("?" + urlencode(params) if params else "")
