"""Lookup tables the validator walks: one ``Struct`` per type or backbone element, built at import."""

from __future__ import annotations

from typing import Any, Callable

from fhir_server.definitions import json_names, load_model

from ._primitives import CHECKERS, Checker, check_reference

__all__ = [
    "PRIMITIVE",
    "COMPLEX",
    "RESOURCE",
    "SINGLE_PRIMITIVE",
    "SINGLE_COMPLEX",
    "SINGLE_RESOURCE",
    "ARRAY_PRIMITIVE",
    "ARRAY_COMPLEX",
    "ARRAY_RESOURCE",
    "Elem",
    "Struct",
    "STRUCTS",
    "ELEMENT",
    "resource_struct",
]

PRIMITIVE, COMPLEX, RESOURCE = 0, 1, 2
# Elem.mode: kind and array-ness in one int, so the walk branches once per property.
SINGLE_PRIMITIVE, SINGLE_COMPLEX, SINGLE_RESOURCE, ARRAY_PRIMITIVE, ARRAY_COMPLEX, ARRAY_RESOURCE = range(6)
_UNBOUNDED = 1 << 62


class Elem:
    """One JSON property of a Struct (a choice element yields one Elem per type)."""

    __slots__ = ("name", "path", "kind", "type", "array", "mode", "min", "max", "check", "struct", "codes", "systems", "choice")

    def __init__(self, name: str, path: str, kind: int, type_: str, min_: int, max_: int) -> None:
        self.name = name
        self.path = path  # definition path, e.g. Observation.value[x]
        self.kind = kind
        self.type = type_
        self.min = min_
        self.max = max_
        self.array = max_ > 1  # FHIR JSON: arrays exactly when the base max is > 1 or *
        self.mode = kind + (3 if self.array else 0)
        self.check: Checker | None = None
        self.struct: Struct | None = None
        self.codes: frozenset[str] | None = None  # required binding on a code
        self.systems: dict[str, frozenset[str]] | None = None  # required binding on Coding/CodeableConcept
        self.choice: str | None = None  # "value[x]" for valueQuantity etc.


class Struct:
    """The allowed properties of one kind of JSON object."""

    __slots__ = ("name", "fields", "required", "is_resource", "post")

    def __init__(self, name: str, is_resource: bool = False) -> None:
        self.name = name
        self.fields: dict[str, Elem] = {}
        # (keys any of which satisfies it, elem): "_x" counts, extension-only values are present.
        self.required: tuple[tuple[tuple[str, ...], Elem], ...] = ()
        self.is_resource = is_resource
        self.post: Callable[[Any, dict[str, Any], str], None] | None = None


def _build() -> dict[str, Struct]:
    model = load_model()
    types: dict[str, Any] = model["types"]
    value_sets: dict[str, Any] = model["valueSets"]
    structs: dict[str, Struct] = {}
    for name, t in types.items():
        structs[name] = Struct(name, is_resource=t["kind"] == "resource")
    # Backbone elements: any path with children gets its own Struct, so contentReference can point to it.
    for t in types.values():
        parents = {row["p"].rsplit(".", 1)[0] for row in t["elements"]}
        for row in t["elements"]:
            if row["p"] in parents:
                structs[row["p"]] = Struct(row["p"])
    required: dict[str, list[tuple[tuple[str, ...], Elem]]] = {}
    for t in types.values():
        for row in t["elements"]:
            _add_row(row, structs, value_sets, required)
    for path, reqs in required.items():
        structs[path].required = tuple(reqs)
    structs["Reference"].fields["reference"].check = check_reference
    return structs


def _add_row(
    row: dict[str, Any],
    structs: dict[str, Struct],
    value_sets: dict[str, Any],
    required: dict[str, list[tuple[tuple[str, ...], Elem]]],
) -> None:
    path: str = row["p"]
    parent = structs[path.rsplit(".", 1)[0]]
    max_ = _UNBOUNDED if row["x"] == "*" else int(row["x"])
    if max_ == 0:
        return  # prohibited: leave it unknown
    types: list[str] = row.get("t", [])
    target = structs.get(row["r"][1:]) if "r" in row else structs.get(path)
    names = json_names(path, types) if types else [path.rsplit(".", 1)[-1]]
    binding = value_sets.get(row["b"]) if "b" in row else None
    elems: list[Elem] = []
    for i, name in enumerate(names):
        type_ = types[i] if types else "BackboneElement"
        if target is not None:  # backbone element or contentReference
            elem = Elem(name, path, COMPLEX, type_, row["n"], max_)
            elem.struct = target
        elif type_ in CHECKERS:
            elem = Elem(name, path, PRIMITIVE, type_, row["n"], max_)
            elem.check = CHECKERS[type_]
            if binding is not None:
                elem.codes = frozenset(c for codes in binding.values() for c in codes)
        elif type_ == "Resource":
            elem = Elem(name, path, RESOURCE, type_, row["n"], max_)
        else:
            elem = Elem(name, path, COMPLEX, type_, row["n"], max_)
            elem.struct = structs[type_]
            if binding is not None and type_ in ("Coding", "CodeableConcept"):
                elem.systems = {s: frozenset(c) for s, c in binding.items()}
        if path.endswith("[x]"):
            elem.choice = path.rsplit(".", 1)[-1]
        parent.fields[name] = elem
        elems.append(elem)
    if row["n"] >= 1:
        keys: list[str] = []
        for e in elems:
            keys.append(e.name)
            if e.kind == PRIMITIVE:
                keys.append("_" + e.name)
        required.setdefault(parent.name, []).append((tuple(keys), elems[0]))


STRUCTS = _build()
# What a primitive's "_x" companion may hold.
ELEMENT = STRUCTS["Element"]


def resource_struct(resource_type: str) -> Struct | None:
    """The Struct of a concrete resource type, or None."""
    st = STRUCTS.get(resource_type)
    return st if st is not None and st.is_resource and resource_type not in ("Resource", "DomainResource") else None
