"""The CN EHR profiles (profiles/): generated files current, definitions well-formed, examples consistent.

No server: StructureDefinitions are checked against the R4 JSON Schema and the catalogue, and every
invariant is evaluated with fhirpathpy directly on the examples (an independent check of the
examples and expressions; the server's validator has its own tests).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
from fhirpathpy import compile as fp_compile
from fhirpathpy import evaluate as fp_evaluate
from fhirpathpy.models import models

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "profiles"
TERMINOLOGY = REPO / "terminology"
SCHEMA = REPO.parent / "shared" / "fhir-r4" / "fhir.schema.json"
BASE = "https://fhir.cn-ehr.org"
R4 = models["r4"]

# The ValueSet ids the profiles may bind (one per code system, plus the extra ones; terminology/README.md).
CATALOGUE_VALUESETS = {
    "gb-t-2261-1-sex", "gb-t-2261-2-marital", "gb-t-3304-ethnicity", "gb-t-4658-education",
    "gb-t-6565-occupation", "gb-t-4761-relationship", "icd-10-cn", "ws-364-abo", "ws-364-rh", "ws-363-de",
    "gb-t-2260-division", "cv02-01-101-id-document-type", "loinc-subset", "ehr-form-marital",
    "ehr-form-education", "ehr-form-occupation", "ehr-form-payment", "ehr-form-drug-allergy",
    "ehr-form-exposure", "ehr-form-past-disease", "ehr-form-family-history", "ehr-form-disability",
    "ehr-form-smoking", "ehr-form-drinking", "ehr-form-exercise", "ehr-form-diet",
    "ehr-form-followup-result", "ehr-form-medication-adherence", "tcm-constitution",
    "tcm-constitution-result", "health-tag-category", "health-tag", "pregnancy-risk-grade",
    "key-population-label", "residence-type", "address-category", "cn-identifier-type", "vaccine-code",
    "immunization-funding", "ehr-document-type", "ehr-section", "careplan-category", "careteam-role",
    "service-activity-type", "loinc-vital-signs", "loinc-report-labs", "shanghai-districts",
    "health-tag-maternal-child", "health-tag-elderly", "health-tag-chronic-disease",
    "health-tag-notifiable-infectious", "health-tag-weight-status", "health-tag-blood-type", "id-document-type",
    "health-tag-value", "mpi",
}
GB11643_WEIGHTS = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2]
GB11643_CHECK = "10X98765432"
ID_CARD_SYSTEM = "urn:oid:2.16.156.10011.1.3"


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _sds() -> dict[str, dict]:
    return {sd["url"]: sd for sd in map(_load, sorted(PROFILES.glob("StructureDefinition-*.json")))}


def _valid_examples() -> list[Path]:
    return sorted((PROFILES / "examples").glob("*.json"))


def _invalid_examples() -> list[Path]:
    return sorted(p for p in (PROFILES / "examples" / "invalid").glob("*.json") if p.name != "expected.json")


def _expected() -> dict[str, list[dict]]:
    return _load(PROFILES / "examples" / "invalid" / "expected.json")


def _constraints(sd: dict) -> list[tuple[dict, dict]]:
    return [(el, c) for el in sd["differential"]["element"] for c in el.get("constraint", [])]


# ---------------------------------------------------------------- where each constraint applies

def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _pattern_condition(path: str, value: Any) -> str:
    """FHIRPath that is true when `path` (relative) matches a fixed/pattern value (pattern semantics)."""
    prefix = "" if path == "$this" else path
    if isinstance(value, dict):
        parts = [_pattern_condition(k, v) for k, v in value.items()]
        inner = " and ".join(parts)
        return f"{prefix}.where({inner}).exists()" if prefix else f"({inner})"
    if isinstance(value, list):
        return " and ".join(_pattern_condition(path, item) for item in value)
    return f"{prefix} = {_literal(value)}" if prefix else f"$this = {_literal(value)}"


def _slice_value(sd: dict, slice_id: str, disc_path: str) -> Any:
    """The fixed/pattern value a slice sets at the discriminator path (or the extension URL)."""
    elements = {el["id"]: el for el in sd["differential"]["element"]}
    target = slice_id if disc_path == "$this" else f"{slice_id}.{disc_path}"
    if disc_path == "url" and target not in elements:
        return elements[slice_id]["type"][0]["profile"][0]
    element = elements[target]
    for key, value in element.items():
        if key.startswith(("fixed", "pattern")):
            return value
    raise AssertionError(f"slice {slice_id} has no value at {disc_path}")


def context_path(sd: dict, element_id: str) -> str:
    """FHIRPath from the resource root selecting the nodes an element (slices included) stands for."""
    elements = {el["id"]: el for el in sd["differential"]["element"]}
    segments = element_id.split(".")
    expr = segments[0]
    so_far = segments[0]
    for segment in segments[1:]:
        name, _, slice_name = segment.partition(":")
        so_far = f"{so_far}.{name}"
        expr += "." + name.replace("[x]", "")
        if slice_name:
            slicing = elements[so_far]["slicing"]
            conditions = []
            for disc in slicing["discriminator"]:
                value = _slice_value(sd, f"{so_far}:{slice_name}", disc["path"])
                conditions.append(_pattern_condition(disc["path"], value))
            expr += ".where(" + " and ".join(conditions) + ")"
            so_far = f"{so_far}:{slice_name}"
    return expr


def _holds(resource: dict, sd: dict, element: dict, constraint: dict) -> bool:
    ctx = context_path(sd, element["id"])
    if ctx == sd["type"]:
        result = fp_evaluate(resource, constraint["expression"], model=R4)
        return result in ([], [True])  # empty: the rule does not apply
    result = fp_evaluate(resource, f"{ctx}.all({constraint['expression']})", model=R4)
    return result == [True]


def _failed_keys(resource: dict) -> set[str]:
    """Keys of the invariants a resource breaks: its profile's, and those of the extensions it uses."""
    sd = _sds()[resource["meta"]["profile"][0]]
    failed = {c["key"] for el, c in _constraints(sd) if not _holds(resource, sd, el, c)}
    for url, ext in _sds().items():
        if ext["type"] != "Extension":
            continue
        for _, c in _constraints(ext):
            # extension-level rules apply to every use of the extension, wherever it sits
            result = fp_evaluate(resource, f"descendants().where(url = '{url}').all({c['expression']})", model=R4)
            if result != [True]:
                failed.add(c["key"])
    return failed


@lru_cache(maxsize=1)
def _valueset_codes() -> dict[str, set[tuple[str, str | None]]]:
    """ValueSet url -> {(system, code)}; (system, None) when a whole code system is included."""
    if not TERMINOLOGY.is_dir():
        return {}
    systems: dict[str, set[tuple[str, str | None]]] = {}
    for path in TERMINOLOGY.glob("CodeSystem-*.json"):
        cs = _load(path)
        if cs.get("content") == "complete":
            systems[cs["url"]] = {(cs["url"], code) for code in _all_codes(cs.get("concept", []))}
    out: dict[str, set[tuple[str, str | None]]] = {}
    for path in TERMINOLOGY.glob("ValueSet-*.json"):
        vs = _load(path)
        members: set[tuple[str, str | None]] = set()
        for inc in vs.get("compose", {}).get("include", []):
            if inc.get("filter") or inc.get("valueSet"):
                members.add(("*", None))  # not expanded here: accept anything
            elif inc.get("concept"):
                members |= {(inc["system"], c["code"]) for c in inc["concept"]}
            else:  # a whole code system: its codes when complete, else anything of that system
                members |= systems.get(inc["system"], {(inc["system"], None)})
        out[vs["url"]] = members
    return out


def _all_codes(concepts: list[dict]) -> list[str]:
    return [code for c in concepts for code in [c["code"], *_all_codes(c.get("concept", []))]]


def _in_valueset(coding: dict, members: set[tuple[str, str | None]]) -> bool:
    return (("*", None) in members or (coding.get("system"), None) in members
            or (coding.get("system"), coding.get("code")) in members)


def _without_primitive_extensions(node: Any) -> Any:
    """Drop `_name` siblings of primitives: fhirpathpy 2.2.4 then yields `name` twice (value, extension)."""
    if isinstance(node, dict):
        return {k: _without_primitive_extensions(v) for k, v in node.items()
                if not (k.startswith("_") and k[1:] in node)}
    if isinstance(node, list):
        return [_without_primitive_extensions(v) for v in node]
    return node


def _structural_failures(resource: dict) -> set[str]:
    """A light structural check against the differential: cardinality, fixed/pattern, slices, required bindings.

    Extensions on primitives are left out (see _without_primitive_extensions).
    """
    sd = _sds()[resource["meta"]["profile"][0]]
    resource = _without_primitive_extensions(resource)
    failures: set[str] = set()
    for el in sd["differential"]["element"]:
        if el["id"] == sd["type"]:
            continue
        parent_id, _, last = el["id"].rpartition(".")
        name, _, slice_name = last.partition(":")
        parent = context_path(sd, parent_id)
        own = context_path(sd, el["id"])
        child = own[len(parent) + 1:]
        if "min" in el or "max" in el:
            count_ok = f"{child}.count() >= {el.get('min', 0)}"
            if el.get("max", "*") != "*":
                count_ok += f" and {child}.count() <= {el['max']}"
            if fp_evaluate(resource, f"{parent}.all({count_ok})", model=R4) != [True]:
                failures.add("slice" if slice_name else "cardinality")
        for key, value in el.items():
            if key.startswith(("fixed", "pattern")) and not slice_name:
                if fp_evaluate(resource, f"{own}.all({_pattern_condition('$this', value)})", model=R4) != [True]:
                    failures.add("pattern" if key.startswith("pattern") else "fixed")
        if _breaks_binding(resource, own, el.get("binding", {})):
            failures.add("binding")
    for url, ext in _sds().items():  # the bindings of the extensions the resource uses
        value = next((el for el in ext["differential"]["element"] if el["id"] == "Extension.value[x]"), {})
        if ext["type"] == "Extension" and _breaks_binding(resource, f"descendants().where(url = '{url}').value", value.get("binding", {})):
            failures.add("binding")
    return failures


def _breaks_binding(resource: dict, path: str, binding: dict) -> bool:
    members = _valueset_codes().get(binding.get("valueSet", ""))
    if binding.get("strength") != "required" or members is None:
        return False
    for node in fp_evaluate(resource, path, model=R4):
        codings = node.get("coding", []) if "coding" in node or "text" in node else [node]
        if not any(_in_valueset(c, members) for c in codings):
            return True
    return False


# ---------------------------------------------------------------- generated files

def test_build_check_is_clean() -> None:
    proc = subprocess.run([sys.executable, str(PROFILES / "build.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_structure_definitions_basics() -> None:
    assert len(_sds()) >= 40
    for url, sd in _sds().items():
        assert url == f"{BASE}/StructureDefinition/{sd['id']}"
        assert sd["version"] == "0.1.0" and sd["status"] == "active" and sd["fhirVersion"] == "4.0.1"
        assert sd["derivation"] == "constraint" and sd["abstract"] is False
        assert sd["baseDefinition"] == f"http://hl7.org/fhir/StructureDefinition/{sd['type']}"
        assert "snapshot" not in sd
        assert re.search(r"[\u4e00-\u9fff]", sd["title"]) and re.search(r"[A-Za-z]", sd["title"])
        ids = [el["id"] for el in sd["differential"]["element"]]
        assert len(ids) == len(set(ids)), sd["id"]
        for el in sd["differential"]["element"]:
            assert el["path"] == el["path"].split(".")[0] or el["path"].startswith(sd["type"] + "."), el["id"]
            assert el["path"].split(".")[0] == sd["type"], el["id"]
            assert re.sub(r":[^.]+", "", el["id"]) == el["path"], el["id"]
        if sd["type"] == "Extension":
            assert sd["kind"] == "complex-type" and sd["context"]
            url_el = next(el for el in sd["differential"]["element"] if el["id"] == "Extension.url")
            assert url_el["fixedUri"] == url


def test_structure_definitions_match_r4_schema() -> None:
    if not SCHEMA.exists():
        pytest.skip(f"{SCHEMA} is not here (../shared is only beside the project's own checkouts)")
    jsonschema = pytest.importorskip("jsonschema")
    definitions = _load(SCHEMA)["definitions"]
    documents = [*_sds().values(), _load(PROFILES / "ImplementationGuide-cn-ehr.json"),
                 *map(_load, _valid_examples()), *map(_load, _invalid_examples())]
    for doc in documents:
        # validate against the resource's own definition: the top-level oneOf only says "no match";
        # the official R4 schema's FHIRVersion enum lacks "4.0.1" itself, so that value is let through
        validator = jsonschema.Draft6Validator({"$ref": f"#/definitions/{doc['resourceType']}", "definitions": definitions})
        errors = sorted((e for e in validator.iter_errors(doc) if e.instance != "4.0.1"), key=lambda e: list(e.path))
        assert not errors, f"{doc['resourceType']}/{doc['id']}: {errors[0].message[:300]} at {list(errors[0].path)}"


def _known_valuesets() -> set[str]:
    if TERMINOLOGY.is_dir() and any(TERMINOLOGY.glob("ValueSet-*.json")):
        return {_load(p)["url"] for p in TERMINOLOGY.glob("ValueSet-*.json")}
    return {f"{BASE}/ValueSet/{vs}" for vs in CATALOGUE_VALUESETS}


def test_bindings_use_catalogue_valuesets() -> None:
    catalogue = {f"{BASE}/ValueSet/{vs}" for vs in CATALOGUE_VALUESETS}
    known = _known_valuesets()
    for sd in _sds().values():
        for el in sd["differential"]["element"]:
            if "binding" in el:
                assert el["binding"]["valueSet"] in catalogue, (sd["id"], el["id"])
                assert el["binding"]["valueSet"] in known, (sd["id"], el["id"], "missing in terminology/")
                assert el["binding"]["strength"] in ("required", "extensible", "preferred", "example")


def test_type_profiles_resolve() -> None:
    urls = set(_sds())
    for sd in _sds().values():
        for el in sd["differential"]["element"]:
            for t in el.get("type", []):
                for target in t.get("profile", []) + t.get("targetProfile", []):
                    assert target in urls or target.startswith("http://hl7.org/fhir/StructureDefinition/"), target


def test_constraint_expressions_compile_and_carry_translations() -> None:
    keys: dict[str, str] = {}
    for sd in _sds().values():
        for el, c in _constraints(sd):
            fp_compile(c["expression"], model=R4)
            assert c["severity"] in ("error", "warning")
            assert c["source"] == sd["url"]
            zh = c["_human"]["extension"][0]
            assert zh["url"] == "http://hl7.org/fhir/StructureDefinition/translation"
            assert {"url": "lang", "valueCode": "zh-CN"} in zh["extension"]
            # one key, one meaning: a key reused in another profile keeps the same expression
            assert keys.setdefault(c["key"], c["expression"]) == c["expression"], c["key"]
            fp_compile(f"{context_path(sd, el['id'])}.all({c['expression']})", model=R4)


def test_native_invariant_keys_sit_where_the_catalogue_says() -> None:
    patient = _sds()[f"{BASE}/StructureDefinition/cn-patient"]
    where = {c["key"]: el["id"] for el, c in _constraints(patient)}
    assert where["cn-id-1"] == "Patient.identifier:idCard"
    assert where["cn-id-2"] == where["cn-id-3"] == "Patient"
    assert where["cn-name-1"] == "Patient.name"
    assert context_path(patient, "Patient.identifier:idCard") == f"Patient.identifier.where(system = '{ID_CARD_SYSTEM}')"


def test_implementation_guide_lists_everything() -> None:
    ig = _load(PROFILES / "ImplementationGuide-cn-ehr.json")
    assert ig["packageId"] == "cn.ehr.core" and ig["url"] == f"{BASE}/ImplementationGuide/cn-ehr"
    refs = {r["reference"]["reference"]: r for r in ig["definition"]["resource"]}
    for sd in _sds().values():
        assert f"StructureDefinition/{sd['id']}" in refs
        assert (PROFILES / "docs" / f"{sd['id']}.md").exists()
    for path in _valid_examples():
        ex = _load(path)
        assert refs[f"{ex['resourceType']}/{ex['id']}"]["exampleCanonical"] == ex["meta"]["profile"][0]
    index = (PROFILES / "docs" / "index.md").read_text(encoding="utf-8")
    assert all(sd["id"] in index for sd in _sds().values())


# ---------------------------------------------------------------- examples

def test_every_profile_has_valid_and_invalid_examples() -> None:
    profiles = {url for url, sd in _sds().items() if sd["type"] != "Extension"}
    valid = {_load(p)["meta"]["profile"][0] for p in _valid_examples()}
    invalid = {_load(p)["meta"]["profile"][0] for p in _invalid_examples()}
    assert profiles - valid == set(), "profiles without a valid example"
    assert profiles - invalid == set(), "profiles without an invalid example"


def test_example_files_names_and_profiles() -> None:
    ids: set[tuple[str, str]] = set()
    for path in _valid_examples() + _invalid_examples():
        ex = _load(path)
        assert path.name == f"{ex['resourceType']}-{ex['id']}.json"
        assert (ex["resourceType"], ex["id"]) not in ids
        ids.add((ex["resourceType"], ex["id"]))
        profile = ex["meta"]["profile"]
        assert len(profile) == 1 and profile[0] in _sds(), path.name
        assert _sds()[profile[0]]["type"] == ex["resourceType"], path.name


def _references(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["reference"]] if isinstance(node.get("reference"), str) else []
        return found + [r for v in node.values() for r in _references(v)]
    if isinstance(node, list):
        return [r for v in node for r in _references(v)]
    return []


def test_valid_examples_reference_existing_examples_without_cycles() -> None:
    examples = {f"{ex['resourceType']}/{ex['id']}": ex for ex in map(_load, _valid_examples())}
    graph = {key: set(_references(ex)) for key, ex in examples.items()}
    for key, refs in graph.items():
        assert refs <= set(examples), f"{key} -> {refs - set(examples)}"
    # a loader that stores in dependency order needs the graph to be acyclic
    done: set[str] = set()
    while len(done) < len(graph):
        ready = {k for k, refs in graph.items() if k not in done and refs <= done}
        assert ready, f"reference cycle among {set(graph) - done}"
        done |= ready


def _check_char(number: str) -> str:
    return GB11643_CHECK[sum(int(c) * w for c, w in zip(number[:17], GB11643_WEIGHTS)) % 11]


def test_example_id_numbers_have_correct_check_digits() -> None:
    seen = 0
    for path in _valid_examples():
        ex = _load(path)
        for ident in ex.get("identifier", []) if isinstance(ex.get("identifier"), list) else []:
            if ident.get("system") == ID_CARD_SYSTEM:
                value = ident["value"]
                assert re.fullmatch(r"\d{17}[\dX]", value), value
                assert value[17] == _check_char(value), f"{path.name}: {value}"
                if "birthDate" in ex:
                    assert ex["birthDate"] == f"{value[6:10]}-{value[10:12]}-{value[12:14]}"
                if ex.get("gender") in ("male", "female"):
                    assert (int(value[16]) % 2 == 1) == (ex["gender"] == "male")
                seen += 1
    assert seen >= 4
    assert _check_char("31010419800101001") == "7"  # the resident 张三 of the brief


def test_known_check_digits_drive_cn_id_1() -> None:
    """cn-id-1 accepts numbers with a right check character and rejects every wrong one."""
    patient = _sds()[f"{BASE}/StructureDefinition/cn-patient"]
    element, rule = next((el, c) for el, c in _constraints(patient) if c["key"] == "cn-id-1")
    for body in ("31010419800101001", "11010519491231002", "44030420000229123", "31011520231130456"):
        for char in "0123456789X":
            resource = {"resourceType": "Patient", "identifier": [{"system": ID_CARD_SYSTEM, "value": body + char}]}
            assert _holds(resource, patient, element, rule) == (char == _check_char(body)), body + char
    for bad_date in ("31010419800230001", "31010419810229001", "31010419800431001", "31010419801301001"):
        number = bad_date + _check_char(bad_date)
        resource = {"resourceType": "Patient", "identifier": [{"system": ID_CARD_SYSTEM, "value": number}]}
        assert not _holds(resource, patient, element, rule), number


@pytest.mark.parametrize("path", _valid_examples(), ids=lambda p: p.name)
def test_valid_example_passes_its_invariants(path: Path) -> None:
    failed = _failed_keys(_load(path))
    assert not failed, f"{path.name} fails {sorted(failed)}"


def test_invalid_examples_have_expectations() -> None:
    expected = _expected()
    names = {p.name for p in _invalid_examples()}
    assert set(expected) == names
    allowed = {"cardinality", "binding", "fixed", "pattern", "type", "slice", "extension", "unknown-profile"}
    keys = {c["key"] for sd in _sds().values() for _, c in _constraints(sd)}
    for name, issues in expected.items():
        assert issues, name
        resource_type = name.split("-", 1)[0]
        for issue in issues:
            assert issue["severity"] in ("error", "warning")
            assert issue["key"] in allowed or issue["key"] in keys, (name, issue)
            assert issue["expression"].split(".")[0].split("[")[0] == resource_type, (name, issue)


@pytest.mark.parametrize("path", _invalid_examples(), ids=lambda p: p.name)
def test_invalid_example_fails_exactly_the_invariants_it_targets(path: Path) -> None:
    failed = _failed_keys(_load(path))
    targeted = {i["key"] for i in _expected()[path.name] if i["key"].startswith("cn-")}
    # invariants of the profile that the example does not target must still hold (one defect each)
    assert failed == targeted, f"{path.name}: fails {sorted(failed)}, expected {sorted(targeted)}"


@pytest.mark.parametrize("path", _valid_examples(), ids=lambda p: p.name)
def test_valid_example_conforms_structurally(path: Path) -> None:
    failures = _structural_failures(_load(path))
    assert not failures, f"{path.name}: {sorted(failures)}"


@pytest.mark.parametrize("path", _invalid_examples(), ids=lambda p: p.name)
def test_invalid_example_fails_the_structural_rule_it_targets(path: Path) -> None:
    expected = {i["key"] for i in _expected()[path.name]} & {"cardinality", "slice", "pattern", "fixed", "binding"}
    if "binding" in expected and not _valueset_codes():
        expected.discard("binding")  # terminology/ not here: nothing to check bindings against
    failures = _structural_failures(_load(path))
    assert expected <= failures, f"{path.name}: found {sorted(failures)}, expected {sorted(expected)}"
