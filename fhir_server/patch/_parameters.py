"""Read a FHIRPath Patch ``Parameters`` resource into typed operations (any defect is a 400)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..outcome import FhirError
from ._locate import PathSyntaxError, parse_path

OPERATION_TYPES = ("add", "insert", "delete", "replace", "move")
_REQUIRED = {
    "add": ("path", "name", "value"),
    "insert": ("path", "value", "index"),
    "delete": ("path",),
    "replace": ("path", "value"),
    "move": ("path", "source", "destination"),
}
_PART_NAMES = ("type", "path", "name", "value", "index", "source", "destination")
_STRING_KEYS = ("valueString", "valueCode")
_INTEGER_KEYS = ("valueInteger", "valueUnsignedInt", "valuePositiveInt")
_BAD_PATCH_ZH = "补丁参数格式无效"


@dataclass(frozen=True, slots=True)
class Value:
    """A ``value`` part: a ``value[x]`` (``suffix`` set), a ``resource``, or nested ``parts``."""

    json: Any = None
    suffix: str | None = None
    parts: tuple[tuple[str, Value], ...] | None = None


@dataclass(frozen=True, slots=True)
class Operation:
    """One ``parameter`` named ``operation``."""

    number: int
    type: str
    path: str
    ast: dict[str, Any]
    name: str | None = None
    value: Value | None = None
    index: int | None = None
    source: int | None = None
    destination: int | None = None

    @property
    def label(self) -> str:
        return f"operation {self.number} ({self.type} at '{self.path}')"


def parse_parameters(parameters: object) -> list[Operation]:
    """The operations of a FHIRPath Patch, in order."""
    if not isinstance(parameters, dict) or parameters.get("resourceType") != "Parameters":
        raise _bad("FHIRPath Patch body must be a Parameters resource")
    entries = parameters.get("parameter", [])
    if not isinstance(entries, list):
        raise _bad("Parameters.parameter must be an array", "Parameters.parameter")
    return [_operation(i, entry) for i, entry in enumerate(entries)]


def _operation(number: int, entry: object) -> Operation:
    where = f"Parameters.parameter[{number}]"
    if not isinstance(entry, dict) or entry.get("name") != "operation":
        raise _bad(f"{where} must be a parameter named 'operation'", where)
    parts = entry.get("part")
    if not isinstance(parts, list) or not parts:
        raise _bad(f"{where} has no parts", where)
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for j, part in enumerate(parts):
        part_where = f"{where}.part[{j}]"
        name = part.get("name") if isinstance(part, dict) else None
        if name not in _PART_NAMES:
            raise _bad(
                f"{part_where} has unknown name {name!r}; expected one of {', '.join(_PART_NAMES)}",
                part_where,
            )
        if name in found:
            raise _bad(f"{where} has more than one '{name}' part", part_where)
        found[name] = (part_where, part)
    if "type" not in found:
        raise _bad(f"{where} has no 'type' part", where)
    op_type = _string(*found["type"])
    if op_type not in OPERATION_TYPES:
        raise _bad(
            f"{where}: unknown operation type {op_type!r}; expected one of {', '.join(OPERATION_TYPES)}",
            where,
        )
    for required in _REQUIRED[op_type]:
        if required not in found:
            raise _bad(f"{where}: a '{op_type}' operation needs a '{required}' part", where)
    path_where, path_part = found["path"]
    path = _string(path_where, path_part)
    try:
        ast = parse_path(path)
    except PathSyntaxError as exc:
        raise _bad(f"{path_where}: invalid FHIRPath '{path}': {exc}", path_where) from None
    return Operation(
        number=number,
        type=op_type,
        path=path,
        ast=ast,
        name=_string(*found["name"]) if "name" in found and op_type == "add" else None,
        value=_value(*found["value"])
        if "value" in found and op_type in ("add", "insert", "replace")
        else None,
        index=_integer(*found["index"]) if op_type == "insert" else None,
        source=_integer(*found["source"]) if op_type == "move" else None,
        destination=_integer(*found["destination"]) if op_type == "move" else None,
    )


def _value(where: str, part: dict[str, Any]) -> Value:
    forms = [k for k in part if k.startswith("value") and k[5:6].isupper()]
    forms += [k for k in ("resource", "part") if k in part]
    if len(forms) != 1:
        raise _bad(f"{where} must have exactly one of value[x], resource or part", where)
    form = forms[0]
    if form == "resource":
        if not isinstance(part["resource"], dict):
            raise _bad(f"{where}.resource must be a resource", where)
        return Value(json=part["resource"])
    if form != "part":
        return Value(json=part[form], suffix=form[5:])
    subparts = part["part"]
    if not isinstance(subparts, list) or not subparts:
        raise _bad(f"{where}.part must be a non-empty array", where)
    built = []
    for j, sub in enumerate(subparts):
        sub_where = f"{where}.part[{j}]"
        name = sub.get("name") if isinstance(sub, dict) else None
        if not isinstance(name, str) or not name:
            raise _bad(f"{sub_where} needs a name (the element name)", sub_where)
        built.append((name, _value(sub_where, sub)))
    return Value(parts=tuple(built))


def _string(where: str, part: dict[str, Any]) -> str:
    for key in _STRING_KEYS:
        if isinstance(part.get(key), str) and part[key]:
            return str(part[key])
    raise _bad(f"{where} ('{part.get('name')}') needs a non-empty valueString or valueCode", where)


def _integer(where: str, part: dict[str, Any]) -> int:
    for key in _INTEGER_KEYS:
        value = part.get(key)
        # bool is an int subclass but true is not an index.
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise _bad(f"{where} ('{part.get('name')}') must not be negative", where)
            return value
    raise _bad(f"{where} ('{part.get('name')}') needs a valueInteger", where)


def _bad(diagnostics: str, where: str | None = None) -> FhirError:
    return FhirError.of(
        400, "invalid", diagnostics, expression=(where,) if where else (), details_zh=_BAD_PATCH_ZH
    )
