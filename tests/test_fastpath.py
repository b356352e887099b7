"""The fast FHIRPath subset (validation/fastpath.py) against fhirpathpy: the same verdict for every
invariant leaf it answers, over the CN examples and the official R4 examples."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any, Iterator

import pytest
from fhirpathpy import evaluate
from fhirpathpy.models import models
from fhirpathpy.parser import parse

from fhir_server.conformance.registry import ConformanceRegistry
from fhir_server.validation import invariants
from fhir_server.validation.base_invariants import check_base_invariants
from fhir_server.validation.fastpath import Unsupported, compile_fast
from fhir_server.validation.registry_definitions import validator_for

from tests.conftest import shared_path

ROOT = Path(__file__).resolve().parents[1]
OBS = {
    "resourceType": "Observation",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}, {"system": "urn:x", "code": "DE04"}], "text": "收缩压"},
    "valueQuantity": {"value": 120, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
    "component": [{"code": {"text": "a"}}, {"code": {"text": "b"}, "valueString": "x"}],
    "extension": [{"url": "http://e/hash", "valueString": "ab12"}],
}


@pytest.mark.parametrize(
    "expression",
    [
        "status = 'final'",
        "status != 'final'",
        "code.coding.where(system = 'http://loinc.org' and code.matches('^[0-9]+-[0-9]$')).exists()",
        "code.coding.where(system = 'urn:none').exists()",
        "code.coding.code.count() = 2",
        "value.exists() and component.all(code.exists())",
        "component.where(value.exists()).count() = 1",
        "status in ('final' | 'amended')",
        "status in ('preliminary' | 'amended')",
        "dataAbsentReason.empty() implies value.exists()",
        "value.ofType(Quantity).code = 'mm[Hg]'",
        "extension.where(url = 'http://e/hash').value.ofType(string).matches('^[0-9a-f]+$')",
        "code.text.startsWith('收缩')",
        "code.text.length() = 3",
        "issued.exists() or effective.exists()",
        "(status = 'final') or (status = 'amended')",
        "component.first().code.text = 'a'",
        "note.empty().not()",
    ],
)
def test_subset_agrees_with_fhirpathpy(expression: str) -> None:
    fast = compile_fast(parse(expression)["children"][0])
    assert fast is not None, "this expression is in the subset"
    assert fast(OBS) == evaluate(OBS, expression, model=models["r4"])


@pytest.mark.parametrize("expression", ["%resource.id.exists()", "iif(status = 'final', true, false)", "code.coding.union(code.coding).count() = 2", "descendants().count() > 1"])
def test_outside_the_subset_is_left_to_fhirpathpy(expression: str) -> None:
    assert compile_fast(parse(expression)["children"][0]) is None


def test_primitive_extensions_go_to_fhirpathpy_at_run_time() -> None:
    fast = compile_fast(parse("gender.extension.exists()")["children"][0])
    assert fast is not None
    with pytest.raises(Unsupported):
        fast({"resourceType": "Patient", "gender": "male", "_gender": {"extension": [{"url": "x", "valueCode": "1"}]}})


def _cn_resources() -> Iterator[dict[str, Any]]:
    for path in sorted([*(ROOT / "profiles" / "examples").glob("*.json"), *(ROOT / "profiles" / "examples" / "invalid").glob("*-*.json")]):
        yield json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture
def cross_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(invariants, "CROSS_CHECK", True)


def test_cn_profiles_same_verdicts_both_ways(cross_check: None) -> None:
    registry = ConformanceRegistry()
    for path in sorted([*(ROOT / "terminology").glob("*.json"), *(ROOT / "profiles").glob("*.json")]):
        res = json.loads(path.read_text(encoding="utf-8"))
        registry.apply(res["resourceType"], res["id"], 1, res)
    validator = validator_for(registry)
    count = 0
    for resource in _cn_resources():
        validator.validate(resource)  # raises on any disagreement
        count += 1
    assert count > 100


def test_r4_examples_same_verdicts_both_ways(cross_check: None) -> None:
    heavy = ("StructureDefinition", "ValueSet", "CodeSystem", "ConceptMap", "SearchParameter", "OperationDefinition", "CapabilityStatement", "ImplementationGuide")
    count = 0
    with tarfile.open(shared_path("fhir-r4", "hl7.fhir.r4.examples-4.0.1.tgz"), "r:gz") as tar:
        for member in tar.getmembers():
            if not member.name.endswith(".json") or member.name.startswith("package/Bundle-"):
                continue
            doc = json.load(tar.extractfile(member))  # type: ignore[arg-type]
            if isinstance(doc, dict) and doc.get("resourceType") and doc["resourceType"] not in heavy:
                check_base_invariants(doc)
                count += 1
    assert count > 650
