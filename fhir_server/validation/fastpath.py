"""A small FHIRPath evaluator for the subset most invariants use, over plain JSON.

fhirpathpy evaluates an expression like ``vaccineCode.coding.where(system = 'x' and
code.matches('^[0-9]{4}$')).exists()`` in 0.4-2 ms; this one does it in a few microseconds by
compiling the parse tree (fhirpathpy's own parser) into Python closures. It covers member paths
(choice elements: ``value``; ``value.ofType(string)``), ``where``, ``exists``, ``empty``, ``not``,
``count``, ``first``, ``matches``, ``startsWith``, ``length``, ``$this``, literals, ``=``, ``!=``,
``and``, ``or``, ``implies``, ``in`` and ``|``. Anything else, at compile time, returns None and
fhirpathpy is used; a situation it does not model at run time (a primitive's extensions, a
non-JSON value) raises :class:`Unsupported` and that evaluation goes to fhirpathpy too.
tests/test_fastpath.py runs both engines on every invariant of the shipped profiles and the R4
definitions over the examples and requires the same answers.
"""

from __future__ import annotations

import re
from typing import Any, Callable

__all__ = ["compile_fast", "Unsupported"]

Fn = Callable[[list[Any]], list[Any]]


class Unsupported(Exception):
    """This evaluation needs the full engine."""


# FHIR primitive type names as ofType() arguments → the JSON suffix of a choice element.
_PRIMITIVES = {
    "string": "String", "code": "Code", "uri": "Uri", "url": "Url", "canonical": "Canonical", "id": "Id",
    "boolean": "Boolean", "integer": "Integer", "decimal": "Decimal", "date": "Date", "dateTime": "DateTime",
    "instant": "Instant", "time": "Time", "markdown": "Markdown", "oid": "Oid", "uuid": "Uuid",
    "positiveInt": "PositiveInt", "unsignedInt": "UnsignedInt", "base64Binary": "Base64Binary",
}
_COMPLEX_OK = re.compile(r"^[A-Z][A-Za-z]+$")  # ofType(Quantity), ofType(CodeableConcept) ...


def _choice_names() -> frozenset[str]:
    from fhir_server.definitions import load_model

    return frozenset(
        row["p"].rsplit(".", 1)[-1][:-3] for t in load_model()["types"].values() for row in t["elements"] if row["p"].endswith("[x]")
    )


# Names that may appear as name + Type (value → valueQuantity); others are looked up directly.
CHOICES = _choice_names()


def _members(items: list[Any], name: str) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if type(item) is not dict:
            raise Unsupported("member of a primitive")  # e.g. gender.extension
        value = item.get(name)
        if value is None:
            if "_" + name in item:
                raise Unsupported("primitive with extensions only")
            if name not in CHOICES:
                continue
            for key in item:  # value[x]
                if key.startswith(name) and len(key) > len(name) and key[len(name)].isupper():
                    value = item[key]
                    break
                if key.startswith("_" + name) and len(key) > len(name) + 1 and key[len(name) + 1].isupper():
                    raise Unsupported("primitive with extensions only")
            if value is None:
                continue
        if type(value) is list:
            out += [v for v in value if v is not None]
        else:
            out.append(value)
    return out


def _of_type_member(items: list[Any], name: str, type_: str) -> list[Any]:
    suffix = _PRIMITIVES.get(type_, type_ if _COMPLEX_OK.match(type_) else None)
    if suffix is None:
        raise Unsupported(type_)
    key = name + suffix
    out: list[Any] = []
    for item in items:
        if type(item) is not dict:
            raise Unsupported("member of a primitive")
        value = item.get(key)
        if type(value) is list:
            out += value
        elif value is not None:
            out.append(value)
    return out


_DATE_LIKE = re.compile(r"^\d{4}(-\d\d|$)")


def _single(items: list[Any], comparing: bool = True) -> Any:
    if len(items) != 1:
        raise Unsupported("not a singleton")
    value = items[0]
    if type(value) in (dict, list) or type(value) is float:
        raise Unsupported("comparison of a complex or decimal value")
    if comparing and type(value) is str and _DATE_LIKE.match(value):
        raise Unsupported("dates compare by precision")
    return value


def _truth(items: list[Any]) -> bool | None:
    if not items:
        return None
    if len(items) == 1 and type(items[0]) is bool:
        return items[0]
    raise Unsupported("boolean of a non-boolean")


def _logic(op: str, a: Fn, b: Fn) -> Fn:
    """FHIRPath's three-valued and / or / implies."""

    def run(focus: list[Any]) -> list[Any]:
        x = _truth(a(focus))
        if op == "and":
            if x is False:
                return [False]
            y = _truth(b(focus))
            return [False] if y is False else [True] if x is True and y is True else []
        if op == "or":
            if x is True:
                return [True]
            y = _truth(b(focus))
            return [True] if y is True else [False] if x is False and y is False else []
        if x is False:
            return [True]
        y = _truth(b(focus))
        return [True] if y is True else [False] if x is True and y is False else []

    if op not in ("and", "or", "implies"):
        raise Unsupported(op)
    return run


def _compile(node: dict[str, Any]) -> Fn:
    kind = node.get("type")
    children = node.get("children", [])
    if kind == "TermExpression":
        return _term(children[0])
    if kind == "InvocationExpression":
        left = children[0]
        step = children[1]
        # name.ofType(T) on a choice element: read valueT directly
        if (
            step.get("type") == "FunctionInvocation"
            and _fn_name(step) == "ofType"
            and _member_name(left) is not None
        ):
            base, name = _member_base(left)
            type_ = _type_name(_fn_params(step)[0])
            return lambda focus: _of_type_member(base(focus), name, type_)
        head = _compile(left)
        return _step(head, step)
    if kind in ("AndExpression", "OrExpression", "ImpliesExpression"):
        op = node["terminalNodeText"][0]
        a, b = _compile(children[0]), _compile(children[1])
        return _logic(op, a, b)
    if kind == "EqualityExpression":
        op = node["terminalNodeText"][0]
        if op not in ("=", "!="):
            raise Unsupported(op)
        a, b = _compile(children[0]), _compile(children[1])

        def equal(focus: list[Any]) -> list[Any]:
            left, right = a(focus), b(focus)
            if not left or not right:
                return []
            same = _single(left) == _single(right)
            return [same if op == "=" else not same]

        return equal
    if kind == "MembershipExpression":
        op = node["terminalNodeText"][0]
        if op != "in":
            raise Unsupported(op)
        a, b = _compile(children[0]), _compile(children[1])

        def member(focus: list[Any]) -> list[Any]:
            left = a(focus)
            if not left:
                return []
            value = _single(left)
            return [any(value == v for v in b(focus) if type(v) not in (dict, list, float))]

        return member
    if kind == "UnionExpression":
        a, b = _compile(children[0]), _compile(children[1])

        def union(focus: list[Any]) -> list[Any]:
            out: list[Any] = []
            for v in a(focus) + b(focus):
                if type(v) in (dict, list, float):
                    raise Unsupported("union of complex values")
                if v not in out:
                    out.append(v)
            return out

        return union
    raise Unsupported(str(kind))


def _member_name(node: dict[str, Any]) -> str | None:
    """The last member name of a path expression (``a.b`` → b), or None."""
    if node.get("type") == "TermExpression":
        term = node["children"][0]
        if term.get("type") == "InvocationTerm" and term["children"][0].get("type") == "MemberInvocation":
            return str(term["children"][0]["children"][0].get("text"))
        return None
    if node.get("type") == "InvocationExpression" and node["children"][1].get("type") == "MemberInvocation":
        return str(node["children"][1]["children"][0].get("text"))
    return None


def _member_base(node: dict[str, Any]) -> tuple[Fn, str]:
    name = _member_name(node)
    assert name is not None
    _check_name(name)
    if node.get("type") == "TermExpression":
        return (lambda focus: focus), name
    return _compile(node["children"][0]), name


def _check_name(name: str) -> None:
    if not name or name[0].isupper() or name.startswith("`"):
        raise Unsupported(f"member {name}")  # type names and escaped identifiers: full engine


def _fn_name(step: dict[str, Any]) -> str:
    return str(step["children"][0]["children"][0].get("text", ""))


def _fn_params(step: dict[str, Any]) -> list[dict[str, Any]]:
    functn = step["children"][0]
    if len(functn["children"]) < 2:
        return []
    return [p for p in functn["children"][1].get("children", []) if isinstance(p, dict)]


def _type_name(node: dict[str, Any]) -> str:
    text = node.get("text", "")
    if not text or not re.match(r"^[A-Za-z]+$", text):
        raise Unsupported("type specifier")
    return str(text)


def _literal(node: dict[str, Any]) -> Any:
    if node.get("type") == "TermExpression" and node["children"][0].get("type") == "LiteralTerm":
        lit = node["children"][0]["children"][0]
        if lit.get("type") == "StringLiteral":
            return _unquote(lit.get("text", ""))
    raise Unsupported("not a string literal")


def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != "'" or text[-1] != "'":
        raise Unsupported("string literal")
    body = text[1:-1]
    if "\\" in body:
        raise Unsupported("escapes")
    return body


def _term(term: dict[str, Any]) -> Fn:
    kind = term.get("type")
    if kind == "ParenthesizedTerm":
        return _compile(term["children"][0])
    if kind == "LiteralTerm":
        lit = term["children"][0]
        text = lit.get("text", "")
        if lit.get("type") == "StringLiteral":
            value: Any = _unquote(text)
        elif lit.get("type") == "BooleanLiteral":
            value = text == "true"
        elif lit.get("type") == "NumberLiteral" and re.match(r"^[0-9]+$", text):
            value = int(text)
        elif lit.get("type") == "NullLiteral":
            return lambda focus: []
        else:
            raise Unsupported(str(lit.get("type")))
        return lambda focus: [value]
    if kind == "InvocationTerm":
        inv = term["children"][0]
        if inv.get("type") == "MemberInvocation":
            name = inv["children"][0].get("text", "")
            _check_name(name)
            return lambda focus: _members(focus, name)
        if inv.get("type") == "ThisInvocation":
            return lambda focus: focus
        if inv.get("type") == "FunctionInvocation":
            return _step(lambda focus: focus, inv)
    raise Unsupported(str(kind))


def _on_string(head: Fn, op: Callable[[str], Any]) -> Fn:
    """A string function: empty in, empty out; one string in, ``op`` of it; anything else is for
    the full engine."""

    def run(focus: list[Any]) -> list[Any]:
        items = head(focus)
        if not items:
            return []
        value = _single(items, comparing=False)
        if type(value) is not str:
            raise Unsupported("string function on a non-string")
        return [op(value)]

    return run


def _step(head: Fn, step: dict[str, Any]) -> Fn:
    if step.get("type") == "MemberInvocation":
        name = step["children"][0].get("text", "")
        _check_name(name)
        return lambda focus: _members(head(focus), name)
    if step.get("type") != "FunctionInvocation":
        raise Unsupported(str(step.get("type")))
    fn = _fn_name(step)
    params = _fn_params(step)
    if fn == "exists" and not params:
        return lambda focus: [bool(head(focus))]
    if fn == "empty" and not params:
        return lambda focus: [not head(focus)]
    if fn == "count" and not params:
        return lambda focus: [len(head(focus))]
    if fn == "first" and not params:
        return lambda focus: head(focus)[:1]
    if fn == "not" and not params:

        def negate(focus: list[Any]) -> list[Any]:
            t = _truth(head(focus))
            return [] if t is None else [not t]

        return negate
    if fn in ("where", "exists") and len(params) == 1:
        criterion = _compile(params[0])

        def where(focus: list[Any]) -> list[Any]:
            return [item for item in head(focus) if _truth(criterion([item])) is True]

        if fn == "where":
            return where
        return lambda focus: [bool(where(focus))]
    if fn == "all" and len(params) == 1:
        criterion = _compile(params[0])
        return lambda focus: [all(_truth(criterion([item])) is True for item in head(focus))]
    if fn == "matches" and len(params) == 1:
        pattern = re.compile(_literal(params[0]), re.DOTALL)
        return _on_string(head, lambda v: pattern.search(v) is not None)
    if fn == "startsWith" and len(params) == 1:
        prefix = _literal(params[0])
        return _on_string(head, lambda v: v.startswith(prefix))
    if fn == "length" and not params:
        return _on_string(head, len)
    raise Unsupported(fn)


def compile_fast(tree: dict[str, Any]) -> Callable[[Any], list[Any]] | None:
    """An evaluator of a parsed expression (a node of fhirpathpy's parse tree) with one JSON node
    as focus, or None when the subset does not cover it (then use fhirpathpy)."""
    try:
        fn = _compile(tree)
    except (Unsupported, KeyError, IndexError, AssertionError):
        return None
    return lambda node: fn([node])
