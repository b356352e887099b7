"""One search value → a MongoDB condition on the stored index values of one parameter.

The stored formats are those of :mod:`fhir_server.search.extract`. Every value that reaches
MongoDB is a string, number or datetime built here: user input never becomes an operator or a
field name, so ``$where`` or ``{"$gt": ""}`` in a query string is just text to compare.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from fhir_server.outcome import bad_request
from fhir_server.search import grammar, parameters
from fhir_server.search.extract import local_reference, normalize_string
from fhir_server.search.parameters import SearchParam
from fhir_server.storage import field_crypto

Condition = dict[str, Any]


def date_match(prefix: str, lo: datetime, hi: datetime) -> Condition:
    """Conditions on one stored range {lo, hi} for a search range [lo, hi] (search.html#prefix)."""
    if prefix == "eq":
        # lo <= hi for every stored range, so "lo <= hi" bounds the index scan on lo from both sides.
        return {"lo": {"$gte": lo, "$lte": hi}, "hi": {"$lte": hi}}
    if prefix == "gt":
        return {"hi": {"$gt": hi}}
    if prefix == "sa":
        return {"lo": {"$gt": hi}}
    if prefix == "lt":
        return {"lo": {"$lt": lo}}
    if prefix == "eb":
        return {"hi": {"$lt": lo}}
    if prefix == "ge":
        return {"hi": {"$gte": lo}}
    if prefix == "le":
        return {"lo": {"$lte": hi}}
    if prefix == "ap":
        slack = _approximately(lo, hi)
        return {"lo": {"$lte": hi + slack}, "hi": {"$gte": lo - slack}}
    raise AssertionError(prefix)


def _approximately(lo: datetime, hi: datetime) -> timedelta:
    # "ap": the spec leaves the margin to the server; 10% of the distance from now, at least a day.
    now = datetime.now(lo.tzinfo)
    return max(abs(now - lo) / 10, timedelta(days=1))


def instant_match(prefix: str, lo: datetime, hi: datetime) -> Condition:
    """Conditions on one stored instant (``_lastUpdated``)."""
    if prefix == "ap":
        slack = _approximately(lo, hi)
        return {"$gte": lo - slack, "$lte": hi + slack}
    return {
        "eq": {"$gte": lo, "$lte": hi},
        "gt": {"$gt": hi},
        "sa": {"$gt": hi},
        "lt": {"$lt": lo},
        "eb": {"$lt": lo},
        "ge": {"$gte": lo},
        "le": {"$lte": hi},
    }[prefix]


def number_match(prefix: str, name: str, text: str) -> Condition:
    d = grammar.number(name, text)
    lo, hi = grammar.number_range(d)
    exact = float(d)
    if prefix == "eq":
        return {"$gte": lo, "$lt": hi}
    if prefix == "ne":
        return {"$not": {"$gte": lo, "$lt": hi}}
    if prefix in ("gt", "sa"):
        return {"$gt": exact}
    if prefix in ("lt", "eb"):
        return {"$lt": exact}
    if prefix == "ge":
        return {"$gte": exact}
    if prefix == "le":
        return {"$lte": exact}
    margin = abs(exact) * 0.1
    return {"$gte": exact - margin, "$lte": exact + margin}  # ap


def quantity_match(name: str, value: str) -> Condition:
    """Conditions on one stored quantity {v, s, c, u}: ``[prefix]number|system|code``."""
    pfx, text = grammar.prefix(value)
    parts = grammar.split_pipe(text)
    if len(parts) not in (1, 3):
        raise bad_request(f"Invalid quantity '{value[:60]}' for parameter '{name}'", expression=[name])
    cond: Condition = {"v": number_match(pfx, name, parts[0])}
    if len(parts) == 3:
        system, code = parts[1], parts[2]
        if system:
            cond["s"] = system
            if code:
                cond["c"] = code
        elif code:
            cond["$or"] = [{"c": code}, {"u": code}]
    return cond


# Token parameters that may hold ID-document or phone numbers, indexed by their blind form when
# protected (fhir_server/storage/field_crypto.py): those whose expression reads an identifier or a
# telecom (identifier, phone, telecom, custom ones such as an `id-card`), and any so named.
_PROTECTABLE = re.compile(r"identifier|telecom|phone|contactpoint", re.IGNORECASE)


@lru_cache(maxsize=1)
def _protectable_codes() -> frozenset[str]:
    codes = set()
    for table in parameters._by_base().values():
        for code, sp in table.items():
            if sp.type == "token" and sp.expression and _PROTECTABLE.search(sp.expression):
                codes.add(code)
    for sp in parameters.custom_parameters():
        if sp.type == "token" and sp.expression and _PROTECTABLE.search(sp.expression):
            codes.add(sp.code)
    return frozenset(codes)


parameters.on_change(_protectable_codes.cache_clear)


def protectable(name: str) -> bool:
    return name in _protectable_codes() or _PROTECTABLE.search(name) is not None


def token_value(name: str, value: str, *, protected: bool | None = None) -> Any:
    """The stored token string (or a prefix condition) a token search value matches.

    For a parameter that may hold protected values (``protected``, by default judged from the
    name), the value's blind index form matches too: ``{"$in": [plain, blind]}``."""
    parts = grammar.split_pipe(value)
    crypto = field_crypto.active()
    if crypto is not None and not (protectable(name) if protected is None else protected):
        crypto = None
    if len(parts) == 1:
        if crypto is not None:
            return {"$in": [parts[0], crypto.blind(parts[0])]}
        return parts[0]
    if len(parts) != 2:
        raise bad_request(f"Invalid token '{value[:60]}' for parameter '{name}' (expected [system|]code)", expression=[name])
    system, code = parts
    if code == "":
        if system == "":
            raise bad_request(f"Invalid token '|' for parameter '{name}'", expression=[name])
        return {"$regex": "^" + re.escape(system) + r"\|"}
    if crypto is not None:
        return {"$in": [f"{system}|{code}", f"{system}|{crypto.blind(code)}"]}
    return f"{system}|{code}"


def of_type_value(name: str, type_system: str, type_code: str, value: str) -> Any:
    """The stored ``:of-type`` string(s) (``system|code|value``) matching an identifier's value."""
    plain = f"{type_system}|{type_code}|{value}"
    crypto = field_crypto.active()
    if crypto is None:
        return plain
    return {"$in": [plain, f"{type_system}|{type_code}|{crypto.blind(value)}"]}


def string_match(modifier: str | None, value: str) -> Condition:
    """Conditions on one stored string {n, x} (``n`` normalised; ``x`` the exact text)."""
    text = grammar.unescape(value)
    norm = normalize_string(text)
    if modifier is None:
        return {"n": {"$regex": "^" + re.escape(norm)}}
    if modifier == "exact":
        return {"n": norm, "x": text}
    return {"n": {"$regex": re.escape(norm)}}  # contains


def reference_values(sp: SearchParam, value: str, type_modifier: str | None, base_url: str) -> list[str]:
    """The stored reference strings a reference search value matches."""
    value = grammar.unescape(value)
    if base_url and value.startswith(base_url + "/"):
        value = value[len(base_url) + 1 :]
    if "/" in value:
        local = local_reference(value)
        if local and type_modifier and not local.startswith(type_modifier + "/"):
            return []
        return [local or value]
    if type_modifier:
        return [f"{type_modifier}/{value}"]
    if not grammar.ID_RE.match(value):
        return [value]
    return [f"{t}/{value}" for t in sp.targets] or [value]


def scalar(path: str, cond: Any) -> Condition:
    return {path: cond}


def element(path: str, cond: Condition) -> Condition:
    """A condition that one stored element (a dict) must meet as a whole."""
    if len(cond) == 1 and not next(iter(cond)).startswith("$"):
        key, inner = next(iter(cond.items()))
        return {f"{path}.{key}": inner}
    return {path: {"$elemMatch": cond}}


def simple_value(sp: SearchParam, name: str, modifier: str | None, value: str, path: str, base_url: str) -> Condition:
    """The condition for one (OR-alternative) value of a non-composite parameter at ``path``."""
    kind = sp.type
    if kind == "token":
        return scalar(path, token_value(name, value))
    if kind == "string":
        return element(path, string_match(modifier, value))
    if kind == "reference":
        if modifier == "identifier":
            # Logical references are indexed as "?system|value" and "?value" (a protected value by
            # its blind form).
            token = token_value(name, value, protected=True)
            if isinstance(token, dict) and "$in" in token:
                return scalar(path, {"$in": ["?" + t for t in token["$in"]]})
            if isinstance(token, dict):
                return scalar(path, {"$regex": r"^\?" + token["$regex"][1:]})
            return scalar(path, "?" + token)
        values = reference_values(sp, value, modifier, base_url)
        if not values:
            return {"_id": {"$in": []}}
        return scalar(path, {"$in": values} if len(values) > 1 else values[0])
    if kind == "uri":
        text = grammar.unescape(value)
        if modifier == "below":
            return scalar(path, {"$regex": "^" + re.escape(text)})
        if modifier == "above":
            return scalar(path, {"$in": _uri_ancestors(text)})
        return scalar(path, text)
    if kind == "date":
        pfx, lo, hi = grammar.date_bounds(name, value)
        if pfx == "ne":
            return {"$nor": [{path: {"$elemMatch": date_match("eq", lo, hi)}}]}
        return {path: {"$elemMatch": date_match(pfx, lo, hi)}}
    if kind == "number":
        pfx, text = grammar.prefix(value)
        return scalar(path, number_match(pfx, name, text))
    if kind == "quantity":
        return {path: {"$elemMatch": quantity_match(name, value)}}
    raise grammar.not_supported(f"Search on {kind} parameter '{name}' is not supported", name)


def _uri_ancestors(uri: str) -> list[str]:
    """``uri`` and every path prefix of it (for ``:above``)."""
    out = [uri]
    head = uri
    while "/" in head.rstrip("/"):
        head = head.rstrip("/").rsplit("/", 1)[0]
        if head.endswith(":") or head.endswith(":/"):
            break
        out.append(head)
    return out


def component_value(sp: SearchParam, name: str, value: str, slot: str, base_url: str) -> Condition:
    """The condition on component ``slot`` (``c0``, ``c1``, ...) of one stored composite entry."""
    kind = sp.type
    if kind in ("date", "quantity", "string"):
        if kind == "date":
            pfx, lo, hi = grammar.date_bounds(name, value)
            if pfx == "ne":
                raise grammar.not_supported("The 'ne' prefix is not supported inside a composite", name)
            cond = date_match(pfx, lo, hi)
        elif kind == "quantity":
            cond = quantity_match(name, value)
        else:
            cond = string_match(None, value)
        return {slot: {"$elemMatch": cond}}
    return simple_value(sp, name, None, value, slot, base_url)
