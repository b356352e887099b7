"""Terminology operations over hand-built fixtures (tests/data/terminology-fixture): $lookup,
$expand (filters by Chinese, pinyin and initials, paging), $validate-code, $translate, error
statuses, read-your-writes after a PUT, and another app on the same database following changes
through the change stream. Expected values are the fixtures' own codes and the R4 operation
definitions, never the code's output."""

from __future__ import annotations

import asyncio
import copy
import re
import time
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest

from fhir_server.config import load_settings
from fhir_server.conformance.seed import seed
from fhir_server.http.app import create_app
from tests.conftest import make_settings
from tests.helpers import uid

FIXTURE = Path(__file__).parent / "data" / "terminology-fixture"
DIRS = [(FIXTURE / "terminology", True), (FIXTURE / "profiles", False)]
B = "https://fhir.cn-ehr.org"
MARITAL = "urn:oid:2.16.156.10011.2.3.3.5"
ETHNICITY = "urn:oid:2.16.156.10011.2.3.3.3"
SEX = "urn:oid:2.16.156.10011.2.3.3.4"
FORM_MARITAL = f"{B}/CodeSystem/ehr-form-marital"
ETHNICITY_VS = f"{B}/ValueSet/gb-t-3304-ethnicity"
_CHINESE = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
async def tx(mongo_uri: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(mongo_uri)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        report = await seed(app.state.server, DIRS)
        assert not report.failed, report
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver/fhir", timeout=60
        ) as c:
            c.app = app  # type: ignore[attr-defined]
            yield c


def _params(body: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    assert body["resourceType"] == "Parameters", body
    out: dict[str, list[dict[str, Any]]] = {}
    for p in body["parameter"]:
        out.setdefault(p["name"], []).append(p)
    return out


def _value(p: dict[str, Any]) -> Any:
    return next(v for k, v in p.items() if k.startswith("value"))


def _parts(p: dict[str, Any]) -> dict[str, Any]:
    return {q["name"]: _value(q) for q in p["part"]}


def _codes(vs: dict[str, Any]) -> list[str]:
    return [c["code"] for c in vs["expansion"].get("contains", [])]


def _assert_outcome(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    issue = body["issue"][0]
    assert issue["diagnostics"] and "Traceback" not in r.text
    return issue


# -- $lookup ---------------------------------------------------------------------------------------


async def test_lookup_display_designation_and_parent(tx: httpx.AsyncClient) -> None:
    r = await tx.get("/CodeSystem/$lookup", params={"system": MARITAL, "code": "21"})
    assert r.status_code == 200, r.text
    p = _params(r.json())
    assert _value(p["display"][0]) == "初婚"
    assert _value(p["name"][0]) == "婚姻状况代码（GB/T 2261.2）"
    assert _value(p["version"][0]) == "2003"
    props = [_parts(x) for x in p["property"]]
    assert {"code": "parent", "value": "20"} in props
    designations = [_parts(x) for x in p["designation"]]
    assert {"language": "en", "value": "First marriage"} in designations


async def test_lookup_children_by_post_coding_and_instance(tx: httpx.AsyncClient) -> None:
    body = {"resourceType": "Parameters", "parameter": [{"name": "coding", "valueCoding": {"system": MARITAL, "code": "20"}}]}
    r = await tx.post("/CodeSystem/$lookup", json=body)
    assert r.status_code == 200, r.text
    props = [_parts(x) for x in _params(r.json())["property"]]
    assert {pr["value"] for pr in props if pr["code"] == "child"} == {"21", "22", "23"}
    assert not [pr for pr in props if pr["code"] == "parent"]

    r = await tx.get("/CodeSystem/gb-t-2261-2-marital/$lookup", params={"code": "10", "property": "display"})
    assert r.status_code == 200, r.text
    p = _params(r.json())
    assert _value(p["display"][0]) == "未婚" and "designation" not in p

    r = await tx.get("/CodeSystem/$lookup", params={"system": MARITAL, "code": "10", "displayLanguage": "en"})
    assert _value(_params(r.json())["display"][0]) == "Unmarried"


async def test_lookup_property_of_project_code_system(tx: httpx.AsyncClient) -> None:
    r = await tx.get("/CodeSystem/$lookup", params={"system": f"{B}/CodeSystem/health-tag", "code": "t2dm"})
    p = _params(r.json())
    assert _value(p["display"][0]) == "2型糖尿病"
    assert {"code": "category", "value": "chronic-disease"} in [_parts(x) for x in p["property"]]


async def test_lookup_errors(tx: httpx.AsyncClient) -> None:
    issue = _assert_outcome(await tx.get("/CodeSystem/$lookup", params={"system": "urn:oid:1.2.3.4", "code": "1"}), 404)
    assert _CHINESE.search(issue["details"]["text"]) and "urn:oid:1.2.3.4" in issue["diagnostics"]
    issue = _assert_outcome(await tx.get("/CodeSystem/$lookup", params={"system": MARITAL, "code": "99"}), 404)
    assert _CHINESE.search(issue["details"]["text"])
    _assert_outcome(await tx.get("/CodeSystem/$lookup", params={"system": MARITAL}), 400)
    _assert_outcome(await tx.get("/CodeSystem/$lookup", params={"code": "10"}), 400)
    _assert_outcome(await tx.get("/CodeSystem/no-such-id/$lookup", params={"code": "10"}), 404)
    _assert_outcome(await tx.post("/CodeSystem/$lookup", json={"resourceType": "Patient"}), 400)
    # Not defined on other types
    _assert_outcome(await tx.get("/Patient/$lookup", params={"code": "10"}), 404)


# -- $expand ---------------------------------------------------------------------------------------


async def test_expand_whole_system_with_hierarchy_flattened(tx: httpx.AsyncClient) -> None:
    r = await tx.get("/ValueSet/$expand", params={"url": f"{B}/ValueSet/gb-t-2261-2-marital"})
    assert r.status_code == 200, r.text
    vs = r.json()
    assert vs["resourceType"] == "ValueSet" and vs["url"] == f"{B}/ValueSet/gb-t-2261-2-marital"
    assert vs["expansion"]["total"] == 8
    assert _codes(vs) == ["10", "20", "21", "22", "23", "30", "40", "90"]
    assert all("contains" not in c and c["system"] == MARITAL for c in vs["expansion"]["contains"])
    assert vs["expansion"]["contains"][3]["display"] == "再婚"
    assert vs["expansion"]["timestamp"] and vs["expansion"]["identifier"]


@pytest.mark.parametrize(
    "url, codes",
    [
        (f"{B}/ValueSet/marital-married", ["20", "21", "22", "23"]),  # is-a
        (f"{B}/ValueSet/marital-remarried", ["22", "23"]),  # descendent-of, exclude 21
        (f"{B}/ValueSet/health-tag-chronic-disease", ["hypertension", "t2dm", "stroke"]),  # property =
        # valueSet imports, exclude
        (f"{B}/ValueSet/health-tag-chronic-and-married", ["hypertension", "t2dm", "20", "21", "22", "23"]),
    ],
)
async def test_expand_filters_imports_excludes(tx: httpx.AsyncClient, url: str, codes: list[str]) -> None:
    r = await tx.get("/ValueSet/$expand", params={"url": url})
    assert r.status_code == 200, r.text
    assert _codes(r.json()) == codes
    assert r.json()["expansion"]["total"] == len(codes)


@pytest.mark.parametrize(
    "text, must, must_not",
    [
        ("汉", {"01"}, {"02", "03"}),  # Chinese characters
        ("hanzu", {"01"}, {"03", "02"}),  # full pinyin
        ("hz", {"01"}, {"02", "08"}),  # initials (回族 huizu is hz too)
        ("HAN", {"01"}, {"02"}),  # English designation / pinyin, case-insensitive
        ("zu", {"01", "02", "03"}, {"97", "98"}),  # a syllable
        ("wgxt", {"98"}, {"01"}),  # initials of 外国血统…
        ("98", {"98"}, {"01"}),  # the code
    ],
)
async def test_expand_text_filter(tx: httpx.AsyncClient, text: str, must: set[str], must_not: set[str]) -> None:
    r = await tx.get("/ValueSet/$expand", params={"url": ETHNICITY_VS, "filter": text})
    assert r.status_code == 200, r.text
    got = set(_codes(r.json()))
    assert must <= got and not (must_not & got), (text, got)
    assert r.json()["expansion"]["total"] == len(got)
    assert {"name": "filter", "valueString": text} in r.json()["expansion"]["parameter"]


async def test_expand_paging_and_display_language(tx: httpx.AsyncClient) -> None:
    r = await tx.get("/ValueSet/$expand", params={"url": ETHNICITY_VS, "count": "3", "offset": "2"})
    vs = r.json()
    assert vs["expansion"]["total"] == 10 and vs["expansion"]["offset"] == 2
    assert _codes(vs) == ["03", "04", "05"]
    r = await tx.get("/ValueSet/$expand", params={"url": ETHNICITY_VS, "count": "0"})
    assert r.json()["expansion"]["total"] == 10 and _codes(r.json()) == []
    r = await tx.get("/ValueSet/$expand", params={"url": ETHNICITY_VS, "filter": "hz", "count": "1"})
    assert r.json()["expansion"]["total"] == 2 and _codes(r.json()) == ["01"]
    r = await tx.get("/ValueSet/$expand", params={"url": ETHNICITY_VS, "displayLanguage": "en", "count": "1"})
    assert r.json()["expansion"]["contains"][0]["display"] == "Han"


async def test_expand_instance_post_and_inline(tx: httpx.AsyncClient) -> None:
    r = await tx.get("/ValueSet/marital-married/$expand")
    assert r.status_code == 200 and _codes(r.json()) == ["20", "21", "22", "23"], r.text
    body = {
        "resourceType": "Parameters",
        "parameter": [{"name": "url", "valueUri": ETHNICITY_VS}, {"name": "filter", "valueString": "维吾尔"}],
    }
    r = await tx.post("/ValueSet/$expand", json=body)
    assert r.status_code == 200 and _codes(r.json()) == ["05"], r.text
    inline = {
        "resourceType": "ValueSet",
        "status": "draft",
        "compose": {"include": [{"system": SEX, "concept": [{"code": "1"}, {"code": "2", "display": "女"}]}]},
    }
    r = await tx.post("/ValueSet/$expand", json={"resourceType": "Parameters", "parameter": [{"name": "valueSet", "resource": inline}]})
    assert r.status_code == 200, r.text
    assert [(c["code"], c["display"]) for c in r.json()["expansion"]["contains"]] == [("1", "男性"), ("2", "女")]
    # The form of a POST
    r = await tx.post("/ValueSet/$expand", data={"url": ETHNICITY_VS, "filter": "miao"})
    assert r.status_code == 200 and _codes(r.json()) == ["06"], r.text


async def test_expand_builtin_r4_value_set(tx: httpx.AsyncClient) -> None:
    r = await tx.get("/ValueSet/$expand", params={"url": "http://hl7.org/fhir/ValueSet/administrative-gender"})
    assert r.status_code == 200, r.text
    assert sorted(_codes(r.json())) == ["female", "male", "other", "unknown"]


async def test_expand_errors(tx: httpx.AsyncClient) -> None:
    issue = _assert_outcome(await tx.get("/ValueSet/$expand", params={"url": f"{B}/ValueSet/nope"}), 404)
    assert _CHINESE.search(issue["details"]["text"]) and f"{B}/ValueSet/nope" in issue["diagnostics"]
    _assert_outcome(await tx.get("/ValueSet/$expand"), 400)
    _assert_outcome(await tx.get("/ValueSet/$expand", params={"url": ETHNICITY_VS, "count": "-1"}), 400)
    # a count beyond a FHIR integer was echoed into expansion.parameter and broke the JSON writer (500)
    _assert_outcome(await tx.get("/ValueSet/$expand", params={"url": ETHNICITY_VS, "count": "1" + "0" * 30}), 400)
    _assert_outcome(await tx.get("/ValueSet/$expand", params={"url": ETHNICITY_VS, "offset": str(2**40)}), 400)
    _assert_outcome(await tx.get("/ValueSet/$expand", params={"url": ETHNICITY_VS, "offset": "x"}), 400)
    unknown_system = {
        "resourceType": "ValueSet",
        "status": "draft",
        "compose": {"include": [{"system": "urn:oid:9.9.9"}]},
    }
    body = {"resourceType": "Parameters", "parameter": [{"name": "valueSet", "resource": unknown_system}]}
    issue = _assert_outcome(await tx.post("/ValueSet/$expand", json=body), 422)
    assert "urn:oid:9.9.9" in issue["diagnostics"] and _CHINESE.search(issue["details"]["text"])


# -- $validate-code --------------------------------------------------------------------------------


async def test_validate_code_in_value_set(tx: httpx.AsyncClient) -> None:
    r = await tx.get("/ValueSet/$validate-code", params={"url": ETHNICITY_VS, "system": ETHNICITY, "code": "01"})
    p = _params(r.json())
    assert _value(p["result"][0]) is True and _value(p["display"][0]) == "汉族" and "message" not in p

    r = await tx.get("/ValueSet/$validate-code", params={"url": ETHNICITY_VS, "system": ETHNICITY, "code": "99"})
    p = _params(r.json())
    assert _value(p["result"][0]) is False and _CHINESE.search(_value(p["message"][0]))

    # A wrong display: valid, with a warning message naming the right display.
    params = {"url": ETHNICITY_VS, "system": ETHNICITY, "code": "01", "display": "汉"}
    p = _params((await tx.get("/ValueSet/$validate-code", params=params)).json())
    assert _value(p["result"][0]) is True and "汉族" in _value(p["message"][0])
    # A designation is an acceptable display.
    params = {"url": ETHNICITY_VS, "system": ETHNICITY, "code": "01", "display": "Han"}
    p = _params((await tx.get("/ValueSet/$validate-code", params=params)).json())
    assert _value(p["result"][0]) is True and "message" not in p

    # In the code system but not in the value set (descendent-of excludes 20 itself).
    r = await tx.get("/ValueSet/marital-remarried/$validate-code", params={"system": MARITAL, "code": "20"})
    p = _params(r.json())
    assert _value(p["result"][0]) is False and "marital-remarried" in _value(p["message"][0])


async def test_validate_codeable_concept_and_coding(tx: httpx.AsyncClient) -> None:
    cc = {"coding": [{"system": "urn:oid:1.2.3", "code": "x"}, {"system": MARITAL, "code": "22", "display": "再婚"}]}
    body = {
        "resourceType": "Parameters",
        "parameter": [{"name": "url", "valueUri": f"{B}/ValueSet/marital-married"}, {"name": "codeableConcept", "valueCodeableConcept": cc}],
    }
    p = _params((await tx.post("/ValueSet/$validate-code", json=body)).json())
    assert _value(p["result"][0]) is True and _value(p["display"][0]) == "再婚"
    body["parameter"][1] = {"name": "coding", "valueCoding": {"system": MARITAL, "code": "10"}}
    p = _params((await tx.post("/ValueSet/$validate-code", json=body)).json())
    assert _value(p["result"][0]) is False


async def test_validate_code_builtin_and_code_system(tx: httpx.AsyncClient) -> None:
    params = {"url": "http://hl7.org/fhir/ValueSet/administrative-gender", "system": "http://hl7.org/fhir/administrative-gender", "code": "male"}
    assert _value(_params((await tx.get("/ValueSet/$validate-code", params=params)).json())["result"][0]) is True
    params["code"] = "男"
    assert _value(_params((await tx.get("/ValueSet/$validate-code", params=params)).json())["result"][0]) is False

    r = await tx.get("/CodeSystem/$validate-code", params={"url": MARITAL, "code": "21"})
    p = _params(r.json())
    assert _value(p["result"][0]) is True and _value(p["display"][0]) == "初婚"
    r = await tx.get("/CodeSystem/$validate-code", params={"url": MARITAL, "code": "24"})
    p = _params(r.json())
    assert _value(p["result"][0]) is False and _CHINESE.search(_value(p["message"][0]))
    r = await tx.get("/CodeSystem/gb-t-2261-1-sex/$validate-code", params={"code": "1", "display": "女性"})
    p = _params(r.json())
    assert _value(p["result"][0]) is True and "男性" in _value(p["message"][0])


async def test_validate_code_errors(tx: httpx.AsyncClient) -> None:
    issue = _assert_outcome(await tx.get("/ValueSet/$validate-code", params={"url": f"{B}/ValueSet/nope", "code": "1"}), 404)
    assert _CHINESE.search(issue["details"]["text"])
    _assert_outcome(await tx.get("/ValueSet/$validate-code", params={"url": ETHNICITY_VS}), 400)
    _assert_outcome(await tx.get("/ValueSet/$validate-code", params={"code": "01"}), 400)
    _assert_outcome(await tx.get("/CodeSystem/$validate-code", params={"url": "urn:oid:1.2.3", "code": "1"}), 404)
    _assert_outcome(await tx.get("/CodeSystem/$validate-code", params={"code": "1"}), 400)


# -- $translate ------------------------------------------------------------------------------------


async def test_translate_equivalences(tx: httpx.AsyncClient) -> None:
    params = {"url": f"{B}/ConceptMap/form-marital-to-gb", "system": FORM_MARITAL, "code": "2"}
    r = await tx.get("/ConceptMap/$translate", params=params)
    assert r.status_code == 200, r.text
    p = _params(r.json())
    assert _value(p["result"][0]) is True and _value(p["message"][0])
    matches = [_parts(m) for m in p["match"]]
    assert [(m["equivalence"], m["concept"]["code"]) for m in matches] == [("equivalent", "20"), ("narrower", "21"), ("narrower", "22")]
    assert matches[0]["concept"]["system"] == MARITAL and matches[0]["concept"]["display"] == "已婚"
    assert matches[0]["source"] == f"{B}/ConceptMap/form-marital-to-gb"

    params["code"] = "5"  # mapped to nothing
    p = _params((await tx.get("/ConceptMap/$translate", params=params)).json())
    assert _value(p["result"][0]) is False and [_parts(m)["equivalence"] for m in p["match"]] == ["unmatched"]
    params["code"] = "4"  # not in the map at all
    p = _params((await tx.get("/ConceptMap/$translate", params=params)).json())
    assert _value(p["result"][0]) is False and "match" not in p and _CHINESE.search(_value(p["message"][0]))


async def test_translate_without_url_instance_reverse(tx: httpx.AsyncClient) -> None:
    gender = "http://hl7.org/fhir/administrative-gender"
    r = await tx.get("/ConceptMap/$translate", params={"system": SEX, "code": "2", "targetsystem": gender})
    p = _params(r.json())
    assert _value(p["result"][0]) is True
    assert [_parts(m)["concept"] for m in p["match"]] == [{"system": gender, "code": "female", "display": "Female"}]
    r = await tx.get("/ConceptMap/$translate", params={"system": SEX, "code": "9", "target": "http://hl7.org/fhir/ValueSet/administrative-gender"})
    assert [_parts(m)["equivalence"] for m in _params(r.json())["match"]] == ["wider"]

    r = await tx.get("/ConceptMap/gb-sex-to-fhir-gender/$translate", params={"system": SEX, "code": "1"})
    assert [_parts(m)["concept"]["code"] for m in _params(r.json())["match"]] == ["male"]

    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "url", "valueUri": f"{B}/ConceptMap/gb-sex-to-fhir-gender"},
            {"name": "coding", "valueCoding": {"system": gender, "code": "unknown"}},
            {"name": "reverse", "valueBoolean": True},
        ],
    }
    p = _params((await tx.post("/ConceptMap/$translate", json=body)).json())
    got = sorted((_parts(m)["concept"]["code"], _parts(m)["equivalence"]) for m in p["match"])
    assert got == [("0", "equivalent"), ("9", "narrower")]


async def test_translate_errors(tx: httpx.AsyncClient) -> None:
    issue = _assert_outcome(
        await tx.get("/ConceptMap/$translate", params={"url": f"{B}/ConceptMap/nope", "system": SEX, "code": "1"}), 404
    )
    assert _CHINESE.search(issue["details"]["text"])
    _assert_outcome(await tx.get("/ConceptMap/$translate", params={"system": SEX}), 400)
    _assert_outcome(await tx.get("/ConceptMap/$translate", params={"code": "1"}), 400)


# -- terminology resources stay searchable -------------------------------------------------------


async def test_seeded_resources_are_searchable(tx: httpx.AsyncClient) -> None:
    r = await tx.get("/CodeSystem", params={"url": MARITAL})
    assert r.json()["total"] == 1 and r.json()["entry"][0]["resource"]["id"] == "gb-t-2261-2-marital"
    r = await tx.get("/ValueSet", params={"name:contains": "marital", "_summary": "count"})
    assert r.json()["total"] == 3  # GBT2261_2Marital, MaritalMarried, MaritalRemarried
    r = await tx.get("/ConceptMap", params={"url": f"{B}/ConceptMap/form-marital-to-gb"})
    assert r.json()["total"] == 1


# -- changes: this worker and another ----------------------------------------------------------------


def _code_system(url: str, concepts: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "resourceType": "CodeSystem",
        "id": url.rsplit("/", 1)[-1],
        "url": url,
        "name": "ReadYourWrites",
        "status": "active",
        "content": "complete",
        "concept": [{"code": c, "display": d} for c, d in concepts],
    }


def _value_set(url: str, system: str) -> dict[str, Any]:
    return {
        "resourceType": "ValueSet",
        "id": url.rsplit("/", 1)[-1],
        "url": url,
        "status": "active",
        "compose": {"include": [{"system": system}]},
    }


async def test_put_is_seen_by_the_next_request(tx: httpx.AsyncClient) -> None:
    n = uid()[:12]
    cs_url, vs_url = f"http://example.org/CodeSystem/rw-{n}", f"http://example.org/ValueSet/rw-{n}"
    cs = _code_system(cs_url, [("a", "甲")])
    assert (await tx.put(f"/CodeSystem/rw-{n}", json=cs)).status_code == 201
    assert (await tx.put(f"/ValueSet/rw-{n}", json=_value_set(vs_url, cs_url))).status_code == 201
    assert _codes((await tx.get("/ValueSet/$expand", params={"url": vs_url})).json()) == ["a"]
    expected = ["a"]
    for code, display, pinyin in [("b", "乙", "yi"), ("c", "丙", "bing"), ("d", "丁", "ding")]:
        cs["concept"].append({"code": code, "display": display})
        assert (await tx.put(f"/CodeSystem/rw-{n}", json=cs)).status_code == 200
        expected.append(code)
        assert _codes((await tx.get("/ValueSet/$expand", params={"url": vs_url})).json()) == expected
        assert _codes((await tx.get("/ValueSet/$expand", params={"url": vs_url, "filter": pinyin})).json()) == [code]
        r = await tx.get("/ValueSet/$validate-code", params={"url": vs_url, "system": cs_url, "code": code})
        assert _value(_params(r.json())["result"][0]) is True
    # A deleted code system: the value set cannot be expanded any more.
    assert (await tx.delete(f"/CodeSystem/rw-{n}")).status_code in (200, 204)
    _assert_outcome(await tx.get("/ValueSet/$expand", params={"url": vs_url}), 422)
    _assert_outcome(await tx.get("/CodeSystem/$lookup", params={"system": cs_url, "code": "a"}), 404)


async def _until(check: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def test_another_app_follows_through_the_change_stream(tx: httpx.AsyncClient, mongo_uri: str) -> None:
    settings = tx.app.state.server.settings  # type: ignore[attr-defined]
    other = create_app(load_settings(mongodb_uri=mongo_uri, database=settings.database, load_conformance=False, auth_enabled=False))
    n = uid()[:12]
    cs_url, vs_url = f"http://example.org/CodeSystem/cs-{n}", f"http://example.org/ValueSet/cs-{n}"
    async with other.router.lifespan_context(other):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=other), base_url="http://testserver/fhir") as remote:
            # Stored before it started: loaded at startup.
            r = await remote.get("/ValueSet/$expand", params={"url": ETHNICITY_VS, "filter": "hz"})
            assert "01" in _codes(r.json()), r.text
            cs = _code_system(cs_url, [("x", "戊")])
            assert (await tx.put(f"/CodeSystem/cs-{n}", json=cs)).status_code == 201
            assert (await tx.put(f"/ValueSet/cs-{n}", json=_value_set(vs_url, cs_url))).status_code == 201

            async def expands_to(codes: list[str]) -> bool:
                r = await remote.get("/ValueSet/$expand", params={"url": vs_url})
                return r.status_code == 200 and _codes(r.json()) == codes

            await _until(lambda: expands_to(["x"]))
            cs["concept"].append({"code": "y", "display": "己"})
            assert (await tx.put(f"/CodeSystem/cs-{n}", json=cs)).status_code == 200
            await _until(lambda: expands_to(["x", "y"]))
            assert (await tx.delete(f"/ValueSet/cs-{n}")).status_code in (200, 204)

            async def forgotten() -> bool:
                return (await remote.get("/ValueSet/$expand", params={"url": vs_url})).status_code == 404

            await _until(forgotten)
            # And the other way round: written there, seen here at once and by this worker later.
            changed = copy.deepcopy(cs)
            changed["concept"] = [{"code": "z", "display": "庚"}]
            assert (await remote.put(f"/CodeSystem/cs-{n}", json=changed)).status_code == 200
            r = await remote.get("/CodeSystem/$lookup", params={"system": cs_url, "code": "z"})
            assert r.status_code == 200, r.text

            async def here_knows_z() -> bool:
                return (await tx.get("/CodeSystem/$lookup", params={"system": cs_url, "code": "z"})).status_code == 200

            await _until(here_knows_z)
