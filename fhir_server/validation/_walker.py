"""One pass over a resource's JSON against the compiled Structs, collecting Issues."""

from __future__ import annotations

from typing import Any

from fhir_server.outcome import Issue, Severity

from ._model import (
    ARRAY_COMPLEX,
    ARRAY_PRIMITIVE,
    ELEMENT,
    PRIMITIVE,
    SINGLE_COMPLEX,
    SINGLE_PRIMITIVE,
    SINGLE_RESOURCE,
    STRUCTS,
    Elem,
    Struct,
    resource_struct,
)
from ._primitives import Fault

__all__ = ["Ctx", "validate_root"]


class Ctx:
    """State of one validate_resource call."""

    __slots__ = ("issues", "max_depth", "too_deep", "extensions")

    def __init__(self, max_depth: int, extensions: list[tuple[dict[str, Any], str]] | None = None) -> None:
        self.issues: list[Issue] = []
        self.max_depth = max_depth
        self.too_deep = False
        # When a list: every Extension object met, with its location (profile validation uses it).
        self.extensions = extensions

    def add(self, code: str, en: str, zh: str, path: str, severity: Severity = "error") -> None:
        self.issues.append(Issue(code, en, severity, (path,) if path else (), zh))


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _fault(ctx: Ctx, fault: Fault, elem: Elem, value: Any, path: str) -> None:
    shown = repr(value) if not isinstance(value, str) or len(value) <= 80 else repr(value[:77] + "...")
    found = f", found {_json_type(value)} {shown}" if fault.code == "structure" else f": {shown}"
    ctx.add(fault.code, f"{fault.en}{found}", fault.zh, path)


def _null(ctx: Ctx, path: str) -> None:
    ctx.add("structure", "null is not allowed here (omit the element instead)", "不允许 null 值", path)


def validate_root(ctx: Ctx, resource: Any, path: str, depth: int) -> None:
    """Validate ``resource`` as a resource of its own resourceType, located at ``path``."""
    if type(resource) is not dict:
        ctx.add("structure", f"A resource must be a JSON object, found {_json_type(resource)}", "资源必须是 JSON 对象", path)
        return
    rtype = resource.get("resourceType")
    if rtype is None:
        ctx.add("required", "Missing resourceType", "缺少 resourceType", path)
        return
    st = resource_struct(rtype) if type(rtype) is str else None
    if st is None:
        ctx.add("structure", f"Unknown resourceType {rtype!r}", f"未知资源类型 {rtype}", path)
        return
    _walk(ctx, resource, st, f"{path}.ofType({rtype})" if path else rtype, depth)


def _walk(ctx: Ctx, obj: dict[str, Any], st: Struct, path: str, depth: int) -> None:
    if depth > ctx.max_depth:
        if not ctx.too_deep:
            ctx.too_deep = True
            ctx.add("invalid", f"Nesting deeper than {ctx.max_depth} levels", f"嵌套超过 {ctx.max_depth} 层", path)
        return
    if not obj:
        ctx.add("structure", "Empty object not allowed (omit the element instead)", "不允许空对象", path)
        return
    fields = st.fields
    choices: dict[str, str] | None = None
    for key, val in obj.items():
        el = fields.get(key)
        if el is None:
            _other_key(ctx, obj, st, key, val, path, depth)
            continue
        if el.choice is not None:
            if choices is None:
                choices = {el.choice: key}
            elif el.choice in choices:
                ctx.add(
                    "structure",
                    f"Only one of {el.choice} allowed, found {choices[el.choice]} and {key}",
                    f"{el.choice} 只能有一个取值",
                    f"{path}.{key}",
                )
            else:
                choices[el.choice] = key
        mode = el.mode
        if mode == SINGLE_PRIMITIVE:
            fault = el.check(val)  # type: ignore[misc]
            if fault is not None:
                _single_fault(ctx, fault, el, val, f"{path}.{key}")
            elif el.codes is not None and val not in el.codes:
                _bad_code(ctx, el, val, f"{path}.{key}")
        elif mode == SINGLE_COMPLEX:
            if type(val) is dict:
                _walk(ctx, val, el.struct, f"{path}.{key}", depth + 1)  # type: ignore[arg-type]
                if el.systems is not None:
                    _check_coded(ctx, el, val, f"{path}.{key}")
            else:
                _not_single_object(ctx, el, val, f"{path}.{key}")
        elif mode == SINGLE_RESOURCE:
            if type(val) is list:
                _not_single_object(ctx, el, val, f"{path}.{key}")
            else:
                validate_root(ctx, val, f"{path}.{key}", depth + 1)
        elif type(val) is not list or not val:
            _not_array(ctx, el, val, f"{path}.{key}")
        else:
            n = len(val)
            if n > el.max or n < el.min:
                ctx.add(
                    "structure",
                    f"{key} has {n} items, allowed {el.min}..{_card(el.max)}",
                    f"{key} 的数量 {n} 不符合基数 {el.min}..{_card(el.max)}",
                    f"{path}.{key}",
                )
            if mode == ARRAY_PRIMITIVE:
                check = el.check
                codes = el.codes
                for i, item in enumerate(val):
                    fault = check(item)  # type: ignore[misc]
                    if fault is not None:
                        if item is None:
                            _null_item(ctx, obj, key, i, path)
                        else:
                            _fault(ctx, fault, el, item, f"{path}.{key}[{i}]")
                    elif codes is not None and item not in codes:
                        _bad_code(ctx, el, item, f"{path}.{key}[{i}]")
            elif mode == ARRAY_COMPLEX:
                sub = el.struct
                for i, item in enumerate(val):
                    ipath = f"{path}.{key}[{i}]"
                    if type(item) is dict:
                        _walk(ctx, item, sub, ipath, depth + 1)  # type: ignore[arg-type]
                        if el.systems is not None:
                            _check_coded(ctx, el, item, ipath)
                    elif item is None:
                        _null(ctx, ipath)
                    else:
                        _not_object(ctx, el, item, ipath)
            else:
                for i, item in enumerate(val):
                    validate_root(ctx, item, f"{path}.{key}[{i}]", depth + 1)
    for keys, rel in st.required:
        for k in keys:
            if k in obj:
                break
        else:
            name = rel.choice or rel.name
            ctx.add("required", f"Missing required element {name}", f"缺少必填元素 {name}", f"{path}.{name}")
    if st.post is not None:
        st.post(ctx, obj, path)


def _card(n: int) -> str:
    return "*" if n > 1 << 32 else str(n)


def _single_fault(ctx: Ctx, fault: Fault, el: Elem, val: Any, path: str) -> None:
    # Checkers see null and arrays as wrong JSON types; say what is really wrong.
    if val is None:
        _null(ctx, path)
    elif type(val) is list:
        _not_single_object(ctx, el, val, path)
    else:
        _fault(ctx, fault, el, val, path)


def _not_single_object(ctx: Ctx, el: Elem, val: Any, path: str) -> None:
    if val is None:
        _null(ctx, path)
    elif type(val) is list:
        ctx.add("structure", f"{el.name} must be a single value, not an array (max 1)", f"{el.name} 不能是数组", path)
    else:
        _not_object(ctx, el, val, path)


def _not_array(ctx: Ctx, el: Elem, val: Any, path: str) -> None:
    if val is None:
        _null(ctx, path)
    elif type(val) is not list:
        ctx.add("structure", f"{el.name} must be a JSON array (max {_card(el.max)})", f"{el.name} 必须是数组", path)
    else:
        ctx.add("structure", "Empty array not allowed (omit the element instead)", "不允许空数组", path)


def _not_object(ctx: Ctx, el: Elem, val: Any, path: str) -> None:
    ctx.add("structure", f"Expected a JSON object for {el.type}, found {_json_type(val)}", f"JSON 类型错误：{el.type} 应为对象", path)


def _bad_code(ctx: Ctx, el: Elem, code: Any, path: str) -> None:
    ctx.add("value", f"Code {code!r} is not in the required value set of {el.path}", f"代码 {code} 不在必需值集中", path)


def _null_item(ctx: Ctx, obj: dict[str, Any], key: str, i: int, path: str) -> None:
    # null marks a slot whose value lives only in the "_key" parallel array (json.html#primitive).
    ext = obj.get("_" + key)
    if type(ext) is list and i < len(ext) and type(ext[i]) is dict:
        return
    _null(ctx, f"{path}.{key}[{i}]")


def _other_key(ctx: Ctx, obj: dict[str, Any], st: Struct, key: str, val: Any, path: str, depth: int) -> None:
    if key == "resourceType" and st.is_resource:
        return
    if type(key) is not str:  # only possible for dicts not made by a JSON parser
        ctx.add("structure", f"Non-string key {key!r}", "键必须是字符串", path)
        return
    if key[:1] == "_":
        el = st.fields.get(key[1:])
        if el is not None and el.kind == PRIMITIVE:
            _companion(ctx, obj, el, val, path, depth)
            return
    ctx.add("structure", f"Unknown element {key!r}", f"未知元素 {key}", f"{path}.{key}")


def _companion(ctx: Ctx, obj: dict[str, Any], el: Elem, val: Any, path: str, depth: int) -> None:
    """``_name``: the id/extensions of primitive ``name``; an array parallel to it when repeating."""
    name = el.name
    epath = f"{path}.{name}"
    if not el.array:
        if type(val) is dict:
            _walk(ctx, val, ELEMENT, epath, depth + 1)
        elif val is None:
            _null(ctx, epath)
        else:
            ctx.add("structure", f"_{name} must be a JSON object", f"_{name} 必须是对象", epath)
        return
    if type(val) is not list:
        ctx.add("structure", f"_{name} must be a JSON array parallel to {name}", f"_{name} 必须是与 {name} 对应的数组", epath)
        return
    if not val:
        ctx.add("structure", "Empty array not allowed (omit the element instead)", "不允许空数组", epath)
        return
    values = obj.get(name)
    if type(values) is list and len(values) != len(val):
        ctx.add(
            "structure",
            f"_{name} has {len(val)} items but {name} has {len(values)}",
            f"_{name} 与 {name} 的长度不一致",
            epath,
        )
    for i, item in enumerate(val):
        if type(item) is dict:
            _walk(ctx, item, ELEMENT, f"{epath}[{i}]", depth + 1)
        elif item is None:
            # Both null at i is reported once, from the value side.
            if type(values) is not list or i >= len(values):
                _null(ctx, f"{epath}[{i}]")
        else:
            ctx.add("structure", f"_{name}[{i}] must be a JSON object or null", f"_{name} 的条目必须是对象或 null", f"{epath}[{i}]")


def _check_coded(ctx: Ctx, el: Elem, val: dict[str, Any], path: str) -> None:
    """Required binding on Coding / CodeableConcept: a coding must come from the value set."""
    systems = el.systems
    assert systems is not None
    codings = val.get("coding") if el.type == "CodeableConcept" else [val]
    if type(codings) is not list:
        if codings is not None:
            return  # a malformed coding is reported as a structure error already
        ctx.add(
            "value",
            f"No coding given; {el.path} requires a code from its value set",
            "缺少编码，必需值集要求提供代码",
            path,
            "warning",
        )
        return
    shown = []
    for c in codings:
        if type(c) is not dict:
            continue
        code = c.get("code")
        system = c.get("system")
        if type(code) is not str or (system is not None and type(system) is not str):
            continue  # reported as a JSON type error already
        if system is None:
            if any(code in codes for codes in systems.values()):
                return
        elif code in systems.get(system, ()):
            return
        shown.append(f"{system}|{code}")
    if shown:
        ctx.add(
            "value",
            f"None of {', '.join(shown)} is in the required value set of {el.path}",
            "代码不在必需值集中",
            path,
        )


def _extension_rule(ctx: Ctx, obj: dict[str, Any], path: str) -> None:
    if ctx.extensions is not None:
        ctx.extensions.append((obj, path))
    # ext-1: an extension has either a value[x] or nested extensions, never both, never neither.
    has_value = False
    for k in obj:
        if type(k) is str and k.startswith(("value", "_value")):
            has_value = True
            break
    has_nested = "extension" in obj
    if has_value and has_nested:
        ctx.add("invalid", "Extension has both a value and nested extensions", "扩展不能同时有值和子扩展", path)
    elif not has_value and not has_nested:
        ctx.add("invalid", "Extension has neither a value nor nested extensions", "扩展必须有值或子扩展", path)


STRUCTS["Extension"].post = _extension_rule
