"""The profile engine on HL7's own profiles: every official R4 example that claims a core profile
(vital signs, blood pressure, body weight, the extensions it uses ...) conforms to it, and breaking
one the way the profile forbids is caught. The profiles and examples come from HL7's package, an
independent source; nothing here was written for this server."""

from __future__ import annotations

import copy
import json
import tarfile
from functools import lru_cache
from typing import Any

import pytest

from fhir_server.conformance.registry import ConformanceRegistry
from fhir_server.validation.registry_definitions import validator_for
from fhir_server.validation.validator import Validator

from tests.conftest import shared_path

_BUNDLES = ("package/Bundle-profiles-others.json", "package/Bundle-extensions.json")


@lru_cache(maxsize=1)
def _package() -> tuple[Validator, dict[str, dict[str, Any]]]:
    registry = ConformanceRegistry()
    examples: dict[str, dict[str, Any]] = {}
    with tarfile.open(shared_path("fhir-r4", "hl7.fhir.r4.examples-4.0.1.tgz"), "r:gz") as tar:
        for name in _BUNDLES:
            for entry in json.load(tar.extractfile(name))["entry"]:  # type: ignore[arg-type]
                sd = entry["resource"]
                registry.apply("StructureDefinition", sd["id"], 1, sd)
        for member in tar.getmembers():
            if member.name.endswith(".json") and not member.name.startswith("package/Bundle-"):
                doc = json.load(tar.extractfile(member))  # type: ignore[arg-type]
                if isinstance(doc, dict) and (doc.get("meta") or {}).get("profile"):
                    examples[member.name.rsplit("/", 1)[-1]] = doc
    return validator_for(registry), examples


BP = "http://hl7.org/fhir/StructureDefinition/bp"
BODY_HEIGHT = "http://hl7.org/fhir/StructureDefinition/bodyheight"


def _errors(validator: Validator, resource: dict[str, Any], profiles: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    issues = validator.validate(resource, profiles=profiles)
    return [((i.expression or ("",))[0], i.diagnostics) for i in issues if i.severity == "error"]


def test_official_examples_conform_to_the_core_profiles_they_claim() -> None:
    validator, examples = _package()
    assert len(examples) > 1900
    failures = {name: _errors(validator, res)[:3] for name, res in examples.items()}
    failures = {k: v for k, v in failures.items() if v}
    assert not failures, json.dumps(failures, indent=1)[:4000]


def _set_code(code: str) -> Any:
    return lambda r: r["code"]["coding"].__setitem__(0, {"system": "http://loinc.org", "code": code})


@pytest.mark.parametrize(
    "name, profiles, change, location",
    [
        # vitalsigns (claimed by the example): subject 1..1, effective[x] 1..1, category slice VSCat 1..1
        ("Observation-blood-pressure.json", (), lambda r: r.pop("subject"), "Observation.subject"),
        ("Observation-blood-pressure.json", (), lambda r: r.pop("effectiveDateTime"), "Observation.effective"),
        ("Observation-blood-pressure.json", (), lambda r: r.pop("category"), "Observation.category"),
        # bp, asked for: the systolic component (code.coding:SBPCode 8480-6) is 1..1, unit fixed mm[Hg]
        ("Observation-blood-pressure.json", (BP,), lambda r: r["component"].pop(0), "Observation.component"),
        ("Observation-blood-pressure.json", (BP,), lambda r: r["component"][1]["valueQuantity"].update(code="kPa"), "Observation.component[1].valueQuantity.code"),
        # bodyheight: code.coding:BodyHeightCode fixed 8302-2
        ("Observation-body-height.json", (BODY_HEIGHT,), _set_code("29463-7"), "Observation.code"),
    ],
)
def test_breaking_a_core_profile_is_caught(name: str, profiles: tuple[str, ...], change: Any, location: str) -> None:
    validator, examples = _package()
    resource = copy.deepcopy(examples[name])
    assert _errors(validator, resource, profiles) == []
    change(resource)
    locations = [loc for loc, _ in _errors(validator, resource, profiles)]
    assert any(loc == location or loc.startswith(location) for loc in locations), locations
