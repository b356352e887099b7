"""FHIRPath Patch (R4 fhirpatch.html): apply a ``Parameters`` of operations to a resource."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from ..outcome import FhirError
from . import _r4_model as model
from ._locate import (
    EvaluationError,
    Loc,
    UnlocatableError,
    key_for,
    member_split,
    root_loc,
    select,
)
from ._parameters import Operation, Value, parse_parameters

_FAILED_ZH = "补丁无法应用到该资源"


def apply_fhirpath_patch(resource: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """Return a patched copy of ``resource``; ``resource`` itself is not changed.

    Raises FhirError 400 for a malformed ``Parameters`` and 422 when an operation cannot be
    applied (path selects the wrong number of elements, index out of range, ...).
    """
    operations = parse_parameters(parameters)
    if not isinstance(resource, dict):
        raise FhirError.of(400, "invalid", "the resource to patch must be a JSON object")
    doc = copy.deepcopy(resource)
    for op in operations:
        _APPLY[op.type](doc, op)
        for key in ("resourceType", "id"):
            if doc.get(key) != resource.get(key):
                raise _fail(op, f"a patch must not change the resource's {key}")
    return doc


def _add(doc: dict[str, Any], op: Operation) -> None:
    assert op.name is not None and op.value is not None
    target = _single(doc, op)
    if not isinstance(target.value, dict):
        raise _fail(op, f"the path selects a primitive value, which cannot contain '{op.name}'")
    owner = target.type_path
    key = _key(op, owner, op.name, op.value)
    data = target.value
    existing = data.get(key)
    value = _build(op, op.value, _type_of(owner, key, op.value))
    if isinstance(existing, list):
        _edit_list(data, key, lambda items, v: items.append(v), value)
        return
    if existing is not None or _has_choice_sibling(data, owner, op.name):
        raise _fail(op, f"'{op.name}' already has a value and does not repeat; use replace")
    data[key] = [value] if model.is_repeating(owner, op.name) else value


def _insert(doc: dict[str, Any], op: Operation) -> None:
    assert op.value is not None and op.index is not None
    parent, key = _list_owner(doc, op)
    data = parent.value
    items = data.get(key)
    if items is None:
        if model.is_known(parent.type_path, key) and not model.is_repeating(parent.type_path, key):
            raise _fail(op, f"'{key}' is not a repeating element")
        items = []
    elif not isinstance(items, list):
        raise _fail(op, f"'{key}' is not a list")
    if op.index > len(items):
        raise _fail(op, f"index {op.index} is out of range: the list has {len(items)} items")
    value = _build(op, op.value, _type_of(parent.type_path, key, op.value))
    data[key] = items
    index = op.index
    _edit_list(data, key, lambda items, v: items.insert(index, v), value)


def _delete(doc: dict[str, Any], op: Operation) -> None:
    locs = _select(doc, op)
    if not locs:
        return  # the spec: delete the element "if found"
    if len(locs) > 1:
        raise _fail(op, f"the path matches {len(locs)} elements; delete removes exactly one")
    loc = locs[0]
    if loc.is_root:
        raise _fail(op, "cannot delete the resource itself")
    _remove(loc)
    # An emptied object or array is not valid FHIR JSON; remove it as the object model would.
    parent = loc.parent
    while parent is not None and not parent.is_root and parent.value in ({}, []):
        _remove(parent)
        parent = parent.parent


def _replace(doc: dict[str, Any], op: Operation) -> None:
    assert op.value is not None
    loc = _single(doc, op)
    if loc.is_root or loc.container is None or loc.key is None:
        raise _fail(op, "cannot replace the resource itself")
    data, key = loc.container, loc.key
    owner = loc.parent.type_path if loc.parent else None
    new_key = key
    if loc.base is not None and op.value.suffix is not None:
        # Replacing valueQuantity with a valueString moves the value to the valueString key.
        new_key = _key(op, owner, loc.base, op.value)
    value = _build(op, op.value, loc.type_path if new_key == key else model.child_type(owner, new_key))
    if loc.index is not None:
        index = loc.index
        _edit_list(data, key, lambda items, v: items.__setitem__(index, v), value)
    elif new_key != key:
        del data[key]
        data.pop("_" + key, None)
        data[new_key] = value
    else:
        data[key] = value
        # A new primitive value replaces the whole element, its id and extensions too.
        data.pop("_" + key, None)


def _move(doc: dict[str, Any], op: Operation) -> None:
    assert op.source is not None and op.destination is not None
    parent, key = _list_owner(doc, op)
    items = parent.value.get(key)
    if not isinstance(items, list):
        raise _fail(op, f"'{key}' is not a list" if items is not None else f"there is no '{key}' list")
    for label, index in (("source", op.source), ("destination", op.destination)):
        if index >= len(items):
            raise _fail(op, f"{label} {index} is out of range: the list has {len(items)} items")
    src, dst = op.source, op.destination
    _edit_list(parent.value, key, lambda items, _: items.insert(dst, items.pop(src)), None)


_APPLY: dict[str, Callable[[dict[str, Any], Operation], None]] = {
    "add": _add,
    "insert": _insert,
    "delete": _delete,
    "replace": _replace,
    "move": _move,
}


def _select(doc: dict[str, Any], op: Operation, ast: dict[str, Any] | None = None) -> list[Loc]:
    try:
        return select(doc, op.ast if ast is None else ast)
    except EvaluationError as exc:
        raise _fail(op, f"the path could not be evaluated: {exc}") from None
    except UnlocatableError as exc:
        raise _fail(op, str(exc)) from None


def _single(doc: dict[str, Any], op: Operation) -> Loc:
    locs = _select(doc, op)
    if len(locs) != 1:
        found = "no element" if not locs else f"{len(locs)} elements"
        raise _fail(op, f"the path matches {found}; exactly one is required")
    return locs[0]


def _list_owner(doc: dict[str, Any], op: Operation) -> tuple[Loc, str]:
    """The element holding the list that ``op.path`` names, and the list's key."""
    split = member_split(op.ast)
    if split is None or (split[0] is None and split[1] == doc.get("resourceType")):
        raise _fail(op, "the path must name a list element, such as Patient.identifier")
    parent_ast, name = split
    parents = [root_loc(doc)] if parent_ast is None else _select(doc, op, parent_ast)
    if len(parents) != 1 or not isinstance(parents[0].value, dict):
        found = "no element" if not parents else f"{len(parents)} elements"
        if len(parents) == 1:
            found = "a primitive value"
        raise _fail(op, f"the element that holds '{name}' matches {found}; exactly one is required")
    parent = parents[0]
    return parent, key_for(parent.value, parent.type_path, name) or name


def _key(op: Operation, owner: str | None, name: str, value: Value) -> str:
    """The JSON key for element ``name``: ``deceased`` + valueBoolean -> ``deceasedBoolean``."""
    choices = model.choice_types(owner, name)
    if choices is None:
        return name
    if value.suffix is None:
        raise _fail(
            op, f"'{name}' is a choice element; give its value as value[x], one of: {', '.join(choices)}"
        )
    if value.suffix not in choices:
        raise _fail(op, f"type {value.suffix} is not allowed for '{name}[x]'; allowed: {', '.join(choices)}")
    return name + value.suffix


def _has_choice_sibling(data: dict[str, Any], owner: str | None, name: str) -> bool:
    return any(name + t in data for t in model.choice_types(owner, name) or ())


def _type_of(owner: str | None, key: str, value: Value) -> str | None:
    """The type path of a new element: its resourceType for a resource, else from the model."""
    if isinstance(value.json, dict) and isinstance(value.json.get("resourceType"), str):
        return str(value.json["resourceType"])
    return model.child_type(owner, key)


def _build(op: Operation, value: Value, type_path: str | None) -> Any:
    """The JSON for ``value``; nested parts become an object typed by ``type_path``."""
    if value.parts is None:
        return copy.deepcopy(value.json)
    grouped: dict[str, tuple[str, list[Any]]] = {}
    for name, sub in value.parts:
        key = _key(op, type_path, name, sub)
        child = _build(op, sub, _type_of(type_path, key, sub))
        grouped.setdefault(key, (name, []))[1].append(child)
    # Cardinality decides array vs single; a name given twice is an array whatever the model says.
    return {
        key: items if len(items) > 1 or model.is_repeating(type_path, name) else items[0]
        for key, (name, items) in grouped.items()
    }


def _remove(loc: Loc) -> None:
    data, key = loc.container, loc.key
    assert data is not None and key is not None
    if loc.index is None:
        del data[key]
        data.pop("_" + key, None)
        return
    index = loc.index
    _edit_list(data, key, lambda items, _: items.pop(index), None)
    if not data[key]:
        del data[key]
        data.pop("_" + key, None)


def _edit_list(data: dict[str, Any], key: str, edit: Callable[[list[Any], Any], object], value: Any) -> None:
    """Apply ``edit`` to the list ``data[key]`` and, with a null, to its ``_key`` array.

    ``_key`` carries the ids/extensions of primitive items and must stay aligned with ``key``
    item for item; once it holds only nulls it is dropped.
    """
    items = data[key]
    side = data.get("_" + key)
    if isinstance(side, list):
        side[:] = (side + [None] * len(items))[: len(items)]
        edit(side, None)
        if all(item is None for item in side):
            del data["_" + key]
    edit(items, value)


def _fail(op: Operation, message: str) -> FhirError:
    return FhirError.of(
        422,
        "processing",
        f"FHIRPath Patch {op.label}: {message}",
        expression=(op.path,),
        details_zh=_FAILED_ZH,
    )
