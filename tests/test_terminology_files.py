"""Static checks of terminology/: the Chinese code systems, value sets and concept maps.

Pure file checks, no server: every file parses, is plausible FHIR R4, agrees with the canonical URL
catalogue, and its maps and value sets point at codes that exist. Expected values (ids, URLs, the
56 ethnic groups, Shanghai's districts) are written out here from the standards, not read back
from the files.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import pytest

_REPO = Path(__file__).resolve().parents[1]
_TERMINOLOGY = _REPO / "terminology"
_SCHEMA = _REPO.parent / "shared" / "fhir-r4" / "fhir.schema.json"
_BASE = "https://fhir.cn-ehr.org"
_REL_EXT = f"{_BASE}/StructureDefinition/source-reliability"

# The decided catalogue (ids and URLs); national systems keep their OIDs.
_NATIONAL = {
    "gb-t-2261-1-sex": "urn:oid:2.16.156.10011.2.3.3.4",
    "gb-t-2261-2-marital": "urn:oid:2.16.156.10011.2.3.3.5",
    "gb-t-3304-ethnicity": "urn:oid:2.16.156.10011.2.3.3.3",
    "gb-t-4658-education": "urn:oid:2.16.156.10011.2.3.3.6",
    "gb-t-6565-occupation": "urn:oid:2.16.156.10011.2.3.3.7",
    "gb-t-4761-relationship": "urn:oid:2.16.156.10011.2.3.3.8",
    "icd-10-cn": "urn:oid:2.16.156.10011.2.3.3.11",
    "ws-364-abo": "urn:oid:2.16.156.10011.2.3.1.85",
    "ws-364-rh": "urn:oid:2.16.156.10011.2.3.1.250",
    "ws-363-de": "urn:oid:2.16.156.10011.2.2.1",
    "gb-t-2260-division": f"{_BASE}/CodeSystem/gb-t-2260-division",
    "cv02-01-101-id-document-type": f"{_BASE}/CodeSystem/cv02-01-101-id-document-type",
    "loinc-subset": "http://loinc.org",
}
_PROJECT = [
    "ehr-form-marital", "ehr-form-education", "ehr-form-occupation", "ehr-form-payment", "ehr-form-drug-allergy",
    "ehr-form-exposure", "ehr-form-past-disease", "ehr-form-family-history", "ehr-form-disability", "ehr-form-smoking",
    "ehr-form-drinking", "ehr-form-exercise", "ehr-form-diet", "ehr-form-followup-result", "ehr-form-medication-adherence",
    "tcm-constitution", "tcm-constitution-result", "health-tag-category", "health-tag", "pregnancy-risk-grade",
    "key-population-label", "residence-type", "address-category", "cn-identifier-type", "vaccine-code",
    "immunization-funding", "ehr-document-type", "ehr-section", "careplan-category", "careteam-role",
    "service-activity-type", "example-local-lab", "mpi",
]
_CODE_SYSTEMS = {**_NATIONAL, **{i: f"{_BASE}/CodeSystem/{i}" for i in _PROJECT}}
_EXTRA_VALUE_SETS = [
    "loinc-vital-signs", "loinc-report-labs", "shanghai-districts", "id-document-type", "health-tag-value",
    *(f"health-tag-{c}" for c in ("maternal-child", "elderly", "chronic-disease", "notifiable-infectious", "weight-status", "blood-type")),
]
_VALUE_SETS = {i: f"{_BASE}/ValueSet/{i}" for i in [*_CODE_SYSTEMS, *_EXTRA_VALUE_SETS]}
_CONCEPT_MAPS = {
    i: f"{_BASE}/ConceptMap/{i}"
    for i in ("form-marital-to-gb", "form-education-to-gb", "form-occupation-to-gb", "form-past-disease-to-icd10",
              "gb-sex-to-fhir-gender", "local-lab-to-loinc")
}
_EXPECTED = {"CodeSystem": _CODE_SYSTEMS, "ValueSet": _VALUE_SETS, "ConceptMap": _CONCEPT_MAPS}

# Core FHIR code systems a value set or map may point at without a file here.
_CORE = {"http://hl7.org/fhir/administrative-gender": {"male", "female", "other", "unknown"}}

_SHANGHAI = {
    "310101": "黄浦区", "310104": "徐汇区", "310105": "长宁区", "310106": "静安区", "310107": "普陀区", "310109": "虹口区",
    "310110": "杨浦区", "310112": "闵行区", "310113": "宝山区", "310114": "嘉定区", "310115": "浦东新区", "310116": "金山区",
    "310117": "松江区", "310118": "青浦区", "310120": "奉贤区", "310151": "崇明区",
}
_EQUIVALENCE = {"relatedto", "equivalent", "equal", "wider", "subsumes", "narrower", "specializes", "inexact", "unmatched", "disjoint"}


def _files() -> list[Path]:
    return sorted(_TERMINOLOGY.glob("*.json"))


@lru_cache(maxsize=None)
def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _resources(rt: str) -> list[dict[str, Any]]:
    return [r for p in _files() if (r := _load(p))["resourceType"] == rt]


def _concepts(concepts: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for c in concepts:
        yield c
        yield from _concepts(c.get("concept", []))


def _by_url() -> dict[str, dict[str, Any]]:
    return {r["url"]: r for r in _resources("CodeSystem")}


def _codes(system: str) -> set[str]:
    if system in _CORE:
        return _CORE[system]
    cs = _by_url().get(system)
    assert cs is not None, f"no CodeSystem for {system} in terminology/"
    return {c["code"] for c in _concepts(cs.get("concept", []))}


def _cs(id_: str) -> dict[str, Any]:
    return _load(_TERMINOLOGY / f"CodeSystem-{id_}.json")


def test_every_catalogue_entry_has_a_file_and_nothing_else_is_there() -> None:
    expected = {f"{rt}-{i}.json" for rt, ids in _EXPECTED.items() for i in ids}
    present = {p.name for p in _files()}
    assert expected - present == set(), "missing"
    assert present - expected == set(), "not in the catalogue"
    assert (_TERMINOLOGY / "README.md").is_file()


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.name)
def test_file_is_plausible_fhir(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    r = json.loads(text)
    rt, _, id_ = path.stem.partition("-")
    assert r["resourceType"] == rt
    assert r["id"] == id_ and re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", id_)
    assert r["url"] == _EXPECTED[rt][id_]
    assert r["status"] == "active" and r["experimental"] is False and r["version"] == "0.1.0"
    assert re.fullmatch(r"[A-Z][A-Za-z0-9_]{0,254}", r["name"])
    assert r["title"] and r["publisher"] and r["description"]
    # reviewers read these files: pretty-printed, Chinese kept as characters
    assert text == json.dumps(r, ensure_ascii=False, indent=2) + "\n"


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.name)
def test_source_and_reliability_are_stated(path: Path) -> None:
    r = _load(path)
    marks = [e["valueCode"] for e in r.get("extension", []) if e.get("url") == _REL_EXT]
    assert len(marks) == 1 and marks[0] in {"std", "impl", "prov"}
    assert f"[{marks[0]}]" in r["description"]
    assert "来源" in r["description"] and "Source" in r["description"]


@pytest.mark.parametrize("cs", _resources("CodeSystem"), ids=lambda r: r["id"])
def test_code_system_content(cs: dict[str, Any]) -> None:
    codes = [c["code"] for c in _concepts(cs["concept"])]
    assert len(codes) == len(set(codes)), "duplicate codes"
    assert cs["caseSensitive"] is True
    assert cs["content"] in {"complete", "fragment", "example"}
    if cs["content"] == "complete":
        assert cs["count"] == len(codes)
    else:
        assert "count" not in cs
    declared = {p["code"] for p in cs.get("property", [])}
    for c in _concepts(cs["concept"]):
        assert c["display"].strip()
        assert {p["code"] for p in c.get("property", [])} <= declared, c["code"]
        for e in c.get("extension", []):
            assert e["url"] == _REL_EXT and e["valueCode"] in {"std", "impl", "prov"}


def test_fragments_are_where_the_catalogue_says() -> None:
    for id_ in ("icd-10-cn", "ws-363-de", "gb-t-2260-division", "loinc-subset", "vaccine-code", "gb-t-6565-occupation"):
        assert _cs(id_)["content"] == "fragment", id_
    assert _cs("example-local-lab")["content"] == "example"


@pytest.mark.parametrize("vs", _resources("ValueSet"), ids=lambda r: r["id"])
def test_value_set_includes_resolve(vs: dict[str, Any]) -> None:
    includes = vs["compose"]["include"]
    assert includes
    for inc in includes:
        known = _codes(inc["system"])
        for c in inc.get("concept", []):
            assert c["code"] in known, (inc["system"], c["code"])


def test_one_value_set_per_code_system_takes_the_whole_system() -> None:
    for id_, url in _CODE_SYSTEMS.items():
        vs = _load(_TERMINOLOGY / f"ValueSet-{id_}.json")
        systems = [inc["system"] for inc in vs["compose"]["include"]]
        assert systems == [url]
        if id_ != "loinc-subset":  # the whole of http://loinc.org would be all LOINC: listed instead
            assert "concept" not in vs["compose"]["include"][0]
    loinc = _load(_TERMINOLOGY / "ValueSet-loinc-subset.json")["compose"]["include"][0]["concept"]
    assert {c["code"] for c in loinc} == _codes("http://loinc.org")


def test_subset_value_sets() -> None:
    def members(id_: str) -> set[str]:
        vs = _load(_TERMINOLOGY / f"ValueSet-{id_}.json")
        return {c["code"] for inc in vs["compose"]["include"] for c in inc.get("concept", [])}

    assert members("loinc-vital-signs") == {"85354-9", "8480-6", "8462-4", "8302-2", "29463-7", "39156-5", "8280-0", "8867-4"}
    assert members("loinc-report-labs") == {
        "1558-6", "4548-4", "2093-3", "2571-8", "18262-6", "13457-7", "2085-9", "1742-6", "1920-8", "2160-0"}
    assert members("shanghai-districts") == set(_SHANGHAI)
    tags = {c["code"]: c for c in _concepts(_cs("health-tag")["concept"])}
    for cat in ("maternal-child", "elderly", "chronic-disease", "notifiable-infectious", "weight-status"):
        got = members(f"health-tag-{cat}")
        assert got and got == {k for k, c in tags.items() if c["property"][0]["valueCode"] == cat}, cat
    blood = _load(_TERMINOLOGY / "ValueSet-health-tag-blood-type.json")["compose"]["include"]
    assert [inc["system"] for inc in blood] == [_NATIONAL["ws-364-abo"], _NATIONAL["ws-364-rh"]]


@pytest.mark.parametrize("cm", _resources("ConceptMap"), ids=lambda r: r["id"])
def test_concept_map_codes_exist(cm: dict[str, Any]) -> None:
    assert cm["sourceUri"] in _VALUE_SETS.values()
    assert cm["targetUri"] in {*_VALUE_SETS.values(), "http://hl7.org/fhir/ValueSet/administrative-gender"}
    for group in cm["group"]:
        source, target = _codes(group["source"]), _codes(group["target"])
        for el in group["element"]:
            assert el["code"] in source, el["code"]
            for t in el["target"]:
                assert t["equivalence"] in _EQUIVALENCE
                if t["equivalence"] == "unmatched":
                    assert "code" not in t
                else:
                    assert t["code"] in target, (el["code"], t["code"])
                if t["equivalence"] in ("narrower", "inexact"):
                    assert t.get("comment"), "cmd-1: narrower and inexact maps need a comment"


def test_every_source_code_of_the_form_maps_is_mapped() -> None:
    for cm_id, cs_id in (("form-marital-to-gb", "ehr-form-marital"), ("form-education-to-gb", "ehr-form-education"),
                         ("form-occupation-to-gb", "ehr-form-occupation"), ("form-past-disease-to-icd10", "ehr-form-past-disease"),
                         ("gb-sex-to-fhir-gender", "gb-t-2261-1-sex"), ("local-lab-to-loinc", "example-local-lab")):
        mapped = {el["code"] for g in _load(_TERMINOLOGY / f"ConceptMap-{cm_id}.json")["group"] for el in g["element"]}
        assert mapped == {c["code"] for c in _concepts(_cs(cs_id)["concept"])}, cm_id


def test_sex_codes() -> None:
    assert {c["code"]: c["display"] for c in _cs("gb-t-2261-1-sex")["concept"]} == {
        "0": "未知的性别", "1": "男性", "2": "女性", "9": "未说明的性别"}
    gender = _load(_TERMINOLOGY / "ConceptMap-gb-sex-to-fhir-gender.json")["group"][0]["element"]
    assert {el["code"]: el["target"][0]["code"] for el in gender} == {"0": "unknown", "1": "male", "2": "female", "9": "unknown"}


def test_marital_hierarchy() -> None:
    top = {c["code"]: c for c in _cs("gb-t-2261-2-marital")["concept"]}
    assert set(top) == {"10", "20", "30", "40", "90"}
    assert [c["code"] for c in top["20"]["concept"]] == ["21", "22", "23"]


def test_ethnicity_has_the_56_groups() -> None:
    codes = {c["code"]: c["display"] for c in _concepts(_cs("gb-t-3304-ethnicity")["concept"])}
    assert set(codes) - {"97", "98"} == {f"{n:02d}" for n in range(1, 57)}
    assert (codes["01"], codes["10"], codes["29"], codes["46"], codes["56"]) == ("汉族", "朝鲜族", "柯尔克孜族", "德昂族", "基诺族")
    assert all(d.endswith("族") for k, d in codes.items() if k not in {"97", "98"})


def test_administrative_divisions() -> None:
    cs = _cs("gb-t-2260-division")
    top = {c["code"]: c for c in cs["concept"]}
    assert len(top) == 34 and all(re.fullmatch(r"[1-8]\d0000", k) for k in top)
    assert (top["710000"]["display"], top["810000"]["display"], top["820000"]["display"]) == (
        "台湾省", "香港特别行政区", "澳门特别行政区")
    shanghai = top["310000"]
    assert shanghai["display"] == "上海市"
    current = {c["code"]: c["display"] for c in shanghai["concept"]
               if not any(p["code"] == "inactive" and p.get("valueBoolean") for p in c.get("property", []))}
    assert current == _SHANGHAI


def test_id_document_types_and_blood_groups() -> None:
    assert [c["code"] for c in _cs("cv02-01-101-id-document-type")["concept"]] == ["01", "02", "03", "04", "05", "06", "07", "99"]
    assert {c["code"]: c["display"] for c in _cs("ws-364-abo")["concept"]} == {"1": "A型", "2": "B型", "3": "O型", "4": "AB型", "5": "不详"}
    assert {c["code"]: c["display"] for c in _cs("ws-364-rh")["concept"]} == {"1": "阴性", "2": "阳性", "3": "不详"}


def test_icd10_fragment_has_what_the_maps_and_tags_need() -> None:
    codes = {c["code"] for c in _concepts(_cs("icd-10-cn")["concept"])}
    assert {"I10", "E11", "E11.9", "I64", "I63.9", "I25.1", "J44.9", "J45.9", "N18.5", "N19", "C80", "F20",
            "A15", "A16", "B18", "B19", "I69"} <= codes
    assert all(re.fullmatch(r"[A-Z]\d\d(\.\d{1,2})?", c) for c in codes)


def test_loinc_subset() -> None:
    cs = _cs("loinc-subset")
    assert cs["url"] == "http://loinc.org" and cs["content"] == "fragment"
    assert "Regenstrief" in cs["copyright"] and "loinc.org/license" in cs["copyright"]
    for c in cs["concept"]:
        assert re.fullmatch(r"\d{1,7}-\d", c["code"])
        assert c["display"].isascii()
        assert any(d["language"] == "zh-CN" for d in c["designation"])


def test_properties_declared_where_promised() -> None:
    tags = _cs("health-tag")
    assert {p["code"]: p["type"] for p in tags["property"]} == {"category": "code"}
    categories = {c["code"] for c in _cs("health-tag-category")["concept"]}
    assert all(c["property"][0]["valueCode"] in categories for c in tags["concept"])
    labels = {c["code"]: c["property"][0]["valueInteger"] for c in _cs("key-population-label")["concept"]}
    assert labels == {"red": 1, "yellow": 2, "green": 3}
    assert {p["code"] for p in _cs("pregnancy-risk-grade")["property"]} == {"colour"}


def test_vaccine_codes_are_a_sourced_fragment() -> None:
    cs = _cs("vaccine-code")
    assert cs["content"] == "fragment"
    codes = {c["code"]: c["display"] for c in cs["concept"]}
    assert codes["5601"] == "新冠疫苗（Vero细胞）"
    assert all(re.fullmatch(r"\d{4}", k) for k in codes)


@lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    if not _SCHEMA.is_file():
        pytest.skip(f"official R4 JSON Schema not found at {_SCHEMA} (../shared is only beside the project's own checkouts)")
    return json.loads(_SCHEMA.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", _files(), ids=lambda p: p.name)
def test_official_r4_json_schema(path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = _schema()
    r = _load(path)
    # validate against the one resource definition: the root oneOf over 140+ types is slow and its errors unreadable
    sub = {"$ref": f"#/definitions/{r['resourceType']}", "definitions": schema["definitions"]}
    errors = sorted(jsonschema.Draft6Validator(sub).iter_errors(r), key=lambda e: list(e.path))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message[:200]}" for e in errors[:5]]


def test_the_servers_own_validator_accepts_every_file() -> None:
    from fhir_server.validation import validate_resource

    failures = {}
    for path in _files():
        errors = [f"{'/'.join(i.expression)}: {i.diagnostics}" for i in validate_resource(_load(path)) if i.severity == "error"]
        if errors:
            failures[path.name] = errors[:3]
    assert not failures, failures
