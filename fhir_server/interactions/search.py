"""search (search.html): type level, system level (``_type``) and compartment searches, GET and
POST ``_search``, answered with a searchset Bundle with keyset paging links.

The query language lives in fhir_server/search; this module decides which types are searched,
pages through them, adds included resources and builds the Bundle.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence
from urllib.parse import urlencode

import orjson

from fhir_server.config import Settings
from fhir_server.definitions import RESOURCE_TYPES
from fhir_server.interactions._representation import shape_raw
from fhir_server.interactions._resource import check_id, check_type, prefer
from fhir_server.interactions.context import FhirRequest, FhirResponse, Server, Tx
from fhir_server.outcome import FhirError, Issue, bad_request, operation_outcome
from fhir_server.search import include, paging
from fhir_server.search.query import CompiledSearch, compile_search, sort_keys
from fhir_server.storage.base import Store, Stored, UnitOfWork
from fhir_server.terminology.service import TerminologyService, terminology_for

_ENVELOPE = ("_format", "_pretty")


async def search(server: Server, req: FhirRequest) -> FhirResponse:
    return await _search(server.settings, server.store, req, terminology_for(server.conformance))


async def search_in(tx: Tx, req: FhirRequest) -> FhirResponse:
    """A search inside a transaction: sees the transaction's own writes."""
    return await _search(tx.settings, tx.unit, req, terminology_for(tx.server.conformance))


async def _search(
    settings: Settings, store: Store | UnitOfWork, req: FhirRequest, terminology: TerminologyService
) -> FhirResponse:
    query = [(k, v) for k, v in req.query if k not in _ENVELOPE]
    types, query, path = await _target_types(store, req, query)
    compartment = _compartment_filter(req, types)
    lenient = prefer(req.headers, "handling") == "lenient"
    # The caller's confinement (fhir_server/interceptors/access.py): on each type searched, on the
    # steps of chains, _has and _list, and on what _include/_revinclude add.
    confine = req.access.filter if req.access is not None else None
    compiled: dict[str, CompiledSearch] = {}
    for type_ in types:
        c = await compile_search(
            type_,
            query,
            lookup=store,
            terminology=terminology,
            default_count=settings.default_count,
            max_count=settings.max_count,
            max_matches=settings.max_chain_matches,
            lenient=lenient,
            base_url=req.base_url,
            confine=confine,
        )
        if compartment is not None:
            c.filter = {"$and": [c.filter, compartment[type_]]} if c.filter else compartment[type_]
        if confine is not None and (allowed := confine(type_)) is not None:
            c.filter = {"$and": [c.filter, allowed]} if c.filter else allowed
        compiled[type_] = c
    if not compiled:
        raise bad_request("No resource type to search")
    first = next(iter(compiled.values()))
    if len(compiled) > 1:
        sort_value = next((v for k, v in query if k == "_sort"), None)
        keys = sort_keys(None, sort_value) if sort_value else [paging.SortKey("_id", 1)]
        for c in compiled.values():
            c.sort = keys
    page = _Page(settings, req, first, f"{req.base_url}/{path}")
    total_mode = first.total or settings.search_default_total
    if first.summary == "count" or first.count == 0:
        total = sum([await store.count(t, c.filter) for t, c in compiled.items()])
        return FhirResponse(200, resource=page.bundle([], [], total, None, None))
    cursor = paging.decode(first.cursor_token, len(first.sort)) if first.cursor_token else None
    if first.offset and cursor is None:
        found, has_more = await _offset_page(store, compiled, first.offset)
        before = first.offset > 0
    else:
        found, has_more, before = await _keyset_page(store, compiled, cursor)
    total: int | None = None
    if cursor is None and not first.offset and not has_more:
        total = len(found) if total_mode != "none" else None
    elif total_mode == "accurate" and (first.total == "accurate" or cursor is None):
        # Later pages repeat the count only when asked (_total=accurate): a client walking
        # 20,000 results needs it once, and it costs as much as the page itself.
        total = sum([await store.count(t, c.filter) for t, c in compiled.items()])
    included: list[Stored] = []
    if first.includes and found:
        read_confine = (lambda t: req.access.filter(t, "read")) if req.access is not None else None
        included, truncated = await include.resolve(store, found, first.includes, settings.max_include, confine=read_confine)
        if truncated:
            first.ignored.append(
                Issue(
                    "too-costly",
                    f"Only the first {settings.max_include} included resources are in this page",
                    severity="warning",
                )
            )
    next_cursor = prev_cursor = None
    if found:
        keys = first.sort
        if has_more:
            last = found[-1]
            next_cursor = paging.Cursor(True, paging.key_of(last, keys), last.type, last.id)
        if before:
            head = found[0]
            prev_cursor = paging.Cursor(False, paging.key_of(head, keys), head.type, head.id)
    return FhirResponse(200, resource=page.bundle(found, included, total, next_cursor, prev_cursor))


async def _target_types(
    store: Store | UnitOfWork, req: FhirRequest, query: list[tuple[str, str]]
) -> tuple[list[str], list[tuple[str, str]], str]:
    """The types to search, the query without ``_type``, and the path the links repeat."""
    if req.compartment is not None:
        comp_type, comp_id = req.compartment
        from fhir_server.search.compartments import compartment_members, compartment_types

        if comp_type not in compartment_types():
            raise FhirError.of(404, "not-found", f"{comp_type[:60]} is not a compartment")
        check_id(comp_id)
        members = compartment_members(comp_type)
        if req.type is not None:
            check_type(req.type)
            if req.type not in members:
                raise bad_request(f"{req.type} resources are not in the {comp_type} compartment")
            return [req.type], query, f"{comp_type}/{comp_id}/{req.type}"
        existing = await store.types()
        return sorted(t for t in members if t in existing), query, f"{comp_type}/{comp_id}/*"
    if req.type is not None:
        check_type(req.type)
        if any(k == "_type" for k, _ in query):
            raise bad_request("_type is a parameter of searches across types (at the server's base)", expression=["_type"])
        return [req.type], query, req.type
    named = [t.strip() for k, v in query if k == "_type" for t in v.split(",") if t.strip()]
    rest = [(k, v) for k, v in query if k != "_type"]
    for t in named:
        if t not in RESOURCE_TYPES:
            raise bad_request(f"Unknown resource type '{t[:60]}' in _type", expression=["_type"])
    if named:
        return sorted(set(named)), rest, ""
    return sorted(await store.types()), rest, ""


def _compartment_filter(req: FhirRequest, types: Sequence[str]) -> dict[str, dict[str, Any]] | None:
    if req.compartment is None:
        return None
    from fhir_server.search.compartments import DEF, compartment_params

    comp_type, comp_id = req.compartment
    target = f"{comp_type}/{comp_id}"
    out: dict[str, dict[str, Any]] = {}
    for t in types:
        params = compartment_params(comp_type, t)
        ors: list[dict[str, Any]] = [{"s." + p: target} for p in params if p != DEF]
        if DEF in params or t == comp_type:
            # The compartment's own resource belongs to it (R4 says {def}; for Patient only
            # through `link`, yet Patient/123/* is expected to include Patient 123 itself).
            ors.append({"_id": comp_id})
        out[t] = {"_id": {"$in": []}} if not ors else ors[0] if len(ors) == 1 else {"$or": ors}
    return out


def _mongo_sort(keys: Sequence[paging.SortKey], reverse: bool = False) -> list[tuple[str, int]]:
    sort = [(k.field, -k.direction if reverse else k.direction) for k in keys]
    if sort[-1][0] != "_id":
        sort.append(("_id", -1 if reverse else 1))
    return sort


def _with(filter_: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    if not extra:
        return filter_
    return {"$and": [filter_, extra]} if filter_ else extra


async def _keyset_page(
    store: Store | UnitOfWork, compiled: dict[str, CompiledSearch], cursor: paging.Cursor | None
) -> tuple[list[Stored], bool, bool]:
    """One page: its resources, whether more follow, and whether some come before it."""
    first = next(iter(compiled.values()))
    keys, count = first.sort, first.count
    forward = cursor is None or cursor.forward
    exact_backwards = all(k.scalar for k in keys)
    if not forward and not exact_backwards:
        return await _backwards_by_count(store, compiled, cursor)
    rows: list[Stored] = []
    for type_, c in compiled.items():
        flt = _with(c.filter, paging.keyset(keys, cursor, type_)) if cursor else c.filter
        rows += await store.find(
            type_, flt, sort=_mongo_sort(keys, reverse=not forward), limit=count + 1, index_fields=c.index_fields(type_)
        )
    if len(compiled) > 1:
        sort_keys_of = {id(r): paging.key_of(r, keys) for r in rows}
        rows.sort(
            key=functools.cmp_to_key(lambda a, b: _compare(a, b, sort_keys_of[id(a)], sort_keys_of[id(b)], keys)),
            reverse=not forward,
        )
    more = len(rows) > count
    rows = rows[:count]
    if forward:
        return rows, more, cursor is not None
    rows.reverse()
    return rows, True, more


async def _backwards_by_count(
    store: Store | UnitOfWork, compiled: dict[str, CompiledSearch], cursor: paging.Cursor
) -> tuple[list[Stored], bool, bool]:
    # MongoDB orders a descending sort by a list's largest element, not the smallest one an
    # ascending sort used, so a page before a cursor on a list-valued key is found by counting.
    (type_, c), = compiled.items()
    flt = _with(c.filter, paging.keyset(c.sort, cursor, type_))
    n = await store.count(type_, flt)
    skip = max(0, n - c.count)
    rows = await store.find(type_, flt, sort=_mongo_sort(c.sort), limit=c.count, skip=skip, index_fields=c.index_fields(type_))
    return rows, True, skip > 0


async def _offset_page(store: Store | UnitOfWork, compiled: dict[str, CompiledSearch], offset: int) -> tuple[list[Stored], bool]:
    if len(compiled) > 1:
        raise bad_request("_offset is not supported in searches across types; follow the paging links", expression=["_offset"])
    (type_, c), = compiled.items()
    rows = await store.find(
        type_, c.filter, sort=_mongo_sort(c.sort), limit=c.count + 1, skip=offset, index_fields=c.index_fields(type_)
    )
    return rows[: c.count], len(rows) > c.count


def _compare(a: Stored, b: Stored, ka: tuple[Any, ...], kb: tuple[Any, ...], keys: Sequence[paging.SortKey]) -> int:
    """The order of two resources of a search across types: sort keys, then type, then id."""
    for key, x, y in zip(keys, ka, kb):
        if x == y:
            continue
        if x is None or y is None:
            return (-1 if x is None else 1) * key.direction
        return (-1 if x < y else 1) * key.direction
    if a.type != b.type:
        return -1 if a.type < b.type else 1
    return (a.id > b.id) - (a.id < b.id)


class _Page:
    """Builds the searchset Bundle of one page."""

    def __init__(self, settings: Settings, req: FhirRequest, compiled: CompiledSearch, self_base: str) -> None:
        self._req = req
        self._compiled = compiled
        self._base = self_base.rstrip("/")
        self._used = list(compiled.used)
        types = [v for k, v in req.query if k == "_type"]
        if types:
            self._used = [("_type", ",".join(types))] + self._used

    def _url(self, extra: list[tuple[str, str]]) -> str:
        params = [(k, v) for k, v in self._used if k != "_offset"] + extra
        return self._base + ("?" + urlencode(params) if params else "")

    def bundle(
        self,
        found: list[Stored],
        included: list[Stored],
        total: int | None,
        next_cursor: paging.Cursor | None,
        prev_cursor: paging.Cursor | None,
    ) -> dict[str, Any]:
        c = self._compiled
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
        if total is not None:
            bundle["total"] = total
        current = [("_cursor", c.cursor_token)] if c.cursor_token else []
        if c.offset and not c.cursor_token:
            current = [("_offset", str(c.offset))]
        links = [{"relation": "self", "url": self._url(current)}, {"relation": "first", "url": self._url([])}]
        if prev_cursor is not None:
            links.append({"relation": "previous", "url": self._url([("_cursor", paging.encode(prev_cursor))])})
        if next_cursor is not None:
            links.append({"relation": "next", "url": self._url([("_cursor", paging.encode(next_cursor))])})
        bundle["link"] = links
        entries = [self._entry(s, "match") for s in found] + [self._entry(s, "include") for s in included]
        if c.ignored:
            entries.append({"resource": operation_outcome(c.ignored), "search": {"mode": "outcome"}})
        if entries:
            bundle["entry"] = entries
        return bundle

    def _entry(self, s: Stored, mode: str) -> dict[str, Any]:
        assert s.raw is not None
        shaped = shape_raw(s.raw, self._compiled.summary, self._compiled.elements)
        return {
            "fullUrl": f"{self._req.base_url}/{s.type}/{s.id}",
            "resource": orjson.Fragment(shaped) if isinstance(shaped, bytes) else shaped,
            "search": {"mode": mode},
        }
