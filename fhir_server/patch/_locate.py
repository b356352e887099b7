"""Parse and evaluate FHIRPath, and map the selected nodes back to the JSON that holds them.

fhirpathpy returns ``ResourceNode``s whose ``data`` is the very object in the resource (so dicts
can be found by identity) and whose ``propName`` spells the concrete location, e.g.
``Patient.name[0].given[1]`` (so primitives can be found by walking it). When neither works
(e.g. ``Patient.extension('u').value`` loses ``propName``) and the expression ends in a member
access ``X.name``, ``X`` is located instead and ``name`` is read from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import fhirpathpy
from antlr4 import CommonTokenStream, InputStream, Token
from antlr4.error.ErrorListener import ErrorListener
from antlr4.tree.Tree import ParseTreeWalker
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.parser.ASTPathListener import ASTPathListener
from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

from . import _r4_model as model

_SEGMENT = re.compile(r"([A-Za-z][A-Za-z0-9]*)(?:\[(\d+)\])?")


class PathSyntaxError(ValueError):
    """The FHIRPath expression does not parse."""


class EvaluationError(ValueError):
    """fhirpathpy failed while evaluating an expression."""


class UnlocatableError(ValueError):
    """The expression selected something that is not an element of the resource."""


@dataclass(eq=False, slots=True)
class Loc:
    """Where one selected JSON value sits: ``container[key]`` or ``container[key][index]``."""

    value: Any
    container: dict[str, Any] | None  # None for the resource itself
    key: str | None
    index: int | None
    parent: Loc | None  # the Loc of ``container``
    type_path: str | None  # R4 type path of ``value`` (see _r4_model)
    base: str | None = None  # ``value`` for a choice key such as ``valueQuantity``

    @property
    def is_root(self) -> bool:
        return self.container is None

    def place(self) -> tuple[int, str | None, int | None]:
        """Identifies the slot, so one element reached twice counts once."""
        return (id(self.container), self.key, self.index)


class _RaisingListener(ErrorListener):  # type: ignore[misc]
    def syntaxError(
        self, recognizer: Any, offendingSymbol: Any, line: int, column: int, msg: str, e: Any
    ) -> None:
        raise PathSyntaxError(f"column {column + 1}: {msg}")


def parse_path(expression: str) -> dict[str, Any]:
    """Parse ``expression`` into fhirpathpy's AST, rejecting syntax errors.

    fhirpathpy's own ``parse`` silently recovers from syntax errors (``Patient.name.where(``
    parses), which would patch the wrong element, so its parser is driven here with a listener
    that raises, and trailing unparsed text is rejected too.
    """
    listener = _RaisingListener()
    lexer = FHIRPathLexer(InputStream(expression))
    lexer.removeErrorListeners()
    lexer.addErrorListener(listener)
    tokens = CommonTokenStream(lexer)
    parser = FHIRPathParser(tokens)
    parser.removeErrorListeners()
    parser.addErrorListener(listener)
    parser.buildParseTrees = True
    try:
        tree = parser.expression()
        if tokens.LA(1) != Token.EOF:
            raise PathSyntaxError(f"unexpected text after column {tokens.LT(1).column}")
        ast_listener = ASTPathListener()  # type: ignore[no-untyped-call]
        ParseTreeWalker().walk(ast_listener, tree)
    except PathSyntaxError:
        raise
    except Exception as exc:  # the ANTLR runtime raises assorted types
        raise PathSyntaxError(str(exc) or type(exc).__name__) from exc
    root: dict[str, Any] = ast_listener.parentStack[0]
    if not root.get("children"):
        raise PathSyntaxError("empty expression")
    top: dict[str, Any] = root["children"][0]
    return top


def root_loc(doc: dict[str, Any]) -> Loc:
    return Loc(doc, None, None, None, None, doc.get("resourceType"))


def select(doc: dict[str, Any], ast: dict[str, Any]) -> list[Loc]:
    """The distinct locations of the elements ``ast`` selects in ``doc``."""
    locs: list[Loc] = []
    for item in _evaluate(doc, ast):
        if isinstance(item, ResourceNode) and item.data is None:
            continue  # the null placeholders of a ``_given``-style array
        loc = _locate(doc, item) if isinstance(item, ResourceNode) else None
        if loc is None:
            return _select_through_parent(doc, ast)
        locs.append(loc)
    return _distinct(locs)


def member_split(ast: dict[str, Any]) -> tuple[dict[str, Any] | None, str] | None:
    """Split ``X.name`` into ``(X, "name")`` and a bare ``name`` into ``(None, "name")``."""
    children = ast.get("children") or []
    if ast.get("type") == "InvocationExpression" and len(children) == 2:
        name = _member_name(children[1])
        return (children[0], name) if name else None
    if ast.get("type") == "TermExpression" and children and children[0].get("type") == "InvocationTerm":
        name = _member_name((children[0].get("children") or [{}])[0])
        return (None, name) if name else None
    return None


def children_of(parent: Loc, name: str) -> list[Loc]:
    """The locations of element ``name`` (or its choice variant ``name[x]``) in ``parent``."""
    data = parent.value
    if not isinstance(data, dict):
        return []
    key = key_for(data, parent.type_path, name)
    if key is None:
        return []
    value = data[key]
    if isinstance(value, list):
        return [_child(parent, key, i, item) for i, item in enumerate(value) if item is not None]
    return [_child(parent, key, None, value)]


def key_for(data: dict[str, Any], owner: str | None, name: str) -> str | None:
    """The JSON key holding element ``name`` in ``data`` (``deceased`` -> ``deceasedBoolean``)."""
    if name in data:
        return name
    choices = model.choice_types(owner, name)
    if choices is not None:
        found = [name + t for t in choices if name + t in data]
    else:
        # Unknown owner: fall back to the JSON naming rule name + UpperCamelType.
        found = [k for k in data if k.startswith(name) and k[len(name) : len(name) + 1].isupper()]
    return found[0] if len(found) == 1 else None


def choice_base(owner: str | None, key: str) -> str | None:
    """``value`` for ``valueQuantity`` when the owner defines ``value[x]``; else None."""
    for i in range(1, len(key)):
        if key[i].isupper():
            choices = model.choice_types(owner, key[:i])
            if choices and key[i:] in choices:
                return key[:i]
    return None


def _evaluate(doc: dict[str, Any], ast: dict[str, Any]) -> list[Any]:
    variables = {"resource": doc, "rootResource": doc}
    try:
        result = fhirpathpy.apply_parsed_path(  # type: ignore[no-untyped-call]
            doc, {"children": [ast]}, variables, model.MODEL, {"returnRawData": True}
        )
    except Exception as exc:  # fhirpathpy raises bare Exceptions for evaluation errors
        raise EvaluationError(str(exc) or type(exc).__name__) from exc
    items = result if isinstance(result, list) else [result]
    for item in items:
        # Some functions (single()) report failure as a value instead of raising.
        if isinstance(item, dict) and item.get("$status") == "error":
            raise EvaluationError(str(item.get("$error", "evaluation failed")))
    return items


def _locate(doc: dict[str, Any], node: ResourceNode) -> Loc | None:
    data = node.data
    if data is doc:
        return root_loc(doc)
    loc = _walk(doc, node.propName, data) if node.propName else None
    if loc is None and isinstance(data, (dict, list)):
        loc = _find(doc, data)
    return loc


def _walk(doc: dict[str, Any], prop_name: str, data: Any) -> Loc | None:
    segments = prop_name.split(".")
    if segments[0] != doc.get("resourceType"):
        return None
    loc = root_loc(doc)
    for segment in segments[1:]:
        match = _SEGMENT.fullmatch(segment)
        if match is None or not isinstance(loc.value, dict):
            return None
        key = key_for(loc.value, loc.type_path, match.group(1))
        if key is None:
            return None
        value = loc.value[key]
        if match.group(2) is None:
            if isinstance(value, list):
                return None  # fhirpathpy always indexes list items, so this is not our node
            loc = _child(loc, key, None, value)
        else:
            index = int(match.group(2))
            if not isinstance(value, list) or index >= len(value):
                return None
            loc = _child(loc, key, index, value[index])
    if isinstance(data, (dict, list)):
        return loc if loc.value is data else None
    # Primitives have no identity; equal value and type at the spelled-out place is enough.
    return loc if type(loc.value) is type(data) and loc.value == data else None


def _find(doc: dict[str, Any], target: object) -> Loc | None:
    stack = [root_loc(doc)]
    while stack:
        loc = stack.pop()
        if loc.value is target:
            return loc
        if not isinstance(loc.value, dict):
            continue
        for key, value in loc.value.items():
            if isinstance(value, dict):
                stack.append(_child(loc, key, None, value))
            elif isinstance(value, list):
                stack.extend(_child(loc, key, i, v) for i, v in enumerate(value) if isinstance(v, dict))
    return None


def _child(parent: Loc, key: str, index: int | None, value: Any) -> Loc:
    if isinstance(value, dict) and isinstance(value.get("resourceType"), str):
        type_path: str | None = value["resourceType"]  # contained / Bundle.entry.resource
    else:
        type_path = model.child_type(parent.type_path, key)
    return Loc(value, parent.value, key, index, parent, type_path, choice_base(parent.type_path, key))


def _select_through_parent(doc: dict[str, Any], ast: dict[str, Any]) -> list[Loc]:
    split = member_split(ast)
    if split is None:
        raise UnlocatableError("the path selects values that are not elements of the resource")
    parent_ast, name = split
    parents = [root_loc(doc)] if parent_ast is None else select(doc, parent_ast)
    return _distinct([child for parent in parents for child in children_of(parent, name)])


def _member_name(node: dict[str, Any]) -> str | None:
    if node.get("type") != "MemberInvocation":
        return None
    ident = (node.get("children") or [{}])[0]
    text = ident.get("text")
    return text.strip("`") if isinstance(text, str) else None


def _distinct(locs: list[Loc]) -> list[Loc]:
    seen: set[tuple[int, str | None, int | None]] = set()
    out = []
    for loc in locs:
        if loc.place() not in seen:
            seen.add(loc.place())
            out.append(loc)
    return out
