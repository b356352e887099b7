"""Search values extracted on write (fhir_server.search.extract): the stored formats the query
compiler relies on, written out by hand from the spec. Pure functions: no mongod needed."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Iterator

import pytest

from fhir_server.definitions import RESOURCE_TYPES
from fhir_server.search import extract, parameters
from fhir_server.search.extract import encode_values, index_resource, indexed_parameters
from fhir_server.search.indexes import search_indexes
from fhir_server.search.parameters import SearchParam, params_for
from fhir_server.search.pinyin import MAX_VARIANTS, pinyin_keys
from fhir_server.storage import field_crypto

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
ID_CARD = "urn:oid:2.16.156.10011.1.3"


def _id_number(value: str) -> str:
    """How an ID number is indexed: its blind form when field encryption is on (storage/field_crypto.py)."""
    crypto = field_crypto.active()
    return crypto.blind(value) if crypto is not None else value
UTC = timezone.utc


def _mmhg(value: float) -> dict[str, Any]:
    return {"value": value, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}


def _stored_mmhg(value: float) -> dict[str, Any]:
    return {"v": value, "s": UCUM, "c": "mm[Hg]", "u": "mmHg"}


def _blood_pressure() -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "85354-9", "display": "Blood pressure panel"}], "text": "血压"},
        "subject": {"reference": "Patient/p1"},
        "component": [
            {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]}, "valueQuantity": _mmhg(120)},
            {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]}, "valueQuantity": _mmhg(80)},
        ],
    }


# -- composite ------------------------------------------------------------------------------


def test_component_code_value_quantity() -> None:
    s = index_resource(_blood_pressure())
    expected = [
        {"c0": [f"{LOINC}|8480-6", "8480-6"], "c1": [_stored_mmhg(120.0)]},
        {"c0": [f"{LOINC}|8462-4", "8462-4"], "c1": [_stored_mmhg(80.0)]},
    ]
    assert s["component-code-value-quantity"] == expected
    # The panel has no value of its own: combo- finds only the components, code-value- nothing.
    assert s["combo-code-value-quantity"] == expected
    assert "code-value-quantity" not in s
    assert "component-code-value-concept" not in s


def test_code_value_composites_on_the_resource() -> None:
    base = {"resourceType": "Observation", "status": "final", "code": {"coding": [{"system": LOINC, "code": "8867-4"}]}}
    codes = [f"{LOINC}|8867-4", "8867-4"]
    s = index_resource({**base, "valueQuantity": {"value": 72, "unit": "/min", "system": UCUM, "code": "/min"}})
    assert s["code-value-quantity"] == [{"c0": codes, "c1": [{"v": 72.0, "s": UCUM, "c": "/min", "u": "/min"}]}]
    assert s["combo-code-value-quantity"] == s["code-value-quantity"]
    # A node lacking a component is not stored: no composite search could match it.
    assert not {"code-value-string", "code-value-date", "code-value-concept", "combo-code-value-concept"} & set(s)

    s = index_resource({**base, "valueString": "Ünusual"})
    assert s["code-value-string"] == [{"c0": codes, "c1": [{"n": "unusual", "x": "Ünusual"}]}]

    s = index_resource({**base, "valuePeriod": {"start": "2024-03-01T08:00:00Z"}})
    c1 = [{"lo": datetime(2024, 3, 1, 8, tzinfo=UTC), "hi": datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)}]
    assert s["code-value-date"] == [{"c0": codes, "c1": c1}]

    concept = {"coding": [{"system": "http://snomed.info/sct", "code": "10828004", "display": "Positive"}]}
    s = index_resource({**base, "valueCodeableConcept": concept})
    assert s["code-value-concept"] == [{"c0": codes, "c1": ["http://snomed.info/sct|10828004", "10828004"]}]
    assert s["combo-code-value-concept"] == s["code-value-concept"]


def test_composite_with_range_alternative_and_reference_component() -> None:
    plan = {
        "resourceType": "PlanDefinition",
        "status": "active",
        "useContext": [
            {"code": {"system": "http://terminology.hl7.org/CodeSystem/usage-context-type", "code": "age"},
             "valueQuantity": {"value": 65, "unit": "a", "system": UCUM, "code": "a"}},
            {"code": {"system": "http://terminology.hl7.org/CodeSystem/usage-context-type", "code": "focus"},
             "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]}},
        ],
    }
    s = index_resource(plan)
    ctx = "http://terminology.hl7.org/CodeSystem/usage-context-type"
    assert s["context-type-quantity"] == [{"c0": [f"{ctx}|age", "age"], "c1": [{"v": 65.0, "s": UCUM, "c": "a", "u": "a"}]}]
    sct = ["http://snomed.info/sct|38341003", "38341003"]
    assert s["context-type-value"] == [{"c0": [f"{ctx}|focus", "focus"], "c1": sct}]

    doc = {
        "resourceType": "DocumentReference",
        "status": "current",
        "content": [{"attachment": {"url": "http://x/a.pdf"}}],
        "relatesTo": [{"code": "replaces", "target": {"reference": "DocumentReference/old"}}],
    }
    # R4 names the two components' definitions the wrong way round; the values follow the paths.
    assert index_resource(doc)["relationship"] == [{"c0": ["replaces"], "c1": ["DocumentReference/old"]}]
    components = extract.composite_components(params_for("DocumentReference")["relationship"], "DocumentReference")
    assert [c.type for c, _ in components or ()] == ["token", "reference"]


def test_composite_component_from_the_resource() -> None:
    seq = {
        "resourceType": "MolecularSequence",
        "coordinateSystem": 0,
        "referenceSeq": {"chromosome": {"coding": [{"system": "http://x/chr", "code": "1"}]}},
        "variant": [{"start": 100, "end": 101}],
    }
    s = index_resource(seq)
    assert s["chromosome-variant-coordinate"] == [{"c0": ["http://x/chr|1", "1"], "c1": [100.0], "c2": [101.0]}]


def test_composites_are_indexed_on_their_first_component() -> None:
    indexes = dict(search_indexes("Observation"))
    assert indexes["s_component-code-value-quantity"] == (("s.component-code-value-quantity.c0", 1),)
    assert ("component-code-value-quantity", "composite") in indexed_parameters("Observation")


# -- token :text, identifier :of-type ---------------------------------------------------------


def test_token_text_values() -> None:
    s = index_resource(_blood_pressure())
    assert s["code:text"] == ["血压", "blood pressure panel"]
    patient = {
        "resourceType": "Patient",
        "identifier": [
            {"type": {"coding": [{"system": V2_0203, "code": "MR", "display": "Medical record"}], "text": "病历号"},
             "system": "urn:oid:2.16.156.10011.1.13", "value": "12345"},
            {"type": {"text": "病历号"}, "value": "678"},
        ],
    }
    s = index_resource(patient)
    assert s["identifier:text"] == ["病历号"]  # de-duplicated; the type's coding display is not searched
    concept = {"resourceType": "Condition", "subject": {"reference": "Patient/p"},
               "code": {"text": "Héadache", "coding": [{"code": "25064002", "display": "HEADACHE"}]}}
    assert index_resource(concept)["code:text"] == ["headache"]


def test_token_text_is_not_indexed() -> None:
    for rtype in ("Observation", "Patient", "Condition"):
        keys = [k for _, spec in search_indexes(rtype) for k, _ in spec]
        assert not [k for k in keys if ":" in k]
        assert not [code for code, _ in indexed_parameters(rtype) if ":" in code]


def test_identifier_of_type() -> None:
    patient = {
        "resourceType": "Patient",
        "identifier": [
            {"type": {"coding": [{"system": V2_0203, "code": "MR"}, {"system": "urn:local", "code": "病历"}]},
             "system": "urn:oid:2.16.156.10011.1.13", "value": "12345"},
            {"type": {"coding": [{"code": "NI"}]}, "value": "x1"},
            {"system": ID_CARD, "value": "110101199003070000"},
        ],
    }
    assert index_resource(patient)["identifier"] == [
        "urn:oid:2.16.156.10011.1.13|12345",
        "12345",
        f"{V2_0203}|MR|12345",
        "urn:local|病历|12345",
        "|x1",
        "x1",
        "|NI|x1",
        f"{ID_CARD}|{_id_number('110101199003070000')}",
        _id_number("110101199003070000"),
    ]


# -- references -----------------------------------------------------------------------------


def test_reference_by_identifier() -> None:
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": "Patient/p1", "identifier": {"system": ID_CARD, "value": "110101"}},
        "performer": [{"identifier": {"value": "D-7"}}],
    }
    s = index_resource(obs)
    assert s["subject"] == ["Patient/p1", f"?{ID_CARD}|{_id_number('110101')}", f"?{_id_number('110101')}"]
    assert s["patient"] == s["subject"]
    assert s["performer"] == ["?|D-7", "?D-7"]
    assert s["_refs"] == ["Patient/p1"]


def test_canonical_with_version() -> None:
    response = {
        "resourceType": "QuestionnaireResponse",
        "status": "completed",
        "questionnaire": "http://example.org/Questionnaire/phq9|2.0",
        "meta": {
            "profile": ["http://example.org/StructureDefinition/qr|1.1", "http://example.org/StructureDefinition/plain"]
        },
    }
    s = index_resource(response)
    assert s["questionnaire"] == ["http://example.org/Questionnaire/phq9|2.0", "http://example.org/Questionnaire/phq9"]
    assert s["_profile"] == [
        "http://example.org/StructureDefinition/qr|1.1",
        "http://example.org/StructureDefinition/qr",
        "http://example.org/StructureDefinition/plain",
    ]


# -- pinyin -----------------------------------------------------------------------------------


def test_pinyin_for_chinese_patient_names() -> None:
    patient = {"resourceType": "Patient", "name": [{"text": "张三", "family": "张", "given": ["三"]}]}
    s = index_resource(patient)
    assert s["name"] == [
        {"n": "张三", "x": "张三"},
        {"n": "张", "x": "张"},
        {"n": "三", "x": "三"},
        {"n": "zhangsan"}, {"n": "zs"},
        {"n": "zhang"}, {"n": "z"},
        {"n": "san"}, {"n": "s"},
    ]
    assert s["family"] == [{"n": "张", "x": "张"}, {"n": "zhang"}, {"n": "z"}]
    assert s["given"] == [{"n": "三", "x": "三"}, {"n": "san"}, {"n": "s"}]
    assert s["phonetic"] == s["name"]


def test_pinyin_of_family_and_given_without_text() -> None:
    s = index_resource({"resourceType": "Practitioner", "name": [{"family": "欧阳", "given": ["娜娜"]}]})
    assert {"n": "欧阳娜娜"} in s["name"]  # as Chinese names are written: family then given
    assert {"n": "ouyangnana"} in s["name"] and {"n": "oynn"} in s["name"]
    assert s["family"] == [{"n": "欧阳", "x": "欧阳"}, {"n": "ouyang"}, {"n": "oy"}]


def test_pinyin_entries_have_no_exact_form() -> None:
    person = {"resourceType": "RelatedPerson", "patient": {"reference": "Patient/p"}, "name": [{"text": "李四"}]}
    s = index_resource(person)
    exact = [e for e in s["name"] if "x" in e]
    assert exact == [{"n": "李四", "x": "李四"}]
    assert [e for e in s["name"] if "x" not in e] == [{"n": "lisi"}, {"n": "ls"}]


def test_pinyin_only_for_names_of_people() -> None:
    assert index_resource({"resourceType": "Patient", "name": [{"family": "Smith", "given": ["Ann"]}]})["name"] == [
        {"n": "smith", "x": "Smith"},
        {"n": "ann", "x": "Ann"},
    ]
    s = index_resource({"resourceType": "Patient", "address": [{"city": "上海"}]})
    assert s["address-city"] == [{"n": "上海", "x": "上海"}]
    organization = {"resourceType": "Organization", "name": "瑞金医院"}
    assert index_resource(organization)["name"] == [{"n": "瑞金医院", "x": "瑞金医院"}]
    s = index_resource({"resourceType": "Person", "name": [{"text": "王五"}]})
    assert {"n": "wangwu"} in s["name"]


def test_pinyin_polyphonic_surnames() -> None:
    assert pinyin_keys("欧阳娜娜")[:2] == ("ouyangnana", "oynn")
    shan = pinyin_keys("单雄信")
    assert shan[0] == "shanxiongxin" and "sxx" in shan and "danxiongxin" in shan
    zeng = pinyin_keys("曾国藩")
    assert zeng[0] == "zengguofan" and "zgf" in zeng and "cengguofan" in zeng
    assert pinyin_keys("单于")[0] == "chanyu"  # the compound surname, not 单 alone
    for name in ("单雄信", "仇英", "尉迟恭", "朴槿惠"):
        keys = pinyin_keys(name)
        assert len(keys) <= 2 * MAX_VARIANTS and len(set(keys)) == len(keys)
    assert pinyin_keys("Smith") == ()
    assert pinyin_keys("李 明") == ("liming", "lm")


# -- Resource-level parameters ----------------------------------------------------------------


def test_meta_parameters_for_every_type() -> None:
    meta = {
        "tag": [{"system": "http://example.org/tags", "code": "vip", "display": "VIP"}],
        "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}],
        "profile": ["http://example.org/StructureDefinition/cn-patient"],
        "source": "urn:oid:2.16.156.10011.0.1#his",
    }
    assert len(RESOURCE_TYPES) > 140 and "Binary" in RESOURCE_TYPES  # every R4 resource type
    for rtype in sorted(RESOURCE_TYPES):
        s = index_resource({"resourceType": rtype, "meta": meta})
        assert s["_tag"] == ["http://example.org/tags|vip", "vip"], rtype
        assert s["_tag:text"] == ["vip"], rtype
        assert s["_security"] == ["http://terminology.hl7.org/CodeSystem/v3-Confidentiality|R", "R"], rtype
        assert s["_profile"] == ["http://example.org/StructureDefinition/cn-patient"], rtype
        assert s["_source"] == ["urn:oid:2.16.156.10011.0.1#his"], rtype
        names = {name for name, _ in search_indexes(rtype)}
        assert {"s__tag", "s__security", "s__profile", "s__source"} <= names, rtype


# -- expressions beyond the compiled subset ---------------------------------------------------


@pytest.fixture
def extra_param(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Adds a parameter to one type the way a run-time registration shows up: in params_for."""

    def add(resource_type: str, sp: SearchParam) -> None:
        original = extract.params_for
        monkeypatch.setattr(
            extract, "params_for", lambda t: {**original(t), sp.code: sp} if t == resource_type else original(t)
        )
        extract._clear_caches()

    yield add
    extract._clear_caches()


def test_custom_parameter_falls_back_to_fhirpath(extra_param: Any) -> None:
    expression = "Patient.name.where(use = 'official').family.first() | Patient.name.given.last()"
    assert extract._compile(expression, "Patient") is None  # first() and last() are not compiled
    extra_param("Patient", SearchParam("official-family", "string", expression, (), "http://x/sp/of", base=("Patient",)))
    patient = {
        "resourceType": "Patient",
        "name": [{"use": "usual", "family": "Wang"}, {"use": "official", "family": "Li", "given": ["Lei", "Ming"]}],
    }
    assert index_resource(patient)["official-family"] == [{"n": "li", "x": "Li"}, {"n": "ming", "x": "Ming"}]
    assert ("official-family", "string") in indexed_parameters("Patient")
    # A FHIRPath expression may read anything: it runs on every resource of the type.
    assert "official-family" not in index_resource({"resourceType": "Patient", "gender": "male"})


def test_fallback_resolves_choice_elements(extra_param: Any) -> None:
    expression = "Observation.value.ofType(Quantity).where(value > 100)"
    high_value = SearchParam("high-value", "quantity", expression, (), "http://x/sp/hv", base=("Observation",))
    extra_param("Observation", high_value)
    high = {"resourceType": "Observation", "code": {"text": "x"}, "valueQuantity": {"value": 120, "unit": "mg"}}
    low = {**high, "valueQuantity": {"value": 80, "unit": "mg"}}
    assert index_resource(high)["high-value"] == [{"v": 120.0, "u": "mg"}]
    assert "high-value" not in index_resource(low)


def test_unusable_custom_expression_does_not_break_writes(extra_param: Any) -> None:
    extra_param("Patient", SearchParam("broken", "token", "Patient.name.where(", (), "http://x/sp/b", base=("Patient",)))
    s = index_resource({"resourceType": "Patient", "gender": "female"})
    assert s["gender"] == ["female"] and "broken" not in s


def test_parameter_changes_clear_derived_caches() -> None:
    indexed_parameters("Patient")
    search_indexes("Patient")
    assert extract._plan.cache_info().currsize > 0 and search_indexes.cache_info().currsize > 0
    parameters._changed()
    assert extract._plan.cache_info().currsize == 0
    assert extract._dispatch.cache_info().currsize == 0
    assert search_indexes.cache_info().currsize == 0


def test_r4_expressions_the_compiled_path_now_covers() -> None:
    # `(Observation.value as CodeableConcept).text` continues after a cast; `name | alias` has no type.
    obs = {"resourceType": "Observation", "code": {"text": "x"}, "valueCodeableConcept": {"text": "阳性"}}
    assert index_resource(obs)["value-string"] == [{"n": "阳性", "x": "阳性"}]
    plan = {"resourceType": "InsurancePlan", "name": "城乡居民医保", "alias": ["居民医保"]}
    assert index_resource(plan)["name"] == [
        {"n": "城乡居民医保", "x": "城乡居民医保"},
        {"n": "居民医保", "x": "居民医保"},
    ]
    assert extract._compile("Patient.deceased.exists() and Patient.deceased != false", "Patient") is None
    assert index_resource({"resourceType": "Patient"})["deceased"] == ["false"]
    assert index_resource({"resourceType": "Patient", "deceasedDateTime": "2020-01-01"})["deceased"] == ["true"]
    assert index_resource({"resourceType": "Patient", "deceasedBoolean": False})["deceased"] == ["false"]


def test_a_choice_key_starts_exact_and_choice_readers() -> None:
    # valueQuantity is read as `value` (value-quantity) and exactly (the code-value-quantity composite).
    obs = {"resourceType": "Observation", "code": {"coding": [{"code": "x"}]}, "valueQuantity": {"value": 1}}
    s = index_resource(obs)
    assert s["value-quantity"] == [{"v": 1.0}]
    assert s["code-value-quantity"] == [{"c0": ["|x", "x"], "c1": [{"v": 1.0}]}]


# -- encode_values ----------------------------------------------------------------------------


def test_encode_values_per_type() -> None:
    concept = {"coding": [{"system": "s", "code": "c"}, {"code": "c"}]}
    assert encode_values("token", [concept, True]) == ["s|c", "c", "|c", "true"]
    assert encode_values("string", [{"family": "Müller", "given": ["Ann"]}, "Ann"]) == [
        {"n": "muller", "x": "Müller"},
        {"n": "ann", "x": "Ann"},
    ]
    assert encode_values("string", ["张三"], pinyin=True)[1:] == [{"n": "zhangsan"}, {"n": "zs"}]
    assert encode_values("reference", [{"reference": "http://other/fhir/Patient/1"}, "http://x/Q|1"]) == [
        "Patient/1",
        "http://x/Q|1",
        "http://x/Q",
    ]
    assert encode_values("uri", ["http://a", "http://a"]) == ["http://a"]
    assert encode_values("date", ["2024"]) == [
        {"lo": datetime(2023, 12, 31, 16, tzinfo=UTC), "hi": datetime(2024, 12, 31, 15, 59, 59, 999000, tzinfo=UTC)}
    ]
    assert encode_values("number", [3, {"value": 2.5}, True]) == [3.0, 2.5]
    assert encode_values("quantity", [{"value": 5, "code": "mg"}, {"value": True}]) == [{"v": 5.0, "c": "mg"}]
    with pytest.raises(ValueError):
        encode_values("composite", [])


def test_every_r4_parameter_has_a_plan() -> None:
    # Every R4 parameter with an expression and a stored form is extracted for its types.
    for rtype in [t for t in parameters._by_base() if t not in ("Resource", "DomainResource")]:
        planned = {code for code, _ in indexed_parameters(rtype)}
        expected = {
            code
            for code, sp in params_for(rtype).items()
            if sp.expression and code not in parameters.SPECIAL and sp.type not in ("special",)
        }
        assert planned == expected, (rtype, expected - planned)
