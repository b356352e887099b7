"""Turn FHIR search parameters into a MongoDB filter on the extracted index values.

Every value that reaches MongoDB is a string, number or datetime that this module built: user
input never becomes an operator or a field name, so ``$where`` or ``{"$gt": ""}`` in a query
string is just text (or a 400).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from fhir_server.outcome import FhirError, Issue, bad_request
from fhir_server.search.extract import date_range, local_reference, normalize_string
from fhir_server.search.parameters import SearchParam, params_for

# Parameters that steer the result rather than select resources.
RESULT_PARAMS = frozenset(
    {"_count", "_offset", "_sort", "_summary", "_elements", "_total", "_format", "_pretty", "_contained", "_containedType"}
)
_NOT_YET = frozenset({"_include", "_revinclude", "_has", "_text", "_content", "_list", "_query", "_filter"})
_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
MAX_VALUE_LENGTH = 2048


@dataclass
class CompiledSearch:
    filter: dict[str, Any]
    sort: list[tuple[str, int]]
    count: int
    offset: int
    summary: str | None = None
    elements: list[str] | None = None
    total: str | None = None
    used: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[Issue] = field(default_factory=list)


def _split_or(value: str) -> list[str]:
    """Split on unescaped commas and unescape ``\\,`` ``\\|`` ``\\$`` ``\\\\``."""
    out, cur, i = [], [], 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            cur.append(value[i + 1])
            i += 2
            continue
        if ch == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    out.append("".join(cur))
    return out


def _split_pipe(value: str) -> list[str]:
    parts = re.split(r"(?<!\\)\|", value)
    return [p.replace("\\|", "|") for p in parts]


def _prefix(value: str) -> tuple[str, str]:
    if len(value) > 2 and value[:2] in _PREFIXES and (value[2].isdigit() or value[2] == "-"):
        return value[:2], value[2:]
    return "eq", value


def _date_bounds(name: str, raw: str) -> tuple[str, datetime, datetime]:
    prefix, text = _prefix(raw)
    bounds = date_range(text)
    if bounds is None:
        raise bad_request(f"Invalid date '{raw[:60]}' for parameter '{name}'", expression=[name])
    return prefix, bounds[0], bounds[1]


def _date_clause(prefix: str, lo: datetime, hi: datetime) -> dict[str, Any]:
    """Conditions on a stored range {lo, hi} for a search range [lo, hi] (search.html#prefix)."""
    if prefix == "eq":
        return {"lo": {"$gte": lo}, "hi": {"$lte": hi}}
    if prefix == "gt" or prefix == "sa":
        return {"lo": {"$gt": hi}} if prefix == "sa" else {"hi": {"$gt": hi}}
    if prefix == "lt" or prefix == "eb":
        return {"hi": {"$lt": lo}} if prefix == "eb" else {"lo": {"$lt": lo}}
    if prefix == "ge":
        return {"hi": {"$gte": lo}}
    if prefix == "le":
        return {"lo": {"$lte": hi}}
    if prefix == "ap":
        slack = max((hi - lo) / 10, timedelta(days=1))
        return {"lo": {"$lte": hi + slack}, "hi": {"$gte": lo - slack}}
    raise AssertionError(prefix)


def _instant_clause(prefix: str, lo: datetime, hi: datetime) -> dict[str, Any] | None:
    """Conditions on a single stored instant (``_lastUpdated``)."""
    return {
        "eq": {"$gte": lo, "$lte": hi},
        "gt": {"$gt": hi},
        "sa": {"$gt": hi},
        "lt": {"$lt": lo},
        "eb": {"$lt": lo},
        "ge": {"$gte": lo},
        "le": {"$lte": hi},
        "ap": {"$gte": lo - max((hi - lo) / 10, timedelta(days=1)), "$lte": hi + max((hi - lo) / 10, timedelta(days=1))},
    }.get(prefix)


def _number_range(name: str, text: str) -> tuple[float, float]:
    try:
        d = Decimal(text)
    except InvalidOperation:
        raise bad_request(f"Invalid number '{text[:60]}' for parameter '{name}'", expression=[name]) from None
    if not d.is_finite():
        raise bad_request(f"Invalid number '{text[:60]}' for parameter '{name}'", expression=[name])
    exp = d.as_tuple().exponent
    half = Decimal(5).scaleb(exp - 1) if isinstance(exp, int) else Decimal(0)
    return float(d - half), float(d + half)


def _number_clause(prefix: str, lo: float, hi: float, exact: float) -> dict[str, Any]:
    return {
        "eq": {"$gte": lo, "$lt": hi},
        "ne": {"$not": {"$gte": lo, "$lt": hi}},
        "gt": {"$gt": exact},
        "sa": {"$gt": exact},
        "lt": {"$lt": exact},
        "eb": {"$lt": exact},
        "ge": {"$gte": exact},
        "le": {"$lte": exact},
        "ap": {"$gte": exact - abs(exact) * 0.1, "$lte": exact + abs(exact) * 0.1},
    }[prefix]


def _token_clause(field_: str, value: str) -> dict[str, Any]:
    parts = _split_pipe(value)
    if len(parts) == 1:
        return {field_: parts[0]}
    if len(parts) != 2:
        raise bad_request(f"Invalid token '{value[:60]}'")
    system, code = parts
    if code == "":
        return {field_: {"$regex": "^" + re.escape(system) + r"\|"}}
    return {field_: f"{system}|{code}"}


def _reference_values(sp: SearchParam, value: str, type_modifier: str | None, base_url: str) -> list[str]:
    if base_url and value.startswith(base_url + "/"):
        value = value[len(base_url) + 1 :]
    if "/" in value:
        local = local_reference(value)
        return [local or value]
    if type_modifier:
        return [f"{type_modifier}/{value}"]
    if not _ID_RE.match(value):
        return [value]
    targets = sp.targets or ()
    return [f"{t}/{value}" for t in targets] or [value]


def _one_value(sp: SearchParam, name: str, modifier: str | None, value: str, base_url: str) -> dict[str, Any]:
    key = "s." + sp.code
    kind = sp.type
    if kind == "token":
        if modifier not in (None, "not"):
            raise _unsupported_modifier(name, modifier)
        return _token_clause(key, value)
    if kind == "string":
        norm = normalize_string(value)
        if modifier is None:
            return {key + ".n": {"$regex": "^" + re.escape(norm)}}
        if modifier == "exact":
            # The normalised form is what the index holds; the exact one is checked beside it.
            return {key: {"$elemMatch": {"n": norm, "x": value}}}
        if modifier == "contains":
            return {key + ".n": {"$regex": re.escape(norm)}}
        raise _unsupported_modifier(name, modifier)
    if kind == "reference":
        type_modifier = None
        if modifier:
            if modifier[:1].isupper() and modifier in (sp.targets or (modifier,)):
                type_modifier = modifier
            else:
                raise _unsupported_modifier(name, modifier)
        values = _reference_values(sp, value, type_modifier, base_url)
        return {key: {"$in": values}} if len(values) > 1 else {key: values[0]}
    if kind == "uri":
        if modifier == "below":
            return {key: {"$regex": "^" + re.escape(value)}}
        if modifier is not None:
            raise _unsupported_modifier(name, modifier)
        return {key: value}
    if kind == "date":
        if modifier is not None:
            raise _unsupported_modifier(name, modifier)
        prefix, lo, hi = _date_bounds(name, value)
        if prefix == "ne":
            return {"$nor": [{key: {"$elemMatch": _date_clause("eq", lo, hi)}}]}
        return {key: {"$elemMatch": _date_clause(prefix, lo, hi)}}
    if kind == "number":
        prefix, text = _prefix(value)
        lo, hi = _number_range(name, text)
        return {key: _number_clause(prefix, lo, hi, float(Decimal(text)))}
    if kind == "quantity":
        prefix, text = _prefix(value)
        parts = _split_pipe(text)
        lo, hi = _number_range(name, parts[0])
        match: dict[str, Any] = {"v": _number_clause(prefix, lo, hi, float(Decimal(parts[0])))}
        if len(parts) == 3:
            system, code = parts[1], parts[2]
            if system:
                match["s"] = system
            if code:
                match["$or"] = [{"c": code}, {"u": code}] if not system else [{"c": code}]
        elif len(parts) != 1:
            raise bad_request(f"Invalid quantity '{value[:60]}' for parameter '{name}'", expression=[name])
        return {key: {"$elemMatch": match}}
    raise FhirError.of(400, "not-supported", f"Search on {kind} parameter '{name}' is not supported yet", expression=[name])


def _unsupported_modifier(name: str, modifier: str) -> FhirError:
    return FhirError.of(400, "not-supported", f"Modifier ':{modifier}' is not supported on parameter '{name}'", expression=[name])


def _int_param(name: str, value: str, low: int, high: int) -> int:
    if not value.isdigit():
        raise bad_request(f"Parameter '{name}' must be a non-negative integer, got '{value[:40]}'", expression=[name])
    return max(low, min(int(value), high))


def _sort_keys(resource_type: str, value: str) -> list[tuple[str, int]]:
    keys: list[tuple[str, int]] = []
    params = params_for(resource_type)
    for item in value.split(","):
        item = item.strip()
        desc = item.startswith("-")
        name = item[1:] if desc else item
        direction = -1 if desc else 1
        if name == "_id":
            keys.append(("_id", direction))
        elif name == "_lastUpdated":
            keys.append(("t", direction))
        elif name in params and params[name].type in ("date", "string", "token", "number", "quantity", "reference", "uri"):
            sp = params[name]
            suffix = {"date": ".lo" if not desc else ".hi", "string": ".n", "number": "", "quantity": ".v"}.get(sp.type, "")
            keys.append(("s." + name + suffix, direction))
        else:
            raise bad_request(f"Cannot sort by unknown parameter '{name[:60]}'", expression=["_sort"])
    if not any(k == "_id" for k, _ in keys):
        keys.append(("_id", 1))
    return keys


def compile_search(
    resource_type: str,
    query: list[tuple[str, str]],
    *,
    default_count: int,
    max_count: int,
    lenient: bool = False,
    base_url: str = "",
) -> CompiledSearch:
    """Compile a FHIR search on ``resource_type``; unknown parameters are a 400 unless ``lenient``."""
    params = params_for(resource_type)
    ands: list[dict[str, Any]] = []
    result = CompiledSearch(filter={}, sort=[("_id", 1)], count=default_count, offset=0)
    for raw_name, value in query:
        if len(value) > MAX_VALUE_LENGTH or len(raw_name) > 256:
            raise FhirError.of(400, "too-long", f"Search parameter '{raw_name[:60]}' is too long")
        if "\x00" in value or "\x00" in raw_name:
            # No FHIR value holds a NUL, and MongoDB refuses one inside a regular expression.
            shown = raw_name.replace("\x00", "")[:60]
            raise bad_request(f"Search parameter '{shown}' contains a NUL character", expression=[shown])
        name, _, modifier = raw_name.partition(":")
        if name in RESULT_PARAMS:
            _result_param(result, resource_type, name, value, default_count, max_count)
            result.used.append((raw_name, value))
            continue
        try:
            clause = _param_clause(params, name, modifier or None, value, base_url)
        except FhirError as e:
            if lenient and e.issues and e.issues[0].code in ("not-supported",):
                result.ignored.append(
                    Issue("not-supported", e.issues[0].diagnostics, severity="warning", expression=e.issues[0].expression)
                )
                continue
            raise
        ands.append(clause)
        result.used.append((raw_name, value))
    if ands:
        result.filter = ands[0] if len(ands) == 1 else {"$and": ands}
    return result


def _param_clause(
    params: dict[str, SearchParam], name: str, modifier: str | None, value: str, base_url: str
) -> dict[str, Any]:
    if name in _NOT_YET or "." in name:
        raise FhirError.of(400, "not-supported", f"Search parameter '{name[:60]}' is not supported yet", expression=[name])
    if name == "_id":
        ids = _split_or(value)
        if modifier == "missing":
            raise _unsupported_modifier(name, modifier)
        for i in ids:
            if not _ID_RE.match(i):
                raise bad_request(f"Invalid id '{i[:60]}' in _id", expression=["_id"])
        if modifier == "not":
            return {"_id": {"$nin": ids}}
        return {"_id": {"$in": ids}} if len(ids) > 1 else {"_id": ids[0]}
    if name == "_lastUpdated":
        ors = []
        for v in _split_or(value):
            prefix, lo, hi = _date_bounds(name, v)
            clause = {"$nor": [{"t": _instant_clause("eq", lo, hi)}]} if prefix == "ne" else {"t": _instant_clause(prefix, lo, hi)}
            ors.append(clause)
        return ors[0] if len(ors) == 1 else {"$or": ors}
    sp = params.get(name)
    if sp is None:
        raise FhirError.of(
            400, "not-supported", f"Unknown search parameter '{name[:60]}' for this resource type", expression=[name]
        )
    if modifier == "missing":
        if value not in ("true", "false"):
            raise bad_request(f":missing takes true or false, got '{value[:20]}'", expression=[name])
        return {"s." + sp.code: {"$exists": value == "false"}}
    values = _split_or(value)
    if any(v == "" for v in values):
        raise bad_request(f"Empty value for search parameter '{name}'", expression=[name])
    if modifier == "not" and sp.type == "token":
        # :not matches resources that have none of the values, including those with no value at all.
        return {"$nor": [_one_value(sp, name, None, v, base_url) for v in values]}
    ors = [_one_value(sp, name, modifier, v, base_url) for v in values]
    return ors[0] if len(ors) == 1 else {"$or": ors}


def _result_param(
    result: CompiledSearch, resource_type: str, name: str, value: str, default_count: int, max_count: int
) -> None:
    if name == "_count":
        result.count = _int_param(name, value, 0, max_count)
    elif name == "_offset":
        result.offset = _int_param(name, value, 0, 10**9)
    elif name == "_sort":
        result.sort = _sort_keys(resource_type, value)
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
