"""What the patch engines need to know about R4 element definitions.

Types, choice types and content references come from fhirpathpy's R4 model (the same one the
paths are evaluated with); cardinality comes from the server's generated R4 model
(:mod:`fhir_server.definitions`).
A "type path" is what fhirpathpy puts in ``ResourceNode.path``: a type name (``HumanName``,
``Patient``) or, for anonymous backbone elements, the element path (``Patient.contact``).
"""

from __future__ import annotations

from functools import cache
from typing import Any

from fhirpathpy.models import models

MODEL: dict[str, Any] = models["r4"]
_PATH2TYPE: dict[str, str] = MODEL["path2Type"]
_CHOICES: dict[str, list[str]] = MODEL["choiceTypePaths"]
_ELSEWHERE: dict[str, str] = MODEL["pathsDefinedElsewhere"]
# Types whose children are addressed by the element's own path, not by a type name.
_ANONYMOUS = {"BackboneElement", "Element"}


@cache
def _cardinality() -> tuple[frozenset[str], dict[str, str]]:
    """Element paths with max > 1, and content references (``ValueSet.compose.exclude`` → ``…include``)."""
    from fhir_server.definitions import load_model

    repeating, refs = set(), {}
    for type_def in load_model()["types"].values():
        for row in type_def["elements"]:
            if row["x"] not in ("0", "1"):
                repeating.add(row["p"])
            if row.get("r"):
                refs[row["p"]] = row["r"].lstrip("#")
    return frozenset(repeating), refs


def _element(owner: str, name: str) -> str:
    return _ELSEWHERE.get(f"{owner}.{name}", f"{owner}.{name}")


def is_known(owner: str | None, name: str) -> bool:
    """Whether the model defines element ``name`` on ``owner``."""
    if not owner:
        return False
    path = f"{owner}.{name}"
    return path in _PATH2TYPE or path in _CHOICES or path in _ELSEWHERE or path in _owners()


def is_repeating(owner: str | None, name: str) -> bool:
    """Whether ``owner.name`` has max cardinality ``*`` (False when unknown)."""
    # Cardinality belongs to the referencing element, so look it up before resolving
    # a content reference (Questionnaire.item.item -> Questionnaire.item).
    if not owner:
        return False
    if name in ("extension", "modifierExtension"):
        return True
    repeating, refs = _cardinality()
    path = f"{owner}.{name}"
    for _ in range(8):  # content references can chain (Questionnaire.item.item.item)
        if path in repeating:
            return True
        parent = path.rsplit(".", 1)[0]
        prefix = next((p for p in _prefixes(parent) if p in refs), None)
        if prefix is None:
            return False
        path = refs[prefix] + path[len(prefix):]
    return False


def _prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 1, -1)]


def choice_types(owner: str | None, name: str) -> list[str] | None:
    """The allowed type suffixes when ``owner.name`` is a choice element ``name[x]``."""
    if not owner:
        return None
    return _CHOICES.get(f"{owner}.{name}")


def child_type(owner: str | None, key: str) -> str | None:
    """The type path of the element stored under JSON ``key`` in an ``owner``."""
    if not owner:
        return None
    path = _element(owner, key)
    typ = _PATH2TYPE.get(path)
    if typ is None:
        # Backbone elements are absent from path2Type but still own child definitions.
        return path if path in _owners() else None
    return path if typ in _ANONYMOUS else typ


@cache
def _owners() -> frozenset[str]:
    return frozenset(p.rsplit(".", 1)[0] for p in _PATH2TYPE)
