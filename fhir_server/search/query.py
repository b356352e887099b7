"""Compile a FHIR search (search.html) on one resource type into a MongoDB filter and a plan.

Chained parameters and ``_has`` are resolved here, innermost first, into lists of matching
references (so MongoDB answers each step from an index); value set membership and code
hierarchies come from the terminology module. What cannot be answered is a 400 naming the
parameter, or, with ``Prefer: handling=lenient``, a warning and the parameter ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import orjson

from fhir_server import terminology
from fhir_server.definitions import RESOURCE_TYPES
from fhir_server.outcome import FhirError, Issue, bad_request
from fhir_server.search import clauses, grammar, paging
from fhir_server.search.clauses import Condition
from fhir_server.search.extract import composite_components, normalize_string
from fhir_server.search.parameters import SearchParam, params_for
from fhir_server.storage.base import Stored

# Parameters that steer the result rather than select resources.
RESULT_PARAMS = frozenset(
    {
        "_count", "_offset", "_sort", "_summary", "_elements", "_total", "_contained", "_containedType",
        "_include", "_revinclude", "_cursor",
    }
)
_NOT_SUPPORTED = frozenset({"_text", "_content", "_query", "_filter"})
_SORTABLE_SUFFIX = {"date": (".lo", ".hi"), "string": (".n", ".n"), "quantity": (".v", ".v")}
_NEVER: Condition = {"_id": {"$in": []}}
MAX_VALUE_LENGTH = 4096
MAX_CHAIN_DEPTH = 4


class Lookup(Protocol):
    """The reads a compiled search needs besides the search itself (a Store or a UnitOfWork)."""

    async def find(self, type_: str, query: dict[str, Any], limit: int, **kw: Any) -> list[Stored]: ...

    async def find_ids(self, type_: str, query: dict[str, Any], limit: int) -> list[str]: ...

    async def distinct(self, type_: str, query: dict[str, Any], field: str, limit: int) -> list[Any]: ...


@dataclass(frozen=True, slots=True)
class Include:
    """``_include`` / ``_revinclude``: from resources of ``source``, follow ``param`` (``*``: all)
    to resources of ``target`` (None: any)."""

    source: str
    param: str
    target: str | None
    iterate: bool
    reverse: bool


@dataclass
class CompiledSearch:
    filter: Condition
    sort: list[paging.SortKey]
    count: int
    cursor_token: str | None = None
    offset: int = 0
    summary: str | None = None
    elements: list[str] | None = None
    total: str | None = None
    includes: list[Include] = field(default_factory=list)
    used: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[Issue] = field(default_factory=list)

    def index_fields(self, type_: str) -> list[str]:
        """Index values a page of ``type_`` must read back: the sort keys' and what ``_include`` follows."""
        codes = {k.index_code for k in self.sort if k.index_code}
        return sorted(codes.union(include_fields(self.includes, type_)))


def include_fields(includes: list[Include], type_: str) -> set[str]:
    """The index values that forward includes follow from resources of ``type_``."""
    return {
        "_refs" if inc.param == "*" else inc.param
        for inc in includes
        if not inc.reverse and inc.source in ("*", type_)
    }


@dataclass
class _Context:
    lookup: Lookup
    base_url: str
    max_matches: int
    # The server's terminology service (registry-backed: filters, imports); None: stored resources only.
    terminology: Any = None
    # The caller's rights: the condition a resource of a type must meet to be seen (None: any).
    confine: Callable[[str], Condition | None] | None = None

    def within(self, type_: str, condition: Condition) -> Condition:
        extra = self.confine(type_) if self.confine is not None else None
        return condition if extra is None else {"$and": [condition, extra]}


async def compile_search(
    resource_type: str,
    query: list[tuple[str, str]],
    *,
    lookup: Lookup,
    default_count: int,
    max_count: int,
    max_matches: int = 100_000,
    lenient: bool = False,
    base_url: str = "",
    terminology: Any = None,
    confine: Callable[[str], Condition | None] | None = None,
) -> CompiledSearch:
    """Compile a search on ``resource_type``; unknown parameters are a 400 unless ``lenient``.

    ``confine(type)`` (the caller's rights, fhir_server/interceptors/access.py) is applied to the
    intermediate steps (chains, ``_has``, ``_list``); the caller applies it to the result type."""
    ctx = _Context(lookup, base_url, max_matches, terminology, confine)
    ands: list[Condition] = []
    result = CompiledSearch(filter={}, sort=[paging.SortKey("_id", 1)], count=default_count)
    for raw_name, value in query:
        _check_size(raw_name, value)
        name = raw_name.partition(":")[0].partition(".")[0]
        if name in RESULT_PARAMS:
            _result_param(result, resource_type, raw_name, value, max_count)
            if name != "_cursor":
                result.used.append((raw_name, value))
            continue
        try:
            clause = await _criterion(ctx, resource_type, raw_name, value, depth=0)
        except FhirError as e:
            issue = e.issues[0] if e.issues else None
            if lenient and issue is not None and issue.code == "not-supported":
                result.ignored.append(Issue("not-supported", issue.diagnostics, severity="warning", expression=issue.expression))
                continue
            raise
        ands.append(clause)
        result.used.append((raw_name, value))
    if ands:
        result.filter = ands[0] if len(ands) == 1 else {"$and": ands}
    return result


def _check_size(raw_name: str, value: str) -> None:
    if len(value) > MAX_VALUE_LENGTH or len(raw_name) > 256:
        raise FhirError.of(400, "too-long", f"Search parameter '{raw_name[:60]}' is too long")
    if "\x00" in value or "\x00" in raw_name:
        # No FHIR value holds a NUL, and MongoDB refuses one inside a regular expression.
        shown = raw_name.replace("\x00", "")[:60]
        raise bad_request(f"Search parameter '{shown}' contains a NUL character", expression=[shown])


# -- criteria -----------------------------------------------------------------------------


async def _criterion(ctx: _Context, type_: str, raw_name: str, value: str, depth: int) -> Condition:
    """One ``name[:modifier][.chain]=value`` criterion on ``type_``."""
    if raw_name.startswith("_has:"):
        return await _reverse_chain(ctx, type_, raw_name, value, depth)
    head, dot, rest = raw_name.partition(".")
    name, _, modifier = head.partition(":")
    if dot:
        return await _chain(ctx, type_, name, modifier or None, rest, value, depth)
    mod = modifier or None
    if name in _NOT_SUPPORTED:
        raise grammar.not_supported(f"Search parameter '{name}' is not supported by this server", name)
    if name == "_id":
        return _id_clause(name, mod, value)
    if name == "_lastUpdated":
        return _last_updated_clause(name, mod, value)
    if name == "_list":
        return await _list_clause(ctx, type_, mod, value)
    sp = params_for(type_).get(name)
    if sp is None:
        raise grammar.not_supported(f"Unknown search parameter '{name[:60]}' for {type_}", name)
    if mod == "missing":
        if value not in ("true", "false"):
            raise bad_request(f":missing takes true or false, got '{value[:20]}'", expression=[raw_name[:60]])
        return {"s." + sp.code: {"$exists": value == "false"}}
    values = grammar.split_or(value)
    if any(v == "" for v in values):
        raise bad_request(f"Empty value for search parameter '{raw_name[:60]}'", expression=[raw_name[:60]])
    if sp.type == "token":
        return await _token_clause(ctx, sp, name, mod, values)
    _check_modifier(sp, name, mod)
    if sp.type == "composite":
        ors = [_composite_value(ctx, type_, sp, name, v) for v in values]
    else:
        ors = [clauses.simple_value(sp, name, mod, v, "s." + sp.code, ctx.base_url) for v in values]
    return _or(ors)


def _check_modifier(sp: SearchParam, name: str, modifier: str | None) -> None:
    if modifier is None:
        return
    allowed = {
        "string": ("exact", "contains"),
        "uri": ("above", "below"),
        "reference": ("identifier",),
    }.get(sp.type, ())
    if modifier in allowed:
        return
    if sp.type == "reference" and grammar.TYPE_RE.match(modifier) and modifier in RESOURCE_TYPES:
        if not sp.targets or modifier in sp.targets:
            return
        raise bad_request(f"'{modifier}' is not a target type of parameter '{name}'", expression=[name])
    raise grammar.unsupported_modifier(name, modifier)


def _or(ors: list[Condition]) -> Condition:
    return ors[0] if len(ors) == 1 else {"$or": ors}


def _id_clause(name: str, modifier: str | None, value: str) -> Condition:
    if modifier not in (None, "not"):
        raise grammar.unsupported_modifier(name, modifier)
    ids = [grammar.unescape(v) for v in grammar.split_or(value)]
    for i in ids:
        if not grammar.ID_RE.match(i):
            raise bad_request(f"Invalid id '{i[:60]}' in _id", expression=["_id"])
    if modifier == "not":
        return {"_id": {"$nin": ids}}
    return {"_id": {"$in": ids}} if len(ids) > 1 else {"_id": ids[0]}


def _last_updated_clause(name: str, modifier: str | None, value: str) -> Condition:
    if modifier is not None:
        raise grammar.unsupported_modifier(name, modifier)
    ors = []
    for v in grammar.split_or(value):
        pfx, lo, hi = grammar.date_bounds(name, v)
        if pfx == "ne":
            ors.append({"$nor": [{"t": clauses.instant_match("eq", lo, hi)}]})
        else:
            ors.append({"t": clauses.instant_match(pfx, lo, hi)})
    return _or(ors)


async def _token_clause(ctx: _Context, sp: SearchParam, name: str, modifier: str | None, values: list[str]) -> Condition:
    path = "s." + sp.code
    if modifier is None:
        return _or([_token_match(path, name, v) for v in values])
    if modifier == "not":
        # Resources with none of the values, including those with no value at all.
        return {"$nor": [_token_match(path, name, v) for v in values]}
    if modifier == "text":
        return _or(
            [{path + ":text": {"$regex": r"(?:^|\s)" + re.escape(normalize_string(grammar.unescape(v)))}} for v in values]
        )
    if modifier == "of-type":
        ors = []
        for v in values:
            parts = grammar.split_pipe(v)
            if len(parts) != 3 or not all(parts):
                raise bad_request(f":of-type takes system|code|value, got '{v[:60]}'", expression=[name])
            ors.append({path: "|".join(parts)})
        return _or(ors)
    if modifier in ("in", "not-in"):
        members: set[tuple[str, str]] = set()
        for v in values:
            url = grammar.unescape(v)
            found = ctx.terminology.members(url) if ctx.terminology is not None else None
            if found is None:
                found = await terminology.valueset_members(ctx.lookup, url)
            if found is None:
                raise grammar.not_supported(f"The value set '{v[:100]}' is not known to this server", name)
            members.update(found)
        cond = _coded_in(path, members)
        return cond if modifier == "in" else {"$nor": [cond]}
    if modifier in ("above", "below"):
        codes: set[str] = set()
        for v in values:
            parts = grammar.split_pipe(v)
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise bad_request(f":{modifier} takes system|code, got '{v[:60]}'", expression=[name])
            related = _related(ctx, parts[0], parts[1], modifier)
            if related is None:
                related = await terminology.related_codes(ctx.lookup, parts[0], parts[1], modifier)
            if related is None:
                raise grammar.not_supported(f"The server knows no hierarchy for {parts[0][:100]}|{parts[1][:40]}", name)
            codes.update(f"{parts[0]}|{c}" for c in related)
        return {path: {"$in": sorted(codes)}}
    raise grammar.unsupported_modifier(name, modifier)


def _related(ctx: _Context, system: str, code: str, direction: str) -> set[str] | None:
    """``code`` and its descendants (below) or ancestors (above), from the terminology service."""
    cs = ctx.terminology.code_system(system) if ctx.terminology is not None else None
    if cs is None or cs.find(code) is None:
        return None
    return {code, *(cs.ancestors(code) if direction == "above" else cs.descendants(code))}


def _token_match(path: str, name: str, value: str) -> Condition:
    token = clauses.token_value(name, value)
    system, _, code = token.partition("|") if isinstance(token, str) else ("", "", "")
    if code and system.startswith("http://hl7.org/fhir/") and not system.startswith("http://hl7.org/fhir/sid/"):
        # A `code` element (Patient.gender, Observation.status) holds its code without a system:
        # the system is implied by its binding, always to an HL7 code system in R4.
        return _coded_in(path, {(system, code)})
    return {path: token}


def _coded_in(path: str, members: set[tuple[str, str]]) -> Condition:
    """Codings with one of ``members``; or a plain ``code`` element (indexed without a system,
    its system being implied by the element's binding) holding one of the codes."""
    with_system = sorted(f"{s}|{c}" for s, c in members)
    bare = sorted({c for _, c in members})
    return {
        "$or": [
            {path: {"$in": with_system}},
            {"$and": [{path: {"$in": bare}}, {path: {"$not": re.compile(r"\|")}}]},
        ]
    }


def _composite_value(ctx: _Context, type_: str, sp: SearchParam, name: str, value: str) -> Condition:
    parts = grammar.split_unescaped(value, "$")
    if len(parts) != len(sp.components):
        raise bad_request(
            f"Parameter '{name}' takes {len(sp.components)} values separated by '$', got {len(parts)}", expression=[name]
        )
    components = composite_components(sp, type_)
    if components is None:
        raise grammar.not_supported(f"A component of '{name}' is not known to this server", name)
    conds: list[Condition] = []
    for i, ((component, _), part) in enumerate(zip(components, parts)):
        conds.append(clauses.component_value(component, name, part, f"c{i}", ctx.base_url))
    return {"s." + sp.code: {"$elemMatch": conds[0] if len(conds) == 1 else {"$and": conds}}}


# -- chains, reverse chains, lists ----------------------------------------------------------


async def _chain(
    ctx: _Context, type_: str, name: str, modifier: str | None, rest: str, value: str, depth: int
) -> Condition:
    """``name[:Type].rest=value``: the references of ``name`` must point at resources matching ``rest``."""
    if depth >= MAX_CHAIN_DEPTH:
        raise bad_request(f"Chains are limited to {MAX_CHAIN_DEPTH} links", expression=[name])
    sp = params_for(type_).get(name)
    if sp is None:
        raise grammar.not_supported(f"Unknown search parameter '{name[:60]}' for {type_}", name)
    if sp.type != "reference":
        raise bad_request(f"Only reference parameters can be chained; '{name}' is a {sp.type}", expression=[name])
    if modifier is not None:
        if modifier not in RESOURCE_TYPES or (sp.targets and modifier not in sp.targets):
            raise bad_request(f"'{modifier[:60]}' is not a target type of parameter '{name}'", expression=[name])
        targets: tuple[str, ...] = (modifier,)
    else:
        targets = sp.targets
    next_name = rest.partition(":")[0].partition(".")[0]
    usable = [t for t in targets if next_name in ("_id", "_lastUpdated", "_has") or next_name in params_for(t)]
    if not usable:
        raise grammar.not_supported(f"No target of '{name}' has a search parameter '{next_name[:60]}'", f"{name}.{next_name}")
    # Several usable targets (search.html#chaining calls this ambiguous): each one is searched.
    refs: list[str] = []
    for target in usable:
        inner = await _criterion(ctx, target, rest, value, depth + 1)
        ids = await ctx.lookup.find_ids(target, ctx.within(target, inner), ctx.max_matches + 1)
        _check_matches(len(ids), ctx, f"{name}.{rest}")
        refs.extend(f"{target}/{i}" for i in ids)
    return {"s." + sp.code: {"$in": refs}} if refs else _NEVER


async def _reverse_chain(ctx: _Context, type_: str, raw_name: str, value: str, depth: int) -> Condition:
    """``_has:Type:param:criterion=value``: resources that some ``Type`` refers to through ``param``."""
    if depth >= MAX_CHAIN_DEPTH:
        raise bad_request(f"_has is limited to {MAX_CHAIN_DEPTH} levels", expression=[raw_name[:60]])
    parts = raw_name.split(":", 3)
    if len(parts) != 4 or not all(parts[1:]):
        raise bad_request("_has takes the form _has:Type:parameter:criterion=value", expression=[raw_name[:60]])
    _, source, ref_name, rest = parts
    if source not in RESOURCE_TYPES:
        raise bad_request(f"Unknown resource type '{source[:60]}' in _has", expression=[raw_name[:60]])
    sp = params_for(source).get(ref_name)
    if sp is None or sp.type != "reference":
        raise bad_request(f"'{ref_name[:60]}' is not a reference parameter of {source}", expression=[raw_name[:60]])
    if sp.targets and type_ not in sp.targets:
        raise bad_request(f"{source}.{ref_name} does not refer to {type_}", expression=[raw_name[:60]])
    inner = await _criterion(ctx, source, rest, value, depth + 1)
    refs = await ctx.lookup.distinct(source, ctx.within(source, inner), sp.code, ctx.max_matches * 4)
    prefix = type_ + "/"
    ids = sorted({r[len(prefix) :] for r in refs if isinstance(r, str) and r.startswith(prefix)})
    _check_matches(len(ids), ctx, raw_name)
    return {"_id": {"$in": ids}}


def _check_matches(n: int, ctx: _Context, name: str) -> None:
    if n > ctx.max_matches:
        raise FhirError.of(
            400,
            "too-costly",
            f"'{name[:80]}' matches more than {ctx.max_matches} resources; add criteria to narrow it",
            expression=[name[:80]],
        )


async def _list_clause(ctx: _Context, type_: str, modifier: str | None, value: str) -> Condition:
    if modifier is not None:
        raise grammar.unsupported_modifier("_list", modifier)
    ids: set[str] = set()
    for list_id in grammar.split_or(value):
        list_id = grammar.unescape(list_id)
        if not grammar.ID_RE.match(list_id):
            raise grammar.not_supported(f"_list={list_id[:60]}: only lists by id are supported", "_list")
        found = await ctx.lookup.find("List", ctx.within("List", {"_id": list_id}), limit=1)
        if not found or not found[0].raw:
            continue
        for entry in orjson.loads(found[0].raw).get("entry", ()):
            ref = (entry.get("item") or {}).get("reference", "")
            if isinstance(ref, str) and ref.startswith(type_ + "/") and not entry.get("deleted"):
                ids.add(ref[len(type_) + 1 :].split("/")[0])
    return {"_id": {"$in": sorted(ids)}}


# -- result parameters ---------------------------------------------------------------------


def _int_param(name: str, value: str, high: int) -> int:
    if not value.isdigit():
        raise bad_request(f"Parameter '{name}' must be a non-negative integer, got '{value[:40]}'", expression=[name])
    return min(int(value), high)


def sort_keys(resource_type: str | None, value: str) -> list[paging.SortKey]:
    """``_sort`` → sort keys (``resource_type`` None: a search across types, by _id/_lastUpdated only)."""
    keys: list[paging.SortKey] = []
    params = params_for(resource_type) if resource_type else {}
    for item in value.split(","):
        item = item.strip()
        desc = item.startswith("-")
        name = item[1:] if desc else item
        direction = -1 if desc else 1
        if name == "_id":
            keys.append(paging.SortKey("_id", direction))
        elif name == "_lastUpdated":
            keys.append(paging.SortKey("t", direction))
        elif name in params and params[name].type in ("date", "string", "token", "number", "quantity", "reference", "uri"):
            suffix = _SORTABLE_SUFFIX.get(params[name].type, ("", ""))[1 if desc else 0]
            keys.append(paging.SortKey("s." + name + suffix, direction))
        elif not name:
            raise bad_request("Empty _sort key", expression=["_sort"])
        elif resource_type is None:
            raise grammar.not_supported("A search across types sorts by _id or _lastUpdated only", "_sort")
        else:
            raise bad_request(f"Cannot sort {resource_type} by unknown parameter '{name[:60]}'", expression=["_sort"])
    if not any(k.field == "_id" for k in keys):
        keys.append(paging.SortKey("_id", 1))
    return keys


def parse_include(raw_name: str, value: str) -> Include:
    name, _, modifier = raw_name.partition(":")
    reverse = name == "_revinclude"
    if modifier not in ("", "iterate", "recurse"):
        raise grammar.unsupported_modifier(name, modifier)
    iterate = modifier in ("iterate", "recurse")
    if value == "*":
        if reverse:
            raise grammar.not_supported("_revinclude=* is not supported; name the source type and parameter", name)
        return Include("*", "*", None, iterate, reverse)
    parts = value.split(":")
    if len(parts) not in (2, 3) or parts[0] not in RESOURCE_TYPES:
        raise bad_request(f"{name} takes Type:parameter[:targetType], got '{value[:80]}'", expression=[name])
    source, param = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    if target is not None and target not in RESOURCE_TYPES:
        raise bad_request(f"Unknown target type '{target[:60]}' in {name}", expression=[name])
    if param == "*" and reverse:
        raise grammar.not_supported("_revinclude needs a parameter name, not '*'", name)
    if param != "*":
        sp = params_for(source).get(param)
        if sp is None or sp.type != "reference":
            raise grammar.not_supported(f"'{param[:60]}' is not a reference parameter of {source}", name)
        if target and sp.targets and target not in sp.targets:
            raise bad_request(f"{source}.{param} does not refer to {target}", expression=[name])
    return Include(source, param, target, iterate, reverse)


def _result_param(result: CompiledSearch, resource_type: str | None, raw_name: str, value: str, max_count: int) -> None:
    name = raw_name.partition(":")[0]
    if name in ("_include", "_revinclude"):
        result.includes.append(parse_include(raw_name, value))
    elif name == "_count":
        result.count = _int_param(name, value, max_count)
    elif name == "_offset":
        result.offset = _int_param(name, value, 10**9)
    elif name == "_sort":
        result.sort = sort_keys(resource_type, value)
    elif name == "_cursor":
        result.cursor_token = value
    elif name == "_summary":
        if value not in ("true", "false", "text", "data", "count"):
            raise bad_request(f"Invalid _summary '{value[:20]}'", expression=["_summary"])
        result.summary = value
    elif name == "_elements":
        result.elements = [e.strip() for e in value.split(",") if e.strip()]
    elif name == "_total":
        if value not in ("none", "estimate", "accurate"):
            raise bad_request(f"Invalid _total '{value[:20]}'", expression=["_total"])
        result.total = value
    elif name == "_contained":
        if value != "false":
            raise grammar.not_supported("Searching contained resources (_contained) is not supported", name)
    elif name == "_containedType":
        raise grammar.not_supported("_containedType is not supported", name)
