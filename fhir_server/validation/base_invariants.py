"""The invariants of the R4 specification itself (dom-3, pat-1, per-1, obs-6 ...), on any resource.

They come from the generated model (``c`` on types and element rows). The walk follows the same
Structs as the structural validator, so it knows each node's type: a Period anywhere gets per-1,
every Patient.contact gets pat-1, a contained or bundled resource gets its own type's rules with
itself as ``%resource``. ele-1 and ext-1 are checked by the structural walk.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from fhir_server.definitions import load_model
from fhir_server.outcome import Issue

from ._model import ARRAY_COMPLEX, ARRAY_RESOURCE, SINGLE_COMPLEX, SINGLE_RESOURCE, STRUCTS, Struct
from .invariants import Invariant, compile_invariant, evaluate

log = logging.getLogger("fhir_server.validation")

__all__ = ["check_base_invariants", "SKIPPED"]

# R4 invariants that reject valid data or that fhirpathpy cannot evaluate as the spec means them;
# each is listed with why, and not evaluated.
SKIPPED: dict[str, str] = {
    # Uses descendants() over the whole resource for every contained resource: correct but it
    # costs milliseconds on large resources, and referential checks cover the same ground.
    # (kept: evaluated only when contained resources exist, thanks to folding)
}


# Chinese texts of the R4 invariants a clerk meets most; the others show the English rule.
_ZH: dict[str, str] = {
    "dom-2": "内含资源（contained）中不能再内含资源",
    "dom-3": "内含资源必须被本资源引用，或引用本资源",
    "dom-4": "内含资源不能有 meta.versionId 或 meta.lastUpdated",
    "dom-5": "内含资源不能有安全标签",
    "dom-6": "资源宜有叙述文本（text）",
    "pat-1": "联系人至少需要姓名、电话、地址或机构之一",
    "per-1": "开始时间不能晚于结束时间",
    "cpt-2": "联系方式有值时必须填写类型（system）",
    "qty-3": "有单位代码（code）时必须有单位系统（system）",
    "obs-6": "有缺失原因（dataAbsentReason）时不能有结果值",
    "obs-7": "组分编码与观察编码相同时，观察本身不能有结果值",
    "obs-3": "参考范围至少需要下限、上限或文字说明之一",
    "att-1": "附件有数据（data）时必须有内容类型（contentType）",
}


def _rows(rows: list[list[str]], base: str) -> tuple[Invariant, ...]:
    out = []
    for key, severity, expression, human in rows:
        if key in SKIPPED:
            continue
        try:
            out.append(compile_invariant(key, severity, expression, human, base, human_zh=_ZH.get(key), source="FHIR R4"))
        except ValueError as e:
            log.warning("R4 invariant not usable: %s", e)
    return tuple(out)


class _Lazy(dict):  # type: ignore[type-arg]
    """path → invariants, compiled the first time a node of that path is met (compiling all 956
    R4 invariants up front would cost seconds at every worker's first validation)."""

    def __init__(self, rows: dict[str, list[list[str]]]) -> None:
        super().__init__()
        self._rows = rows

    def get(self, key: str, default: Any = ()) -> tuple[Invariant, ...]:  # type: ignore[override]
        try:
            return dict.__getitem__(self, key)  # type: ignore[no-any-return]
        except KeyError:
            rows = self._rows.get(key)
            compiled = _rows(rows, key) if rows else ()
            self[key] = compiled
            return compiled


@lru_cache(maxsize=1)
def _tables() -> tuple[_Lazy, _Lazy]:
    """(Struct name → invariants of its nodes, element path → invariants of its values).

    Types and backbone elements have a Struct of their own: their invariants go with every node of
    that Struct, which also covers contentReference (Questionnaire.item.item is a
    Questionnaire.item). Other elements (a Reference-typed element with its own rule) keep theirs.
    """
    by_struct: dict[str, list[list[str]]] = {}
    by_path: dict[str, list[list[str]]] = {}
    for name, t in load_model()["types"].items():
        if t.get("c"):
            by_struct[name] = t["c"]
        for row in t["elements"]:
            if row.get("c"):
                target = by_struct if row["p"] in STRUCTS else by_path
                target[row["p"]] = row["c"]
    return _Lazy(by_struct), _Lazy(by_path)


@lru_cache(maxsize=1)
def _relevant() -> frozenset[str]:
    """Structs under which some invariant can apply: the walk skips every other subtree
    (a HumanName or a Coding holds none)."""
    by_struct, by_path = _tables()
    relevant = set(by_struct._rows)
    changed = True
    while changed:
        changed = False
        for name, st in STRUCTS.items():
            if name in relevant:
                continue
            for el in st.fields.values():
                if el.name in _EXTENSION_FIELDS:
                    continue  # walked only where an extension's value needs it (_needs_walk)
                if (
                    el.mode in (SINGLE_RESOURCE, ARRAY_RESOURCE)
                    or el.path in by_path._rows
                    or (el.struct is not None and el.struct.name in relevant)
                ):
                    relevant.add(name)
                    changed = True
                    break
    return frozenset(relevant)


_RELEVANT: frozenset[str] | None = None
_EXTENSION_FIELDS = ("extension", "modifierExtension")


def _needs_walk(ext: Any, depth: int = 0) -> bool:
    """Whether an extension holds a value an invariant applies to (a Period, a Reference ...)."""
    if type(ext) is not dict or depth > 8:
        return False
    fields = STRUCTS["Extension"].fields
    for key, value in ext.items():
        if key in _EXTENSION_FIELDS:
            if type(value) is list and any(_needs_walk(v, depth + 1) for v in value):
                return True
            continue
        el = fields.get(key)
        if el is not None and el.struct is not None and el.struct.name in _RELEVANT:  # type: ignore[operator]
            return True
    return False


def check_base_invariants(resource: dict[str, Any], location: str | None = None) -> list[Issue]:
    """Every failed R4 invariant in ``resource`` (nested resources included)."""
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        return []
    st = STRUCTS.get(resource["resourceType"])
    if st is None or not st.is_resource:
        return []
    issues: list[Issue] = []
    by_type, by_path = _tables()
    global _RELEVANT
    if _RELEVANT is None:
        _RELEVANT = _relevant()
    _walk(resource, st, location or resource["resourceType"], resource, resource, issues, by_type, by_path, 0)
    return issues


def _walk(
    obj: dict[str, Any],
    st: Struct,
    path: str,
    resource: dict[str, Any],
    root: dict[str, Any],
    issues: list[Issue],
    by_type: _Lazy,
    by_path: _Lazy,
    depth: int,
) -> None:
    if depth > 64:
        return
    for inv in by_type.get(st.name, ()):
        issues += evaluate(inv, obj, resource, path, root)
    fields = st.fields
    for key, val in obj.items():
        el = fields.get(key)
        if el is None:
            continue
        mode = el.mode
        if key in _EXTENSION_FIELDS:
            if type(val) is list:
                for i, item in enumerate(val):
                    if _needs_walk(item):
                        _walk(item, el.struct, f"{path}.{key}[{i}]", resource, root, issues, by_type, by_path, depth + 1)  # type: ignore[arg-type]
            continue
        if el.struct is not None and el.struct.name not in _RELEVANT and el.path not in by_path._rows:  # type: ignore[operator]
            continue
        here = by_path.get(el.path) if el.path not in STRUCTS and el.path in by_path._rows else None
        if mode == SINGLE_COMPLEX and type(val) is dict:
            if here:
                for inv in here:
                    issues += evaluate(inv, val, resource, f"{path}.{key}", root)
            _walk(val, el.struct, f"{path}.{key}", resource, root, issues, by_type, by_path, depth + 1)  # type: ignore[arg-type]
        elif mode == ARRAY_COMPLEX and type(val) is list:
            for i, item in enumerate(val):
                if type(item) is dict:
                    ipath = f"{path}.{key}[{i}]"
                    if here:
                        for inv in here:
                            issues += evaluate(inv, item, resource, ipath, root)
                    _walk(item, el.struct, ipath, resource, root, issues, by_type, by_path, depth + 1)  # type: ignore[arg-type]
        elif mode == SINGLE_RESOURCE and type(val) is dict:
            _nested(val, f"{path}.{key}", None, issues, by_type, by_path, depth)
        elif mode == ARRAY_RESOURCE and type(val) is list:
            # %rootResource of a contained resource is its container; bundled ones stand alone.
            container = root if key == "contained" else None
            for i, item in enumerate(val):
                if type(item) is dict:
                    _nested(item, f"{path}.{key}[{i}]", container, issues, by_type, by_path, depth)


def _nested(
    res: dict[str, Any],
    path: str,
    container: dict[str, Any] | None,
    issues: list[Issue],
    by_type: _Lazy,
    by_path: _Lazy,
    depth: int,
) -> None:
    rtype = res.get("resourceType")
    st = STRUCTS.get(rtype) if isinstance(rtype, str) else None
    if st is not None and st.is_resource:
        _walk(res, st, f"{path}.ofType({rtype})", res, container or res, issues, by_type, by_path, depth + 1)
