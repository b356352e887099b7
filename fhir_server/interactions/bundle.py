"""batch and transaction (http.html#transaction).

A transaction runs in one unit of work: it processes the DELETEs, then resolves identities
(ifNoneExist, conditional PUT), assigns ids, resolves conditional references, rewrites every
``urn:uuid:`` / fullUrl reference, then processes POST, PUT/PATCH, GET in that order. Any failure
aborts the whole unit, so nothing of a failed transaction is ever visible. A batch runs each entry
in its own unit.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qsl, urlsplit

import orjson

from fhir_server.definitions import RESOURCE_TYPES
from fhir_server.interactions import create as create_mod
from fhir_server.interactions import delete as delete_mod
from fhir_server.interactions import history as history_mod
from fhir_server.interactions import patch as patch_mod
from fhir_server.interactions import read as read_mod
from fhir_server.interactions import search as search_mod
from fhir_server.interactions import update as update_mod
from fhir_server.interactions._conditional import find_matches, parse_criteria, too_many
from fhir_server.interactions._resource import instant, new_id, prefer, stored_headers
from fhir_server.interactions.context import FhirRequest, FhirResponse, Server, Tx, storage_error
from fhir_server.interceptors import access as access_mod
from fhir_server.outcome import FhirError, Issue, bad_request, operation_outcome
from fhir_server.search.extract import REFERENCE_BYTES as _REFERENCE_BYTES
from fhir_server.storage.base import Conflict, TooLarge

_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
_STATUS_TEXT = {200: "200 OK", 201: "201 Created", 204: "204 No Content", 304: "304 Not Modified"}


@dataclass
class _Entry:
    index: int
    method: str
    url: str
    full_url: str | None
    resource: Any
    headers: dict[str, str]
    type: str | None = None
    id: str | None = None
    version: str | None = None
    query: list[tuple[str, str]] = field(default_factory=list)
    # Decided before processing: the id a POST/PUT will get, or the existing resource it matched.
    target_id: str | None = None
    matched_existing: bool = False
    _references: list[str] | None = None
    # The caller (fhir_server/interceptors/access.py): each entry is held to the bundle's caller's rights.
    access: Any = None

    def references(self) -> list[str]:
        """Every ``reference`` string inside this entry's resource (found once, then kept)."""
        if self._references is None:
            self._references = _references(self.resource) if self.resource is not None else []
        return self._references


def _entry_from(raw: Any, index: int, base_url: str) -> _Entry:
    where = f"Bundle.entry[{index}]"
    if not isinstance(raw, dict):
        raise bad_request(f"{where} must be an object", expression=[where])
    request = raw.get("request")
    if not isinstance(request, dict):
        raise bad_request(f"{where}.request is required in a batch or transaction", expression=[f"{where}.request"])
    method = request.get("method")
    url = request.get("url")
    if method not in _ORDER:
        raise bad_request(f"{where}.request.method '{method}' is not one of GET, HEAD, POST, PUT, DELETE, PATCH", expression=[f"{where}.request.method"])
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}.request.url is required", expression=[f"{where}.request.url"])
    headers = {}
    for field_, header in (("ifMatch", "if-match"), ("ifNoneMatch", "if-none-match"), ("ifModifiedSince", "if-modified-since"), ("ifNoneExist", "if-none-exist")):
        if isinstance(request.get(field_), str):
            headers[header] = request[field_]
    full_url = raw.get("fullUrl") if isinstance(raw.get("fullUrl"), str) else None
    entry = _Entry(index, method, url, full_url, raw.get("resource"), headers)
    _parse_url(entry, base_url)
    if method in ("POST", "PUT") and not isinstance(entry.resource, dict):
        raise bad_request(f"{where}.resource is required for {method}", expression=[f"{where}.resource"])
    return entry


def _parse_url(entry: _Entry, base_url: str) -> None:
    url = entry.url
    if base_url and url.startswith(base_url + "/"):
        url = url[len(base_url) + 1 :]
    elif "://" in url:
        raise bad_request(f"Bundle.entry[{entry.index}].request.url '{url[:100]}' is not on this server", expression=[f"Bundle.entry[{entry.index}].request.url"])
    parts = urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    entry.query = parse_qsl(parts.query, keep_blank_values=True)
    if segments and segments[0] in RESOURCE_TYPES:
        entry.type = segments[0]
        rest = segments[1:]
        if rest and rest[0] not in ("_history", "_search"):
            entry.id = rest[0]
            rest = rest[1:]
        if len(rest) == 2 and rest[0] == "_history":
            entry.version = rest[1]
        elif rest and rest != ["_history"] and rest != ["_search"]:
            raise bad_request(f"Bundle.entry[{entry.index}].request.url '{url[:100]}' is not understood")
    elif segments and segments[0] not in ("metadata", "_history"):
        raise FhirError.of(404, "not-supported", f"Bundle.entry[{entry.index}]: unknown resource type in '{url[:100]}'")


def _request_for(entry: _Entry, base_url: str, body: Any, headers: dict[str, str] | None = None) -> FhirRequest:
    return FhirRequest(
        method=entry.method,
        type=entry.type,
        id=entry.id,
        version=entry.version,
        query=entry.query,
        headers=headers if headers is not None else entry.headers,
        body=body,
        base_url=base_url,
        access=entry.access,
    )


def _response_entry(resp: FhirResponse, base_url: str, representation: bool, method: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    response: dict[str, Any] = {"status": _STATUS_TEXT.get(resp.status, str(resp.status))}
    if resp.stored is not None:
        s = resp.stored
        if resp.status == 201 or (s.method in ("POST", "PUT", "PATCH") and resp.status in (200, 201)):
            response["location"] = f"{s.type}/{s.id}/_history/{s.version}"
        response["etag"] = f'W/"{s.version}"'
        response["lastModified"] = instant(s.last_updated)
    elif "ETag" in resp.headers:
        response["etag"] = resp.headers["ETag"]
    # A read answers with the resource; a write only when asked (Prefer: return=representation).
    if method == "GET" or representation or resp.stored is None or resp.stored.method not in ("POST", "PUT", "PATCH"):
        if resp.raw is not None:
            out["resource"] = orjson.Fragment(resp.raw)
        elif resp.resource is not None and resp.outcome is None:
            out["resource"] = resp.resource
    if resp.outcome is not None:
        response["outcome"] = resp.outcome
    out["response"] = response
    if resp.stored is not None and "resource" in out:
        out["fullUrl"] = f"{base_url}/{resp.stored.type}/{resp.stored.id}"
        out = {"fullUrl": out.pop("fullUrl"), **out}
    return out


# -- transaction -----------------------------------------------------------------------------


_URN_IN_TEXT = re.compile(r"urn:uuid:[0-9A-Fa-f-]{36}")


def _rewrite_in_place(node: Any, mapping: dict[str, str]) -> None:
    """Replace every reference in ``mapping`` (and urn:uuid links in narrative) inside ``node``."""
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, str):
                if k == "reference":
                    if v in mapping:
                        node[k] = mapping[v]
                elif k == "div" and "urn:uuid:" in v:
                    node[k] = _URN_IN_TEXT.sub(lambda m: mapping.get(m.group(0), m.group(0)), v)
            elif isinstance(v, (dict, list)):
                _rewrite_in_place(v, mapping)
    elif isinstance(node, list):
        for v in node:
            if isinstance(v, (dict, list)):
                _rewrite_in_place(v, mapping)


def _rewritten(resource: Any, mapping: dict[str, str]) -> Any:
    """A rewritten copy: the bundle itself stays untouched so that a retried unit starts afresh.

    References are replaced on the serialised bytes (one regex pass in C) rather than by walking
    the tree; only narrative that still mentions a urn:uuid is walked."""
    if not isinstance(resource, (dict, list)) or not mapping:
        return resource

    def replace(match: re.Match[bytes]) -> bytes:
        target = mapping.get(match.group(1).decode("utf-8", "replace"))
        return b'"reference":' + orjson.dumps(target) if target is not None else match.group(0)

    raw = _REFERENCE_BYTES.sub(replace, orjson.dumps(resource))
    copy = orjson.loads(raw)
    if b"urn:uuid:" in raw and b'"div":' in raw:
        _rewrite_in_place(copy, mapping)
    return copy


def _references(resource: Any) -> list[str]:
    """Every ``reference`` string anywhere inside ``resource``."""
    return [m.group(1).decode("utf-8", "replace") for m in _REFERENCE_BYTES.finditer(orjson.dumps(resource))]


def _conditional_refs(e: _Entry, out: set[str]) -> None:
    """Conditional references (``Type?criteria``) anywhere in the entry's resource."""
    out.update(r for r in e.references() if "?" in r and not r.startswith(("http", "urn:", "#")))


def _check_placeholders(e: _Entry, mapping: dict[str, str], kind: str) -> None:
    """A urn:uuid/urn:oid reference must name another entry of the transaction; in a batch, where
    entries must not depend on each other (http.html#brules), none can be resolved. A Bundle
    stored as a resource (a document) is left alone: its references resolve within itself."""
    if not isinstance(e.resource, dict) or e.resource.get("resourceType") == "Bundle":
        return
    found = {r for r in e.references() if r.startswith(("urn:uuid:", "urn:oid:"))}
    unresolved = sorted(found - mapping.keys())
    if unresolved:
        raise bad_request(
            f"Bundle.entry[{e.index}]: reference '{unresolved[0][:100]}' is not the fullUrl of an entry "
            + ("of this transaction" if kind == "transaction" else "that can be used: batch entries must not refer to each other"),
            expression=[f"Bundle.entry[{e.index}].resource"],
        )


async def _resolve_identities(tx: Tx, entries: list[_Entry], mapping: dict[str, str]) -> None:
    seen: dict[str, int] = {}
    for e in entries:
        where = f"Bundle.entry[{e.index}]"
        if e.method == "POST" and e.type:
            condition = e.headers.get("if-none-exist")
            if condition:
                found = await find_matches(tx, e.type, parse_criteria(condition), limit=2)
                if len(found) > 1:
                    raise _in_entry(too_many(e.type, condition), e.index)
                if found:
                    e.target_id, e.matched_existing = found[0].id, True
            if e.target_id is None:
                e.target_id = new_id()
        elif e.method in ("PUT", "PATCH") and e.type and e.id is None and e.query:
            found = await find_matches(tx, e.type, e.query, limit=2)
            if len(found) > 1:
                raise _in_entry(too_many(e.type, e.url), e.index)
            body_id = e.resource.get("id") if isinstance(e.resource, dict) else None
            e.target_id = found[0].id if found else (body_id if isinstance(body_id, str) else new_id())
        elif e.method in ("PUT", "PATCH", "DELETE") and e.id:
            e.target_id = e.id
        if e.target_id and e.type and e.method != "GET":
            key = f"{e.type}/{e.target_id}"
            if key in seen:
                raise bad_request(
                    f"{where} and Bundle.entry[{seen[key]}] both change {key}; a transaction may touch a resource once",
                    expression=[where],
                )
            seen[key] = e.index
            if e.full_url:
                mapping[e.full_url] = key


async def _resolve_conditional_refs(tx: Tx, entries: list[_Entry], mapping: dict[str, str]) -> None:
    wanted: set[str] = set()
    for e in entries:
        if e.resource is not None:
            _conditional_refs(e, wanted)
    for ref in sorted(wanted):
        type_, _, criteria = ref.partition("?")
        if type_ not in RESOURCE_TYPES:
            raise bad_request(f"Conditional reference '{ref[:200]}' names an unknown resource type")
        found = await find_matches(tx, type_, parse_criteria(criteria), limit=2, lock=False)
        if not found:
            raise FhirError.of(404, "not-found", f"Conditional reference '{ref[:200]}' matches no resource")
        if len(found) > 1:
            raise FhirError.of(412, "multiple-matches", f"Conditional reference '{ref[:200]}' matches more than one resource")
        mapping[ref] = f"{type_}/{found[0].id}"


def _in_entry(error: FhirError, index: int) -> FhirError:
    where = f"Bundle.entry[{index}]"
    issues = [
        Issue(
            i.code,
            i.diagnostics if i.diagnostics.startswith(where) else f"{where}: {i.diagnostics}",
            i.severity,
            i.expression or (where,),
            i.details_zh,
        )
        for i in error.issues
    ]
    return FhirError(error.status, issues, error.headers)


async def _run_entry_in(tx: Tx, e: _Entry, base_url: str, mapping: dict[str, str]) -> FhirResponse:
    body = _rewritten(e.resource, mapping) if e.resource is not None else None
    if e.method == "POST" and e.type and not e.query and e.id is None:
        if e.matched_existing:
            existing = await tx.unit.current(e.type, e.target_id or "")
            assert existing is not None
            return FhirResponse(200, raw=existing.raw, headers=stored_headers(existing, base_url, location=True), stored=existing)
        req = _request_for(e, base_url, body, headers={})
        return await create_mod.create_in(tx, req, id_=e.target_id)
    if e.method == "PUT" and e.type:
        if e.id is None:
            if isinstance(body, dict):
                body = {**body, "id": e.target_id}
            e.id, e.query = e.target_id, []
        return await update_mod.update_in(tx, _request_for(e, base_url, body))
    if e.method == "PATCH" and e.type:
        if e.id is None and e.target_id:
            e.id, e.query = e.target_id, []
        return await patch_mod.patch_in(tx, _request_for(e, base_url, body))
    if e.method == "DELETE" and e.type:
        return await delete_mod.delete_in(tx, _request_for(e, base_url, None))
    if e.method in ("GET", "HEAD") and e.type and e.id and e.version is None:
        return await read_mod.read_in(tx, _request_for(e, base_url, None))
    if e.method in ("GET", "HEAD") and e.type and e.id is None and not e.url.split("?")[0].rstrip("/").endswith("_history"):
        return await search_mod.search_in(tx, _request_for(e, base_url, None))
    raise FhirError.of(400, "not-supported", f"Bundle.entry[{e.index}]: {e.method} {e.url[:100]} is not supported in a transaction")


async def _transaction(server: Server, entries: list[_Entry], base_url: str, representation: bool) -> dict[str, Any]:
    types = {e.type for e in entries if e.type}

    async def work(tx: Tx) -> list[FhirResponse]:
        mapping: dict[str, str] = {}
        results: list[FhirResponse | None] = [None] * len(entries)

        async def run(e: _Entry) -> None:
            try:
                resp = await _run_entry_in(tx, e, base_url, mapping)
                if e.method in ("GET", "HEAD"):  # a confined read answers only within the compartment
                    kind = access_mod.entry_interaction(e.method, e.type, e.id, e.version, e.url)
                    resp = await access_mod.check_entry_answer(server, _request_for(e, base_url, None), kind, resp)
                results[e.index] = resp
            except FhirError as err:
                raise _in_entry(err, e.index) from None

        # Deletions come first (http.html#trules), so that the conditional creates, updates and
        # references resolved next no longer see what this transaction deletes.
        for e in entries:
            if e.method == "DELETE":
                await run(e)
        await _resolve_identities(tx, entries, mapping)
        for e in entries:
            _check_placeholders(e, mapping, "transaction")
        await _resolve_conditional_refs(tx, entries, mapping)
        for e in sorted(entries, key=lambda e: _ORDER[e.method]):
            if e.method != "DELETE":
                await run(e)
        return [r for r in results if r is not None]

    # Entries are re-parsed per attempt because _run_entry_in sets ids on them.
    snapshot = [(e.id, e.query, e.target_id, e.matched_existing) for e in entries]

    async def attempt(tx: Tx) -> list[FhirResponse]:
        for e, (id_, query, target, matched) in zip(entries, snapshot):
            e.id, e.query, e.target_id, e.matched_existing = id_, query, target, matched
        return await work(tx)

    responses = await server.transact(attempt, types)
    return {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [_response_entry(r, base_url, representation, e.method) for r, e in zip(responses, entries)],
    }


# -- batch -----------------------------------------------------------------------------------


async def _batch_entry(server: Server, raw: Any, index: int, base_url: str, caller: Any = None) -> FhirResponse:
    e = _entry_from(raw, index, base_url)
    e.access = caller
    _check_placeholders(e, {}, "batch")
    req = _request_for(e, base_url, e.resource)
    handler: Callable[[Server, FhirRequest], Awaitable[FhirResponse]]
    if e.method == "POST" and e.type and e.id is None:
        if e.url.rstrip("/").endswith("_search"):
            handler = search_mod.search
        else:
            handler = create_mod.create
    elif e.method == "PUT" and e.type:
        handler = update_mod.update
    elif e.method == "PATCH" and e.type:
        handler = patch_mod.patch
    elif e.method == "DELETE" and e.type:
        handler = delete_mod.delete
    elif e.method in ("GET", "HEAD"):
        if e.version is not None:
            handler = read_mod.vread
        elif e.url.split("?")[0].rstrip("/").endswith("_history"):
            handler = history_mod.history
        elif e.id is not None:
            handler = read_mod.read
        elif e.type is not None:
            handler = search_mod.search
        else:
            from fhir_server.interactions.capabilities import capabilities

            handler = capabilities
    else:
        raise FhirError.of(400, "not-supported", f"{e.method} {e.url[:100]} is not supported in a batch")
    # The same checks as the standalone request (fhir_server/interceptors/access.py).
    kind = access_mod.entry_interaction(e.method, e.type, e.id, e.version, e.url)
    return await access_mod.guard(server, req, kind, handler)


_BATCH_CONCURRENCY = 8


async def _batch(server: Server, raw_entries: list[Any], base_url: str, representation: bool, caller: Any = None) -> dict[str, Any]:
    """Entries of a batch are independent (http.html#brules), so a few run at once."""
    gate = asyncio.Semaphore(_BATCH_CONCURRENCY)

    async def one(index: int, raw: Any) -> dict[str, Any]:
        async with gate:
            try:
                resp = await _batch_entry(server, raw, index, base_url, caller)
                return _response_entry(resp, base_url, representation, raw["request"]["method"])
            except (FhirError, Conflict, TooLarge) as exc:
                err = exc if isinstance(exc, FhirError) else storage_error(exc)
                return {"response": {"status": str(err.status), "outcome": _in_entry(err, index).outcome()}}

    out = await asyncio.gather(*(one(i, raw) for i, raw in enumerate(raw_entries)))
    return {"resourceType": "Bundle", "type": "batch-response", "entry": list(out)}


async def process(server: Server, req: FhirRequest) -> FhirResponse:
    bundle = req.body
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise bad_request("POST to the base URL takes a Bundle of type batch or transaction", code="structure")
    kind = bundle.get("type")
    if kind not in ("batch", "transaction"):
        raise bad_request(f"Bundle.type must be batch or transaction, not '{str(kind)[:40]}'", expression=["Bundle.type"])
    raw_entries = bundle.get("entry", [])
    if not isinstance(raw_entries, list):
        raise bad_request("Bundle.entry must be an array", expression=["Bundle.entry"])
    limit = server.settings.max_bundle_entries
    if len(raw_entries) > limit:
        raise FhirError.of(413, "too-costly", f"The bundle has {len(raw_entries)} entries; this server takes at most {limit}")
    representation = prefer(req.headers, "return") == "representation"
    if kind == "batch":
        return FhirResponse(200, resource=await _batch(server, raw_entries, req.base_url, representation, req.access))
    entries = [_entry_from(raw, i, req.base_url) for i, raw in enumerate(raw_entries)]
    full_urls: dict[str, int] = {}
    for e in entries:
        if e.type is None and e.method != "GET":
            raise bad_request(f"Bundle.entry[{e.index}]: {e.method} needs a resource type", expression=[f"Bundle.entry[{e.index}].request.url"])
        if e.full_url:
            # bdl-7: a fullUrl names one entry, or references to it would be ambiguous.
            if e.full_url in full_urls:
                raise bad_request(
                    f"Bundle.entry[{e.index}].fullUrl '{e.full_url[:100]}' is also Bundle.entry[{full_urls[e.full_url]}]'s; "
                    "fullUrl must be unique in a bundle",
                    expression=[f"Bundle.entry[{e.index}].fullUrl"],
                )
            full_urls[e.full_url] = e.index
    for e in entries:  # every entry as if it were its own request; what it stores is checked as stored
        e.access = req.access
        try:
            kind = access_mod.entry_interaction(e.method, e.type, e.id, e.version, e.url)
            await access_mod.authorize_entry(server, _request_for(e, req.base_url, e.resource), kind)
        except FhirError as err:
            raise _in_entry(err, e.index) from None
    return FhirResponse(200, resource=await _transaction(server, entries, req.base_url, representation))


__all__ = ["process", "operation_outcome"]
