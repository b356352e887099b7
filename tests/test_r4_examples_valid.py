"""Every resource in HL7's R4 examples package passes structural validation, bar known-bad ones."""

from __future__ import annotations

import json
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson
import pytest

from fhir_server.validation import validate_resource

_SHARED = Path(__file__).resolve().parents[2] / "shared"
_TGZ = _SHARED / "fhir-r4" / "hl7.fhir.r4.examples-4.0.1.tgz"

# Files of the published 4.0.1 package that really are invalid R4, with why.
KNOWN_INVALID: dict[str, str] = {
    "Questionnaire-qs1.json": "nested items lack linkId, which is 1..1 (Questionnaire.item.linkId)",
    "ImplementationGuide-fhir.json": "no name and no status (both 1..1); a manifest reference's id is 67 chars (max 64)",
    "ig-r4.json": "same ImplementationGuide as ImplementationGuide-fhir.json: no name/status, 67-char id in a reference",
    "SearchParameter-questionnaireresponse-extensions-QuestionnaireResponse-item-subject.json": "id is 67 chars; ids are at most 64",
    **{
        f"SearchParameter-{cs}-extensions-{rt}-{name}.json": "no SearchParameter.base, which is 1..*"
        for cs, rt in (("codesystem", "CodeSystem"), ("valueset", "ValueSet"))
        for name in ("author", "effective", "end", "keyword", "workflow")
    },
}


@lru_cache(maxsize=1)
def _examples() -> dict[str, Any]:
    if not _TGZ.is_file():
        pytest.skip(f"HL7 R4 examples package not found at {_TGZ} (shared folder absent)")
    out: dict[str, Any] = {}
    with tarfile.open(_TGZ, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if not member.isfile() or not name.endswith(".json") or name in ("package.json", ".index.json"):
                continue
            f = tar.extractfile(member)
            assert f is not None
            out[name] = orjson.loads(f.read())
    return out


def _errors(resource: Any) -> list[str]:
    return [f"{i.code} {'/'.join(i.expression)}: {i.diagnostics}" for i in validate_resource(resource) if i.severity == "error"]


def test_examples_are_valid() -> None:
    examples = _examples()
    assert len(examples) > 5000  # all resources of the package, conformance resources included
    failures = {}
    for name, resource in sorted(examples.items()):
        if name in KNOWN_INVALID:
            continue
        errors = _errors(resource)
        if errors:
            failures[name] = errors[:5]
    assert not failures, json.dumps(failures, indent=1, ensure_ascii=False)


@pytest.mark.parametrize("name", sorted(KNOWN_INVALID))
def test_known_invalid_examples_still_fail(name: str) -> None:
    examples = _examples()
    assert name in examples, f"{name} is no longer in the package: drop it from KNOWN_INVALID"
    assert _errors(examples[name]), f"{name} now validates: drop it from KNOWN_INVALID"


# Examples of the 4.0.1 package that break an R4 invariant (not a limitation of the validator).
INVARIANT_EXCEPTIONS: dict[str, str] = {
    **{
        f"StructureDefinition-{name}.json": "sdf-4: a logical model of the workflow patterns with neither abstract=true nor a baseDefinition"
        for name in ("Definition", "Event", "FiveWs", "Request")
    },
    "Bundle-dataelements.json": "bdl-7: a collection with the same fullUrl on several entries (de-Quantity.value 3 times ...)",
}


def _invariant_errors(resource: Any) -> list[str]:
    from fhir_server.validation.base_invariants import check_base_invariants

    return [
        f"{'/'.join(i.expression)}: {i.diagnostics}"
        for i in check_base_invariants(resource)
        if i.severity == "error" or i.code == "informational"
    ]


def test_examples_pass_the_r4_invariants() -> None:
    """Every R4 invariant (dom-3, pat-1, per-1, obs-7, que-7 ...) evaluated as FHIRPath on every
    example: none fails and none is left unevaluated, except the listed, really invalid ones."""
    examples = _examples()
    failures = {}
    for name, resource in sorted(examples.items()):
        if name in KNOWN_INVALID or name in INVARIANT_EXCEPTIONS:
            continue
        errors = _invariant_errors(resource)
        if errors:
            failures[name] = errors[:5]
    assert not failures, json.dumps(failures, indent=1, ensure_ascii=False)


@pytest.mark.parametrize("name", sorted(INVARIANT_EXCEPTIONS))
def test_invariant_exceptions_still_fail(name: str) -> None:
    examples = _examples()
    if name not in examples:
        pytest.skip(f"{name} is not in this package")
    assert _invariant_errors(examples[name]), f"{name} now passes its invariants: drop it from INVARIANT_EXCEPTIONS"
