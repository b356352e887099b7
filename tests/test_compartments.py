"""The compartment tables against facts picked by hand from the R4 CompartmentDefinitions
(compartmentdefinition-patient.html and siblings), not from the generated file itself."""

from __future__ import annotations

import pytest

from fhir_server.search.compartments import DEF, compartment_members, compartment_params, compartment_types
from fhir_server.search.parameters import params_for


def test_the_five_compartments() -> None:
    assert compartment_types() == ("Patient", "Encounter", "Practitioner", "RelatedPerson", "Device")


@pytest.mark.parametrize(
    ("compartment", "resource_type", "params"),
    [
        ("Patient", "Observation", ("subject", "performer")),
        ("Patient", "Patient", ("link",)),
        ("Patient", "Encounter", ("patient",)),
        ("Patient", "AllergyIntolerance", ("patient", "recorder", "asserter")),
        ("Patient", "Immunization", ("patient",)),
        ("Encounter", "Encounter", (DEF,)),
        ("Encounter", "Observation", ("encounter",)),
        ("Practitioner", "Practitioner", (DEF,)),
        ("Practitioner", "Patient", ("general-practitioner",)),
        ("Practitioner", "Encounter", ("practitioner", "participant")),
        ("RelatedPerson", "RelatedPerson", (DEF,)),
        ("RelatedPerson", "Patient", ("link",)),
        ("Device", "Observation", ("subject", "device")),
    ],
)
def test_params_linking_a_type_into_a_compartment(compartment: str, resource_type: str, params: tuple[str, ...]) -> None:
    assert compartment_params(compartment, resource_type) == params


def test_types_outside_a_compartment_have_no_params() -> None:
    assert compartment_params("Patient", "Organization") == ()
    assert compartment_params("Patient", "Practitioner") == ()
    assert compartment_params("Encounter", "Patient") == ()
    assert compartment_params("Device", "Device") == ()  # R4 does not list the focal Device
    assert compartment_params("Nope", "Observation") == ()


def test_members() -> None:
    encounter = compartment_members("Encounter")
    assert len(encounter) == 25
    for member in ("Encounter", "Observation", "Condition", "Procedure", "MedicationRequest", "DiagnosticReport", "Composition"):
        assert member in encounter
    assert "Patient" not in encounter
    patient = compartment_members("Patient")
    assert len(patient) == 66
    assert {"Patient", "Observation", "Condition", "Encounter", "RelatedPerson"} <= set(patient)
    assert "Organization" not in patient and "Practitioner" not in patient
    assert compartment_members("Nope") == ()


def test_every_listed_param_is_a_reference_parameter_of_its_type() -> None:
    for compartment in compartment_types():
        for resource_type in compartment_members(compartment):
            for code in compartment_params(compartment, resource_type):
                if code == DEF:
                    assert resource_type == compartment
                    continue
                sp = params_for(resource_type).get(code)
                assert sp is not None and sp.type == "reference", (compartment, resource_type, code)
