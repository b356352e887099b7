"""history (http.html#history) at instance, type and system level, with _since, _at, _count and paging."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import orjson

from fhir_server.interactions._resource import check_id, check_type, instant
from fhir_server.interactions.context import FhirRequest, FhirResponse, Server
from fhir_server.outcome import bad_request, not_found
from fhir_server.search.extract import date_range


def _period_param(name: str, value: str) -> tuple[datetime, datetime]:
    bounds = date_range(value)
    if bounds is None:
        raise bad_request(f"Invalid {name} '{value[:60]}': expected a FHIR instant", expression=[name])
    return bounds


async def history(server: Server, req: FhirRequest) -> FhirResponse:
    if req.type:
        check_type(req.type)
    if req.id:
        check_id(req.id)
    settings = server.settings
    since = at = None
    count = settings.history_default_count
    cursor = None
    for k, v in req.query:
        if k == "_since":
            since = _period_param(k, v)[0]
        elif k == "_at":
            # A period: the versions current at some point during it (http.html#history).
            at = _period_param(k, v)
        elif k == "_count":
            if not v.isdigit():
                raise bad_request(f"_count must be a non-negative integer, got '{v[:20]}'", expression=["_count"])
            count = max(1, min(int(v), settings.max_count))
        elif k == "_page":
            cursor = v
        elif k in ("_format", "_pretty", "_list", "_sort"):
            continue
        else:
            raise bad_request(f"Unknown history parameter '{k[:60]}'", expression=[k])
    try:
        page = await server.store.history(req.type, req.id, since=since, at=at, count=count, cursor=cursor)
    except ValueError as e:
        raise bad_request(str(e), expression=["_page"]) from None
    if req.access is not None and (req.access.patients is not None or req.type is None):
        # The caller's rights (fhir_server/interceptors/access.py): only versions it may see; the
        # total would count the others, so it is left out.
        page.entries = [s for s in page.entries if req.access.visible(s, instance=bool(req.id))]
        page.total = None
    if req.id and not page.entries and cursor is None:
        if await server.store.current(req.type or "", req.id) is None:
            raise not_found(f"{req.type}/{req.id} is not known")
    path = "/".join(p for p in (req.type, req.id) if p)
    self_url = f"{req.base_url}/{path + '/' if path else ''}_history"
    kept = [(k, v) for k, v in req.query if k != "_page"]
    links = [{"relation": "self", "url": self_url + ("?" + urlencode(req.query) if req.query else "")}]
    if page.next_cursor:
        links.append({"relation": "next", "url": self_url + "?" + urlencode(kept + [("_page", page.next_cursor)])})
    entries: list[dict[str, Any]] = []
    for s in page.entries:
        full_url = f"{req.base_url}/{s.type}/{s.id}"
        entry: dict[str, Any] = {"fullUrl": full_url}
        if s.raw is not None:
            entry["resource"] = orjson.Fragment(s.raw)
        method = s.method if s.method in ("POST", "PUT", "DELETE", "PATCH") else "PUT"
        entry["request"] = {
            "method": method if method != "PATCH" else "PATCH",
            "url": s.type if method == "POST" else f"{s.type}/{s.id}",
        }
        entry["response"] = {
            "status": "201 Created" if method == "POST" else "204 No Content" if s.deleted else "200 OK",
            "etag": f'W/"{s.version}"',
            "lastModified": instant(s.last_updated),
        }
        entries.append(entry)
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "history"}
    if page.total is not None:
        bundle["total"] = page.total
    bundle["link"] = links
    bundle["entry"] = entries
    return FhirResponse(200, resource=bundle)
