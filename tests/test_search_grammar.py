"""The FHIR R4 search grammar (issue #3, http://hl7.org/fhir/R4/search.html) on a small hand-made
fixture, tests/data/search-fixture.json, PUT once per module (client ids) into its own database.

Every expected set below was written by hand from the fixture and the spec, not from the server.
Conventions this server documents (README, fhir_server/search/extract.py LOCAL_TZ): a date or
dateTime without a zone, stored or searched, is in China Standard Time (+08:00).

Dates (search.html#prefix, #date) are ranges: the stored value covers the implicit range of its
precision and the search value too. eq: the search range contains the target range; gt: the target
range reaches above the search range; lt: below; ge/le: gt/lt or eq; sa: the target starts after
the search range ends; eb: ends before it starts; ne: not eq. Where the R4 text admits two readings
(ge/le on a target that straddles the search range, gt/lt on numbers inside the search value's
implicit range, ``ap``), a case lists the ``must`` set and a larger ``may`` set.

Fixture (ids):
  Organization org-rj 上海交通大学医学院附属瑞金医院 (alias 瑞金医院); org-cm 上海市徐汇区斜土街道社区卫生服务中心
      (partOf org-rj); org-comma "Smith, Jones & Partners Clinic"; org-jones "Jones Clinic"
  Practitioner prac-li 李明 (female); prac-wang 王刚 (male)
  Patient pat-zs 张三 male 1980-05-12, GP prac-li, org-cm, active, identifiers resident-id 310104198005120011
      (type NNCHN, text 居民身份证) and mrn "ID,1", address 上海市徐汇区, communication zh-CN, narrative,
      meta.tag https://fhir.example.cn/tags|vip, meta.profile .../cn-patient
  Patient pat-zsf 张三丰 male 1947, GP prac-wang, org-rj, active, address 上海市黄浦区
  Patient pat-li 李四 male 1946-12-31, org-rj, active=false, address 北京市
  Patient pat-oy 欧阳娜娜 female 1995-02, org-cm
  Patient pat-jose José Müller male 1990-07-15
  Patient pat-anon: only an identifier (no name, gender, birthDate)
  Encounter enc-1 (pat-zs, org-cm)
  Observation heart rate (LOINC 8867-4, vital-signs):
      obs-tz1 pat-zs 2024-01-01T07:30:00+08:00 (= 2023-12-31T23:30Z); obs-tz2 pat-zs 2023-12-31T20:00:00Z
      (= 2024-01-01T04:00+08); obs-tz3 pat-zsf 2024-01-01T23:59:59+08:00; obs-tz4 pat-zsf 2024-01-02;
      obs-tz5 pat-li 2024-01; obs-period pat-li 2024-03-01T08:00+08 .. 2024-03-03T18:00+08;
      obs-open pat-oy period from 2024-05-01, no end
  Observation glucose (LOINC 2339-0 "Glucose [Mass/volume] in Blood", text 血糖, laboratory):
      obs-q1 pat-zs 5.4 mmol/L 2024-02-01T09:00+08 (subject also has identifier, encounter enc-1,
      performer prac-li); obs-q2 pat-zs 5.35 mmol/L 2024-02-01T02:00Z; obs-q3 pat-zsf 5.45 mmol/L
      2024-02-01T08:30+09:00; obs-q4 pat-zsf 5.5 mmol/L 2024-02-02; obs-q5 pat-li 97.2 mg/dL 2024-02-03;
      obs-q6 pat-oy code 2339-0 WITHOUT system, 6.1 with unit "mmol/L" only, 2024-02-04
  Observation blood pressure (85354-9): obs-bp1 pat-zs systolic 142 diastolic 88; obs-bp2 pat-zsf 118/135
  Observation obs-smoke pat-li smoking status = SNOMED 266919005 never smoker
  DiagnosticReport dr-1 pat-zs, result obs-q1, LOINC 24323-8
  RiskAssessment ra-1 pat-zs 0.25; ra-2 pat-zsf 0.3; ra-3 pat-li 0.35; ra-4 pat-oy (no probability)
  ValueSet vs-glucose https://fhir.example.cn/ValueSet/glucose = LOINC {2339-0, 15074-8}
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from pymongo import AsyncMongoClient

from fhir_server.http.app import create_app
from tests.conftest import make_settings

BASE = "http://testserver/fhir"
FIXTURE = Path(__file__).parent / "data" / "search-fixture.json"
FORM = "application/x-www-form-urlencoded"


@pytest.fixture(scope="module")
async def fx(mongo_uri: str):
    settings = make_settings(mongo_uri)
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url=BASE, timeout=120) as client:
            r = await client.post("", content=FIXTURE.read_bytes(), headers={"Content-Type": "application/fhir+json"})
            assert r.status_code == 200, r.text[:3000]
            yield client
    mongo: AsyncMongoClient = AsyncMongoClient(mongo_uri)
    try:
        await mongo.drop_database(settings.database)
    finally:
        await mongo.close()


# -- helpers ---------------------------------------------------------------------------------------


def qs(query: str) -> list[Any]:
    """``a=b&c=d`` -> [(a, b), (c, d)], values kept literally (httpx percent-encodes them)."""
    out = []
    for part in query.split("&") if query else []:
        name, _, value = part.partition("=")
        out.append((name, value))
    return out


def link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((x["url"] for x in bundle.get("link") or [] if x.get("relation") == relation), None)


def rel(url: str) -> str:
    assert url.startswith(BASE), url
    return url[len(BASE) :]


def by_mode(bundle: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [e for e in bundle.get("entry") or [] if (e.get("search") or {}).get("mode") == mode]


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in by_mode(bundle, mode)]


def check_searchset(bundle: dict[str, Any]) -> None:
    assert bundle.get("resourceType") == "Bundle" and bundle.get("type") == "searchset", bundle
    for e in bundle.get("entry") or []:
        assert (e.get("search") or {}).get("mode") in ("match", "include", "outcome"), e


async def pages(
    client: httpx.AsyncClient,
    path: str,
    params: list[Any],
    headers: dict[str, str] | None = None,
    post: bool = False,
) -> list[dict[str, Any]]:
    if post:
        r = await client.post(path + "/_search", data=dict(params), headers={"Content-Type": FORM, **(headers or {})})
    else:
        r = await client.get(path, params=params, headers=headers)
    assert r.status_code == 200, f"{path}?{params}: {r.status_code} {r.text[:2000]}"
    out = [r.json()]
    while (nxt := link(out[-1], "next")) is not None:
        assert len(out) < 200
        r = await client.get(rel(nxt), headers=headers)
        assert r.status_code == 200, r.text[:2000]
        out.append(r.json())
    for b in out:
        check_searchset(b)
    return out


async def matched(client: httpx.AsyncClient, path: str, query: str, **kw: Any) -> list[str]:
    found = [i for b in await pages(client, path, qs(query), **kw) for i in ids(b)]
    assert len(found) == len(set(found)), f"a match appears twice: {found}"
    return found


def assert_between(found: list[str], must: set[str], may: set[str] | None) -> None:
    may = must if may is None else may
    got = set(found)
    assert must <= got <= may, f"missing {sorted(must - got)}, unexpected {sorted(got - may)} (got {sorted(got)})"


def is_outcome_naming(body: dict[str, Any], name: str) -> bool:
    if body.get("resourceType") != "OperationOutcome" or not body.get("issue"):
        return False
    for issue in body["issue"]:
        if any(name in x for x in issue.get("expression") or []):
            return True
        if name in (issue.get("diagnostics") or ""):
            return True
    return False


# -- the expected sets, by hand ------------------------------------------------------------------------

TZ = {"obs-tz1", "obs-tz2", "obs-tz3", "obs-tz4", "obs-tz5"}
HR = TZ | {"obs-period", "obs-open"}
GLU = {"obs-q1", "obs-q2", "obs-q3", "obs-q4", "obs-q5"}  # LOINC-coded glucose
ALL_OBS = HR | GLU | {"obs-q6", "obs-bp1", "obs-bp2", "obs-smoke"}
ZS_OBS = {"obs-tz1", "obs-tz2", "obs-q1", "obs-q2", "obs-bp1"}
ZSF_OBS = {"obs-tz3", "obs-tz4", "obs-q3", "obs-q4", "obs-bp2"}
LI_OBS = {"obs-tz5", "obs-period", "obs-q5", "obs-smoke"}
OY_OBS = {"obs-open", "obs-q6"}
PATIENTS = {"pat-zs", "pat-zsf", "pat-li", "pat-oy", "pat-jose", "pat-anon"}
HRQ = "code=http://loinc.org|8867-4&"
GQ = "code=2339-0&"

# (name, path, query, must, may): one row per line, as a table
# fmt: off
CASES: list[tuple[str, str, str, set[str], set[str] | None]] = [
    # --- dates: precision and time zones (no zone in the query = +08:00) ---
    ("date-day-no-zone-is-cst", "/Observation", HRQ + "date=2024-01-01", {"obs-tz1", "obs-tz2", "obs-tz3"}, None),
    ("date-day-before-in-cst-is-empty", "/Observation", HRQ + "date=2023-12-31", set(), None),
    ("date-seconds-utc", "/Observation", HRQ + "date=2023-12-31T23:30:00Z", {"obs-tz1"}, None),
    ("date-seconds-plus8", "/Observation", HRQ + "date=2024-01-01T07:30:00+08:00", {"obs-tz1"}, None),
    ("date-seconds-minus5", "/Observation", HRQ + "date=2023-12-31T15:00:00-05:00", {"obs-tz2"}, None),
    ("date-seconds-no-zone", "/Observation", HRQ + "date=2024-01-01T07:30:00", {"obs-tz1"}, None),
    ("date-month", "/Observation", HRQ + "date=2024-01", TZ, None),
    ("date-year", "/Observation", HRQ + "date=2024", TZ | {"obs-period"}, None),
    ("date-day-does-not-contain-month", "/Observation", HRQ + "date=2024-01-15", set(), None),
    ("date-ge-day", "/Observation", HRQ + "date=ge2024-01-02", {"obs-tz4", "obs-tz5", "obs-period", "obs-open"}, None),
    ("date-gt-day", "/Observation", HRQ + "date=gt2024-01-02", {"obs-tz5", "obs-period", "obs-open"}, None),
    ("date-le-day", "/Observation", HRQ + "date=le2024-01-01", {"obs-tz1", "obs-tz2", "obs-tz3"}, {"obs-tz1", "obs-tz2", "obs-tz3", "obs-tz5"}),
    ("date-lt-day", "/Observation", HRQ + "date=lt2024-01-02", {"obs-tz1", "obs-tz2", "obs-tz3", "obs-tz5"}, None),
    ("date-sa-day", "/Observation", HRQ + "date=sa2024-01-01", {"obs-tz4", "obs-period", "obs-open"}, None),
    ("date-eb-day", "/Observation", HRQ + "date=eb2024-01-02", {"obs-tz1", "obs-tz2", "obs-tz3"}, None),
    ("date-ne-day", "/Observation", HRQ + "date=ne2024-01-01", {"obs-tz4", "obs-tz5", "obs-period", "obs-open"}, None),
    ("date-ap-near", "/Observation", HRQ + "date=ap2024-01-01", {"obs-tz1", "obs-tz2", "obs-tz3"}, HR),
    ("date-ap-far", "/Observation", HRQ + "date=ap2010-01-01", set(), None),
    # a millisecond-precision search value does not contain a second-precision target (R4 lets servers ignore fractions)
    ("date-fraction-of-second", "/Observation", HRQ + "date=2024-01-01T07:30:00.000+08:00", set(), {"obs-tz1"}),
    ("date-or", "/Observation", HRQ + "date=2024-01-02,2024-03", {"obs-tz4", "obs-period"}, None),
    # ge noon 01-01 (+08) and before 2024-01-02T08:00+08: tz3, and the day 01-02 and month 2024-01 that straddle it
    ("date-and-range", "/Observation", HRQ + "date=ge2024-01-01T12:00:00+08:00&date=lt2024-01-02T00:00:00Z", {"obs-tz3", "obs-tz4", "obs-tz5"}, None),
    # periods
    ("period-month-contains", "/Observation", HRQ + "date=2024-03", {"obs-period"}, None),
    ("period-day-inside-not-eq", "/Observation", HRQ + "date=2024-03-02", set(), None),
    ("period-ge-day-inside", "/Observation", HRQ + "date=ge2024-03-02", {"obs-period", "obs-open"}, None),
    ("period-le-day-inside", "/Observation", HRQ + "date=le2024-03-02", TZ | {"obs-period"}, None),
    ("period-gt-after-end", "/Observation", HRQ + "date=gt2024-03-03", {"obs-open"}, None),
    ("period-eb", "/Observation", HRQ + "date=eb2024-03-03", TZ, None),
    ("period-sa", "/Observation", HRQ + "date=sa2024-02-29", {"obs-period", "obs-open"}, None),
    ("period-open-ended-ge-future", "/Observation", HRQ + "date=ge2030", {"obs-open"}, None),
    ("period-open-ended-lt-start", "/Observation", HRQ + "date=lt2024-05-01", TZ | {"obs-period"}, None),
    # glucose times in three zones: +08:00 day 2024-02-01 holds q1, q2 and q3
    ("date-zones-glucose-day", "/Observation", GQ + "date=2024-02-01", {"obs-q1", "obs-q2", "obs-q3"}, None),
    ("date-zones-glucose-day-before", "/Observation", GQ + "date=2024-01-31", set(), None),
    # birthdate (date precision: 1947 is the whole year, 1995-02 the whole month)
    ("birthdate-year", "/Patient", "birthdate=1947", {"pat-zsf"}, None),
    ("birthdate-month-not-in-year-value", "/Patient", "birthdate=1947-06", set(), None),
    ("birthdate-ge-month", "/Patient", "birthdate=ge1947-06", {"pat-zsf", "pat-zs", "pat-oy", "pat-jose"}, None),
    ("birthdate-le-month", "/Patient", "birthdate=le1947-06", {"pat-zsf", "pat-li"}, None),
    ("birthdate-month-precision-target", "/Patient", "birthdate=1995", {"pat-oy"}, None),
    ("birthdate-eb-year", "/Patient", "birthdate=eb1947", {"pat-li"}, None),
    ("birthdate-sa-day", "/Patient", "birthdate=sa1946-12-31", {"pat-zsf", "pat-zs", "pat-oy", "pat-jose"}, None),
    ("birthdate-ne", "/Patient", "birthdate=ne1980-05-12", {"pat-zsf", "pat-li", "pat-oy", "pat-jose"}, {"pat-zsf", "pat-li", "pat-oy", "pat-jose", "pat-anon"}),
    ("birthdate-and-gender", "/Patient", "gender=male&birthdate=lt1950", {"pat-zsf", "pat-li"}, None),
    # --- numbers and quantities (precision: 5.4 means [5.35, 5.45)) ---
    ("quantity-eq-precision", "/Observation", GQ + "value-quantity=5.4", {"obs-q1", "obs-q2"}, None),
    ("quantity-eq-more-precision", "/Observation", GQ + "value-quantity=5.40", {"obs-q1"}, None),
    ("quantity-system-code", "/Observation", GQ + "value-quantity=5.4|http://unitsofmeasure.org|mmol/L", {"obs-q1", "obs-q2"}, None),
    ("quantity-code-no-system", "/Observation", GQ + "value-quantity=5.4||mmol/L", {"obs-q1", "obs-q2"}, None),
    ("quantity-unit-only", "/Observation", GQ + "value-quantity=6.1||mmol/L", {"obs-q6"}, None),
    ("quantity-system-needs-system", "/Observation", GQ + "value-quantity=6.1|http://unitsofmeasure.org|mmol/L", set(), None),
    ("quantity-other-unit", "/Observation", GQ + "value-quantity=97.2|http://unitsofmeasure.org|mg/dL", {"obs-q5"}, None),
    ("quantity-gt", "/Observation", GQ + "value-quantity=gt5.4", {"obs-q3", "obs-q4", "obs-q5", "obs-q6"}, None),
    ("quantity-lt", "/Observation", GQ + "value-quantity=lt5.4", set(), {"obs-q2"}),
    ("quantity-le", "/Observation", GQ + "value-quantity=le5.4", {"obs-q1", "obs-q2"}, None),
    ("quantity-ge", "/Observation", GQ + "value-quantity=ge5.5", {"obs-q4", "obs-q5", "obs-q6"}, {"obs-q3", "obs-q4", "obs-q5", "obs-q6"}),
    ("quantity-ne", "/Observation", GQ + "value-quantity=ne5.4", {"obs-q3", "obs-q4", "obs-q5", "obs-q6"}, None),
    ("quantity-ap", "/Observation", GQ + "value-quantity=ap5.4", {"obs-q1", "obs-q2", "obs-q3", "obs-q4"}, {"obs-q1", "obs-q2", "obs-q3", "obs-q4", "obs-q6"}),
    ("quantity-ge-and-lt", "/Observation", GQ + "value-quantity=ge5.4&value-quantity=lt5.5", {"obs-q1"}, {"obs-q1", "obs-q2", "obs-q3"}),
    ("quantity-gt-with-units", "/Observation", GQ + "value-quantity=gt5.0|http://unitsofmeasure.org|mmol/L", {"obs-q1", "obs-q2", "obs-q3", "obs-q4"}, None),
    ("number-eq-precision", "/RiskAssessment", "probability=0.3", {"ra-1", "ra-2"}, None),
    ("number-eq-more-precision", "/RiskAssessment", "probability=0.30", {"ra-2"}, None),
    ("number-gt", "/RiskAssessment", "probability=gt0.3", {"ra-3"}, None),
    ("number-lt", "/RiskAssessment", "probability=lt0.30", {"ra-1"}, None),
    ("number-ge", "/RiskAssessment", "probability=ge0.30", {"ra-2", "ra-3"}, None),
    ("number-missing", "/RiskAssessment", "probability:missing=true", {"ra-4"}, None),
    ("number-ap", "/RiskAssessment", "probability=ap0.3", {"ra-2"}, {"ra-1", "ra-2", "ra-3"}),
    # --- composites ---
    ("composite-component-systolic-gt130", "/Observation", "component-code-value-quantity=http://loinc.org|8480-6$gt130", {"obs-bp1"}, None),
    ("composite-component-diastolic-gt130", "/Observation", "component-code-value-quantity=http://loinc.org|8462-4$gt130", {"obs-bp2"}, None),
    ("composite-component-code-only-lt120", "/Observation", "component-code-value-quantity=8480-6$lt120", {"obs-bp2"}, None),
    ("composite-code-value-quantity", "/Observation", "code-value-quantity=http://loinc.org|2339-0$gt5.4", {"obs-q3", "obs-q4", "obs-q5"}, None),
    ("composite-code-value-quantity-units", "/Observation", "code-value-quantity=http://loinc.org|2339-0$5.4|http://unitsofmeasure.org|mmol/L", {"obs-q1", "obs-q2"}, None),
    ("composite-code-value-concept", "/Observation", "code-value-concept=http://loinc.org|72166-2$http://snomed.info/sct|266919005", {"obs-smoke"}, None),
    ("composite-code-value-concept-other", "/Observation", "code-value-concept=http://loinc.org|72166-2$http://snomed.info/sct|8517006", set(), None),
    # --- tokens ---
    ("token-code", "/Observation", "code=2339-0", GLU | {"obs-q6"}, None),
    ("token-system-code", "/Observation", "code=http://loinc.org|2339-0", GLU, None),
    ("token-no-system", "/Observation", "code=|2339-0", {"obs-q6"}, None),
    ("token-system-only", "/Observation", "code=http://loinc.org|", ALL_OBS - {"obs-q6"}, None),
    ("token-not", "/Observation", "code:not=http://loinc.org|2339-0", ALL_OBS - GLU, None),
    ("token-text-chinese", "/Observation", "code:text=血糖", GLU, None),
    ("token-text-display", "/Observation", "code:text=glucose", GLU | {"obs-q6"}, None),
    ("token-in-valueset", "/Observation", "code:in=https://fhir.example.cn/ValueSet/glucose", GLU, None),
    ("token-not-in-valueset", "/Observation", "code:not-in=https://fhir.example.cn/ValueSet/glucose", ALL_OBS - GLU, None),
    ("token-category", "/Observation", "category=vital-signs", HR | {"obs-bp1", "obs-bp2"}, None),
    ("token-value-concept", "/Observation", "value-concept=http://snomed.info/sct|266919005", {"obs-smoke"}, None),
    ("token-identifier-system-value", "/Patient", "identifier=https://fhir.example.cn/sid/resident-id|310104198005120011", {"pat-zs"}, None),
    ("token-identifier-value-only", "/Patient", "identifier=310104198005120011", {"pat-zs"}, None),
    ("token-identifier-system-only", "/Patient", "identifier=https://fhir.example.cn/sid/resident-id|", {"pat-zs", "pat-zsf"}, None),
    ("token-of-type", "/Patient", "identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|NNCHN|310104194701010013", {"pat-zsf"}, None),
    ("token-of-type-wrong-type", "/Patient", "identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|MR|310104194701010013", set(), None),
    ("token-escaped-comma", "/Patient", "identifier=https://fhir.example.cn/sid/mrn|ID\\,1", {"pat-zs"}, None),
    ("token-unescaped-comma-is-or", "/Patient", "identifier=https://fhir.example.cn/sid/mrn|ID,1", set(), None),
    ("token-gender", "/Patient", "gender=male", {"pat-zs", "pat-zsf", "pat-li", "pat-jose"}, None),
    ("token-gender-not-includes-missing", "/Patient", "gender:not=male", {"pat-oy", "pat-anon"}, None),
    ("token-boolean", "/Patient", "active=true", {"pat-zs", "pat-zsf"}, None),
    ("token-boolean-false", "/Patient", "active=false", {"pat-li"}, None),
    ("token-text-identifier-type", "/Patient", "identifier:text=居民", {"pat-zs", "pat-zsf"}, None),
    ("tag", "/Patient", "_tag=https://fhir.example.cn/tags|vip", {"pat-zs"}, None),
    ("tag-code-only", "/Patient", "_tag=vip", {"pat-zs"}, None),
    ("profile", "/Patient", "_profile=https://fhir.example.cn/StructureDefinition/cn-patient", {"pat-zs"}, None),
    ("lastupdated-all", "/Patient", "_lastUpdated=lt2100-01-01", PATIENTS, None),
    ("lastupdated-none", "/Patient", "_lastUpdated=gt2100-01-01T00:00:00+08:00", set(), None),
    # --- strings: default starts-with, case and accent insensitive, on each name part ---
    ("string-chinese-family-char", "/Patient", "name=张", {"pat-zs", "pat-zsf"}, None),
    ("string-chinese-full-name-prefix", "/Patient", "name=张三", {"pat-zs", "pat-zsf"}, None),
    ("string-exact", "/Patient", "name:exact=张三", {"pat-zs"}, None),
    ("string-contains-given", "/Patient", "name:contains=三", {"pat-zs", "pat-zsf"}, None),
    ("string-contains-double", "/Patient", "name:contains=娜", {"pat-oy"}, None),
    ("string-compound-family", "/Patient", "family=欧阳", {"pat-oy"}, None),
    ("string-compound-family-prefix", "/Patient", "family=欧", {"pat-oy"}, None),
    ("string-not-a-prefix", "/Patient", "family=阳", set(), None),
    ("string-family-contains", "/Patient", "family:contains=阳", {"pat-oy"}, None),
    ("string-given", "/Patient", "given=三丰", {"pat-zsf"}, None),
    ("pinyin-surname", "/Patient", "name=zhang", {"pat-zs", "pat-zsf"}, None),
    ("pinyin-surname-uppercase", "/Patient", "name=ZHANG", {"pat-zs", "pat-zsf"}, None),
    ("pinyin-full", "/Patient", "name=zhangsan", {"pat-zs"}, {"pat-zs", "pat-zsf"}),
    ("pinyin-full-longer", "/Patient", "name=zhangsanfeng", {"pat-zsf"}, None),
    ("pinyin-initials", "/Patient", "name=zs", {"pat-zs"}, {"pat-zs", "pat-zsf"}),
    ("pinyin-initials-three", "/Patient", "name=zsf", {"pat-zsf"}, None),
    ("pinyin-compound-surname", "/Patient", "family=ouyang", {"pat-oy"}, None),
    ("pinyin-initials-four", "/Patient", "name=oynn", {"pat-oy"}, None),
    ("pinyin-li", "/Patient", "name=li", {"pat-li"}, None),
    ("string-accent-insensitive", "/Patient", "name=jose", {"pat-jose"}, None),
    ("string-accent-in-query", "/Patient", "name=MÜLLER", {"pat-jose"}, None),
    ("string-exact-accent", "/Patient", "family:exact=Müller", {"pat-jose"}, None),
    ("string-exact-is-exact", "/Patient", "family:exact=muller", set(), None),
    ("string-address-city", "/Patient", "address-city=上海", {"pat-zs", "pat-zsf"}, None),
    ("string-address-any-part", "/Patient", "address=徐汇", {"pat-zs"}, None),
    ("string-org-alias", "/Organization", "name=瑞金", {"org-rj"}, None),
    ("string-org-prefix", "/Organization", "name=上海", {"org-rj", "org-cm"}, None),
    ("string-org-contains", "/Organization", "name:contains=医院", {"org-rj"}, None),
    ("string-escaped-comma", "/Organization", "name=Smith\\, Jones", {"org-comma"}, None),
    ("string-comma-is-or", "/Organization", "name=Smith,Jones", {"org-comma", "org-jones"}, None),
    ("string-or", "/Patient", "name=张,李", {"pat-zs", "pat-zsf", "pat-li"}, None),
    ("string-and", "/Patient", "name=张&name=三丰", {"pat-zsf"}, None),
    # --- :missing on every type ---
    ("missing-date-true", "/Patient", "birthdate:missing=true", {"pat-anon"}, None),
    ("missing-date-false", "/Patient", "birthdate:missing=false", PATIENTS - {"pat-anon"}, None),
    ("missing-token-true", "/Patient", "gender:missing=true", {"pat-anon"}, None),
    ("missing-boolean-true", "/Patient", "active:missing=true", {"pat-oy", "pat-jose", "pat-anon"}, None),
    ("missing-string-true", "/Patient", "name:missing=true", {"pat-anon"}, None),
    ("missing-string-address", "/Patient", "address:missing=true", {"pat-oy", "pat-jose", "pat-anon"}, None),
    ("missing-reference-true", "/Patient", "general-practitioner:missing=true", {"pat-li", "pat-oy", "pat-jose", "pat-anon"}, None),
    ("missing-reference-false", "/Patient", "general-practitioner:missing=false", {"pat-zs", "pat-zsf"}, None),
    ("missing-quantity-true", "/Observation", "value-quantity:missing=true", {"obs-bp1", "obs-bp2", "obs-smoke"}, None),
    ("missing-quantity-false", "/Observation", "value-quantity:missing=false", HR | GLU | {"obs-q6"}, None),
    ("missing-uri-false", "/ValueSet", "url:missing=false", {"vs-glucose"}, None),
    ("uri-equal", "/ValueSet", "url=https://fhir.example.cn/ValueSet/glucose", {"vs-glucose"}, None),
    ("uri-below", "/ValueSet", "url:below=https://fhir.example.cn/ValueSet", {"vs-glucose"}, None),
    # --- references ---
    ("ref-type-id", "/Observation", "subject=Patient/pat-zs", ZS_OBS, None),
    ("ref-bare-id", "/Observation", "subject=pat-zs", ZS_OBS, None),
    ("ref-patient-param", "/Observation", "patient=pat-zs", ZS_OBS, None),
    ("ref-type-modifier", "/Observation", "subject:Patient=pat-zs", ZS_OBS, None),
    ("ref-absolute-url", "/Observation", f"subject={BASE}/Patient/pat-zs", ZS_OBS, None),
    ("ref-identifier-modifier", "/Observation", "subject:identifier=https://fhir.example.cn/sid/resident-id|310104198005120011", {"obs-q1"}, None),
    ("ref-or", "/Observation", "subject=Patient/pat-oy,Patient/pat-li", OY_OBS | LI_OBS, None),
    ("ref-gp", "/Patient", "general-practitioner=Practitioner/prac-li", {"pat-zs"}, None),
    ("ref-gp-typed", "/Patient", "general-practitioner:Practitioner=prac-wang", {"pat-zsf"}, None),
    ("ref-organization", "/Patient", "organization=org-rj", {"pat-zsf", "pat-li"}, None),
    ("ref-encounter", "/Observation", "encounter=enc-1", {"obs-q1"}, None),
    ("ref-performer-missing-false", "/Observation", "performer:missing=false", {"obs-q1"}, None),
    # --- chains ---
    ("chain-typed-name", "/Observation", "subject:Patient.name=张", ZS_OBS | ZSF_OBS, None),
    ("chain-pinyin", "/Observation", "patient.name=zhang", ZS_OBS | ZSF_OBS, None),
    ("chain-gender", "/Observation", "patient.gender=female", OY_OBS, None),
    ("chain-two-level", "/Observation", "patient.organization.name=瑞金", ZSF_OBS | LI_OBS, None),
    ("chain-three-level", "/Observation", "patient.organization.partof.name=瑞金", ZS_OBS | OY_OBS, None),
    ("chain-and-code", "/Observation", "patient.organization.name=瑞金&code=http://loinc.org|2339-0", {"obs-q3", "obs-q4", "obs-q5"}, None),
    ("chain-gp-name", "/Patient", "general-practitioner.name=李", {"pat-zs"}, None),
    ("chain-gp-typed-family", "/Patient", "general-practitioner:Practitioner.family=王", {"pat-zsf"}, None),
    ("chain-encounter-subject", "/Encounter", "subject.name=张三", {"enc-1"}, None),
    ("chain-date", "/RiskAssessment", "subject:Patient.birthdate=lt1950", {"ra-2", "ra-3"}, None),
    ("chain-exact", "/Observation", "subject:Patient.name:exact=张三", ZS_OBS, None),
    ("chain-or-values", "/Observation", "patient.name=张三丰,李四", ZSF_OBS | LI_OBS, None),
    ("chain-missing", "/Observation", "patient.general-practitioner:missing=true", LI_OBS | OY_OBS, None),
    ("chain-identifier", "/Observation", "patient.identifier=https://fhir.example.cn/sid/resident-id|310104194701010013", ZSF_OBS, None),
    # --- reverse chains ---
    ("has-simple", "/Patient", "_has:Observation:patient:code=http://loinc.org|2339-0", {"pat-zs", "pat-zsf", "pat-li"}, None),
    ("has-subject-code-only", "/Patient", "_has:Observation:subject:code=2339-0", {"pat-zs", "pat-zsf", "pat-li", "pat-oy"}, None),
    ("has-two-anded", "/Patient", "_has:Observation:patient:code=http://loinc.org|2339-0&_has:RiskAssessment:subject:probability=gt0.28", {"pat-zsf", "pat-li"}, None),
    ("has-or-values", "/Patient", "_has:Observation:patient:code=http://loinc.org|72166-2,http://loinc.org|85354-9", {"pat-zs", "pat-zsf", "pat-li"}, None),
    ("has-nested", "/Patient", "_has:Observation:patient:_has:DiagnosticReport:result:code=http://loinc.org|24323-8", {"pat-zs"}, None),
    ("has-practitioner", "/Practitioner", "_has:Patient:general-practitioner:name=张三丰", {"prac-wang"}, None),
    ("has-nested-organization", "/Organization", "_has:Patient:organization:_has:Observation:patient:code=http://loinc.org|85354-9", {"org-cm", "org-rj"}, None),
    ("has-and-own-param", "/Patient", "gender=male&_has:Observation:patient:code=http://loinc.org|8867-4", {"pat-zs", "pat-zsf", "pat-li"}, None),
    # --- _id ---
    ("id-several", "/Patient", "_id=pat-zs,pat-li", {"pat-zs", "pat-li"}, None),
    ("id-and-is-intersection", "/Patient", "_id=pat-zs&_id=pat-li", set(), None),
    # --- system level and compartments ---
    ("system-type", "", "_type=Patient,Practitioner&name=李", {"pat-li", "prac-li"}, None),
    ("system-type-reference", "", "_type=Observation,RiskAssessment&subject=Patient/pat-zsf", ZSF_OBS | {"ra-2"}, None),
    ("system-id", "", "_id=pat-zs", {"pat-zs"}, None),
    ("compartment-type", "/Patient/pat-zs/Observation", "", ZS_OBS, None),
    ("compartment-type-with-params", "/Patient/pat-zs/Observation", "code=http://loinc.org|2339-0", {"obs-q1", "obs-q2"}, None),
    ("compartment-all", "/Patient/pat-zs/*", "", ZS_OBS | {"ra-1", "enc-1", "dr-1"}, ZS_OBS | {"ra-1", "enc-1", "dr-1", "pat-zs"}),
    ("compartment-practitioner", "/Practitioner/prac-li/Patient", "", {"pat-zs"}, None),
    ("compartment-practitioner-observation", "/Practitioner/prac-li/Observation", "", {"obs-q1"}, None),
]
# fmt: on


def test_case_names_unique() -> None:
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name,path,query,must,may", CASES, ids=[c[0] for c in CASES])
async def test_search(
    fx: httpx.AsyncClient, name: str, path: str, query: str, must: set[str], may: set[str] | None
) -> None:
    found = await matched(fx, path, query)
    assert_between(found, must, may)


# -- _sort ------------------------------------------------------------------------------------------------

FIVE = "_id=pat-zs,pat-zsf,pat-li,pat-oy,pat-jose"


@pytest.mark.parametrize(
    "path,query,order",
    [
        # instants across zones: q3 (23:30Z the day before) < q1 (01:00Z) < q2 (02:00Z) < q4 < q5 < q6
        ("/Observation", GQ + "_sort=date", ["obs-q3", "obs-q1", "obs-q2", "obs-q4", "obs-q5", "obs-q6"]),
        ("/Observation", GQ + "_sort=-date", ["obs-q6", "obs-q5", "obs-q4", "obs-q2", "obs-q1", "obs-q3"]),
        ("/Patient", FIVE + "&_sort=birthdate", ["pat-li", "pat-zsf", "pat-zs", "pat-jose", "pat-oy"]),
        ("/Patient", FIVE + "&_sort=-birthdate", ["pat-oy", "pat-jose", "pat-zs", "pat-zsf", "pat-li"]),
        ("/Patient", FIVE + "&_sort=gender,-birthdate", ["pat-oy", "pat-jose", "pat-zs", "pat-zsf", "pat-li"]),
        ("/Patient", FIVE + "&_sort=-gender,birthdate", ["pat-li", "pat-zsf", "pat-zs", "pat-jose", "pat-oy"]),
        ("/Patient", "_sort=_id", ["pat-anon", "pat-jose", "pat-li", "pat-oy", "pat-zs", "pat-zsf"]),
        ("/Patient", "_sort=-_id&_count=4", ["pat-zsf", "pat-zs", "pat-oy", "pat-li", "pat-jose", "pat-anon"]),
        ("/RiskAssessment", "_sort=-probability&probability:missing=false", ["ra-3", "ra-2", "ra-1"]),
        (
            "/Observation",
            GQ + "_sort=value-quantity&value-quantity=lt10",
            ["obs-q2", "obs-q1", "obs-q3", "obs-q4", "obs-q6"],
        ),
        (
            "",
            "_type=Patient,Practitioner&gender=male&_sort=_id",
            ["pat-jose", "pat-li", "pat-zs", "pat-zsf", "prac-wang"],
        ),
    ],
    ids=[
        "date",
        "-date",
        "birthdate",
        "-birthdate",
        "gender,-birthdate",
        "-gender,birthdate",
        "_id",
        "-_id-paged",
        "-number",
        "quantity",
        "system",
    ],
)
async def test_sort(fx: httpx.AsyncClient, path: str, query: str, order: list[str]) -> None:
    found = [i for b in await pages(fx, path, qs(query)) for i in ids(b)]
    assert found == order


async def test_sort_last_updated(fx: httpx.AsyncClient) -> None:
    for sid in ("ra-2", "ra-1"):  # touch in this order: ra-2 then ra-1 are the two most recent
        r = await fx.get(f"/RiskAssessment/{sid}")
        body = r.json()
        body.pop("meta", None)
        body["note"] = [{"text": f"touched {len(body.get('note') or [])}"}]  # a real change, not a no-op update
        assert (await fx.put(f"/RiskAssessment/{sid}", json=body)).status_code == 200
    found = [i for b in await pages(fx, "/RiskAssessment", qs("_sort=-_lastUpdated")) for i in ids(b)]
    assert found[:2] == ["ra-1", "ra-2"]
    found = [i for b in await pages(fx, "/RiskAssessment", qs("_sort=_lastUpdated")) for i in ids(b)]
    assert found[-2:] == ["ra-2", "ra-1"]


# -- _include / _revinclude ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,query,match,include",
    [
        ("/Observation", "_id=obs-q1&_include=Observation:patient", {"obs-q1"}, {"pat-zs"}),
        ("/Observation", "_id=obs-q1&_include=Observation:subject:Patient", {"obs-q1"}, {"pat-zs"}),
        (
            "/Observation",
            "_id=obs-q1&_include=Observation:patient&_include:iterate=Patient:organization",
            {"obs-q1"},
            {"pat-zs", "org-cm"},
        ),
        (
            "/Observation",
            "_id=obs-q1&_include=Observation:patient&_include:iterate=Patient:organization&_include:iterate=Organization:partof",
            {"obs-q1"},
            {"pat-zs", "org-cm", "org-rj"},
        ),
        ("/Observation", "_id=obs-q1&_include=*", {"obs-q1"}, {"pat-zs", "enc-1", "prac-li"}),
        ("/Patient", "_id=pat-zs&_revinclude=Observation:subject", {"pat-zs"}, ZS_OBS),
        (
            "/Patient",
            "_id=pat-zs&_revinclude=Observation:subject&_revinclude:iterate=DiagnosticReport:result",
            {"pat-zs"},
            ZS_OBS | {"dr-1"},
        ),
        (
            "/Encounter",
            "_id=enc-1&_revinclude=Observation:encounter&_include=Encounter:subject",
            {"enc-1"},
            {"obs-q1", "pat-zs"},
        ),
        # org-rj is a match and the partOf target of org-cm: it appears once, as a match
        ("/Organization", "_id=org-cm,org-rj&_include=Organization:partof", {"org-cm", "org-rj"}, set()),
        ("/Patient", "name=张&_include=Patient:general-practitioner", {"pat-zs", "pat-zsf"}, {"prac-li", "prac-wang"}),
        ("/Patient", "_id=pat-li&_include=Patient:general-practitioner", {"pat-li"}, set()),
    ],
    ids=[
        "include",
        "include-typed",
        "iterate",
        "iterate-2",
        "wildcard",
        "revinclude",
        "revinclude-iterate",
        "both",
        "match-wins",
        "several",
        "nothing",
    ],
)
async def test_include(fx: httpx.AsyncClient, path: str, query: str, match: set[str], include: set[str]) -> None:
    bundles = await pages(fx, path, qs(query))
    assert len(bundles) == 1
    b = bundles[0]
    m, i = ids(b, "match"), ids(b, "include")
    assert set(m) == match and len(m) == len(set(m))
    assert set(i) == include and len(i) == len(set(i))
    assert b.get("total") in (None, len(match)), "total counts matches only"


# -- _elements / _summary / _total / _count ---------------------------------------------------------------


async def _one(fx: httpx.AsyncClient, query: str) -> dict[str, Any]:
    r = await fx.get("/Patient", params=qs("_id=pat-zs&" + query))
    assert r.status_code == 200, r.text[:2000]
    found = by_mode(r.json(), "match")
    assert len(found) == 1
    return found[0]["resource"]


def _subsetted(resource: dict[str, Any]) -> bool:
    return any(t.get("code") == "SUBSETTED" for t in (resource.get("meta") or {}).get("tag") or [])


async def test_elements(fx: httpx.AsyncClient) -> None:
    res = await _one(fx, "_elements=name,gender")
    assert res["resourceType"] == "Patient" and res["id"] == "pat-zs"
    assert res["name"][0]["text"] == "张三" and res["gender"] == "male"
    for absent in ("birthDate", "address", "identifier", "telecom", "communication", "text"):
        assert absent not in res, absent
    assert _subsetted(res)


async def test_summary_true(fx: httpx.AsyncClient) -> None:
    res = await _one(fx, "_summary=true")
    assert res["name"][0]["text"] == "张三" and res["birthDate"] == "1980-05-12"
    assert "communication" not in res  # not a summary element
    assert "text" not in res
    assert _subsetted(res)


async def test_summary_text(fx: httpx.AsyncClient) -> None:
    res = await _one(fx, "_summary=text")
    assert "张三" in res["text"]["div"]
    assert "name" not in res and "birthDate" not in res
    assert _subsetted(res)


async def test_summary_data(fx: httpx.AsyncClient) -> None:
    res = await _one(fx, "_summary=data")
    assert "text" not in res
    assert res["communication"] and res["name"]


async def test_summary_false(fx: httpx.AsyncClient) -> None:
    res = await _one(fx, "_summary=false")
    assert res["text"] and res["communication"] and res["name"]
    assert not _subsetted(res)


async def test_summary_count(fx: httpx.AsyncClient) -> None:
    r = await fx.get("/Patient", params=qs("name=张&_summary=count"))
    assert r.status_code == 200
    b = r.json()
    assert b["total"] == 2 and not b.get("entry")


@pytest.mark.parametrize("total,expected", [("accurate", 6), ("none", None)])
async def test_total(fx: httpx.AsyncClient, total: str, expected: int | None) -> None:
    r = await fx.get("/Patient", params=qs(f"_total={total}&_count=2"))
    assert r.status_code == 200
    b = r.json()
    assert b.get("total") == expected
    assert len(ids(b)) == 2


async def test_count_above_maximum_is_clamped(fx: httpx.AsyncClient) -> None:
    r = await fx.get("/Patient", params=qs("_count=100000"))
    assert r.status_code == 200, r.text[:1000]
    assert set(ids(r.json())) == PATIENTS


async def test_count_zero(fx: httpx.AsyncClient) -> None:
    r = await fx.get("/Patient", params=qs("_count=0&_total=accurate"))
    assert r.status_code == 200
    assert r.json()["total"] == 6 and not ids(r.json())


# -- POST _search -----------------------------------------------------------------------------------------


async def test_post_search_form(fx: httpx.AsyncClient) -> None:
    found = await matched(fx, "/Patient", "name=张&gender=male", post=True)
    assert set(found) == {"pat-zs", "pat-zsf"}


async def test_post_search_url_and_body_combine(fx: httpx.AsyncClient) -> None:
    r = await fx.post("/Patient/_search?gender=male", data={"name": "张"}, headers={"Content-Type": FORM})
    assert r.status_code == 200, r.text[:2000]
    assert set(ids(r.json())) == {"pat-zs", "pat-zsf"}


async def test_post_search_chinese_and_chain(fx: httpx.AsyncClient) -> None:
    found = await matched(fx, "/Observation", "patient.organization.name=瑞金&code=http://loinc.org|2339-0", post=True)
    assert set(found) == {"obs-q3", "obs-q4", "obs-q5"}


async def test_post_search_unknown_parameter_400(fx: httpx.AsyncClient) -> None:
    r = await fx.post("/Patient/_search", data={"foo": "bar"}, headers={"Content-Type": FORM})
    assert r.status_code == 400
    assert is_outcome_naming(r.json(), "foo")


async def test_post_search_paging_links_are_gets(fx: httpx.AsyncClient) -> None:
    r = await fx.post("/Patient/_search", data={"gender": "male", "_count": "2"}, headers={"Content-Type": FORM})
    assert r.status_code == 200
    nxt = link(r.json(), "next")
    assert nxt is not None
    r2 = await fx.get(rel(nxt))
    assert r2.status_code == 200
    assert len(set(ids(r.json())) | set(ids(r2.json()))) == 4


# -- lenient handling ----------------------------------------------------------------------------------------


async def test_lenient_ignores_and_reports_unknown(fx: httpx.AsyncClient) -> None:
    r = await fx.get("/Patient", params=qs("name=张&foo=bar"), headers={"Prefer": "handling=lenient"})
    assert r.status_code == 200, r.text[:2000]
    b = r.json()
    assert set(ids(b)) == {"pat-zs", "pat-zsf"}
    outcomes = by_mode(b, "outcome")
    assert len(outcomes) == 1 and is_outcome_naming(outcomes[0]["resource"], "foo")
    self_link = link(b, "self")
    assert self_link is not None
    used = dict(parse_qsl(urlsplit(self_link).query))
    assert used.get("name") == "张" and "foo" not in used


async def test_lenient_still_refuses_bad_values(fx: httpx.AsyncClient) -> None:
    """Lenient handling ignores unknown parameters, not malformed values of known ones."""
    r = await fx.get("/Patient", params=qs("birthdate=2024-13-45&foo=bar"), headers={"Prefer": "handling=lenient"})
    assert r.status_code == 400
    assert is_outcome_naming(r.json(), "birthdate")


async def test_lenient_post_search(fx: httpx.AsyncClient) -> None:
    r = await fx.post(
        "/Patient/_search",
        data={"name": "欧阳", "foo": "bar"},
        headers={"Content-Type": FORM, "Prefer": "handling=lenient"},
    )
    assert r.status_code == 200, r.text[:2000]
    assert set(ids(r.json())) == {"pat-oy"}
    assert "foo" not in (link(r.json(), "self") or "")


@pytest.mark.parametrize("prefer", [None, "handling=strict"])
async def test_strict_refuses_unknown(fx: httpx.AsyncClient, prefer: str | None) -> None:
    r = await fx.get("/Patient", params=qs("name=张&foo=bar"), headers={"Prefer": prefer} if prefer else {})
    assert r.status_code == 400
    assert is_outcome_naming(r.json(), "foo")


# -- errors: 400 (never 500) with an OperationOutcome naming the parameter ------------------------------------

LONG = "x" * 5000
ERRORS: list[tuple[str, str, list[tuple[str, str]], str]] = [
    ("unknown-param", "/Patient", [("foo", "bar")], "foo"),
    ("unknown-modifier", "/Patient", [("name:sounds-like", "x")], "name"),
    ("modifier-wrong-type", "/Patient", [("birthdate:exact", "1980")], "birthdate"),
    ("bad-date", "/Patient", [("birthdate", "2024-13-45")], "birthdate"),
    ("bad-date-feb-30", "/Patient", [("birthdate", "2024-02-30")], "birthdate"),
    ("bad-date-text", "/Observation", [("date", "yesterday")], "date"),
    ("bad-prefix-date", "/Patient", [("birthdate", "xx2020")], "birthdate"),
    ("bad-prefix-quantity", "/Observation", [("value-quantity", "zz5.4")], "value-quantity"),
    ("bad-number", "/RiskAssessment", [("probability", "abc")], "probability"),
    ("bad-quantity-parts", "/Observation", [("value-quantity", "5.4|a")], "value-quantity"),
    ("dollar-where-param", "/Patient", [("$where", "1")], "$where"),
    ("bracket-operator-param", "/Patient", [("name[$ne]", "x")], "name[$ne]"),
    ("json-operator-date", "/Patient", [("birthdate", '{"$gt":""}')], "birthdate"),
    ("json-operator-number", "/RiskAssessment", [("probability", '{"$gt":""}')], "probability"),
    ("nul-in-value", "/Patient", [("name", "a\x00b")], "name"),
    ("nul-in-name", "/Patient", [("na\x00me", "a")], "me"),
    ("too-long-value", "/Patient", [("name", LONG)], "name"),
    ("count-negative", "/Patient", [("_count", "-1")], "_count"),
    ("count-not-a-number", "/Patient", [("_count", "ten")], "_count"),
    ("sort-unknown", "/Patient", [("_sort", "shoe-size")], "_sort"),
    ("summary-bad", "/Patient", [("_summary", "maybe")], "_summary"),
    ("total-bad", "/Patient", [("_total", "some")], "_total"),
    ("missing-bad", "/Patient", [("gender:missing", "maybe")], "gender"),
    ("include-unknown", "/Observation", [("_include", "Observation:shoe")], "_include"),
    ("revinclude-unknown-type", "/Patient", [("_revinclude", "Nonsense:patient")], "_revinclude"),
    ("chain-unknown-param", "/Observation", [("patient.shoe-size", "4")], "patient.shoe-size"),
    ("chain-on-non-reference", "/Observation", [("code.name", "x")], "code"),
    ("has-malformed", "/Patient", [("_has:Observation", "x")], "_has"),
    ("has-unknown-type", "/Patient", [("_has:Nonsense:patient:code", "x")], "_has"),
    (
        "composite-without-dollar",
        "/Observation",
        [("component-code-value-quantity", "http://loinc.org|8480-6")],
        "component-code-value-quantity",
    ),
    (
        "composite-bad-quantity",
        "/Observation",
        [("component-code-value-quantity", "http://loinc.org|8480-6$high")],
        "component-code-value-quantity",
    ),
    ("reference-unknown-type-modifier", "/Observation", [("subject:Nonsense", "1")], "subject"),
    ("id-bad", "/Patient", [("_id", '{"$gt":""}')], "_id"),
    ("lastupdated-bad", "/Patient", [("_lastUpdated", "gt-never")], "_lastUpdated"),
    ("system-type-unknown", "", [("_type", "Patient,Nonsense")], "_type"),
]


@pytest.mark.parametrize("name,path,params,named", ERRORS, ids=[e[0] for e in ERRORS])
async def test_bad_request(fx: httpx.AsyncClient, name: str, path: str, params: list[Any], named: str) -> None:
    r = await fx.get(path, params=params)
    assert r.status_code == 400, f"{r.status_code}: {r.text[:500]}"
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert is_outcome_naming(body, named), json.dumps(body, ensure_ascii=False)[:1000]


@pytest.mark.parametrize(
    "path,params",
    [
        ("/Patient", [("name", '{"$gt":""}')]),
        ("/Patient", [("name", "$where")]),
        ("/Patient", [("family", ".*")]),
        ("/Patient", [("name:contains", "(a+)+$")]),
        ("/Patient", [("gender", '{"$ne":null}')]),
        ("/Observation", [("code", "http://loinc.org|.*")]),
        ("/Observation", [("subject", "Patient/.*")]),
        ("/ValueSet", [("url:below", "^")]),
    ],
    ids=[
        "json-in-string",
        "where-in-string",
        "regex-in-string",
        "redos-in-contains",
        "json-in-token",
        "regex-in-token",
        "regex-in-reference",
        "regex-in-uri",
    ],
)
async def test_injection_in_values_matches_nothing(fx: httpx.AsyncClient, path: str, params: list[Any]) -> None:
    """Operators or regular expressions in values are plain text: 200 with no match (or a 400), never a 500
    and never "everything"."""
    r = await fx.get(path, params=params)
    assert r.status_code in (200, 400), r.status_code
    if r.status_code == 200:
        assert ids(r.json()) == []
    else:
        assert r.json()["resourceType"] == "OperationOutcome"


# -- paging while others write ------------------------------------------------------------------------------

PAGING_CODE = "https://fhir.example.cn/CodeSystem/test|paging-while-writing"


def _paging_obs(id_: str, minute: int) -> dict[str, Any]:
    system, code = PAGING_CODE.split("|")
    return {
        "resourceType": "Observation",
        "id": id_,
        "status": "final",
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": "Patient/pat-anon"},
        "effectiveDateTime": f"2025-01-{1 + minute // 1440:02d}T{(minute // 60) % 24:02d}:{minute % 60:02d}:00+08:00",
    }


@pytest.fixture(scope="module")
async def stable_300(fx: httpx.AsyncClient) -> set[str]:
    entries = [
        {"resource": _paging_obs(f"pw-{i:03d}", i * 10), "request": {"method": "PUT", "url": f"Observation/pw-{i:03d}"}}
        for i in range(300)
    ]
    r = await fx.post("", json={"resourceType": "Bundle", "type": "transaction", "entry": entries})
    assert r.status_code == 200, r.text[:2000]
    return {f"pw-{i:03d}" for i in range(300)}


@pytest.mark.parametrize("sort", [None, "date", "-date", "-_lastUpdated"])
async def test_paging_while_writing(fx: httpx.AsyncClient, stable_300: set[str], sort: str | None) -> None:
    """Walk every page of a 300-resource result (_count=20) while another task creates and deletes
    resources of the same type that match too, placed before and after the cursor (ids and dates
    interleaved with the stable ones): every stable resource appears exactly once."""
    tag = {None: "n", "date": "a", "-date": "d", "-_lastUpdated": "u"}[sort]
    rng = random.Random(tag)
    done = asyncio.Event()
    progressed = asyncio.Event()
    created: list[str] = []
    writes = 0

    async def writer() -> None:
        # ids "pw-123-x-n" sort between pw-123 and pw-124, dates 5 minutes after pw-123's: the new
        # resources land before and after the reader's position, whatever the sort
        nonlocal writes
        n = 0
        while not done.is_set():
            k = rng.randrange(300)
            id_ = f"pw-{k:03d}-{tag}-{n}"
            n += 1
            r = await fx.put(f"/Observation/{id_}", json=_paging_obs(id_, k * 10 + 5))
            assert r.status_code == 201, r.text[:500]
            created.append(id_)
            writes += 1
            if len(created) > 5:
                victim = created.pop(rng.randrange(len(created)))
                assert (await fx.delete(f"/Observation/{victim}")).status_code in (200, 204)
                writes += 1
            progressed.set()
            await asyncio.sleep(0)

    async def let_writer_work() -> None:
        for _ in range(3):  # at least three create/delete rounds between two pages
            progressed.clear()
            await asyncio.wait_for(progressed.wait(), timeout=30)

    task = asyncio.create_task(writer())
    try:
        params: list[Any] = [("code", PAGING_CODE), ("_count", "20")]
        if sort:
            params.append(("_sort", sort))
        r = await fx.get("/Observation", params=params)
        assert r.status_code == 200, r.text[:2000]
        seen: list[str] = []
        page = r.json()
        n_pages = 1
        while True:
            seen.extend(ids(page))
            await let_writer_work()
            nxt = link(page, "next")
            if nxt is None:
                break
            r = await fx.get(rel(nxt))
            assert r.status_code == 200, r.text[:2000]
            page = r.json()
            n_pages += 1
            assert n_pages < 100
    finally:
        done.set()
        await task
    for id_ in created:
        await fx.delete(f"/Observation/{id_}")
    assert writes > 20, "the writer hardly ran: the test proves nothing"
    stable_seen = [i for i in seen if i in stable_300]
    twice = sorted(i for i in set(stable_seen) if stable_seen.count(i) > 1)
    assert not twice, f"{len(twice)} stable resources seen twice, e.g. {twice[:5]}"
    missing = sorted(stable_300 - set(stable_seen))
    assert not missing, f"{len(missing)} stable resources never seen, e.g. {missing[:5]}"
    assert len(seen) == len(set(seen)), "a resource appeared twice"


async def test_paging_next_link_is_a_cursor(fx: httpx.AsyncClient, stable_300: set[str]) -> None:
    r = await fx.get("/Observation", params=[("code", PAGING_CODE), ("_count", "20")])
    nxt = link(r.json(), "next")
    assert nxt is not None
    assert "_offset" not in nxt, nxt
