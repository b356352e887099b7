"""Structural validation: hand-built resources whose exact issues (code and location) are known."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from fhir_server.definitions import RESOURCE_TYPES, mandatory_elements, summary_elements
from fhir_server.outcome import Issue
from fhir_server.validation import validate_resource

_SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "fhir-r4" / "fhir.schema.json"

# A Synthea-style vital-signs Observation, valid R4.
OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "06e000f8-9bed-51da-6f5c-f18b84f34930",
    "meta": {"profile": ["http://hl7.org/fhir/StructureDefinition/heartrate"]},
    "status": "final",
    "category": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "vital-signs",
                    "display": "vital-signs",
                }
            ]
        }
    ],
    "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}], "text": "Heart rate"},
    "subject": {"reference": "urn:uuid:057aa36e-b892-9964-75b9-ffb46b097e34"},
    "encounter": {"reference": "Encounter/81cae753-0a21-1b89-cadb-e82844f952e8"},
    "effectiveDateTime": "2010-09-16T12:21:06+02:00",
    "issued": "2010-09-16T12:21:06.190+02:00",
    "valueQuantity": {"value": 82, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
}

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "p1",
    "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">张三</div>'},
    "extension": [
        {
            "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
            "extension": [{"url": "text", "valueString": "汉族"}],
        }
    ],
    "identifier": [{"system": "urn:oid:2.16.156.10011.1.1", "value": "110101199003071234"}],
    "active": True,
    "name": [{"use": "official", "family": "张", "given": ["三"]}],
    "telecom": [{"system": "phone", "value": "13800000000", "use": "mobile"}],
    "gender": "male",
    "birthDate": "1990-03-07",
    "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime", "valueDateTime": "1990-03-07T08:30:00+08:00"}]},
    "multipleBirthInteger": 2,
    "maritalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M"}]},
    "managingOrganization": {"reference": "Organization/org-1", "display": "某某医院"},
}


def found(issues: list[Issue], severity: str = "error") -> list[tuple[str, str]]:
    """(code, location) of each issue of the given severity, in report order."""
    return [(i.code, i.expression[0] if i.expression else "") for i in issues if i.severity == severity]


def patient(**changes: Any) -> dict[str, Any]:
    r = copy.deepcopy(PATIENT)
    r.update(changes)
    return r


def observation(**changes: Any) -> dict[str, Any]:
    r = copy.deepcopy(OBSERVATION)
    r.update(changes)
    return r


def test_valid_resources_have_no_issues() -> None:
    assert validate_resource(OBSERVATION) == []
    assert validate_resource(PATIENT) == []


def test_every_issue_is_located_and_has_chinese_details() -> None:
    bad = patient(gender="boy", foo=1, birthDate="1990-13-01", active="true", name={"family": "x"})
    issues = validate_resource(bad)
    assert len(issues) == 5
    for issue in issues:
        assert issue.expression and issue.expression[0].startswith("Patient.")
        assert issue.details_zh and any("\u4e00" <= ch <= "\u9fff" for ch in issue.details_zh)
        assert issue.diagnostics


# --- resourceType ---------------------------------------------------------------------------


def test_missing_resource_type() -> None:
    assert found(validate_resource({"id": "x"})) == [("required", "")]


@pytest.mark.parametrize("rtype", ["Foo", "DomainResource", "Resource", "patient", 5, ["Patient"]])
def test_unknown_resource_type(rtype: Any) -> None:
    assert found(validate_resource({"resourceType": rtype})) == [("structure", "")]


def test_resource_must_be_an_object() -> None:
    assert found(validate_resource(["Patient"])) == [("structure", "")]  # type: ignore[arg-type]


# --- unknown elements and JSON shapes ---------------------------------------------------------


def test_unknown_element() -> None:
    assert found(validate_resource(patient(foo="bar"))) == [("structure", "Patient.foo")]


def test_dollar_key_is_unknown() -> None:
    assert found(validate_resource(patient(**{"$where": "1"}))) == [("structure", "Patient.$where")]


def test_unknown_element_deep_inside_a_datatype() -> None:
    r = observation()
    r["valueQuantity"]["$gt"] = 1
    r["code"]["coding"][0]["version2"] = "x"
    assert found(validate_resource(r)) == [
        ("structure", "Observation.code.coding[0].version2"),
        ("structure", "Observation.valueQuantity.$gt"),
    ]


def test_resource_type_key_only_allowed_on_resources() -> None:
    r = observation()
    r["code"]["resourceType"] = "CodeableConcept"
    assert found(validate_resource(r)) == [("structure", "Observation.code.resourceType")]


def test_boolean_given_as_string() -> None:
    assert found(validate_resource(patient(active="true"))) == [("structure", "Patient.active")]


def test_array_element_given_as_object() -> None:
    assert found(validate_resource(patient(name={"family": "x"}))) == [("structure", "Patient.name")]


def test_single_element_given_as_array() -> None:
    assert found(validate_resource(patient(birthDate=["1990-01-01"]))) == [("structure", "Patient.birthDate")]
    assert found(validate_resource(observation(code=[OBSERVATION["code"]]))) == [("structure", "Observation.code")]


def test_string_where_object_expected() -> None:
    assert found(validate_resource(patient(maritalStatus="married"))) == [("structure", "Patient.maritalStatus")]


def test_object_where_string_expected() -> None:
    assert found(validate_resource(patient(birthDate={"value": "1990-01-01"}))) == [("structure", "Patient.birthDate")]


def test_empty_string_object_array_and_null() -> None:
    assert found(validate_resource(patient(birthDate=""))) == [("structure", "Patient.birthDate")]
    assert found(validate_resource(patient(maritalStatus={}))) == [("structure", "Patient.maritalStatus")]
    assert found(validate_resource(patient(name=[]))) == [("structure", "Patient.name")]
    assert found(validate_resource(patient(gender=None))) == [("structure", "Patient.gender")]
    assert found(validate_resource(patient(name=[None]))) == [("structure", "Patient.name[0]")]


def test_empty_string_in_repeating_primitive() -> None:
    r = patient(name=[{"family": "张", "given": ["三", ""]}])
    assert found(validate_resource(r)) == [("structure", "Patient.name[0].given[1]")]


def test_two_values_of_one_choice_element() -> None:
    r = observation(valueString="82")
    assert found(validate_resource(r)) == [("structure", "Observation.valueString")]


# --- primitive formats ------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1990-13-01", "1990-02-30", "2023-02-29", "1990-1-01", "90-01-01", "1990-01-01T10:00:00Z"])
def test_bad_date(value: str) -> None:
    assert found(validate_resource(patient(birthDate=value))) == [("value", "Patient.birthDate")]


@pytest.mark.parametrize("value", ["2024-02-29", "1990", "1990-03", "2000-12-31"])
def test_good_date(value: str) -> None:
    assert validate_resource(patient(birthDate=value)) == []


@pytest.mark.parametrize("value", ["2010-09-16T12:21:06", "2010-09-16T12:21Z", "2010-09-16 12:21:06Z", "2010-09-16T25:00:00Z"])
def test_bad_date_time(value: str) -> None:
    assert found(validate_resource(observation(effectiveDateTime=value))) == [("value", "Observation.effectiveDateTime")]


@pytest.mark.parametrize("value", ["2010", "2010-09", "2010-09-16", "2010-09-16T12:21:06Z", "2010-09-16T12:21:06.5-05:00"])
def test_good_date_time(value: str) -> None:
    assert validate_resource(observation(effectiveDateTime=value)) == []


def test_instant_needs_seconds_and_zone() -> None:
    assert found(validate_resource(observation(issued="2010-09-16"))) == [("value", "Observation.issued")]
    assert found(validate_resource(observation(issued="2010-09-16T12:21:06"))) == [("value", "Observation.issued")]


@pytest.mark.parametrize("value", ["a_b", "a b", "x" * 65, "é"])
def test_bad_resource_id(value: str) -> None:
    assert found(validate_resource(patient(id=value))) == [("value", "Patient.id")]


def test_id_of_64_chars_is_fine() -> None:
    assert validate_resource(patient(id="A-z.0" + "x" * 59)) == []


@pytest.mark.parametrize("value", [" final", "final ", "fi  nal", "fi\tnal"])
def test_code_whitespace(value: str) -> None:
    # One issue: a malformed code is not also reported as outside the value set.
    assert found(validate_resource(observation(status=value))) == [("value", "Observation.status")]


def test_uri_with_space() -> None:
    assert found(validate_resource(patient(implicitRules="http://a b"))) == [("value", "Patient.implicitRules")]


def test_string_with_form_feed() -> None:
    r = patient(name=[{"family": "a\x0cb"}])
    assert found(validate_resource(r)) == [("value", "Patient.name[0].family")]


def test_ideographic_space_is_not_whitespace_for_fhir() -> None:
    r = observation(status="final")
    r["code"]["coding"][0]["code"] = "血压\u3000收缩压"
    assert validate_resource(r) == []


def test_oid_and_uuid_formats() -> None:
    bad = patient(identifier=[{"system": "urn:oid:1.02.3", "value": "1"}])  # system is a uri: any \S+ is fine
    assert validate_resource(bad) == []
    r = {"resourceType": "ImagingStudy", "status": "available", "subject": {"reference": "Patient/p1"}}
    r["identifier"] = [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}]
    r["series"] = [{"uid": "1.2.3", "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}}]
    assert validate_resource(r) == []


def test_integers() -> None:
    assert found(validate_resource(patient(multipleBirthInteger=1.5))) == [("structure", "Patient.multipleBirthInteger")]
    assert found(validate_resource(patient(multipleBirthInteger=1.0))) == [("structure", "Patient.multipleBirthInteger")]
    assert found(validate_resource(patient(multipleBirthInteger="2"))) == [("structure", "Patient.multipleBirthInteger")]
    assert found(validate_resource(patient(multipleBirthInteger=True))) == [("structure", "Patient.multipleBirthInteger")]
    assert found(validate_resource(patient(multipleBirthInteger=2**31))) == [("value", "Patient.multipleBirthInteger")]
    assert validate_resource(patient(multipleBirthInteger=-(2**31))) == []


def test_positive_and_unsigned_int() -> None:
    base = {"resourceType": "Appointment", "status": "booked", "participant": [{"status": "accepted", "actor": {"reference": "Patient/p1"}}]}
    assert found(validate_resource({**base, "minutesDuration": 0})) == [("value", "Appointment.minutesDuration")]
    assert validate_resource({**base, "minutesDuration": 1}) == []
    study = {"resourceType": "ImagingStudy", "status": "available", "subject": {"reference": "Patient/p1"}}
    assert found(validate_resource({**study, "numberOfSeries": -1})) == [("value", "ImagingStudy.numberOfSeries")]
    assert validate_resource({**study, "numberOfSeries": 0}) == []


def test_decimal_must_be_a_json_number() -> None:
    r = observation()
    r["valueQuantity"]["value"] = "82"
    assert found(validate_resource(r)) == [("structure", "Observation.valueQuantity.value")]
    r["valueQuantity"]["value"] = 82.5
    assert validate_resource(r) == []
    r["valueQuantity"]["value"] = float("nan")
    assert found(validate_resource(r)) == [("value", "Observation.valueQuantity.value")]


def test_base64() -> None:
    r = {"resourceType": "Binary", "contentType": "text/plain", "data": "aGVsbG8="}
    assert validate_resource(r) == []
    assert validate_resource({**r, "data": "aGVs\nbG8="}) == []
    assert found(validate_resource({**r, "data": "aGVsbG8"})) == [("value", "Binary.data")]
    assert found(validate_resource({**r, "data": "aGVs*G8="})) == [("value", "Binary.data")]


def test_narrative() -> None:
    assert found(validate_resource(patient(text={"status": "generated", "div": "<p>x</p>"}))) == [("value", "Patient.text.div")]
    script = '<div xmlns="http://www.w3.org/1999/xhtml"><script>alert(1)</script></div>'
    assert found(validate_resource(patient(text={"status": "generated", "div": script}))) == [("value", "Patient.text.div")]
    handler = '<div xmlns="http://www.w3.org/1999/xhtml"><img src="x" onerror="alert(1)"/></div>'
    assert found(validate_resource(patient(text={"status": "generated", "div": handler}))) == [("value", "Patient.text.div")]


# --- cardinality and required bindings --------------------------------------------------------


def test_missing_status_and_code() -> None:
    r = observation()
    del r["status"], r["code"]
    assert found(validate_resource(r)) == [("required", "Observation.status"), ("required", "Observation.code")]


def test_primitive_with_only_extension_counts_as_present() -> None:
    r = observation()
    del r["status"]
    r["_status"] = {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]}
    assert validate_resource(r) == []


def test_missing_required_choice() -> None:
    r = {"resourceType": "MedicationRequest", "status": "active", "intent": "order", "subject": {"reference": "Patient/p1"}}
    assert found(validate_resource(r)) == [("required", "MedicationRequest.medication[x]")]
    assert validate_resource({**r, "medicationReference": {"reference": "Medication/m1"}}) == []


def test_min_cardinality_inside_backbone_element() -> None:
    r = {"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"url": "Patient"}}]}
    assert found(validate_resource(r)) == [("required", "Bundle.entry[0].request.method")]


def test_code_outside_required_value_set() -> None:
    assert found(validate_resource(patient(gender="boy"))) == [("value", "Patient.gender")]
    assert found(validate_resource(observation(status="done"))) == [("value", "Observation.status")]
    r = patient(name=[{"use": "nickname-ish", "family": "x"}])
    assert found(validate_resource(r)) == [("value", "Patient.name[0].use")]


def test_required_binding_in_datatype() -> None:
    r = observation()
    r["valueQuantity"]["comparator"] = "~"
    assert found(validate_resource(r)) == [("value", "Observation.valueQuantity.comparator")]


def test_required_binding_on_codeable_concept() -> None:
    base = {"resourceType": "Condition", "subject": {"reference": "Patient/p1"}}
    system = "http://terminology.hl7.org/CodeSystem/condition-clinical"
    ok = {**base, "clinicalStatus": {"coding": [{"system": system, "code": "active"}]}}
    assert validate_resource(ok) == []
    bad = {**base, "clinicalStatus": {"coding": [{"system": system, "code": "bogus"}]}}
    assert found(validate_resource(bad)) == [("value", "Condition.clinicalStatus")]
    other_system = {**base, "clinicalStatus": {"coding": [{"system": "http://snomed.info/sct", "code": "55561003"}]}}
    assert found(validate_resource(other_system)) == [("value", "Condition.clinicalStatus")]
    text_only = {**base, "clinicalStatus": {"text": "active"}}
    issues = validate_resource(text_only)
    assert found(issues) == [] and found(issues, "warning") == [("value", "Condition.clinicalStatus")]


def test_required_binding_not_expandable_offline_is_skipped() -> None:
    # Attachment.contentType is bound (required) to BCP-13 mime types, which cannot be expanded offline.
    r = {"resourceType": "Binary", "contentType": "application/x-made-up", "data": "aGVsbG8="}
    assert validate_resource(r) == []


# --- extensions and primitive companions ------------------------------------------------------


def test_extension_with_value_and_nested_extension() -> None:
    ext = {"url": "http://example.org/x", "valueString": "a", "extension": [{"url": "y", "valueInteger": 1}]}
    assert found(validate_resource(patient(extension=[ext]))) == [("invalid", "Patient.extension[0]")]


def test_extension_with_neither_value_nor_extension() -> None:
    assert found(validate_resource(patient(extension=[{"url": "http://example.org/x"}]))) == [("invalid", "Patient.extension[0]")]


def test_extension_without_url() -> None:
    assert found(validate_resource(patient(extension=[{"valueString": "a"}]))) == [("required", "Patient.extension[0].url")]


def test_extension_value_is_type_checked() -> None:
    ext = {"url": "http://example.org/x", "valueDate": "2020-02-31"}
    assert found(validate_resource(patient(modifierExtension=[ext]))) == [("value", "Patient.modifierExtension[0].valueDate")]


def test_primitive_extension_companions() -> None:
    assert found(validate_resource(patient(_birthDate=[{"id": "a"}]))) == [("structure", "Patient.birthDate")]
    assert found(validate_resource(patient(_birthDate={"foo": 1}))) == [("structure", "Patient.birthDate.foo")]
    assert found(validate_resource(patient(_gender={}))) == [("structure", "Patient.gender")]
    assert found(validate_resource(patient(_foo={"id": "a"}))) == [("structure", "Patient._foo")]
    # "_name" is not a primitive, so it cannot have a companion.
    assert found(validate_resource(patient(_name=[{"id": "a"}]))) == [("structure", "Patient._name")]


def test_parallel_arrays_of_repeating_primitive() -> None:
    ext = {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-qualifier", "valueCode": "BR"}]}
    ok = patient(name=[{"family": "x", "given": ["a", None], "_given": [None, ext]}])
    assert validate_resource(ok) == []
    only_ext = patient(name=[{"family": "x", "_given": [ext]}])
    assert validate_resource(only_ext) == []
    null_without_ext = patient(name=[{"family": "x", "given": ["a", None], "_given": [ext, None]}])
    assert found(validate_resource(null_without_ext)) == [("structure", "Patient.name[0].given[1]")]
    wrong_length = patient(name=[{"family": "x", "given": ["a", "b"], "_given": [ext]}])
    assert found(validate_resource(wrong_length)) == [("structure", "Patient.name[0].given")]
    bad_ext = patient(name=[{"family": "x", "given": ["a"], "_given": [{"extension": [{"url": "u"}]}]}])
    assert found(validate_resource(bad_ext)) == [("invalid", "Patient.name[0].given[0].extension[0]")]


# --- references -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref",
    [
        "Organization/org-1",
        "Organization/org-1/_history/3",
        "http://example.org/fhir/Organization/1",
        "https://example.org/fhir/Organization/1",
        "urn:uuid:057aa36e-b892-9964-75b9-ffb46b097e34",
        "urn:oid:1.2.156.112604",
        "#org1",
        "Organization?identifier=http://example.org/ids|123",
    ],
)
def test_good_references(ref: str) -> None:
    assert validate_resource(patient(managingOrganization={"reference": ref})) == []


@pytest.mark.parametrize(
    "ref",
    ["Patient/", "Patient", "Foo/1", "Organization/a_b", "Organization/1/_history/", "urn:uuid:123", "Organization/" + "x" * 65, "Foo?a=b", "ftp//x"],
)
def test_bad_references(ref: str) -> None:
    assert found(validate_resource(patient(managingOrganization={"reference": ref}))) == [("value", "Patient.managingOrganization.reference")]


# --- nested resources -------------------------------------------------------------------------


def test_contained_resource_is_validated_as_its_type() -> None:
    r = patient(contained=[{"resourceType": "Organization", "id": "o1", "name": 5}, {"resourceType": "Practitioner", "id": "d1", "gender": "x"}])
    assert found(validate_resource(r)) == [
        ("structure", "Patient.contained[0].ofType(Organization).name"),
        ("value", "Patient.contained[1].ofType(Practitioner).gender"),
    ]


def test_contained_without_resource_type() -> None:
    assert found(validate_resource(patient(contained=[{"id": "o1"}]))) == [("required", "Patient.contained[0]")]


def test_bundle_entry_resources() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:057aa36e-b892-9964-75b9-ffb46b097e34", "resource": copy.deepcopy(PATIENT), "request": {"method": "POST", "url": "Patient"}},
            {"resource": observation(status="bogus"), "request": {"method": "POST", "url": "Observation"}},
            {"resource": patient(birthDate="1990-02-30"), "request": {"method": "PUT", "url": "Patient/p1"}},
        ],
    }
    assert found(validate_resource(bundle)) == [
        ("value", "Bundle.entry[1].resource.ofType(Observation).status"),
        ("value", "Bundle.entry[2].resource.ofType(Patient).birthDate"),
    ]


def test_bundle_entry_resource_inside_bundle() -> None:
    inner = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": patient(foo=1)}]}
    outer = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": inner}]}
    assert found(validate_resource(outer)) == [("structure", "Bundle.entry[0].resource.ofType(Bundle).entry[0].resource.ofType(Patient).foo")]


def test_parameters_resource() -> None:
    r = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": patient(gender="boy")}, {"name": "n", "valueInteger": 1}]}
    assert found(validate_resource(r)) == [("value", "Parameters.parameter[0].resource.ofType(Patient).gender")]


# --- contentReference -------------------------------------------------------------------------


def test_questionnaire_nested_items() -> None:
    item = {"linkId": "1", "type": "group", "item": [{"linkId": "1.1", "type": "string", "text": "名字"}]}
    r = {"resourceType": "Questionnaire", "status": "active", "item": [item]}
    assert validate_resource(r) == []
    r["item"][0]["item"][0]["foo"] = 1
    r["item"][0]["item"][0]["type"] = "bogus"
    del r["item"][0]["item"][0]["linkId"]
    assert found(validate_resource(r)) == [
        ("value", "Questionnaire.item[0].item[0].type"),
        ("structure", "Questionnaire.item[0].item[0].foo"),
        ("required", "Questionnaire.item[0].item[0].linkId"),
    ]


def test_value_set_compose_exclude_and_bundle_entry_link() -> None:
    vs = {
        "resourceType": "ValueSet",
        "status": "active",
        "compose": {
            "include": [{"system": "http://loinc.org"}],
            "exclude": [{"system": "http://loinc.org", "concept": [{"code": "8867-4"}], "bogus": 1}],
        },
    }
    assert found(validate_resource(vs)) == [("structure", "ValueSet.compose.exclude[0].bogus")]
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"link": [{"relation": "self", "url": "http://x/Patient/1"}, {"relation": "next"}]}]}
    assert found(validate_resource(bundle)) == [("required", "Bundle.entry[0].link[1].url")]


# --- depth ------------------------------------------------------------------------------------


def _nested_questionnaire(levels: int) -> dict[str, Any]:
    item: dict[str, Any] = {"linkId": str(levels), "type": "display", "text": "x"}
    for i in range(levels - 1, 0, -1):
        item = {"linkId": str(i), "type": "group", "item": [item]}
    return {"resourceType": "Questionnaire", "status": "draft", "item": [item]}


def test_deep_nesting_is_one_issue() -> None:
    deep = _nested_questionnaire(200)
    issues = validate_resource(deep)
    assert [i.code for i in issues] == ["invalid"]
    assert issues[0].expression[0].startswith("Questionnaire.item[0].item[0].item[0]")
    assert validate_resource(deep, max_depth=300) == []
    assert len(validate_resource(_nested_questionnaire(10), max_depth=5)) == 1


def test_deep_nesting_through_extensions() -> None:
    ext: dict[str, Any] = {"url": "x", "valueString": "leaf"}
    for _ in range(100):
        ext = {"url": "x", "extension": [ext]}
    assert [i.code for i in validate_resource(patient(extension=[ext]))] == ["invalid"]


def test_never_raises_on_odd_json() -> None:
    odd: list[Any] = [None, 1, "x", [], {}, [None], [{}], {"a": None}, True, 1.5]
    r = observation()
    for key in list(OBSERVATION):
        for value in odd:
            r2 = copy.deepcopy(r)
            r2[key] = value
            validate_resource(r2)
    coded = {"resourceType": "Condition", "subject": {"reference": "Patient/p1"}}
    for value in odd:
        validate_resource({**coded, "clinicalStatus": {"coding": [{"system": value, "code": value}]}})
        validate_resource({**coded, "clinicalStatus": {"coding": value}})


# --- definitions API --------------------------------------------------------------------------


def test_resource_types() -> None:
    assert len(RESOURCE_TYPES) == 146
    assert {"Patient", "Observation", "Bundle", "Parameters", "Binary"} <= RESOURCE_TYPES
    assert not {"Resource", "DomainResource", "Quantity", "MetadataResource"} & RESOURCE_TYPES


def test_summary_and_mandatory_elements() -> None:
    # The Σ-flagged elements of patient.html, plus id/meta/implicitRules.
    assert summary_elements("Patient") == {
        "id", "meta", "implicitRules", "identifier", "active", "name", "telecom", "gender", "birthDate",
        "deceasedBoolean", "deceasedDateTime", "address", "managingOrganization", "link",
    }  # fmt: skip
    assert mandatory_elements("Observation") == {"status", "code"}
    assert {"status", "code", "subject", "valueQuantity", "effectiveDateTime"} <= summary_elements("Observation")
    assert "note" not in summary_elements("Observation")
    assert mandatory_elements("Patient") == frozenset()
    assert mandatory_elements("MedicationRequest") == {"status", "intent", "subject", "medicationCodeableConcept", "medicationReference"}
    with pytest.raises(KeyError):
        summary_elements("Foo")


# --- independent cross-check with the official R4 JSON Schema -------------------------------

INVALID_SAMPLES: dict[str, dict[str, Any]] = {
    "gender outside value set": patient(gender="boy"),
    "unknown element": patient(foo="bar"),
    "bad date": patient(birthDate="1990-13-01"),
    "boolean as string": patient(active="true"),
    "array as object": patient(name={"family": "x"}),
    "missing Observation.code": {k: v for k, v in OBSERVATION.items() if k != "code"},
    "dollar key": patient(**{"$where": "1"}),
    "empty string": patient(birthDate=""),
    "bad id": patient(id="a_b"),
    "code with leading space": observation(status=" final"),
    # (The schema types integer as "number", so it cannot catch 1.5; a string it does catch.)
    "integer as string": patient(multipleBirthInteger="2"),
    "decimal as string": observation(valueQuantity={"value": "82"}),
    "unknown element in contained": patient(contained=[{"resourceType": "Organization", "foo": 1}]),
}


@pytest.mark.skipif(not _SCHEMA.is_file(), reason=f"official R4 JSON Schema not found at {_SCHEMA}")
@pytest.mark.parametrize("name", sorted(INVALID_SAMPLES))
def test_invalid_samples_are_invalid_for_the_json_schema_too(name: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(_SCHEMA.read_text(encoding="utf-8"))
    resource = INVALID_SAMPLES[name]
    rtype = resource["resourceType"]
    validator = jsonschema.Draft6Validator({"definitions": schema["definitions"], "$ref": f"#/definitions/{rtype}"})
    assert list(validator.iter_errors(resource)), f"the JSON Schema accepts {name!r}"
    assert found(validate_resource(resource)), f"validate_resource accepts {name!r}"
    # And the valid baselines pass both.
    base = copy.deepcopy(PATIENT if rtype == "Patient" else OBSERVATION)
    base.pop("_birthDate", None)  # the schema's Element has no problem with it, but keep the baseline minimal
    assert not list(jsonschema.Draft6Validator({"definitions": schema["definitions"], "$ref": f"#/definitions/{rtype}"}).iter_errors(base))


def test_huge_max_depth_does_not_overflow_the_stack() -> None:
    assert [i.code for i in validate_resource(_nested_questionnaire(900), max_depth=10**6)] == ["invalid"]


def test_pathological_strings_are_linear_time() -> None:
    import time

    head = '<div xmlns="http://www.w3.org/1999/xhtml">'
    narratives = [head + "<" * 200_000 + "</div>", head + "< on" * 100_000 + "</div>"]
    started = time.process_time()
    for div in narratives:
        validate_resource(patient(text={"status": "generated", "div": div}))
    binary = {"resourceType": "Binary", "contentType": "text/plain", "data": "QUJD \n" * 200_000 + "QUJ"}
    assert found(validate_resource(binary)) == [("value", "Binary.data")]
    code = observation(status="a " * 200_000)
    assert found(validate_resource(code)) == [("value", "Observation.status")]
    assert time.process_time() - started < 2.0
