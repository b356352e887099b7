"""Index values extracted from a resource on write, so that MongoDB indexes answer searches.

Search parameter expressions are FHIRPath. Almost all R4 expressions are simple paths with a few
idioms (``as Type``, ``where(resolve() is Type)``, ``where(system='phone')``, ``[0]``); those are
compiled into small closures that walk the JSON directly, which is many times faster than a
generic FHIRPath evaluation per resource per parameter. Anything else falls back to fhirpathpy.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any, Callable

import orjson

from fhir_server.search import parameters
from fhir_server.search.parameters import SPECIAL, SearchParam, params_for
from fhir_server.search.pinyin import has_cjk, pinyin_keys
from fhir_server.storage import field_crypto

Extractor = Callable[[dict[str, Any]], list[Any]]
# Evaluates a composite's component on one node of the composite; the resource is for %resource.
NodeExtractor = Callable[[Any, dict[str, Any]], list[Any]]
# Writes the values of one parameter, from the nodes its expression yields, into the `s` document;
# the last argument is a memo of composite component values shared by one resource's composites.
Store = Callable[[list[Any], dict[str, Any], dict[str, Any], dict[Any, Any]], None]

_log = logging.getLogger(__name__)

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
    for node in nodes:
        if isinstance(node, dict):
            value = node.get(name)
            if value is not None:
                out.extend(value) if isinstance(value, list) else out.append(value)
    return out


# `_exact_children` is the same walk: a cast names the exact key (valueQuantity).
_exact_children = _children


def _choice_children(nodes: list[Any], name: str) -> list[Any]:
    out: list[Any] = []
    for node in nodes:
        if not isinstance(node, dict):
            continue
        value = node.get(name)
        if value is None:
            # A choice element: `value` finds valueQuantity, valueString, ...
            for key, v in node.items():
                if key.startswith(name) and len(key) > len(name) and key[len(name)].isupper():
                    value = v
                    break
            if value is None:
                continue
        out.extend(value) if isinstance(value, list) else out.append(value)
    return out


def _indexed(nodes: list[Any], arg: tuple[Callable[[list[Any], str], list[Any]], str, int]) -> list[Any]:
    children, name, idx = arg
    return children(nodes, name)[idx : idx + 1]


def _where_resolve(nodes: list[Any], prefix: str) -> list[Any]:
    return [n for n in nodes if _ref_has_type(n, prefix)]


def _where_eq(nodes: list[Any], arg: tuple[str, str]) -> list[Any]:
    field, value = arg
    return [n for n in nodes if isinstance(n, dict) and n.get(field) == value]


_Op = tuple[Callable[[list[Any], Any], list[Any]], Any]


def _compile_ops(steps: list[str]) -> list[_Op]:
    """The steps as (function, argument) pairs, each taking a list of nodes to the next."""
    ops: list[_Op] = []
    choices = _choice_names()
    i = 0
    while i < len(steps):
        step = steps[i]
        nxt = steps[i + 1] if i + 1 < len(steps) else ""
        m_as = _AS.match(nxt)
        if _NAME.match(step) and m_as:
            ops.append((_exact_children, step + m_as.group(1)[0].upper() + m_as.group(1)[1:]))
            i += 2
            continue
        if _NAME.match(step):
            ops.append((_choice_children if step in choices else _children, step))
        elif (m := _INDEXED.match(step)) is not None:
            name = m.group(1)
            ops.append((_indexed, (_choice_children if name in choices else _children, name, int(m.group(2)))))
        elif (m := _WHERE_RESOLVE.match(step)) is not None:
            ops.append((_where_resolve, m.group(1) + "/"))
        elif (m := _WHERE_EQ.match(step)) is not None:
            ops.append((_where_eq, (m.group(1), m.group(2))))
        else:
            raise _Unsupported(step)
        i += 1
    return ops


def _compile_walk(steps: list[str]) -> Callable[[list[Any]], list[Any]]:
    """A function taking the nodes before ``steps`` to the nodes after them."""
    ops = _compile_ops(steps)

    def walk(nodes: list[Any]) -> list[Any]:
        for fn, arg in ops:
            nodes = fn(nodes, arg)
            if not nodes:
                return nodes
        return nodes

    return walk


def _compile_steps(steps: list[str]) -> Extractor:
    ops = _compile_ops(steps)
    if len(ops) == 1 and ops[0][0] is _children:
        # The most common shape by far (Observation.code): one plain element of the resource.
        name = ops[0][1]

        def element(resource: dict[str, Any]) -> list[Any]:
            value = resource.get(name)
            if value is None:
                return []
            return value if isinstance(value, list) else [value]

        return element
    if len(ops) == 1:
        fn, arg = ops[0]
        return lambda resource: fn([resource], arg)
    first, rest = ops[0], ops[1:]

    def run(resource: dict[str, Any]) -> list[Any]:
        nodes = first[0]([resource], first[1])
        for fn, arg in rest:
            if not nodes:
                return nodes
            nodes = fn(nodes, arg)
        return nodes

    return run


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
    if cast:
        steps.append(f"as({cast})")
    if root.startswith("(") and root.endswith(")") and len(steps) > 1:
        # `(Observation.value as CodeableConcept).text`: the path continues from a cast.
        head = _compile_part(root, resource_type)
        if head is None:
            return None
        walk = _compile_walk(steps[1:])
        return lambda r: walk(head(r))
    if root not in (resource_type, "Resource", "DomainResource"):
        if not _NAME.match(root):
            raise _Unsupported(root)
        if root[0].isupper():
            return None  # an alternative for another resource type
        # A path without its type (`name | alias` of InsurancePlan) starts at the resource.
        return _compile_steps(steps)
    steps = steps[1:]
    if not steps:
        return lambda r: [r]
    return _compile_steps(steps)


def _compile_relative_part(part: str) -> NodeExtractor:
    """Compile one ``|`` alternative of a composite component, rooted at the composite's node."""
    part = _strip_parens(part)
    pieces = _split_top(part, " as ")
    steps = _split_top(_strip_parens(pieces[0]), ".")
    if len(pieces) == 2:
        steps.append(f"as({pieces[1]})")
    on_resource = steps[0] == "%resource"
    if steps[0] in ("%resource", "$this"):
        steps = steps[1:]
    if not steps:
        return (lambda node, resource: [resource]) if on_resource else (lambda node, resource: [node])
    run = _compile_steps(steps)
    if on_resource:
        return lambda node, resource: run(resource)
    return lambda node, resource: run(node)


def _fhirpath_model() -> dict[str, Any] | None:
    # The R4 model lets FHIRPath resolve choice elements (`value` → valueQuantity) and types.
    from fhirpathpy.models import models

    return models.get("r4")


def _plain(value: Any) -> Any:
    """A FHIRPath result as JSON data (fhirpathpy may hand back its own date or quantity types)."""
    return value if isinstance(value, (dict, list, str, int, float, bool)) else str(value)


def _fhirpath_fallback(expression: str) -> Extractor:
    import fhirpathpy  # imported lazily: the compiled path covers nearly every R4 expression

    compiled = fhirpathpy.compile(expression, _fhirpath_model())

    def run(resource: dict[str, Any]) -> list[Any]:
        try:
            return [_plain(v) for v in compiled(resource, {})]
        except Exception:  # a FHIRPath evaluation error means "no value", not a failed write
            return []

    return run


def _fhirpath_relative(expression: str) -> NodeExtractor:
    import fhirpathpy

    compiled = fhirpathpy.compile(expression, _fhirpath_model())

    def run(node: Any, resource: dict[str, Any]) -> list[Any]:
        try:
            return [_plain(v) for v in compiled(node, {"resource": resource, "rootResource": resource})]
        except Exception:  # as above: no value
            return []

    return run


def _union(parts: list[Callable[..., list[Any]]]) -> Callable[..., list[Any]]:
    if len(parts) == 1:
        return parts[0]

    def union(*args: Any) -> list[Any]:
        out: list[Any] = []
        for fn in parts:
            out.extend(fn(*args))
        return out

    return union


def _compile(expression: str, resource_type: str) -> Extractor | None:
    """The compiled extractor, or None when the expression is beyond the compiled subset."""
    parts = []
    try:
        for part in _split_top(expression, "|"):
            fn = _compile_part(part, resource_type)
            if fn is not None:
                parts.append(fn)
    except _Unsupported:
        return None
    return _union(parts) if parts else (lambda resource: [])


def _patient_deceased(resource: dict[str, Any]) -> list[Any]:
    flag = resource.get("deceasedBoolean")
    return [flag is True] if isinstance(flag, bool) else ["deceasedDateTime" in resource]


# R4 expressions beyond the compiled subset that a write meets often enough to hand-compile.
_HAND_COMPILED: dict[str, Extractor] = {
    "Patient.deceased.exists() and Patient.deceased != false": _patient_deceased,
}


def compile_expression(expression: str, resource_type: str) -> Extractor:
    """An extractor for a search parameter expression on ``resource_type`` (fhirpathpy if need be)."""
    return _HAND_COMPILED.get(expression) or _compile(expression, resource_type) or _fhirpath_fallback(expression)


def compile_relative(expression: str) -> NodeExtractor:
    """An extractor for a composite component's expression, evaluated on each composite node."""
    try:
        return _union([_compile_relative_part(part) for part in _split_top(expression, "|")])
    except _Unsupported:
        return _fhirpath_relative(expression)


# -- encoding values per search parameter type ------------------------------------------------


@lru_cache(maxsize=16384)
def normalize_string(text: str) -> str:
    """Case- and accent-insensitive form used by string search."""
    # Cached: displays, cities and given names repeat across resources far more than they vary.
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def _token_values(node: Any, out: list[str], texts: list[str] | None = None) -> None:
    """Token strings of one node; with ``texts``, also the text that ``:text`` searches."""
    if isinstance(node, str):
        out.append(node)
    elif isinstance(node, bool):
        out.append("true" if node else "false")
    elif isinstance(node, (int, float)):
        out.append(str(node))
    elif isinstance(node, dict):
        if texts is not None:
            text = node.get("text")  # CodeableConcept.text
            if text is None:
                text = node.get("display")  # Coding.display
            if isinstance(text, str):
                texts.append(text)
        codings = node.get("coding")
        if isinstance(codings, list):
            for c in codings:
                _token_values(c, out, texts)
            return
        code = node.get("code")
        identifier_type = None
        if code is None:
            code = node.get("value")  # Identifier, ContactPoint
            identifier_type = node.get("type")
            crypto = field_crypto.active()
            if crypto is not None and isinstance(code, str) and crypto.protects(node):
                # An ID-document or phone number: its blind index, never the number (field_crypto.py).
                code = crypto.blind(code)
        if isinstance(code, str):
            system = node.get("system")
            out.append(f"{system}|{code}" if isinstance(system, str) else f"|{code}")
            out.append(code)
            if isinstance(identifier_type, dict):
                _identifier_type(identifier_type, code, out, texts)


def _identifier_type(type_: dict[str, Any], value: str, out: list[str], texts: list[str] | None) -> None:
    """``:of-type`` strings (``system|code|value``) and ``:text`` of an Identifier's type."""
    if texts is not None and isinstance(type_.get("text"), str):
        texts.append(type_["text"])
    codings = type_.get("coding")
    if isinstance(codings, list):
        for c in codings:
            if isinstance(c, dict) and isinstance(c.get("code"), str):
                system = c.get("system")
                out.append(f"{system if isinstance(system, str) else ''}|{c['code']}|{value}")


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


def _string_entries(nodes: list[Any], pinyin: bool = False) -> list[dict[str, str]]:
    values: list[str] = []
    for node in nodes:
        _string_values(node, values)
    unique = dict.fromkeys(values)
    out = [{"n": normalize_string(v), "x": v} for v in unique]
    if pinyin:
        out += _pinyin_entries(nodes, unique)
    return out


def _pinyin_entries(nodes: list[Any], values: dict[str, None]) -> list[dict[str, str]]:
    """Extra ``{"n"}`` entries (no ``x``: ``:exact`` never matches them) for Chinese names: their
    pinyin keys, and family + given joined as Chinese names are written (张 + 三 → 张三)."""
    texts = [v for v in values if has_cjk(v)]
    if not texts:
        return []
    keys: dict[str, None] = {}
    for node in nodes:
        joined = _joined_name(node)
        if joined and joined not in values:
            keys[normalize_string(joined)] = None
            texts.append(joined)
    for text in texts:
        keys.update(dict.fromkeys(pinyin_keys(text)))
    return [{"n": k} for k in keys]


def _joined_name(node: Any) -> str | None:
    if not isinstance(node, dict):
        return None
    family, given = node.get("family"), node.get("given")
    if not isinstance(family, str) or not isinstance(given, list) or not has_cjk(family):
        return None
    return family + "".join(g for g in given if isinstance(g, str))


def _canonical(value: str, out: list[str]) -> None:
    out.append(value)
    bar = value.find("|")
    if bar > 0:  # url|version also matches a search on the url alone
        out.append(value[:bar])


def _reference_values(node: Any, out: list[str]) -> None:
    if isinstance(node, str):  # canonical / uri references
        _canonical(node, out)
        return
    if not isinstance(node, dict):
        return
    ref = node.get("reference")
    if isinstance(ref, str):
        local = local_reference(ref)
        out.append(local or ref)
    ident = node.get("identifier")
    if isinstance(ident, dict) and isinstance(ident.get("value"), str):
        value, system = ident["value"], ident.get("system")
        crypto = field_crypto.active()
        if crypto is not None and crypto.protects(ident):
            value = crypto.blind(value)
        # `subject:identifier=sys|val`; the "?" keeps these apart from "Type/id" and URLs.
        out.append(f"?{system}|{value}" if isinstance(system, str) else f"?|{value}")
        out.append(f"?{value}")


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
        _canonical(node, out)


_ENCODERS: dict[str, Callable[[Any, list[Any]], None]] = {
    "token": _token_values,
    "string": _string_values,
    "reference": _reference_values,
    "date": _date_values,
    "number": _number_values,
    "quantity": _quantity_values,
    "uri": _uri_values,
}
_DEDUPLICATED = frozenset({"token", "reference", "uri"})


def encode_values(kind: str, nodes: list[Any], *, pinyin: bool = False) -> list[Any]:
    """The list stored under ``s`` for a parameter of type ``kind`` whose expression yielded
    ``nodes`` (``pinyin``: add the pinyin entries of Chinese names to string values)."""
    if kind == "string":
        return _string_entries(nodes, pinyin)
    encode = _ENCODERS.get(kind)
    if encode is None:
        raise ValueError(f"search parameters of type {kind!r} have no stored form")
    out: list[Any] = []
    for node in nodes:
        encode(node, out)
    return list(dict.fromkeys(out)) if kind in _DEDUPLICATED else out


# -- the extraction plan per resource type ----------------------------------------------------

# String parameters whose Chinese values also get pinyin keys: names staff search by sound.
_PINYIN_PARAMS: dict[str, frozenset[str]] = {
    rtype: frozenset({"name", "family", "given", "phonetic"})
    for rtype in ("Patient", "Practitioner", "RelatedPerson", "Person")
}


def _store_values(code: str, kind: str, pinyin: bool = False) -> Store:
    def store(nodes: list[Any], resource: dict[str, Any], index: dict[str, Any], memo: dict[Any, Any]) -> None:
        values = encode_values(kind, nodes, pinyin=pinyin)
        if values:
            index[code] = values

    return store


def _store_token(code: str) -> Store:
    text_key = code + ":text"

    def store(nodes: list[Any], resource: dict[str, Any], index: dict[str, Any], memo: dict[Any, Any]) -> None:
        values: list[str] = []
        texts: list[str] = []
        for node in nodes:
            _token_values(node, values, texts)
        if values:
            index[code] = list(dict.fromkeys(values))
        if texts:
            index[text_key] = list(dict.fromkeys(map(normalize_string, texts)))

    return store


def _store_composite(code: str, parts: tuple[tuple[str, str, NodeExtractor], ...]) -> Store:
    keys = tuple(f"c{i}" for i in range(len(parts)))
    # Components are tried last first: the value is missing more often than the code.
    reversed_parts = tuple((f"{kind} {expression}", kind, extract) for kind, expression, extract in reversed(parts))

    def store(nodes: list[Any], resource: dict[str, Any], index: dict[str, Any], memo: dict[Any, Any]) -> None:
        entries = []
        for node in nodes:
            # A composite search names every component, so a node lacking one can never match:
            # storing it would only grow the index (every Observation has a code, few a string).
            found = []
            for key, kind, extract in reversed_parts:
                # Several composites read the same component of the same node (code-value-quantity
                # and combo-code-value-quantity both read the Observation's code and value).
                memo_key = (key, id(node))
                seen = memo.get(memo_key)
                if seen is None:
                    values = extract(node, resource)
                    # The node is kept with its values: its id must not be reused during the call.
                    seen = memo[memo_key] = (node, encode_values(kind, values) if values else [])
                encoded = seen[1]
                if not encoded:
                    break
                found.append(encoded)
            else:
                entries.append(dict(zip(keys, reversed(found))))
        if entries:
            index[code] = entries

    return store


@lru_cache(maxsize=1)
def _params_by_url() -> dict[str, SearchParam]:
    out: dict[str, SearchParam] = {}
    for table in parameters._by_base().values():
        for sp in table.values():
            out.setdefault(sp.url, sp)
    return out


def _param_by_url(url: str, resource_type: str) -> SearchParam | None:
    # The type's own parameters first: they include any registered at run time.
    for sp in params_for(resource_type).values():
        if sp.url == url:
            return sp
    return _params_by_url().get(url)


# R4 errata: DocumentReference-relationship names its components' definitions the wrong way
# round (relatesto, a reference, for `code`); R5 fixed it. The query side reads them from here too.
_COMPONENT_ERRATA: dict[str, tuple[tuple[str, str], ...]] = {
    "http://hl7.org/fhir/SearchParameter/DocumentReference-relationship": (
        ("http://hl7.org/fhir/SearchParameter/DocumentReference-relation", "code"),
        ("http://hl7.org/fhir/SearchParameter/DocumentReference-relatesto", "target"),
    ),
}


def composite_components(sp: SearchParam, resource_type: str) -> tuple[tuple[SearchParam, str], ...] | None:
    """(component parameter, expression on the composite's node) per component of a composite,
    in order: ``cN`` holds values encoded as component N's type. None when one is unknown."""
    out = []
    for url, expression in _COMPONENT_ERRATA.get(sp.url, sp.components):
        component = _param_by_url(url, resource_type)
        if component is None or component.type not in _ENCODERS:
            return None
        out.append((component, expression))
    return tuple(out) or None


def _composite_parts(sp: SearchParam, resource_type: str) -> tuple[tuple[str, str, NodeExtractor], ...] | None:
    components = composite_components(sp, resource_type)
    if components is None:
        return None
    return tuple((c.type, expression, compile_relative(expression)) for c, expression in components)


def _plan_entry(code: str, sp: SearchParam, resource_type: str) -> tuple[str, str, Extractor, tuple[str, ...], Store] | None:
    expression = sp.expression or ""
    compiled = _compile(expression, resource_type)
    extract = _HAND_COMPILED.get(expression) or compiled or _fhirpath_fallback(expression)
    # Others may read anything, or yield a value for an absent element: run them on every resource.
    roots = _root_elements(expression, resource_type) if compiled else ()
    if sp.type == "composite":
        parts = _composite_parts(sp, resource_type)
        if parts is None:
            _log.warning("composite search parameter %s on %s: a component is unknown, not extracted", code, resource_type)
            return None
        store = _store_composite(code, parts)
        if compiled:
            # On the resource itself (`Observation`), a node lacking any component yields nothing,
            # so the last component's elements (the value, rarer than the code) decide.
            expressions = [e for _, e in _COMPONENT_ERRATA.get(sp.url, sp.components)]
            bare = next((r for r in map(_relative_roots, reversed(expressions)) if r), ())
            roots = _root_elements(expression, resource_type, bare)
    elif sp.type == "token":
        store = _store_token(code)
    else:
        store = _store_values(code, sp.type, pinyin=sp.type == "string" and code in _PINYIN_PARAMS.get(resource_type, ()))
    return code, sp.type, extract, roots, store


@lru_cache(maxsize=None)
def _plan(resource_type: str) -> tuple[tuple[str, str, Extractor, tuple[str, ...], Store], ...]:
    plan = []
    for code, sp in params_for(resource_type).items():
        if code in SPECIAL or not sp.expression or (sp.type not in _ENCODERS and sp.type != "composite"):
            continue
        try:
            entry = _plan_entry(code, sp, resource_type)
        except Exception:  # one bad (custom) expression must not stop every write of the type
            _log.exception("search parameter %s on %s: expression %r cannot be compiled", code, resource_type, sp.expression)
            continue
        if entry is not None:
            plan.append(entry)
    return tuple(plan)


def indexed_parameters(resource_type: str) -> list[tuple[str, str]]:
    """(code, type) of the parameters whose values :func:`index_resource` stores for this type."""
    return [(code, kind) for code, kind, _, _, _ in _plan(resource_type)]


def _root_elements(expression: str, resource_type: str, bare: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Top-level element names an expression reads (choice names as prefixes); () means "any".
    ``bare`` stands for an alternative that is the resource itself (a composite's components)."""
    names: list[str] = []
    for part in _split_top(expression, "|"):
        part = _strip_parens(_split_top(_strip_parens(part), " as ")[0])
        steps = _split_top(part, ".")
        if steps[0].startswith("("):
            inner = _root_elements(steps[0], resource_type)
            if not inner:
                return ()
            names += inner
            continue
        if steps[0] not in (resource_type, "Resource", "DomainResource"):
            if steps[0][:1].islower():  # a path without its type: the first step is the element
                steps = [resource_type, *steps]
            else:
                continue
        if len(steps) < 2:
            if not bare:
                return ()
            names += bare
            continue
        name = steps[1].split("(", 1)[0].split("[", 1)[0]
        if not _NAME.match(name):
            return ()
        names.append(name)
    return tuple(dict.fromkeys(names))


def _relative_roots(expression: str) -> tuple[str, ...]:
    """The element names of a node that a component expression reads (a cast names the exact
    key: ``value.as(Quantity)`` reads valueQuantity); () when it cannot tell."""
    names: list[str] = []
    for part in _split_top(expression, "|"):
        part = _strip_parens(part)
        pieces = _split_top(part, " as ")
        steps = _split_top(_strip_parens(pieces[0]), ".")
        if len(pieces) == 2:
            steps.append(f"as({pieces[1]})")
        if not _NAME.match(steps[0]):
            return ()
        m_as = _AS.match(steps[1]) if len(steps) > 1 else None
        names.append(steps[0] + m_as.group(1)[0].upper() + m_as.group(1)[1:] if m_as else steps[0])
    return tuple(dict.fromkeys(names))


# Key sets seen per type, remembered with the plan entries they start: resources from one source
# have a handful of shapes. Bounded, since validation may be off and keys then arbitrary.
_MEMO_LIMIT = 2048


@lru_cache(maxsize=None)
def _dispatch(
    resource_type: str,
) -> tuple[dict[tuple[str, ...], list[int]], tuple[int, ...], dict[str, tuple[int, ...]], frozenset[str]]:
    """A memo of resource key set → plan entries; the entries that read from the root itself;
    for each element name, the entries that read it; the choice base names among those."""
    by_name: dict[str, list[int]] = {}
    always: list[int] = []
    for i, (_, _, _, roots, _) in enumerate(_plan(resource_type)):
        if not roots:
            always.append(i)
        for name in roots:
            by_name.setdefault(name, []).append(i)
    choices = frozenset(n for n in by_name if n in _choice_names())
    return {}, tuple(always), {k: tuple(v) for k, v in by_name.items()}, choices


def _clear_caches() -> None:
    _plan.cache_clear()
    _dispatch.cache_clear()
    _params_by_url.cache_clear()


parameters.on_change(_clear_caches)


@lru_cache(maxsize=4096)
def _choice_base(key: str, choices: frozenset[str]) -> str | None:
    """``value`` for ``valueQuantity`` when ``value`` is a choice element of this type."""
    for i in range(len(key) - 1, 0, -1):
        if key[i].isupper() and key[:i] in choices:
            return key[:i]
    return None


def _entries_for(resource: dict[str, Any]) -> list[int]:
    memo, always, by_name, choices = _dispatch(resource["resourceType"])
    keys = tuple(resource)
    wanted = memo.get(keys)
    if wanted is not None:
        return wanted
    found: set[int] = set(always)
    for key in keys:
        found.update(by_name.get(key, ()))
        # `valueQuantity` starts the entries reading it exactly and those reading `value`.
        base = _choice_base(key, choices) if choices else None
        if base is not None:
            found.update(by_name.get(base, ()))
    wanted = sorted(found)
    if len(memo) < _MEMO_LIMIT:
        memo[keys] = wanted
    return wanted


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
    memo: dict[Any, Any] = {}
    plan = _plan(resource["resourceType"])
    for i in _entries_for(resource):
        nodes = plan[i][2](resource)
        if nodes:
            plan[i][4](nodes, resource, index, memo)
    refs = local_references(raw if raw is not None else orjson.dumps(resource), base_url)
    if refs:
        index["_refs"] = sorted(refs)
    return index
