"""Unit tests of the two patch engines (no server, no mongod).

Expected results are written out by hand from RFC 6902 and the R4 FHIRPath Patch page
(fhirpatch.html) and its published test cases, not captured from the code.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from fhir_server.outcome import FhirError
from fhir_server.patch import apply_fhirpath_patch, apply_json_patch


def _patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": "p1",
        "meta": {"versionId": "3"},
        "identifier": [
            {"system": "http://example.org", "value": "value 1"},
            {"system": "http://example.org", "value": "value 2"},
        ],
        "name": [
            {"use": "official", "family": "张", "given": ["三", "丰"], "text": "张三"},
            {"use": "nickname", "given": ["小张"]},
        ],
        "telecom": [
            {"system": "phone", "value": "010-1234"},
            {"system": "email", "value": "z@example.org"},
            {"system": "phone", "value": "139-0000"},
        ],
        "gender": "male",
        "birthDate": "1970-01-01",
        "contact": [{"name": {"text": "李四"}, "gender": "female"}],
    }


def _frozen(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# JSON Patch


def test_json_patch_add_remove_replace() -> None:
    original = _patient()
    result = apply_json_patch(
        original,
        [
            {"op": "add", "path": "/active", "value": True},
            {"op": "add", "path": "/name/0/given/-", "value": "峰"},
            {"op": "remove", "path": "/telecom/1"},
            {"op": "replace", "path": "/gender", "value": "female"},
        ],
    )
    expected = _patient()
    expected["active"] = True
    expected["name"][0]["given"] = ["三", "丰", "峰"]
    expected["telecom"] = [
        {"system": "phone", "value": "010-1234"},
        {"system": "phone", "value": "139-0000"},
    ]
    expected["gender"] = "female"
    assert result == expected
    assert original == _patient()


def test_json_patch_move_copy_test() -> None:
    result = apply_json_patch(
        _patient(),
        [
            {"op": "test", "path": "/name/0/text", "value": "张三"},
            {"op": "move", "from": "/telecom/0", "path": "/telecom/-"},
            {"op": "copy", "from": "/name/1", "path": "/name/-"},
        ],
    )
    assert result["telecom"] == [
        {"system": "email", "value": "z@example.org"},
        {"system": "phone", "value": "139-0000"},
        {"system": "phone", "value": "010-1234"},
    ]
    assert result["name"] == [
        {"use": "official", "family": "张", "given": ["三", "丰"], "text": "张三"},
        {"use": "nickname", "given": ["小张"]},
        {"use": "nickname", "given": ["小张"]},
    ]
    # copy must copy, not alias: changing one copy leaves the other alone
    result["name"][2]["given"].append("x")
    assert result["name"][1]["given"] == ["小张"]


def test_json_patch_empty_array_returns_equal_new_dict() -> None:
    original = _patient()
    result = apply_json_patch(original, [])
    assert result == original and result is not original


def test_json_patch_input_is_not_mutated_even_on_failure() -> None:
    original = _patient()
    before = _frozen(original)
    apply_json_patch(original, [{"op": "add", "path": "/name/0/given/-", "value": "x"}])
    with pytest.raises(FhirError):
        apply_json_patch(
            original,
            [{"op": "remove", "path": "/gender"}, {"op": "remove", "path": "/nothing"}],
        )
    assert _frozen(original) == before


def test_json_patch_test_failure_is_422_naming_the_operation() -> None:
    with pytest.raises(FhirError) as err:
        apply_json_patch(
            _patient(),
            [
                {"op": "replace", "path": "/gender", "value": "female"},
                {"op": "test", "path": "/birthDate", "value": "1999-12-31"},
            ],
        )
    assert err.value.status == 422
    issue = err.value.issues[0]
    assert issue.code == "processing"
    assert "operation 1" in issue.diagnostics and "/birthDate" in issue.diagnostics


@pytest.mark.parametrize(
    "operation",
    [
        {"op": "remove", "path": "/deceasedBoolean"},
        {"op": "replace", "path": "/name/7/family", "value": "王"},
        {"op": "add", "path": "/name/9", "value": {"family": "王"}},
        {"op": "move", "from": "/address", "path": "/x"},
        {"op": "add", "path": "/gender/x", "value": 1},
    ],
)
def test_json_patch_path_not_found_is_422(operation: dict[str, Any]) -> None:
    with pytest.raises(FhirError) as err:
        apply_json_patch(_patient(), [operation])
    assert err.value.status == 422
    assert err.value.issues[0].code == "processing"
    assert "operation 0" in err.value.issues[0].diagnostics
    assert operation["path"] in err.value.issues[0].diagnostics


@pytest.mark.parametrize(
    "operations",
    [
        {"op": "add", "path": "/a", "value": 1},
        "[]",
        None,
        42,
    ],
)
def test_json_patch_body_not_a_list_is_400(operations: object) -> None:
    with pytest.raises(FhirError) as err:
        apply_json_patch(_patient(), operations)
    assert err.value.status == 400
    assert err.value.issues[0].code == "invalid"


@pytest.mark.parametrize(
    "operation",
    [
        {"op": "frobnicate", "path": "/gender"},  # unknown op
        {"path": "/gender", "value": "x"},  # no op
        {"op": "remove"},  # no path
        {"op": "add", "path": "gender", "value": "x"},  # pointer without leading /
        {"op": "add", "path": "/gender"},  # no value
        {"op": "copy", "path": "/x"},  # no from
        {"op": "move", "from": "name", "path": "/x"},  # bad from pointer
        {"op": "replace", "path": 7, "value": "x"},  # path not a string
        "remove /gender",  # not an object
    ],
)
def test_json_patch_malformed_operation_is_400(operation: object) -> None:
    # The malformed operation comes second: nothing may be applied before it is rejected.
    with pytest.raises(FhirError) as err:
        apply_json_patch(_patient(), [{"op": "remove", "path": "/nothing"}, operation])
    assert err.value.status == 400
    assert err.value.issues[0].code == "invalid"
    assert "operation 1" in err.value.issues[0].diagnostics


@pytest.mark.parametrize(
    "operation",
    [
        {"op": "replace", "path": "/id", "value": "p2"},
        {"op": "remove", "path": "/id"},
        {"op": "replace", "path": "/resourceType", "value": "Practitioner"},
        {"op": "replace", "path": "", "value": {"resourceType": "Patient", "id": "other"}},
        {"op": "replace", "path": "", "value": []},
    ],
)
def test_json_patch_cannot_change_resource_type_or_id(operation: dict[str, Any]) -> None:
    with pytest.raises(FhirError) as err:
        apply_json_patch(_patient(), [operation])
    assert err.value.status == 422
    assert "must not change" in err.value.issues[0].diagnostics


def test_json_patch_keeps_chinese_text() -> None:
    result = apply_json_patch(_patient(), [{"op": "replace", "path": "/name/0/text", "value": "张三丰"}])
    assert result["name"][0]["text"] == "张三丰"
    assert "张三丰" in json.dumps(result, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# FHIRPath Patch


def _op(type_: str, path: str, **parts: Any) -> dict[str, Any]:
    """One ``operation`` parameter; ``value`` is a ready part body (``{"valueString": ...}``)."""
    out: list[dict[str, Any]] = [
        {"name": "type", "valueCode": type_},
        {"name": "path", "valueString": path},
    ]
    for name, value in parts.items():
        if name in ("index", "source", "destination"):
            out.append({"name": name, "valueInteger": value})
        elif name == "name":
            out.append({"name": "name", "valueString": value})
        else:
            out.append({"name": name, **value})
    return {"name": "operation", "part": out}


def _raw(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"name": "operation", "part": list(parts)}


def _params(*operations: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(operations)}


def _fp(resource: dict[str, Any], *operations: dict[str, Any]) -> dict[str, Any]:
    return apply_fhirpath_patch(resource, _params(*operations))


def _fp_error(resource: dict[str, Any], parameters: Any) -> FhirError:
    with pytest.raises(FhirError) as err:
        apply_fhirpath_patch(resource, parameters)
    return err.value


def test_fhirpath_add_primitive_spec_example() -> None:
    # fhirpatch.html: add birthDate to a Patient that has none
    result = _fp(
        {"resourceType": "Patient", "id": "a"},
        _op("add", "Patient", name="birthDate", value={"valueDate": "1930-01-01"}),
    )
    assert result == {"resourceType": "Patient", "id": "a", "birthDate": "1930-01-01"}


def test_fhirpath_add_to_existing_list_appends() -> None:
    result = _fp(
        _patient(),
        _op(
            "add",
            "Patient",
            name="identifier",
            value={"valueIdentifier": {"system": "http://example.org", "value": "value 3"}},
        ),
    )
    assert result["identifier"] == [
        {"system": "http://example.org", "value": "value 1"},
        {"system": "http://example.org", "value": "value 2"},
        {"system": "http://example.org", "value": "value 3"},
    ]


def test_fhirpath_add_repeating_element_that_is_absent_creates_an_array() -> None:
    result = _fp(
        {"resourceType": "Patient", "id": "a", "name": [{"family": "王"}]},
        _op("add", "Patient", name="identifier", value={"valueIdentifier": {"value": "1"}}),
        _op("add", "Patient.name[0]", name="given", value={"valueString": "五"}),
    )
    assert result == {
        "resourceType": "Patient",
        "id": "a",
        "name": [{"family": "王", "given": ["五"]}],
        "identifier": [{"value": "1"}],
    }


def test_fhirpath_add_anonymous_type_through_parts_spec_example() -> None:
    # fhirpatch.html: a BackboneElement (Patient.contact) built from parts named by element
    result = _fp(
        {"resourceType": "Patient", "id": "a"},
        _op(
            "add",
            "Patient",
            name="contact",
            value={"part": [{"name": "name", "valueHumanName": {"text": "a name"}}]},
        ),
    )
    assert result == {"resourceType": "Patient", "id": "a", "contact": [{"name": {"text": "a name"}}]}


def test_fhirpath_add_human_name_through_parts() -> None:
    value = {
        "part": [
            {"name": "use", "valueCode": "official"},
            {"name": "text", "valueString": "张三"},
            {"name": "family", "valueString": "张"},
            {"name": "given", "valueString": "三"},
        ]
    }
    result = _fp({"resourceType": "Patient", "id": "a"}, _op("add", "Patient", name="name", value=value))
    # Patient.name and HumanName.given repeat, HumanName.family does not.
    assert result["name"] == [{"use": "official", "text": "张三", "family": "张", "given": ["三"]}]


def test_fhirpath_add_coding_to_codeable_concept() -> None:
    resource = {"resourceType": "Patient", "id": "a", "maritalStatus": {"text": "已婚"}}
    coding = {"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus", "code": "M"}
    result = _fp(resource, _op("add", "Patient.maritalStatus", name="coding", value={"valueCoding": coding}))
    assert result["maritalStatus"] == {"text": "已婚", "coding": [coding]}
    # the same Coding given through parts
    parts = {"part": [{"name": "system", "valueUri": coding["system"]}, {"name": "code", "valueCode": "M"}]}
    again = _fp(resource, _op("add", "Patient.maritalStatus", name="coding", value=parts))
    assert again == result


def test_fhirpath_add_nested_primitive_to_list_item() -> None:
    resource = {"resourceType": "Patient", "id": "a", "contact": [{"name": {"text": "a name"}}]}
    result = _fp(resource, _op("add", "Patient.contact[0]", name="gender", value={"valueCode": "male"}))
    assert result["contact"] == [{"name": {"text": "a name"}, "gender": "male"}]


def test_fhirpath_add_choice_element_uses_typed_key() -> None:
    result = _fp(
        {"resourceType": "Patient", "id": "a"},
        _op("add", "Patient", name="deceased", value={"valueDateTime": "2020-02-02"}),
    )
    assert result == {"resourceType": "Patient", "id": "a", "deceasedDateTime": "2020-02-02"}


def test_fhirpath_add_to_existing_single_element_is_422() -> None:
    err = _fp_error(
        _patient(), _params(_op("add", "Patient", name="birthDate", value={"valueDate": "2000-01-01"}))
    )
    assert err.status == 422


def test_fhirpath_insert_at_start_middle_and_end() -> None:
    new = {"valueIdentifier": {"system": "http://example.org", "value": "value 3"}}
    v1 = {"system": "http://example.org", "value": "value 1"}
    v2 = {"system": "http://example.org", "value": "value 2"}
    v3 = {"system": "http://example.org", "value": "value 3"}

    def inserted(index: int) -> list[dict[str, str]]:
        return list(
            _fp(_patient(), _op("insert", "Patient.identifier", index=index, value=new))["identifier"]
        )

    assert inserted(0) == [v3, v1, v2]
    assert inserted(1) == [v1, v3, v2]
    assert inserted(2) == [v1, v2, v3]  # index == length appends


def test_fhirpath_insert_into_filtered_parent_list() -> None:
    result = _fp(
        _patient(),
        _op("insert", "Patient.name.where(use = 'official').given", index=0, value={"valueString": "老"}),
    )
    assert result["name"][0]["given"] == ["老", "三", "丰"]
    assert result["name"][1] == {"use": "nickname", "given": ["小张"]}


def test_fhirpath_insert_into_absent_list_at_zero() -> None:
    result = _fp(
        {"resourceType": "Patient", "id": "a"},
        _op("insert", "Patient.identifier", index=0, value={"valueIdentifier": {"value": "x"}}),
    )
    assert result["identifier"] == [{"value": "x"}]


def test_fhirpath_insert_index_past_end_is_422() -> None:
    err = _fp_error(
        _patient(), _params(_op("insert", "Patient.identifier", index=3, value={"valueIdentifier": {}}))
    )
    assert err.status == 422
    assert "index 3" in err.issues[0].diagnostics


def test_fhirpath_delete_list_item_selected_by_where() -> None:
    result = _fp(_patient(), _op("delete", "Patient.telecom.where(system = 'email')"))
    assert result["telecom"] == [
        {"system": "phone", "value": "010-1234"},
        {"system": "phone", "value": "139-0000"},
    ]


def test_fhirpath_delete_by_index_and_primitive_in_list() -> None:
    result = _fp(
        _patient(),
        _op("delete", "Patient.identifier[0]"),
        _op("delete", "Patient.name[0].given[1]"),
    )
    assert result["identifier"] == [{"system": "http://example.org", "value": "value 2"}]
    assert result["name"][0]["given"] == ["三"]


def test_fhirpath_delete_primitive_and_last_list_item() -> None:
    result = _fp(_patient(), _op("delete", "Patient.birthDate"), _op("delete", "Patient.contact[0]"))
    expected = _patient()
    del expected["birthDate"], expected["contact"]
    assert result == expected


def test_fhirpath_delete_that_empties_parent_removes_the_parent() -> None:
    # fhir-test-cases "Delete Nested Primitive #2": contact.name holds only text
    result = _fp(_patient(), _op("delete", "Patient.contact[0].name.text"))
    assert result["contact"] == [{"gender": "female"}]


def test_fhirpath_delete_nothing_is_a_no_op() -> None:
    original = _patient()
    result = _fp(
        original,
        _op("delete", "Patient.deceased"),
        _op("delete", "Patient.telecom.where(system = 'fax')"),
        _op("delete", "Patient.name[5]"),
    )
    assert result == _patient() and result is not original


def test_fhirpath_delete_two_matches_is_422() -> None:
    err = _fp_error(_patient(), _params(_op("delete", "Patient.telecom.where(system = 'phone')")))
    assert err.status == 422


def test_fhirpath_replace_primitive() -> None:
    result = _fp(_patient(), _op("replace", "Patient.birthDate", value={"valueDate": "1930-01-01"}))
    expected = _patient()
    expected["birthDate"] = "1930-01-01"
    assert result == expected


def test_fhirpath_replace_primitive_in_list_item() -> None:
    result = _fp(
        _patient(),
        _op("replace", "Patient.telecom[1].value", value={"valueString": "li@example.org"}),
        _op("replace", "Patient.name.where(use = 'official').given[0]", value={"valueString": "叁"}),
        _op("replace", "Patient.contact[0].gender", value={"valueCode": "other"}),
    )
    assert result["telecom"][1] == {"system": "email", "value": "li@example.org"}
    assert result["name"][0]["given"] == ["叁", "丰"]
    assert result["contact"][0]["gender"] == "other"


def test_fhirpath_replace_whole_list_item() -> None:
    result = _fp(
        _patient(),
        _op("replace", "Patient.telecom[1]", value={"valueContactPoint": {"system": "sms", "value": "1"}}),
    )
    assert result["telecom"][1] == {"system": "sms", "value": "1"}
    assert len(result["telecom"]) == 3


def test_fhirpath_replace_choice_with_other_type_renames_key() -> None:
    resource = {"resourceType": "Patient", "id": "a", "deceasedBoolean": False}
    result = _fp(resource, _op("replace", "Patient.deceased", value={"valueDateTime": "2021-01-01"}))
    assert result == {"resourceType": "Patient", "id": "a", "deceasedDateTime": "2021-01-01"}


def test_fhirpath_replace_extension_value() -> None:
    resource = {
        "resourceType": "Patient",
        "id": "a",
        "extension": [{"url": "http://example.org/nation", "valueString": "汉族"}],
    }
    result = _fp(
        resource,
        _op("replace", "Patient.extension('http://example.org/nation').value", value={"valueString": "满族"}),
    )
    assert result["extension"] == [{"url": "http://example.org/nation", "valueString": "满族"}]


def test_fhirpath_replace_missing_element_is_422() -> None:
    err = _fp_error(_patient(), _params(_op("replace", "Patient.deceased", value={"valueBoolean": True})))
    assert err.status == 422
    assert "operation 0" in err.issues[0].diagnostics


def test_fhirpath_move_spec_cases() -> None:
    ids = [{"value": f"v{i}"} for i in range(1, 5)]
    resource = {"resourceType": "Patient", "id": "a", "identifier": ids}

    def moved(source: int, destination: int) -> list[str]:
        out = _fp(resource, _op("move", "Patient.identifier", source=source, destination=destination))
        return [i["value"] for i in out["identifier"]]

    # fhir-test-cases "Reorder List #1..#4": remove at source, then insert at destination
    assert moved(3, 1) == ["v1", "v4", "v2", "v3"]
    assert moved(3, 0) == ["v4", "v1", "v2", "v3"]
    assert moved(3, 2) == ["v1", "v2", "v4", "v3"]
    assert moved(0, 3) == ["v2", "v3", "v4", "v1"]


def test_fhirpath_move_telecom_zero_to_two() -> None:
    result = _fp(_patient(), _op("move", "Patient.telecom", source=0, destination=2))
    assert [t["value"] for t in result["telecom"]] == ["z@example.org", "139-0000", "010-1234"]


def test_fhirpath_move_out_of_range_is_422() -> None:
    err = _fp_error(_patient(), _params(_op("move", "Patient.telecom", source=0, destination=3)))
    assert err.status == 422


def test_fhirpath_primitive_extensions_stay_aligned() -> None:
    resource = {
        "resourceType": "Patient",
        "id": "a",
        "birthDate": "1970",
        "_birthDate": {"extension": [{"url": "http://x", "valueString": "y"}]},
        "name": [{"given": ["a", "b"], "_given": [None, {"id": "g2"}]}],
    }
    result = _fp(
        resource,
        _op("move", "Patient.name[0].given", source=1, destination=0),
        _op("insert", "Patient.name[0].given", index=2, value={"valueString": "c"}),
    )
    assert result["name"][0] == {"given": ["b", "a", "c"], "_given": [{"id": "g2"}, None, None]}
    deleted = _fp(resource, _op("delete", "Patient.name[0].given[1]"), _op("delete", "Patient.birthDate"))
    assert deleted == {"resourceType": "Patient", "id": "a", "name": [{"given": ["a"]}]}


def test_fhirpath_several_operations_apply_in_order() -> None:
    result = _fp(
        _patient(),
        _op("add", "Patient", name="active", value={"valueBoolean": True}),
        _op("replace", "Patient.active", value={"valueBoolean": False}),
        _op("delete", "Patient.name.where(use = 'nickname')"),
    )
    expected = _patient()
    expected["active"] = False
    expected["name"] = expected["name"][:1]
    assert result == expected


def test_fhirpath_input_is_not_mutated() -> None:
    original = _patient()
    before = _frozen(original)
    value = {"valueHumanName": {"text": "王五"}}
    parameters = _params(
        _op("add", "Patient", name="name", value=value),
        _op("delete", "Patient.telecom[0]"),
        _op("move", "Patient.identifier", source=0, destination=1),
    )
    params_before = copy.deepcopy(parameters)
    result = apply_fhirpath_patch(original, parameters)
    assert _frozen(original) == before
    assert parameters == params_before
    # the result does not share the value object with the Parameters
    result["name"][-1]["text"] = "改"
    assert value["valueHumanName"]["text"] == "王五"


def test_fhirpath_keeps_chinese_text() -> None:
    result = _fp(
        _patient(), _op("replace", "Patient.name.where(text = '张三').text", value={"valueString": "张三丰"})
    )
    assert result["name"][0]["text"] == "张三丰"
    assert "张三丰" in json.dumps(result, ensure_ascii=False)


def test_fhirpath_contained_resource_and_resource_value() -> None:
    resource = {
        "resourceType": "Observation",
        "id": "o",
        "status": "final",
        "code": {"text": "血压"},
        "contained": [{"resourceType": "Patient", "id": "c1", "name": [{"family": "A"}]}],
    }
    org = {"resourceType": "Organization", "id": "org", "name": "北京协和医院"}
    result = _fp(
        resource,
        _op("replace", "Observation.contained[0].name[0].family", value={"valueString": "B"}),
        _op("add", "Observation.contained.ofType(Patient)", name="gender", value={"valueCode": "male"}),
        _op("add", "Observation", name="contained", value={"resource": org}),
    )
    assert result["contained"] == [
        {"resourceType": "Patient", "id": "c1", "name": [{"family": "B"}], "gender": "male"},
        org,
    ]


def test_fhirpath_nested_parts_follow_backbone_cardinality() -> None:
    resource = {"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"}}
    component = {
        "part": [
            {"name": "code", "valueCodeableConcept": {"text": "收缩压"}},
            {"name": "value", "valueQuantity": {"value": 120, "unit": "mmHg"}},
            {"name": "interpretation", "valueCodeableConcept": {"text": "正常"}},
            {"name": "referenceRange", "part": [{"name": "text", "valueString": "90-140"}]},
        ]
    }
    result = _fp(resource, _op("add", "Observation", name="component", value=component))
    # component, interpretation and referenceRange repeat; value[x] takes the type's key
    assert result["component"] == [
        {
            "code": {"text": "收缩压"},
            "valueQuantity": {"value": 120, "unit": "mmHg"},
            "interpretation": [{"text": "正常"}],
            "referenceRange": [{"text": "90-140"}],
        }
    ]


def test_fhirpath_resource_variable_and_bare_member_paths() -> None:
    result = _fp(
        _patient(),
        _op("delete", "%resource.gender"),
        _op("replace", "birthDate", value={"valueDate": "1971"}),
    )
    assert "gender" not in result and result["birthDate"] == "1971"


def test_fhirpath_evaluation_error_is_422() -> None:
    err = _fp_error(
        _patient(), _params(_op("replace", "Patient.telecom.single()", value={"valueString": "x"}))
    )
    assert err.status == 422
    assert "could not be evaluated" in err.issues[0].diagnostics


def test_fhirpath_path_matching_two_elements_is_422() -> None:
    err = _fp_error(_patient(), _params(_op("replace", "Patient.name.given", value={"valueString": "x"})))
    assert err.status == 422
    issue = err.issues[0]
    assert issue.code == "processing"
    assert "operation 0" in issue.diagnostics and "Patient.name.given" in issue.diagnostics
    assert "3 elements" in issue.diagnostics


def test_fhirpath_add_on_missing_path_is_422() -> None:
    # fhir-test-cases "Operation on missing element"
    parameters = _params(
        _op(
            "add",
            "Patient.identifier.where(use = 'official').period",
            name="end",
            value={"valueDate": "2021-12-01"},
        )
    )
    assert _fp_error(_patient(), parameters).status == 422


def test_fhirpath_cannot_change_id() -> None:
    err = _fp_error(_patient(), _params(_op("replace", "Patient.id", value={"valueId": "p2"})))
    assert err.status == 422 and "id" in err.issues[0].diagnostics


def test_fhirpath_computed_value_is_not_an_element() -> None:
    err = _fp_error(_patient(), _params(_op("replace", "Patient.name.count()", value={"valueInteger": 1})))
    assert err.status == 422


@pytest.mark.parametrize(
    "parameters",
    [
        {"resourceType": "Patient", "id": "x"},  # not a Parameters
        [{"op": "add", "path": "/a", "value": 1}],  # a JSON Patch body
        "Parameters",
        {"resourceType": "Parameters", "parameter": {"name": "operation"}},
        {"resourceType": "Parameters", "parameter": [{"name": "op", "part": []}]},
        # missing type
        _params(_raw({"name": "path", "valueString": "Patient.gender"})),
        # unknown type
        _params(_op("upsert", "Patient.gender", value={"valueCode": "male"})),
        # missing parts for the type
        _params(_op("add", "Patient", value={"valueCode": "male"})),
        _params(_op("insert", "Patient.identifier", value={"valueIdentifier": {}})),
        _params(_op("replace", "Patient.gender")),
        _params(_op("move", "Patient.identifier", source=0)),
        # unknown part, duplicated part, bad value forms
        _params(_raw({"name": "type", "valueCode": "delete"}, {"name": "where", "valueString": "x"})),
        _params(
            _raw(
                {"name": "type", "valueCode": "delete"},
                {"name": "path", "valueString": "Patient.a"},
                {"name": "path", "valueString": "Patient.b"},
            )
        ),
        _params(_op("replace", "Patient.gender", value={"valueCode": "male", "valueString": "male"})),
        _params(_op("add", "Patient", name="contact", value={"part": [{"valueString": "no name"}]})),
        _params(_op("insert", "Patient.identifier", index=-1, value={"valueIdentifier": {}})),
        _params(
            _raw(
                {"name": "type", "valueCode": "move"},
                {"name": "path", "valueString": "Patient.identifier"},
                {"name": "source", "valueString": "0"},  # index given as a string
                {"name": "destination", "valueInteger": 1},
            )
        ),
        # FHIRPath that does not parse
        _params(_op("delete", "Patient.name.where(")),
        _params(_op("delete", "Patient.name)")),
        _params(_op("delete", "")),
    ],
)
def test_fhirpath_bad_parameters_is_400(parameters: Any) -> None:
    err = _fp_error(_patient(), parameters)
    assert err.status == 400
    assert err.issues[0].code == "invalid"


def test_fhirpath_bad_parameters_are_rejected_before_any_change() -> None:
    # the second operation is malformed; the first must not be reported as applied
    parameters = _params(_op("delete", "Patient.nothing"), _op("frob", "Patient"))
    assert _fp_error(_patient(), parameters).status == 400


def test_fhirpath_empty_parameters_is_a_no_op() -> None:
    assert apply_fhirpath_patch(_patient(), {"resourceType": "Parameters"}) == _patient()


# ---------------------------------------------------------------------------------------------
# R4 cardinality as the patch engine sees it (expected values from the R4 specification)


@pytest.mark.parametrize(
    ("owner", "name", "repeats"),
    [
        ("Patient", "name", True),
        ("HumanName", "given", True),
        ("Patient.contact", "telecom", True),
        ("Patient", "birthDate", False),
        ("Patient.contact", "name", False),
        ("HumanName", "family", False),
        # content references: ValueSet.compose.exclude is defined as #ValueSet.compose.include
        ("ValueSet.compose.exclude", "concept", True),
        ("ValueSet.compose.exclude", "system", False),
        ("Questionnaire.item.item", "answerOption", True),
        ("Bundle.entry.link", "extension", True),
    ],
)
def test_cardinality_follows_the_r4_definitions(owner: str, name: str, repeats: bool) -> None:
    from fhir_server.patch._r4_model import is_repeating

    assert is_repeating(owner, name) is repeats
