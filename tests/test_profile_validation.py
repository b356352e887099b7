"""Profile validation: the engine on hand-built profiles, $validate, and validation on write.

The profiles here (tests/data/mini-*.json) are written by hand for these tests, independently of
the CN profiles in profiles/ (tested in test_cn_profiles.py); expected issues come from the
StructureDefinition semantics of the R4 specification and from GB 11643's published example
number 11010519491231002X.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhirpathpy import compile as fhirpath_compile
from fhirpathpy import evaluate as fhirpath
from fhirpathpy.models import models

from fhir_server.http.app import create_app
from fhir_server.validation import cn_identity
from fhir_server.validation.validator import Validator, parse_required_profiles

from conftest import make_settings
from helpers import uid

DATA = Path(__file__).parent / "data"
PROFILE = json.loads((DATA / "mini-profile.json").read_text(encoding="utf-8"))
EXTENSION = json.loads((DATA / "mini-extension.json").read_text(encoding="utf-8"))
PROFILE_URL = PROFILE["url"]
ETHNICITY_URL = EXTENSION["url"]
ID_CARD = "urn:oid:2.16.156.10011.1.3"
# GB 11643-1999's own example: a woman born 1949-12-31, check character X.
GB_EXAMPLE_ID = "11010519491231002X"

_SHIPPED = json.loads((Path(__file__).parents[1] / "profiles" / "StructureDefinition-cn-patient.json").read_text(encoding="utf-8"))
_SHIPPED_RULES = {c["key"]: c["expression"] for el in _SHIPPED["differential"]["element"] for c in el.get("constraint", ())}

VALUE_SETS = {
    "http://example.org/ValueSet/ethnicity": {("urn:oid:2.16.156.10011.2.3.3.3", "01"), ("urn:oid:2.16.156.10011.2.3.3.3", "03")},
    "http://example.org/ValueSet/marital": {("urn:oid:2.16.156.10011.2.3.3.5", "20")},
}


class _Definitions:
    generation = 1

    def __init__(self, *sds: dict[str, Any]) -> None:
        self.sds = {sd["url"]: sd for sd in sds}

    def structure_definition(self, url: str) -> dict[str, Any] | None:
        return self.sds.get(url)

    def value_set_contains(self, url: str, system: str | None, code: str) -> bool | None:
        members = VALUE_SETS.get(url)
        if members is None:
            return None
        return any(c == code and (system is None or s == system) for s, c in members)


def _patient() -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "meta": {"profile": [PROFILE_URL]},
        "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">张三</div>'},
        "extension": [{"url": ETHNICITY_URL, "valueCoding": {"system": "urn:oid:2.16.156.10011.2.3.3.3", "code": "01"}}],
        "identifier": [{"system": ID_CARD, "value": GB_EXAMPLE_ID}],
        "name": [{"text": "张三", "family": "张", "given": ["三"]}],
        "gender": "female",
        "birthDate": "1949-12-31",
        "telecom": [{"system": "phone", "value": "13800000000"}],
        "maritalStatus": {"coding": [{"system": "urn:oid:2.16.156.10011.2.3.3.5", "code": "20"}]},
    }


@pytest.fixture(scope="module")
def validator() -> Validator:
    return Validator(_Definitions(PROFILE, EXTENSION))


def _errors(issues: list[Any]) -> list[tuple[str, str]]:
    return [(i.expression[0] if i.expression else "", i.details_zh or "") for i in issues if i.severity == "error"]


def test_a_conforming_patient_has_no_errors_or_warnings(validator: Validator) -> None:
    issues = validator.validate(_patient())
    assert [i for i in issues if i.severity in ("error", "warning")] == []


@pytest.mark.parametrize(
    "change, location, zh",
    [
        (lambda p: p["identifier"][0].update(value="110105194912310021"), "Patient.identifier[0]", "身份证号校验位错误：应为 X"),
        (lambda p: p["identifier"][0].update(value="1101051949123100"), "Patient.identifier[0]", "身份证号应为 18 位，实际为 16 位"),
        (lambda p: p["identifier"][0].update(value="110105194902300026"), "Patient.identifier[0]", "身份证号中的出生日期 19490230 无效"),
        (lambda p: p["name"][0].update(text="张四"), "Patient.name[0]", "姓名全称“张四”与姓“张”加名“三”不一致"),
        (lambda p: p.pop("extension"), "Patient.extension", "缺少民族"),
        (lambda p: p["extension"][0]["valueCoding"].update(code="99"), "Patient.extension[0].valueCoding", "民族代码的代码 99 不在规定的值集中"),
        (lambda p: p["maritalStatus"]["coding"][0].update(code="30"), "Patient.maritalStatus", "婚姻状况的代码 30 不在规定的值集中"),
        (lambda p: p.pop("telecom"), "Patient", "电话和地址至少填写一项"),
        (lambda p: p.update(generalPractitioner=[{"reference": "Organization/1"}]), "Patient.generalPractitioner[0]", "只能引用 Practitioner"),
        (lambda p: p["identifier"].__setitem__(0, {"system": "urn:oid:2.16.156.10011.1.2", "value": "1"}), "Patient.identifier", "缺少身份证号"),
        (lambda p: p["identifier"].append({"system": ID_CARD, "value": GB_EXAMPLE_ID}), "Patient.identifier[1]", "身份证号最多 1 个，实际 2 个"),
    ],
)
def test_each_defect_gives_one_error_at_its_location_in_chinese(validator: Validator, change: Any, location: str, zh: str) -> None:
    patient = _patient()
    change(patient)
    errors = _errors(validator.validate(patient))
    assert len(errors) == 1, errors
    assert errors[0][0] == location
    assert zh in errors[0][1]


def test_missing_full_name_breaks_cardinality_and_cn_name_1(validator: Validator) -> None:
    patient = _patient()
    del patient["name"][0]["text"]
    assert sorted(_errors(validator.validate(patient))) == [
        ("Patient.name[0]", "姓名全称（name.text）必填"),
        ("Patient.name[0].text", "缺少姓名全称"),
    ]


def test_id_card_disagreeing_with_birth_date_or_gender_is_a_warning_not_an_error() -> None:
    sd = copy.deepcopy(PROFILE)
    sd["differential"]["element"][0]["constraint"].append(
        {"key": "cn-id-3", "severity": "warning", "human": "sex agrees", "expression": _SHIPPED_RULES["cn-id-3"]}
    )
    v = Validator(_Definitions(sd, EXTENSION))
    patient = _patient()
    patient.update(birthDate="1950-01-01", gender="male")
    issues = v.validate(patient)
    assert _errors(issues) == []
    warnings = {i.details_zh for i in issues if i.severity == "warning" and i.code == "invariant"}
    assert "身份证号中的出生日期（1949-12-31）与出生日期（1950-01-01）不一致" in warnings
    assert "身份证号显示性别为女，与性别（男）不一致" in warnings


def test_closed_slicing_refuses_items_outside_every_slice() -> None:
    sd = copy.deepcopy(PROFILE)
    for el in sd["differential"]["element"]:
        if el["id"] == "Patient.identifier":
            el["slicing"]["rules"] = "closed"
    v = Validator(_Definitions(sd, EXTENSION))
    patient = _patient()
    patient["identifier"].append({"system": "urn:oid:2.16.156.10011.1.2", "value": "31010400000000001"})
    assert [loc for loc, _ in _errors(v.validate(patient))] == ["Patient.identifier[1]"]


def test_choice_type_restriction_fixed_and_pattern() -> None:
    sd = {
        "resourceType": "StructureDefinition",
        "url": "http://example.org/StructureDefinition/mini-weight",
        "type": "Observation",
        "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Observation",
        "derivation": "constraint",
        "differential": {
            "element": [
                {"id": "Observation.code", "path": "Observation.code", "short": "检查项目",
                 "patternCodeableConcept": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]}},
                {"id": "Observation.value[x]", "path": "Observation.value[x]", "short": "体重", "min": 1, "type": [{"code": "Quantity"}]},
                {"id": "Observation.value[x]:valueQuantity.system", "path": "Observation.value[x].system", "fixedUri": "http://unitsofmeasure.org"},
                {"id": "Observation.value[x]:valueQuantity.code", "path": "Observation.value[x].code", "short": "单位", "fixedCode": "kg"},
            ]
        },
    }
    v = Validator(_Definitions(sd))
    obs = {
        "resourceType": "Observation",
        "meta": {"profile": [sd["url"]]},
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}], "text": "体重"},
        "valueQuantity": {"value": 70, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
    }
    assert _errors(v.validate(obs)) == []
    wrong_unit = copy.deepcopy(obs)
    wrong_unit["valueQuantity"]["code"] = "g"
    assert _errors(v.validate(wrong_unit)) == [("Observation.valueQuantity.code", "单位的值必须为 kg")]
    wrong_code = copy.deepcopy(obs)
    wrong_code["code"]["coding"][0]["code"] = "8302-2"
    assert _errors(v.validate(wrong_code)) == [("Observation.code", "检查项目应为 29463-7")]
    wrong_type = copy.deepcopy(obs)
    del wrong_type["valueQuantity"]
    wrong_type["valueString"] = "70 kg"
    assert _errors(v.validate(wrong_type)) == [("Observation.valueString", "体重的类型 String 不允许，应为 Quantity")]


def test_r4_invariants_are_evaluated_with_the_profile() -> None:
    v = Validator(_Definitions(PROFILE, EXTENSION))
    patient = _patient()
    patient["contact"] = [{"gender": "male"}]  # pat-1: a contact needs details
    errors = _errors(v.validate(patient))
    assert [loc for loc, _ in errors] == ["Patient.contact[0]"]


def test_native_id_card_check_agrees_with_a_fhirpath_formulation() -> None:
    """The Python check and the GB 11643 rule written as FHIRPath must agree on every number."""
    weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
    total = " + ".join(f"value.substring({i}, 1).toInteger() * {w}" for i, w in enumerate(weights))
    expression = f"value.matches('^[0-9]{{17}}[0-9X]$') and '10X98765432'.substring(({total}) mod 11, 1) = value.substring(17, 1)"
    numbers = [GB_EXAMPLE_ID, "110105194912310021", "310104198001010017", "31010419800101001X", "440524188001010014", "44052418800101001X"]
    for n in range(200):
        body = f"310104{1950 + n % 60:04d}{1 + n % 12:02d}{1 + n % 28:02d}{n % 1000:03d}"
        numbers += [body + c for c in "0123456789X"[n % 11 : n % 11 + 2]]
    check = fhirpath_compile(expression, model=models["r4"])
    for number in numbers:
        by_fhirpath = check({"value": number}) == [True]
        problem = cn_identity.id_card_problem(number)
        assert by_fhirpath == (problem is None), (number, problem)


def test_native_checks_agree_with_the_shipped_profile_fhirpath() -> None:
    """cn-id-1..3 and cn-name-1 as written in profiles/StructureDefinition-cn-patient.json, run by
    fhirpathpy, against the Python checks the server uses instead, on edge cases."""
    rules = {key: fhirpath_compile(expression, model=models["r4"]) for key, expression in _SHIPPED_RULES.items()}
    numbers = [GB_EXAMPLE_ID, "310104198001010017", "310112202102290037", "310112200002290030", "310112190002290037",
               "010104198001010017", "310104178001010017", "310104198013010017", "310104198004310017", "3101041980010100",
               "31010419800101001x", "310104198001010018"]
    for number in numbers:
        for c in "0123456789X":
            numbers.append(number[:17] + c) if len(number) == 18 and len(numbers) < 200 else None
    for number in numbers:
        identifier = {"system": ID_CARD, "value": number}
        by_fhirpath = rules["cn-id-1"](identifier) == [True]
        assert by_fhirpath == (cn_identity.id_card_problem(number) is None), number
        for birth in ("1980-01-01", "2021-02-29", "1980", "2000-02-29"):
            for gender in ("male", "female", "other"):
                patient = {"resourceType": "Patient", "identifier": [identifier], "birthDate": birth, "gender": gender,
                           "name": [{"text": "张三", "family": "张", "given": ["三"]}]}
                for key, check in (("cn-id-2", cn_identity.check_birth_date_agrees), ("cn-id-3", cn_identity.check_sex_agrees)):
                    expected = rules[key](patient) != [False]
                    assert expected == (check(patient, patient) == []), (key, number, birth, gender)
    for name in ({"text": "张三", "family": "张", "given": ["三"]}, {"text": "张三"}, {"family": "张", "given": ["三"]},
                 {"text": "欧阳娜娜", "family": "欧阳", "given": ["娜", "娜"]}, {"text": "张三", "given": ["三"]}):
        expected = rules["cn-name-1"](name) == [True]
        assert expected == (cn_identity.check_chinese_name(name, {}) == []), name
    for value in ("31010400100012345", "3101040010001234", "310104001000123456", "3101040010001234X", "", None):
        identifier = {"system": "urn:oid:2.16.156.10011.1.2", **({"value": value} if value is not None else {})}
        expected = rules["cn-id-4"](identifier) == [True]
        assert expected == (cn_identity.check_health_record_number(identifier, {}) == []), value
    doc_type = {"coding": [{"system": "https://fhir.cn-ehr.org/CodeSystem/cv02-01-101-id-document-type", "code": "03"}]}
    for identifiers in (
        [{"system": ID_CARD, "value": GB_EXAMPLE_ID}],
        [{"system": "urn:oid:2.16.156.10011.1.19", "value": "1"}, {"value": "E123"}],
        [{"value": "E123", "type": doc_type}],
        [{"system": "http://example.org/passport", "value": "E123", "type": {"text": "护照"}}],
        [{"system": "http://example.org/passport", "value": "E123", "type": doc_type}, {"system": "x", "value": "1"}],
    ):
        patient = {"resourceType": "Patient", "identifier": identifiers}
        expected = rules["cn-id-5"](patient) == [True]
        assert expected == (cn_identity.check_other_documents(patient, patient) == []), identifiers
    gb_sex = "https://fhir.cn-ehr.org/StructureDefinition/cn-gb-sex"
    for gender, code in (("male", "1"), ("female", "1"), ("female", "2"), ("unknown", "0"), ("unknown", "9"), ("male", "9"), (None, "1"), ("male", None)):
        patient: dict[str, Any] = {"resourceType": "Patient"}
        if gender:
            patient["gender"] = gender
        if code:
            patient["_gender"] = {"extension": [{"url": gb_sex, "valueCoding": {"system": "urn:oid:2.16.156.10011.2.3.3.4", "code": code}}]}
        expected = rules["cn-sex-1"](patient) != [False]
        assert expected == (cn_identity.check_gb_sex(patient, patient) == []), (gender, code)


def test_native_checks_are_pinned_to_the_shipped_expressions() -> None:
    """A native check stands in for exactly the expression it was tested against: the shipped
    profiles and R4 use those expressions; any other expression under the same key runs as FHIRPath."""
    import glob

    from fhir_server.validation.invariants import NATIVE, PINNED, compile_invariant, fingerprint

    seen: dict[str, set[str]] = {}
    for path in glob.glob(str(Path(__file__).parents[1] / "profiles" / "StructureDefinition-*.json")):
        sd = json.loads(Path(path).read_text(encoding="utf-8"))
        for el in sd["differential"]["element"]:
            for c in el.get("constraint", ()):
                if c["key"] in NATIVE:
                    seen.setdefault(c["key"], set()).add(fingerprint(c["expression"]))
    for key, prints in seen.items():
        assert prints <= PINNED[key], key
    assert compile_invariant("cn-id-4", "error", "value.exists()", "", "Identifier").native is None
    assert compile_invariant("cn-id-4", "error", _SHIPPED_RULES["cn-id-4"], "", "Identifier").native is not None


def test_required_profiles_setting() -> None:
    assert parse_required_profiles("Patient=http://a, Observation=http://b") == {"Patient": ("http://a",), "Observation": ("http://b",)}
    with pytest.raises(ValueError):
        parse_required_profiles("Patient")
    v = Validator(_Definitions(PROFILE, EXTENSION), parse_required_profiles(f"Patient={PROFILE_URL}"))
    patient = _patient()
    del patient["meta"]
    patient["name"][0]["text"] = "李四"
    assert len(_errors(v.validate(patient))) == 1


# -- over HTTP --------------------------------------------------------------------------------


async def _put_definitions(client: httpx.AsyncClient) -> None:
    for sd in (EXTENSION, PROFILE):
        r = await client.put(f"/StructureDefinition/{sd['id']}", json=sd)
        assert r.status_code in (200, 201), r.text
    vs = [
        {"resourceType": "ValueSet", "id": "mini-ethnicity", "url": "http://example.org/ValueSet/ethnicity", "status": "active",
         "compose": {"include": [{"system": "urn:oid:2.16.156.10011.2.3.3.3", "concept": [{"code": "01"}, {"code": "03"}]}]}},
        {"resourceType": "ValueSet", "id": "mini-marital", "url": "http://example.org/ValueSet/marital", "status": "active",
         "compose": {"include": [{"system": "urn:oid:2.16.156.10011.2.3.3.5", "concept": [{"code": "20"}]}]}},
    ]
    for v in vs:
        r = await client.put(f"/ValueSet/{v['id']}", json=v)
        assert r.status_code in (200, 201), r.text


def _issues(outcome: dict[str, Any], severity: str = "error") -> list[tuple[str, str]]:
    return [((i.get("expression") or [""])[0], i.get("details", {}).get("text", "")) for i in outcome["issue"] if i["severity"] == severity]


async def test_validate_operation_and_validation_on_write(mongo_uri: str) -> None:
    app = create_app(make_settings(mongo_uri))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/fhir") as client:
            await _put_definitions(client)
            good = _patient()
            bad = _patient()
            bad["identifier"][0]["value"] = "110105194912310021"

            r = await client.post("/Patient/$validate", json=good)
            assert r.status_code == 200 and _issues(r.json()) == []
            r = await client.post("/Patient/$validate", json=bad)
            assert r.status_code == 200
            assert _issues(r.json()) == [("Patient.identifier[0]", "身份证号校验位错误：应为 X")]

            # profile named by the caller, the resource not claiming it; Parameters form
            plain = copy.deepcopy(bad)
            del plain["meta"]
            r = await client.post("/Patient/$validate", json=plain)
            assert _issues(r.json()) == []
            params = {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": plain}, {"name": "profile", "valueUri": PROFILE_URL}]}
            r = await client.post("/Patient/$validate", json=params)
            assert _issues(r.json()) == [("Patient.identifier[0]", "身份证号校验位错误：应为 X")]
            r = await client.post(f"/Patient/$validate?profile={PROFILE_URL}", json=plain)
            assert len(_issues(r.json())) == 1

            # on write: 422 with the Chinese text and nothing stored; the good one is stored
            ident = uid()
            bad["identifier"].append({"system": "http://example.org/mrn", "value": ident})
            r = await client.post("/Patient", json=bad)
            assert r.status_code == 422, r.text
            assert ("Patient.identifier[0]", "身份证号校验位错误：应为 X") in _issues(r.json())
            r = await client.get("/Patient", params={"identifier": f"http://example.org/mrn|{ident}"})
            assert r.json().get("total") == 0
            r = await client.post("/Patient", json=good)
            assert r.status_code == 201, r.text
            pid = r.json()["id"]

            # instance level: the stored version
            r = await client.get(f"/Patient/{pid}/$validate")
            assert r.status_code == 200 and _issues(r.json()) == []
            # a claimed profile the server does not hold is not checked on write (US Core claims
            # on Synthea data ...); $validate warns about it, and refuses one asked for
            other = _patient()
            other["meta"]["profile"] = ["http://example.org/StructureDefinition/not-loaded"]
            other["name"][0]["text"] = "不一致"
            r = await client.post("/Patient", json=other)
            assert r.status_code == 201, r.text
            r = await client.post("/Patient/$validate", json=other)
            assert ("warning", "not-found") in [(i["severity"], i["code"]) for i in r.json()["issue"]]
            assert _issues(r.json()) == []
            r = await client.post("/Patient/$validate?profile=http://example.org/StructureDefinition/not-loaded", json=other)
            assert [(i["severity"], i["code"]) for i in r.json()["issue"] if i["severity"] == "error"] == [("error", "not-found")]
            # delete mode: referenced resources cannot be deleted
            r = await client.post("/Observation", json={"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": f"Patient/{pid}"}})
            assert r.status_code == 201
            r = await client.post(f"/Patient/{pid}/$validate?mode=delete")
            assert r.status_code == 200 and len(_issues(r.json())) == 1
            # bad requests
            r = await client.post("/Patient/$validate?mode=nonsense", json=good)
            assert r.status_code == 400
            r = await client.post("/Observation/$validate", json=good)
            assert r.status_code == 400
            r = await client.post("/Patient/$validate")
            assert r.status_code == 400


async def test_required_profiles_refuse_unprofiled_writes(mongo_uri: str) -> None:
    app = create_app(make_settings(mongo_uri, required_profiles=f"Patient={PROFILE_URL}"))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/fhir") as client:
            await _put_definitions(client)
            patient = _patient()
            del patient["meta"]
            patient.pop("telecom")
            r = await client.post("/Patient", json=patient)
            assert r.status_code == 422
            assert _issues(r.json()) == [("Patient", "电话和地址至少填写一项")]
            r = await client.post("/Patient", json=_patient())
            assert r.status_code == 201
