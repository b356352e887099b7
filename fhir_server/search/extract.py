"""Index values extracted from a resource on write, so that MongoDB indexes answer searches.

Search parameter expressions are FHIRPath. Almost all R4 expressions are simple paths with a few
idioms (``as Type``, ``where(resolve() is Type)``, ``where(system='phone')``, ``[0]``); those are
compiled into small closures that walk the JSON directly, which is many times faster than a
generic FHIRPath evaluation per resource per parameter. Anything else falls back to fhirpathpy.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any, Callable

import orjson

from fhir_server.search.parameters import SPECIAL, params_for

Extractor = Callable[[dict[str, Any]], list[Any]]

# Dates without a timezone are taken in China Standard Time, the zone of every data source here.
LOCAL_TZ = timezone(timedelta(hours=8))
_MIN = datetime(1, 1, 1, tzinfo=timezone.utc)
_MAX = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=timezone.utc)


# -- compiling expressions ------------------------------------------------------------------


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, start, quote = [], 0, 0, False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "'":
            quote = not quote
        elif not quote:
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            elif depth == 0 and text.startswith(sep, i):
                parts.append(text[start:i])
                start = i + len(sep)
                i += len(sep)
                continue
        i += 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _strip_parens(text: str) -> str:
    """Remove parentheses that enclose the whole text."""
    while text.startswith("(") and text.endswith(")"):
        depth = 0
        for i, ch in enumerate(text):
            depth += (ch == "(") - (ch == ")")
            if depth == 0 and i < len(text) - 1:
                return text
        text = text[1:-1].strip()
    return text


_WHERE_RESOLVE = re.compile(r"^where\(resolve\(\) is ([A-Za-z]+)\)$")
_WHERE_EQ = re.compile(r"^where\(([a-zA-Z]+) ?= ?'([^']*)'\)$")
_AS = re.compile(r"^(?:as|ofType)\(([A-Za-z]+)\)$")
_INDEXED = re.compile(r"^([a-zA-Z]+)\[(\d+)\]$")
_NAME = re.compile(r"^[a-zA-Z][A-Za-z0-9]*$")


class _Unsupported(Exception):
    pass


@lru_cache(maxsize=1)
def _choice_names() -> frozenset[str]:
    """Base names of every choice element (``value`` of ``value[x]``), from the R4 definitions."""
    from fhir_server.definitions import load_model

    names = set()
    for type_def in load_model()["types"].values():
        for row in type_def.get("elements", ()):
            last = row["p"].rsplit(".", 1)[-1]
            if last.endswith("[x]"):
                names.add(last[:-3])
    return frozenset(names)


def _children(nodes: list[Any], name: str) -> list[Any]:
    out: list[Any] = []
    choice = name in _choice_names()
    for node in nodes:
        if not isinstance(node, dict):
            continue
        value = node.get(name)
        if value is None:
            if not choice:
                continue
            # A choice element: `value` finds valueQuantity, valueString, ...
            for key, v in node.items():
                if key.startswith(name) and len(key) > len(name) and key[len(name)].isupper():
                    value = v
                    break
            if value is None:
                continue
        if isinstance(value, list):
            out.extend(value)
        else:
            out.append(value)
    return out


def _compile_steps(steps: list[str]) -> Extractor:
    ops: list[Callable[[list[Any]], list[Any]]] = []
    i = 0
    while i < len(steps):
        step = steps[i]
        nxt = steps[i + 1] if i + 1 < len(steps) else ""
        m_as = _AS.match(nxt)
        if _NAME.match(step) and m_as:
            key = step + m_as.group(1)[0].upper() + m_as.group(1)[1:]
            ops.append(lambda nodes, k=key: _exact_children(nodes, k))
            i += 2
            continue
        if _NAME.match(step):
            ops.append(lambda nodes, n=step: _children(nodes, n))
        elif (m := _INDEXED.match(step)) is not None:
            name, idx = m.group(1), int(m.group(2))
            ops.append(lambda nodes, n=name, k=idx: _children(nodes, n)[k : k + 1])
        elif (m := _WHERE_RESOLVE.match(step)) is not None:
            prefix = m.group(1) + "/"
            ops.append(lambda nodes, p=prefix: [n for n in nodes if _ref_has_type(n, p)])
        elif (m := _WHERE_EQ.match(step)) is not None:
            field, value = m.group(1), m.group(2)
            ops.append(lambda nodes, f=field, v=value: [n for n in nodes if isinstance(n, dict) and n.get(f) == v])
        else:
            raise _Unsupported(step)
        i += 1

    def run(resource: dict[str, Any]) -> list[Any]:
        nodes: list[Any] = [resource]
        for op in ops:
            nodes = op(nodes)
            if not nodes:
                return nodes
        return nodes

    return run


def _exact_children(nodes: list[Any], key: str) -> list[Any]:
    out: list[Any] = []
    for node in nodes:
        if isinstance(node, dict) and key in node:
            v = node[key]
            out.extend(v) if isinstance(v, list) else out.append(v)
    return out


def _ref_has_type(node: Any, prefix: str) -> bool:
    if not isinstance(node, dict):
        return False
    ref = node.get("reference")
    if not isinstance(ref, str):
        return node.get("type") == prefix[:-1]
    return ref.startswith(prefix) or ("/" + prefix) in ref


def _compile_part(part: str, resource_type: str) -> Extractor | None:
    """Compile one ``|`` alternative, or None when it is rooted at another type."""
    part = _strip_parens(part)
    cast = None
    pieces = _split_top(part, " as ")
    if len(pieces) == 2:
        part, cast = _strip_parens(pieces[0]), pieces[1]
    steps = _split_top(part, ".")
    root = steps[0]
    if root not in (resource_type, "Resource", "DomainResource"):
        return None
    steps = steps[1:]
    if cast:
        steps.append(f"as({cast})")
    if not steps:
        return lambda r: [r]
    return _compile_steps(steps)


def _fhirpath_fallback(expression: str) -> Extractor:
    import fhirpathpy  # imported lazily: the compiled path covers nearly every R4 expression

    compiled = fhirpathpy.compile(expression)

    def run(resource: dict[str, Any]) -> list[Any]:
        try:
            return list(compiled(resource))
        except Exception:  # a FHIRPath evaluation error means "no value", not a failed write
            return []

    return run


def compile_expression(expression: str, resource_type: str) -> Extractor:
    parts = []
    try:
        for part in _split_top(expression, "|"):
            fn = _compile_part(part, resource_type)
            if fn is not None:
                parts.append(fn)
    except _Unsupported:
        return _fhirpath_fallback(expression)
    if len(parts) == 1:
        return parts[0]

    def union(resource: dict[str, Any]) -> list[Any]:
        out: list[Any] = []
        for fn in parts:
            out.extend(fn(resource))
        return out

    return union


# -- encoding values per search parameter type ------------------------------------------------


def normalize_string(text: str) -> str:
    """Case- and accent-insensitive form used by string search."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def _token_values(node: Any, out: list[str]) -> None:
    if isinstance(node, str):
        out.append(node)
    elif isinstance(node, bool):
        out.append("true" if node else "false")
    elif isinstance(node, (int, float)):
        out.append(str(node))
    elif isinstance(node, dict):
        codings = node.get("coding")
        if isinstance(codings, list):
            for c in codings:
                _token_values(c, out)
            return
        code = node.get("code")
        if code is None:
            code = node.get("value")  # Identifier, ContactPoint
        if isinstance(code, str):
            system = node.get("system")
            out.append(f"{system}|{code}" if isinstance(system, str) else f"|{code}")
            out.append(code)


_STRING_FIELDS = ("text", "family", "given", "prefix", "suffix", "line", "city", "district", "state", "postalCode", "country")


def _string_values(node: Any, out: list[str]) -> None:
    if isinstance(node, str):
        out.append(node)
    elif isinstance(node, dict):
        for key in _STRING_FIELDS:
            v = node.get(key)
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, list):
                out.extend(x for x in v if isinstance(x, str))


def _reference_values(node: Any, out: list[str]) -> None:
    if isinstance(node, str):  # canonical / uri references
        out.append(node)
        return
    if not isinstance(node, dict):
        return
    ref = node.get("reference")
    if isinstance(ref, str):
        local = local_reference(ref)
        out.append(local or ref)


_LOCAL_REF = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")


def local_reference(ref: str) -> str | None:
    """``Type/id`` for a relative (or absolute) RESTful reference; None for others."""
    if ref.startswith(("#", "urn:")):
        return None
    m = _LOCAL_REF.search(ref)
    if not m or ("://" not in ref and m.start() != 0):
        return None
    return f"{m.group(1)}/{m.group(2)}"


_DATE_RE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


@lru_cache(maxsize=8192)
def date_range(text: str) -> tuple[datetime, datetime] | None:
    """The instant range [low, high] (inclusive, millisecond) that a FHIR date/dateTime/instant covers."""
    m = _DATE_RE.match(text)
    if not m:
        return None
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    zone = LOCAL_TZ
    if tz:
        zone = timezone.utc if tz == "Z" else timezone(
            (1 if tz[0] == "+" else -1) * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
        )
    try:
        if hh is not None:
            second = int(ss or 0)
            micro = int(round(float(frac) * 1_000_000)) if frac else 0
            low = datetime(int(y), int(mo), int(d), int(hh), int(mi), second, min(micro, 999999), tzinfo=zone)
            step = timedelta(minutes=1) if ss is None else timedelta(seconds=1) if not frac else timedelta(milliseconds=1)
        elif d is not None:
            low = datetime(int(y), int(mo), int(d), tzinfo=zone)
            step = timedelta(days=1)
        elif mo is not None:
            low = datetime(int(y), int(mo), 1, tzinfo=zone)
            nxt = datetime(int(y) + (int(mo) == 12), int(mo) % 12 + 1, 1, tzinfo=zone)
            step = nxt - low
        else:
            low = datetime(int(y), 1, 1, tzinfo=zone)
            step = datetime(int(y) + 1, 1, 1, tzinfo=zone) - low
    except (ValueError, OverflowError):
        return None
    high = low + step - timedelta(milliseconds=1)
    return low.astimezone(timezone.utc), high.astimezone(timezone.utc)


def _date_values(node: Any, out: list[dict[str, datetime]]) -> None:
    if isinstance(node, str):
        r = date_range(node)
        if r:
            out.append({"lo": r[0], "hi": r[1]})
    elif isinstance(node, dict):
        if "start" in node or "end" in node:  # Period
            start = date_range(node["start"]) if isinstance(node.get("start"), str) else None
            end = date_range(node["end"]) if isinstance(node.get("end"), str) else None
            out.append({"lo": start[0] if start else _MIN, "hi": end[1] if end else _MAX})
        elif isinstance(node.get("event"), list):  # Timing
            for e in node["event"]:
                _date_values(e, out)


def _number_values(node: Any, out: list[Any]) -> None:
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        out.append(float(node))
    elif isinstance(node, dict) and isinstance(node.get("value"), (int, float)):
        out.append(float(node["value"]))


def _quantity_values(node: Any, out: list[Any]) -> None:
    if isinstance(node, dict) and isinstance(node.get("value"), (int, float)) and not isinstance(node.get("value"), bool):
        item: dict[str, Any] = {"v": float(node["value"])}
        for src, dst in (("system", "s"), ("code", "c"), ("unit", "u")):
            if isinstance(node.get(src), str):
                item[dst] = node[src]
        out.append(item)


def _uri_values(node: Any, out: list[str]) -> None:
    if isinstance(node, str):
        out.append(node)


_ENCODERS: dict[str, Callable[[Any, list[Any]], None]] = {
    "token": _token_values,
    "string": _string_values,
    "reference": _reference_values,
    "date": _date_values,
    "number": _number_values,
    "quantity": _quantity_values,
    "uri": _uri_values,
}


@lru_cache(maxsize=None)
def _plan(resource_type: str) -> tuple[tuple[str, str, Extractor, tuple[str, ...]], ...]:
    plan = []
    for code, sp in params_for(resource_type).items():
        if code in SPECIAL or sp.type not in _ENCODERS or not sp.expression:
            continue
        roots = _root_elements(sp.expression, resource_type)
        plan.append((code, sp.type, compile_expression(sp.expression, resource_type), roots))
    return tuple(plan)


def indexed_parameters(resource_type: str) -> list[tuple[str, str]]:
    """(code, type) of the parameters whose values :func:`index_resource` stores for this type."""
    return [(code, kind) for code, kind, _, _ in _plan(resource_type)]


def _root_elements(expression: str, resource_type: str) -> tuple[str, ...]:
    """Top-level element names an expression reads (choice names as prefixes); () means "any"."""
    names: list[str] = []
    for part in _split_top(expression, "|"):
        part = _strip_parens(_split_top(_strip_parens(part), " as ")[0])
        steps = _split_top(part, ".")
        if steps[0] not in (resource_type, "Resource", "DomainResource"):
            continue
        if len(steps) < 2:
            return ()
        name = steps[1].split("(", 1)[0].split("[", 1)[0]
        if not _NAME.match(name):
            return ()
        names.append(name)
    return tuple(dict.fromkeys(names))


@lru_cache(maxsize=None)
def _dispatch(resource_type: str) -> tuple[dict[str, tuple[int, ...]], tuple[int, ...], frozenset[str]]:
    """For each top-level element name, the plan entries that read it; entries that read from
    the root itself; and the choice base names among the roots."""
    by_key: dict[str, list[int]] = {}
    always: list[int] = []
    for i, (_, _, _, roots) in enumerate(_plan(resource_type)):
        if not roots:
            always.append(i)
        for name in roots:
            by_key.setdefault(name, []).append(i)
    choices = frozenset(n for n in by_key if n in _choice_names())
    return {k: tuple(v) for k, v in by_key.items()}, tuple(always), choices


@lru_cache(maxsize=4096)
def _choice_base(key: str, choices: frozenset[str]) -> str | None:
    """``value`` for ``valueQuantity`` when ``value`` is a choice element of this type."""
    for i in range(len(key) - 1, 0, -1):
        if key[i].isupper() and key[:i] in choices:
            return key[:i]
    return None


def _entries_for(resource: dict[str, Any]) -> list[int]:
    by_key, always, choices = _dispatch(resource["resourceType"])
    wanted: dict[int, None] = dict.fromkeys(always)
    for key in resource:
        hit = by_key.get(key)
        if hit is None and choices:
            base = _choice_base(key, choices)
            hit = by_key.get(base) if base else None
        if hit:
            wanted.update(dict.fromkeys(hit))
    return sorted(wanted)


# Serialised resources hold `"reference":"..."`; FHIR strings cannot contain an unescaped quote,
# so one regex over the bytes finds every reference without walking the tree again.
REFERENCE_BYTES = re.compile(rb'"reference":"((?:[^"\\]|\\.)*)"')


def local_references(raw: bytes, base_url: str = "") -> set[str]:
    """``Type/id`` of every reference in ``raw`` to a resource on this server (relative, or
    absolute under ``base_url``): what referential integrity checks."""
    base = base_url.rstrip("/") + "/" if base_url else ""
    out: set[str] = set()
    for match in REFERENCE_BYTES.finditer(raw):
        ref = match.group(1).decode("utf-8", "replace")
        if "://" in ref:
            if not base or not ref.startswith(base):
                continue
            ref = ref[len(base) :]
        local = local_reference(ref)
        if local:
            out.add(local)
    return out


def index_resource(resource: dict[str, Any], raw: bytes | None = None, base_url: str = "") -> dict[str, Any]:
    """The ``s`` document stored beside a resource: search values by parameter code, plus ``_refs``
    (the local references, for referential integrity). ``raw`` is the resource serialised."""
    index: dict[str, Any] = {}
    plan = _plan(resource["resourceType"])
    for i in _entries_for(resource):
        code, kind, extract, _ = plan[i]
        nodes = extract(resource)
        if not nodes:
            continue
        values: list[Any] = []
        encode = _ENCODERS[kind]
        for node in nodes:
            encode(node, values)
        if not values:
            continue
        if kind == "string":
            index[code] = [{"n": normalize_string(v), "x": v} for v in dict.fromkeys(values)]
        elif kind in ("token", "reference", "uri"):
            index[code] = list(dict.fromkeys(values))
        else:
            index[code] = values
    refs = local_references(raw if raw is not None else orjson.dumps(resource), base_url)
    if refs:
        index["_refs"] = sorted(refs)
    return index
