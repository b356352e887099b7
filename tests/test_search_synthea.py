"""Full FHIR R4 search (issue #3, search.html) checked on the Synthea sample (../shared/data/synthea-120,
92,114 resources in 122 bundles).

The bundles are POSTed, as transactions/batches, to an app on its own database (``0-…`` files
first, the rest 6 at a time). Expectations are computed here from the raw JSON, independently of
the server: the only thing taken from the server is the ``Type/id`` it gave each entry (from the
transaction responses), so that its answers can be mapped back to Synthea uuids and compared as
sets. Where the R4 text admits two readings (ge/le on ranges that straddle the search range, gt/lt
on values inside the implicit range of the search number), a case has a ``must`` set (strict
reading) and a ``may`` set (loose reading); the server's answer must lie between them.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Callable

import httpx
import pytest
from pymongo import AsyncMongoClient

from fhir_server.http.app import create_app
from tests._synthea import (
    LOCAL_TZ,
    Corpus,
    codings,
    date_interval,
    date_matches,
    effective_interval,
    entries,
    human_name_parts,
    link,
    load_synthea,
    norm,
    number_matches,
    relative,
    string_starts,
    token_matches,
    walk,
)
from tests.conftest import make_settings, shared_path

pytestmark = pytest.mark.timeout(900)

BASE = "http://testserver/fhir"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
HEIGHT = f"{LOINC}|8302-2"
WEIGHT = f"{LOINC}|29463-7"
SYNTHEA_ID = "https://github.com/synthetichealth/synthea"


@dataclass
class Loaded:
    client: httpx.AsyncClient
    corpus: Corpus


@pytest.fixture(scope="module")
async def synthea(mongo_uri: str):
    folder = shared_path("data", "synthea-120")
    settings = make_settings(mongo_uri)
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url=BASE, timeout=600) as client:
            corpus = await load_synthea(client, folder, concurrency=6)
            print(
                f"\nSynthea load: {corpus.loaded_resources} resources in {corpus.load_seconds:.1f} s "
                f"({corpus.loaded_resources / corpus.load_seconds:.0f}/s)"
            )
            yield Loaded(client, corpus)
    mongo: AsyncMongoClient = AsyncMongoClient(mongo_uri)
    try:
        await mongo.drop_database(settings.database)
    finally:
        await mongo.close()


# -- cases ----------------------------------------------------------------------------------------


@dataclass
class Case:
    path: str  # relative to the base, e.g. "/Observation"
    params: list[tuple[str, str]]
    must: set[str]  # Synthea uuids that must be matched
    may: set[str] | None = None  # uuids that may be matched (defaults to must)
    allow_empty: bool = False  # the expectation is deliberately empty
    post: bool = False  # POST [type]/_search with a form body
    headers: dict[str, str] = field(default_factory=dict)


CASES: dict[str, Callable[[Corpus], Case]] = {}


def case(name: str) -> Callable[[Callable[[Corpus], Case]], Callable[[Corpus], Case]]:
    def register(fn: Callable[[Corpus], Case]) -> Callable[[Corpus], Case]:
        assert name not in CASES
        CASES[name] = fn
        return fn

    return register


# -- helpers over the raw corpus ---------------------------------------------------------------------


def where(c: Corpus, type_: str, pred: Callable[[dict[str, Any]], bool]) -> set[str]:
    return {u for u, r in c.of_type(type_) if pred(r)}


def ref(c: Corpus, r: dict[str, Any], path: str) -> list[str]:
    """Uuids that the references at ``path`` (dotted, through lists) of a raw resource point to."""
    nodes: list[Any] = [r]
    for step in path.split("."):
        nxt: list[Any] = []
        for n in nodes:
            v = n.get(step) if isinstance(n, dict) else None
            if isinstance(v, list):
                nxt.extend(v)
            elif v is not None:
                nxt.append(v)
        nodes = nxt
    return [u for u in (c.resolve(n) for n in nodes) if u is not None]


def ref_of_type(c: Corpus, r: dict[str, Any], path: str, type_: str) -> list[str]:
    return [u for u in ref(c, r, path) if c.type_of(u) == type_]


def obs_patient(c: Corpus, o: dict[str, Any]) -> str:
    """The Patient an Observation is about (every Synthea Observation has one)."""
    found = ref_of_type(c, o, "subject", "Patient")
    assert found, o["id"]
    return found[0]


def q(value: Any) -> Decimal:
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def date_case(
    c: Corpus, type_: str, keys: tuple[str, ...], params: list[tuple[str, str]], extra: Callable[[dict[str, Any]], bool]
) -> tuple[set[str], set[str]]:
    """must/may sets for the date parameters in ``params`` (name ``date``-like, ANDed) over ``keys``."""
    must, may = set(), set()
    date_params = [(n, v) for n, v in params if n in ("date", "birthdate", "onset-date", "authoredon", "created")]
    for u, r in c.of_type(type_):
        if not extra(r):
            continue
        target = effective_interval(r, *keys)
        if target is None:
            continue
        all_must, all_may = True, True
        for _, value in date_params:
            prefix, text = split_prefix(value)
            m, y = date_matches(prefix, target, date_interval(text))
            all_must &= m
            all_may &= y
        if all_must:
            must.add(u)
        if all_may:
            may.add(u)
    return must, may


def split_prefix(value: str) -> tuple[str, str]:
    if value[:2] in ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap") and not value[:2].isdigit():
        return value[:2], value[2:]
    return "eq", value


def has_code(r: dict[str, Any], token: str, key: str = "code") -> bool:
    return token_matches(r.get(key), token)


def patients_by(c: Corpus, type_: str, n: int) -> list[str]:
    """Patients ordered by how many resources of ``type_`` they have (most first, then uuid)."""
    counts: Counter[str] = Counter()
    for _, r in c.of_type(type_):
        for p in ref_of_type(c, r, "subject", "Patient") + ref_of_type(c, r, "patient", "Patient"):
            counts[p] += 1
    ranked = sorted(counts, key=lambda p: (-counts[p], p))
    return ranked[:n]


def moderate_patient(c: Corpus) -> str:
    """A patient with a moderate number of Observations (100–400), so sort/compartment checks stay small."""
    counts: Counter[str] = Counter()
    for _, o in c.of_type("Observation"):
        counts[obs_patient(c, o)] += 1
    return sorted((p for p in counts if 100 <= counts[p] <= 400), key=lambda p: (counts[p], p))[0]


def local_day(instant: str) -> str:
    return datetime.fromisoformat(instant).astimezone(LOCAL_TZ).date().isoformat()


def value_of(o: dict[str, Any]) -> Decimal | None:
    vq = o.get("valueQuantity")
    return q(vq["value"]) if isinstance(vq, dict) and "value" in vq else None


def number_case(values: dict[str, list[Decimal]], conditions: list[tuple[str, str]]) -> tuple[set[str], set[str]]:
    must, may = set(), set()
    for u, vs in values.items():
        m_all, y_all = True, True
        for prefix, number in conditions:
            results = [number_matches(prefix, v, number) for v in vs]
            m_all &= any(m for m, _ in results)
            y_all &= any(y for _, y in results)
        if m_all:
            must.add(u)
        if y_all:
            may.add(u)
    return must, may


# -- Patient -----------------------------------------------------------------------------------------


@case("patient-gender-male")
def _(c: Corpus) -> Case:
    return Case("/Patient", [("gender", "male")], where(c, "Patient", lambda r: r.get("gender") == "male"))


@case("patient-gender-system-code")
def _(c: Corpus) -> Case:
    return Case(
        "/Patient",
        [("gender", "http://hl7.org/fhir/administrative-gender|female")],
        where(c, "Patient", lambda r: r.get("gender") == "female"),
    )


@case("patient-gender-not")
def _(c: Corpus) -> Case:
    return Case("/Patient", [("gender:not", "male")], where(c, "Patient", lambda r: r.get("gender") != "male"))


def _birth_case(params: list[tuple[str, str]]) -> Callable[[Corpus], Case]:
    def build(c: Corpus) -> Case:
        must, may = date_case(c, "Patient", ("birthDate",), params, lambda r: True)
        return Case("/Patient", params, must, may)

    return build


for _name, _params in {
    "patient-birthdate-year": [("birthdate", "1929")],
    "patient-birthdate-month": [("birthdate", "1946-05")],
    "patient-birthdate-day": [("birthdate", "1961-07-15")],
    "patient-birthdate-lt": [("birthdate", "lt1950")],
    "patient-birthdate-gt-month": [("birthdate", "gt2000-06")],
    "patient-birthdate-ge-le-and": [("birthdate", "ge1980-01-01"), ("birthdate", "le1989-12-31")],
    "patient-birthdate-sa": [("birthdate", "sa2010")],
    "patient-birthdate-eb": [("birthdate", "eb1945-06-23")],
    "patient-birthdate-ne": [("birthdate", "ne1929-03-21")],
}.items():
    case(_name)(_birth_case(_params))


@case("patient-birthdate-or")
def _(c: Corpus) -> Case:
    return Case(
        "/Patient",
        [("birthdate", "1919,1939-07")],
        where(c, "Patient", lambda r: r["birthDate"].startswith(("1919", "1939-07"))),
    )


def _a_family(c: Corpus) -> str:
    fams = Counter(n["family"] for _, p in c.of_type("Patient") for n in p["name"] if "family" in n)
    return sorted(fams, key=lambda f: (-fams[f], f))[0]  # Rosenbaum794 in this sample


@case("patient-family-prefix-lowercase")
def _(c: Corpus) -> Case:
    prefix = _a_family(c)[:5].lower()
    return Case(
        "/Patient",
        [("family", prefix)],
        where(c, "Patient", lambda r: string_starts([n["family"] for n in r["name"] if "family" in n], prefix)),
    )


@case("patient-name-given-uppercase")
def _(c: Corpus) -> Case:
    given = sorted(c.resources[u]["name"][0]["given"][0] for u in c.by_type["Patient"])[0]
    prefix = given[:3].upper()
    return Case(
        "/Patient",
        [("name", prefix)],
        where(c, "Patient", lambda r: string_starts(human_name_parts(r["name"]), prefix)),
    )


@case("patient-family-exact")
def _(c: Corpus) -> Case:
    fam = _a_family(c)
    return Case(
        "/Patient",
        [("family:exact", fam)],
        where(c, "Patient", lambda r: any(n.get("family") == fam for n in r["name"])),
    )


@case("patient-family-exact-other-case")
def _(c: Corpus) -> Case:
    fam = _a_family(c).lower()
    return Case(
        "/Patient",
        [("family:exact", fam)],
        where(c, "Patient", lambda r: any(n.get("family") == fam for n in r["name"])),
        allow_empty=True,
    )


@case("patient-name-contains")
def _(c: Corpus) -> Case:
    needle = "bau"  # inside Rosenbaum794 (not a prefix)
    return Case(
        "/Patient",
        [("name:contains", needle)],
        where(c, "Patient", lambda r: any(needle in norm(p) for p in human_name_parts(r["name"]))),
    )


@case("patient-address-city")
def _(c: Corpus) -> Case:
    return Case(
        "/Patient",
        [("address-city", "worcester")],
        where(c, "Patient", lambda r: string_starts([a.get("city", "") for a in r.get("address", [])], "worcester")),
    )


def _ssn(p: dict[str, Any]) -> str:
    return next(i["value"] for i in p["identifier"] if i.get("system") == "http://hl7.org/fhir/sid/us-ssn")


@case("patient-identifier-system-value")
def _(c: Corpus) -> Case:
    u = sorted(c.by_type["Patient"])[3]
    ssn = _ssn(c.resources[u])
    return Case(
        "/Patient",
        [("identifier", f"http://hl7.org/fhir/sid/us-ssn|{ssn}")],
        where(c, "Patient", lambda r: any(i.get("value") == ssn for i in r["identifier"])),
    )


@case("patient-identifier-of-type")
def _(c: Corpus) -> Case:
    u = sorted(c.by_type["Patient"])[5]
    ssn = _ssn(c.resources[u])
    return Case(
        "/Patient",
        [("identifier:of-type", f"http://terminology.hl7.org/CodeSystem/v2-0203|SS|{ssn}")],
        where(
            c,
            "Patient",
            lambda r: any(
                i.get("value") == ssn
                and ("http://terminology.hl7.org/CodeSystem/v2-0203", "SS") in codings(i.get("type"))
                for i in r["identifier"]
            ),
        ),
    )


@case("patient-id-several")
def _(c: Corpus) -> Case:
    chosen = sorted(c.by_type["Patient"])[10:13]
    return Case("/Patient", [("_id", ",".join(c.sid(u) for u in chosen))], set(chosen))


def _patients_with(c: Corpus, type_: str, token: str) -> set[str]:
    out = set()
    for _, r in c.of_type(type_):
        if has_code(r, token):
            out.update(ref_of_type(c, r, "subject", "Patient"))
    return out


@case("patient-has-two-conditions")
def _(c: Corpus) -> Case:
    a = _patients_with(c, "Observation", f"{LOINC}|2339-0")
    b = _patients_with(c, "Condition", f"{SNOMED}|15777000")
    return Case(
        "/Patient",
        [("_has:Observation:patient:code", f"{LOINC}|2339-0"), ("_has:Condition:patient:code", f"{SNOMED}|15777000")],
        a & b,
    )


@case("patient-has-and-gender")
def _(c: Corpus) -> Case:
    covid = _patients_with(c, "Condition", f"{SNOMED}|840539006")
    return Case(
        "/Patient",
        [("gender", "female"), ("_has:Condition:patient:code", f"{SNOMED}|840539006")],
        {u for u in covid if c.resources[u]["gender"] == "female"},
    )


@case("patient-has-nested")
def _(c: Corpus) -> Case:
    obs = set()
    for _, dr in c.of_type("DiagnosticReport"):
        if has_code(dr, f"{LOINC}|57698-3"):
            obs.update(ref_of_type(c, dr, "result", "Observation"))
    pats = {obs_patient(c, c.resources[o]) for o in obs}
    return Case("/Patient", [("_has:Observation:patient:_has:DiagnosticReport:result:code", f"{LOINC}|57698-3")], pats)


def _started(c: Corpus) -> str:
    # a second before the load began, in UTC; the server and the test share the clock
    return (c.started - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


@case("patient-lastupdated-ge-load-start")
def _(c: Corpus) -> Case:
    return Case("/Patient", [("_lastUpdated", "ge" + _started(c))], set(c.by_type["Patient"]))


@case("patient-lastupdated-lt-load-start")
def _(c: Corpus) -> Case:
    return Case("/Patient", [("_lastUpdated", "lt" + _started(c))], set(), allow_empty=True)


# -- Observation: tokens -----------------------------------------------------------------------------


@case("obs-code-without-system")
def _(c: Corpus) -> Case:
    return Case("/Observation", [("code", "8302-2")], where(c, "Observation", lambda r: has_code(r, "8302-2")))


@case("obs-code-system-code")
def _(c: Corpus) -> Case:
    return Case("/Observation", [("code", HEIGHT)], where(c, "Observation", lambda r: has_code(r, HEIGHT)))


@case("obs-code-or")
def _(c: Corpus) -> Case:
    return Case(
        "/Observation",
        [("code", f"{HEIGHT},{LOINC}|8310-5")],
        where(c, "Observation", lambda r: has_code(r, HEIGHT) or has_code(r, f"{LOINC}|8310-5")),
    )


@case("obs-code-system-only-and-month")
def _(c: Corpus) -> Case:
    params = [("code", f"{LOINC}|"), ("date", "2019-05")]
    must, may = date_case(c, "Observation", ("effectiveDateTime",), params[1:], lambda r: has_code(r, f"{LOINC}|"))
    return Case("/Observation", params, must, may)


@case("obs-category-and-code")
def _(c: Corpus) -> Case:
    return Case(
        "/Observation",
        [("category", f"{OBS_CAT}|laboratory"), ("code", f"{LOINC}|2339-0")],
        where(
            c,
            "Observation",
            lambda r: has_code(r, f"{OBS_CAT}|laboratory", "category") and has_code(r, f"{LOINC}|2339-0"),
        ),
    )


@case("obs-category-survey-year")
def _(c: Corpus) -> Case:
    params = [("category", "survey"), ("date", "2020")]
    must, may = date_case(
        c, "Observation", ("effectiveDateTime",), params[1:], lambda r: has_code(r, "survey", "category")
    )
    return Case("/Observation", params, must, may)


@case("obs-value-concept")
def _(c: Corpus) -> Case:
    return Case(
        "/Observation",
        [("value-concept", f"{SNOMED}|8517006")],
        where(c, "Observation", lambda r: token_matches(r.get("valueCodeableConcept"), f"{SNOMED}|8517006")),
    )


@case("obs-code-text")
def _(c: Corpus) -> Case:
    def texts(r: dict[str, Any]) -> list[str]:
        code = r["code"]
        return [code.get("text", "")] + [x.get("display", "") for x in code.get("coding", [])]

    must = where(c, "Observation", lambda r: string_starts(texts(r), "body mass"))
    may = where(c, "Observation", lambda r: any("body mass" in norm(t) for t in texts(r)))
    return Case("/Observation", [("code:text", "body mass")], must, may)


@case("obs-code-not")
def _(c: Corpus) -> Case:
    p = moderate_patient(c)
    return Case(
        "/Observation",
        [("patient", c.sid(p)), ("code:not", HEIGHT)],
        where(c, "Observation", lambda r: obs_patient(c, r) == p and not has_code(r, HEIGHT)),
    )


# -- Observation: dates --------------------------------------------------------------------------------


def _obs_date_case(params: list[tuple[str, str]], code: str = HEIGHT) -> Callable[[Corpus], Case]:
    def build(c: Corpus) -> Case:
        must, may = date_case(c, "Observation", ("effectiveDateTime",), params, lambda r: has_code(r, code))
        return Case("/Observation", [("code", code)] + params, must, may)

    return build


for _name, _params in {
    "obs-date-year": [("date", "2015")],
    "obs-date-month": [("date", "2016-06")],
    "obs-date-gt-day": [("date", "gt2016-06-15")],
    "obs-date-lt-day": [("date", "lt2016-06-15")],
    "obs-date-ge-day": [("date", "ge2016-06-15")],
    "obs-date-le-day": [("date", "le2016-06-15")],
    "obs-date-sa-month": [("date", "sa2016-06")],
    "obs-date-eb-month": [("date", "eb2016-06")],
    "obs-date-ne-year": [("date", "ne2020")],
    "obs-date-range-utc-and": [("date", "ge2015-01-01T00:00:00Z"), ("date", "lt2016-01-01T00:00:00Z")],
    "obs-date-range-offset-and": [("date", "gt2014-06-30T23:59:59-05:00"), ("date", "le2015-07-01T12:00:00+02:00")],
}.items():
    case(_name)(_obs_date_case(_params))


def _crossing_weight(c: Corpus) -> dict[str, Any]:
    """A Body Weight Observation whose day in +08:00 is not its day in its own zone."""
    for _, o in sorted(c.of_type("Observation"), key=lambda x: x[0]):
        if has_code(o, WEIGHT):
            t = o["effectiveDateTime"]
            if local_day(t) != t[:10]:
                return o
    raise AssertionError("no such observation in the sample")


@case("obs-date-day-no-zone-is-cst")
def _(c: Corpus) -> Case:
    day = local_day(_crossing_weight(c)["effectiveDateTime"])  # the next day, in China Standard Time
    return _obs_date_case([("date", day)], WEIGHT)(c)


@case("obs-date-day-own-zone-not-cst")
def _(c: Corpus) -> Case:
    # the day as written in the Observation's own zone: in +08:00 the Observation is on the next day
    day = _crossing_weight(c)["effectiveDateTime"][:10]
    built = _obs_date_case([("date", day)], WEIGHT)(c)
    assert _crossing_weight(c)["id"] not in {c.resources[u]["id"] for u in built.must}
    built.allow_empty = True
    return built


@case("obs-date-seconds-own-zone")
def _(c: Corpus) -> Case:
    return _obs_date_case([("date", _crossing_weight(c)["effectiveDateTime"])], WEIGHT)(c)


@case("obs-date-seconds-utc")
def _(c: Corpus) -> Case:
    t = datetime.fromisoformat(_crossing_weight(c)["effectiveDateTime"]).astimezone(timezone.utc)
    return _obs_date_case([("date", t.strftime("%Y-%m-%dT%H:%M:%SZ"))], WEIGHT)(c)


@case("obs-date-seconds-cst")
def _(c: Corpus) -> Case:
    t = datetime.fromisoformat(_crossing_weight(c)["effectiveDateTime"]).astimezone(LOCAL_TZ)
    return _obs_date_case([("date", t.isoformat())], WEIGHT)(c)


@case("obs-date-ge-seconds-boundary")
def _(c: Corpus) -> Case:
    return _obs_date_case([("date", "ge" + _crossing_weight(c)["effectiveDateTime"])], WEIGHT)(c)


@case("obs-date-gt-seconds-boundary")
def _(c: Corpus) -> Case:
    return _obs_date_case([("date", "gt" + _crossing_weight(c)["effectiveDateTime"])], WEIGHT)(c)


@case("obs-date-or-days")
def _(c: Corpus) -> Case:
    # two days (comma = OR), taken in China Standard Time as the query has no zone
    all_days = sorted({local_day(o["effectiveDateTime"]) for _, o in c.of_type("Observation") if has_code(o, WEIGHT)})
    days = (all_days[len(all_days) // 3], all_days[2 * len(all_days) // 3])
    must = where(
        c,
        "Observation",
        lambda r: has_code(r, WEIGHT) and any(local_day(r["effectiveDateTime"]) == d for d in days),
    )
    return Case("/Observation", [("code", WEIGHT), ("date", ",".join(days))], must)


# -- Observation: quantities, composites, :missing ------------------------------------------------------


def _obs_values(c: Corpus, code: str) -> dict[str, list[Decimal]]:
    return {u: [v] for u, o in c.of_type("Observation") if has_code(o, code) and (v := value_of(o)) is not None}


@case("obs-value-gt")
def _(c: Corpus) -> Case:
    must, may = number_case(_obs_values(c, HEIGHT), [("gt", "180")])
    return Case("/Observation", [("code", HEIGHT), ("value-quantity", "gt180")], must, may)


@case("obs-value-lt-with-units")
def _(c: Corpus) -> Case:
    vals = {
        u: [q(o["valueQuantity"]["value"])]
        for u, o in c.of_type("Observation")
        if has_code(o, WEIGHT)
        and o.get("valueQuantity", {}).get("system") == UCUM
        and o["valueQuantity"].get("code") == "kg"
    }
    must, may = number_case(vals, [("lt", "20")])
    return Case("/Observation", [("code", WEIGHT), ("value-quantity", f"lt20|{UCUM}|kg")], must, may)


@case("obs-value-eq-precision")
def _(c: Corpus) -> Case:
    # 188.5 means [188.45, 188.55): values written 188.5 and nothing else in this sample
    must, may = number_case(_obs_values(c, HEIGHT), [("eq", "188.5")])
    return Case("/Observation", [("code", HEIGHT), ("value-quantity", "188.5")], must, may)


@case("obs-value-eq-integer-precision")
def _(c: Corpus) -> Case:
    # 152 means [151.5, 152.5)
    must, may = number_case(_obs_values(c, HEIGHT), [("eq", "152")])
    return Case("/Observation", [("code", HEIGHT), ("value-quantity", "152")], must, may)


@case("obs-value-ge-le-and")
def _(c: Corpus) -> Case:
    must, may = number_case(_obs_values(c, HEIGHT), [("ge", "170"), ("le", "175")])
    return Case("/Observation", [("code", HEIGHT), ("value-quantity", "ge170"), ("value-quantity", "le175")], must, may)


@case("obs-value-ne")
def _(c: Corpus) -> Case:
    p = moderate_patient(c)
    vals = {u: vs for u, vs in _obs_values(c, WEIGHT).items() if obs_patient(c, c.resources[u]) == p}
    some = sorted(v[0] for v in vals.values())[len(vals) // 2]
    must, may = number_case(vals, [("ne", str(some))])
    return Case("/Observation", [("patient", c.sid(p)), ("code", WEIGHT), ("value-quantity", f"ne{some}")], must, may)


@case("obs-code-value-quantity")
def _(c: Corpus) -> Case:
    must, may = number_case(_obs_values(c, HEIGHT), [("gt", "185")])
    return Case("/Observation", [("code-value-quantity", f"{HEIGHT}$gt185")], must, may)


@case("obs-component-code-value-quantity")
def _(c: Corpus) -> Case:
    must, may = set(), set()
    for u, o in c.of_type("Observation"):
        for comp in o.get("component", []):
            if token_matches(comp.get("code"), f"{LOINC}|8480-6") and "valueQuantity" in comp:
                m, y = number_matches("gt", q(comp["valueQuantity"]["value"]), "130")
                if m:
                    must.add(u)
                if y:
                    may.add(u)
    return Case("/Observation", [("component-code-value-quantity", f"{LOINC}|8480-6$gt130")], must, may)


@case("obs-value-missing-true")
def _(c: Corpus) -> Case:
    p = moderate_patient(c)
    return Case(
        "/Observation",
        [("patient", c.sid(p)), ("value-quantity:missing", "true")],
        where(c, "Observation", lambda r: obs_patient(c, r) == p and "valueQuantity" not in r),
    )


@case("obs-value-missing-false")
def _(c: Corpus) -> Case:
    p = moderate_patient(c)
    return Case(
        "/Observation",
        [("patient", c.sid(p)), ("value-quantity:missing", "false")],
        where(c, "Observation", lambda r: obs_patient(c, r) == p and "valueQuantity" in r),
    )


# -- references -----------------------------------------------------------------------------------------


def _obs_of(c: Corpus, p: str, code: str | None = None) -> set[str]:
    return where(c, "Observation", lambda r: obs_patient(c, r) == p and (code is None or has_code(r, code)))


@case("obs-subject-type-id")
def _(c: Corpus) -> Case:
    p = patients_by(c, "Observation", 5)[4]
    return Case("/Observation", [("subject", f"Patient/{c.sid(p)}"), ("code", WEIGHT)], _obs_of(c, p, WEIGHT))


@case("obs-patient-bare-id")
def _(c: Corpus) -> Case:
    p = moderate_patient(c)
    return Case("/Observation", [("patient", c.sid(p))], _obs_of(c, p))


@case("obs-subject-type-modifier")
def _(c: Corpus) -> Case:
    p = moderate_patient(c)
    return Case("/Observation", [("subject:Patient", c.sid(p))], _obs_of(c, p))


@case("obs-subject-absolute-url")
def _(c: Corpus) -> Case:
    p = moderate_patient(c)
    return Case("/Observation", [("subject", f"{BASE}/Patient/{c.sid(p)}")], _obs_of(c, p))


@case("obs-encounter-reference")
def _(c: Corpus) -> Case:
    e = sorted({e for _, o in c.of_type("Observation") for e in ref(c, o, "encounter")})[7]
    return Case(
        "/Observation",
        [("encounter", f"Encounter/{c.sid(e)}")],
        where(c, "Observation", lambda r: e in ref(c, r, "encounter")),
    )


@case("location-organization-identifier")
def _(c: Corpus) -> Case:
    org = sorted(c.by_type["Organization"])[0]
    ident = f"{SYNTHEA_ID}|{c.resources[org]['identifier'][0]['value']}"

    def points(r: dict[str, Any]) -> bool:
        mo = r.get("managingOrganization") or {}
        i = mo.get("identifier") or {}
        return f"{i.get('system')}|{i.get('value')}" == ident

    return Case("/Location", [("organization:identifier", ident)], where(c, "Location", points))


@case("practitionerrole-practitioner-identifier")
def _(c: Corpus) -> Case:
    npi = "http://hl7.org/fhir/sid/us-npi|9999999989"

    def points(r: dict[str, Any]) -> bool:
        i = (r.get("practitioner") or {}).get("identifier") or {}
        return f"{i.get('system')}|{i.get('value')}" == npi

    return Case("/PractitionerRole", [("practitioner:identifier", npi)], where(c, "PractitionerRole", points))


@case("encounter-service-provider-and-year")
def _(c: Corpus) -> Case:
    orgs = Counter(u for _, e in c.of_type("Encounter") for u in ref(c, e, "serviceProvider"))
    org = sorted(orgs, key=lambda o: (-orgs[o], o))[0]
    params = [("service-provider", f"Organization/{c.sid(org)}"), ("date", "2020")]
    must, may = date_case(c, "Encounter", ("period",), params[1:], lambda r: org in ref(c, r, "serviceProvider"))
    return Case("/Encounter", params, must, may)


@case("encounter-practitioner")
def _(c: Corpus) -> Case:
    docs = Counter(u for _, e in c.of_type("Encounter") for u in ref(c, e, "participant.individual"))
    doc = sorted(docs, key=lambda d: (docs[d], d))[len(docs) // 2]
    return Case(
        "/Encounter",
        [("practitioner", f"Practitioner/{c.sid(doc)}")],
        where(c, "Encounter", lambda r: doc in ref(c, r, "participant.individual")),
    )


# -- chains ----------------------------------------------------------------------------------------------


@case("chain-patient-gender")
def _(c: Corpus) -> Case:
    return Case(
        "/Observation",
        [("patient.gender", "male"), ("code", HEIGHT)],
        where(c, "Observation", lambda r: has_code(r, HEIGHT) and c.resources[obs_patient(c, r)]["gender"] == "male"),
    )


@case("chain-subject-typed-family")
def _(c: Corpus) -> Case:
    prefix = _a_family(c)[:6]
    pats = where(c, "Patient", lambda r: string_starts([n["family"] for n in r["name"] if "family" in n], prefix))
    return Case(
        "/Observation",
        [("subject:Patient.family", prefix)],
        where(c, "Observation", lambda r: obs_patient(c, r) in pats),
    )


@case("chain-patient-birthdate-and-code")
def _(c: Corpus) -> Case:
    old = where(c, "Patient", lambda r: r["birthDate"] < "1950-01-01")
    return Case(
        "/Observation",
        [("patient.birthdate", "lt1950"), ("code", WEIGHT)],
        where(c, "Observation", lambda r: has_code(r, WEIGHT) and obs_patient(c, r) in old),
    )


def _busiest_org(c: Corpus) -> str:
    orgs = Counter(u for _, e in c.of_type("Encounter") for u in ref(c, e, "serviceProvider"))
    return sorted(orgs, key=lambda o: (-orgs[o], o))[0]


@case("chain-two-level-encounter-service-provider-name")
def _(c: Corpus) -> Case:
    name = c.resources[_busiest_org(c)]["name"]
    orgs = where(c, "Organization", lambda r: string_starts([r.get("name", "")] + r.get("alias", []), name))
    encs = where(c, "Encounter", lambda r: any(o in orgs for o in ref(c, r, "serviceProvider")))
    return Case(
        "/Observation",
        [("encounter.service-provider.name", name), ("code", WEIGHT)],
        where(c, "Observation", lambda r: has_code(r, WEIGHT) and any(e in encs for e in ref(c, r, "encounter"))),
    )


@case("chain-two-level-encounter-practitioner-family")
def _(c: Corpus) -> Case:
    docs = Counter(u for _, e in c.of_type("Encounter") for u in ref(c, e, "participant.individual"))
    doc = sorted(docs, key=lambda d: (-docs[d], d))[0]
    family = c.resources[doc]["name"][0]["family"]
    pracs = where(c, "Practitioner", lambda r: string_starts([n.get("family", "") for n in r["name"]], family))
    encs = where(c, "Encounter", lambda r: any(d in pracs for d in ref(c, r, "participant.individual")))
    return Case(
        "/Observation",
        [("encounter.participant:Practitioner.family", family), ("code", HEIGHT)],
        where(c, "Observation", lambda r: has_code(r, HEIGHT) and any(e in encs for e in ref(c, r, "encounter"))),
    )


@case("chain-three-level-result-encounter-org")
def _(c: Corpus) -> Case:
    name = c.resources[_busiest_org(c)]["name"]
    orgs = where(c, "Organization", lambda r: string_starts([r.get("name", "")], name))
    encs = where(c, "Encounter", lambda r: any(o in orgs for o in ref(c, r, "serviceProvider")))
    obs = where(c, "Observation", lambda r: any(e in encs for e in ref(c, r, "encounter")))
    return Case(
        "/DiagnosticReport",
        [("code", f"{LOINC}|57698-3"), ("result.encounter.service-provider.name", name)],
        where(
            c,
            "DiagnosticReport",
            lambda r: has_code(r, f"{LOINC}|57698-3") and any(o in obs for o in ref(c, r, "result")),
        ),
    )


@case("chain-encounter-org-name-and-class")
def _(c: Corpus) -> Case:
    orgs = where(c, "Organization", lambda r: string_starts([r.get("name", "")], "mount auburn"))
    return Case(
        "/Encounter",
        [("service-provider.name", "mount auburn"), ("class", "AMB")],
        where(
            c,
            "Encounter",
            lambda r: r["class"]["code"] == "AMB" and any(o in orgs for o in ref(c, r, "serviceProvider")),
        ),
    )


@case("chain-claim-patient-birthdate-created")
def _(c: Corpus) -> Case:
    young = where(c, "Patient", lambda r: r["birthDate"] >= "2010")
    params = [("patient.birthdate", "ge2010"), ("created", "2020")]
    must, may = date_case(c, "Claim", ("created",), params[1:], lambda r: any(p in young for p in ref(c, r, "patient")))
    return Case("/Claim", params, must, may)


# -- other types --------------------------------------------------------------------------------------------


@case("encounter-date-day")
def _(c: Corpus) -> Case:
    params = [("date", "2020-03-10")]
    must, may = date_case(c, "Encounter", ("period",), params, lambda r: True)
    return Case("/Encounter", params, must, may)


@case("encounter-date-ge-le-month")
def _(c: Corpus) -> Case:
    params = [("date", "ge2020-03-01"), ("date", "le2020-03-31")]
    must, may = date_case(c, "Encounter", ("period",), params, lambda r: True)
    return Case("/Encounter", params, must, may)


@case("encounter-class-imp")
def _(c: Corpus) -> Case:
    return Case("/Encounter", [("class", "IMP")], where(c, "Encounter", lambda r: r["class"]["code"] == "IMP"))


@case("encounter-reason-code")
def _(c: Corpus) -> Case:
    return Case(
        "/Encounter",
        [("reason-code", f"{SNOMED}|72892002")],
        where(c, "Encounter", lambda r: token_matches(r.get("reasonCode"), f"{SNOMED}|72892002")),
    )


@case("condition-code-onset-ge")
def _(c: Corpus) -> Case:
    params = [("onset-date", "ge2020-03-10")]
    code = f"{SNOMED}|840539006"
    must, may = date_case(c, "Condition", ("onsetDateTime", "onsetPeriod"), params, lambda r: has_code(r, code))
    return Case("/Condition", [("code", code)] + params, must, may)


@case("condition-clinical-status")
def _(c: Corpus) -> Case:
    return Case(
        "/Condition",
        [("clinical-status", "resolved"), ("code", f"{SNOMED}|444814009")],
        where(
            c,
            "Condition",
            lambda r: token_matches(r.get("clinicalStatus"), "resolved") and has_code(r, f"{SNOMED}|444814009"),
        ),
    )


@case("condition-abatement-missing-false")
def _(c: Corpus) -> Case:
    return Case(
        "/Condition",
        [("abatement-date:missing", "false"), ("code", f"{SNOMED}|444814009")],
        where(c, "Condition", lambda r: "abatementDateTime" in r and has_code(r, f"{SNOMED}|444814009")),
    )


@case("condition-abatement-missing-true")
def _(c: Corpus) -> Case:
    return Case(
        "/Condition",
        [("abatement-date:missing", "true")],
        where(c, "Condition", lambda r: "abatementDateTime" not in r and "abatementPeriod" not in r),
    )


@case("organization-name-prefix")
def _(c: Corpus) -> Case:
    return Case(
        "/Organization",
        [("name", "mount")],
        where(c, "Organization", lambda r: string_starts([r.get("name", "")] + r.get("alias", []), "mount")),
    )


@case("organization-name-contains")
def _(c: Corpus) -> Case:
    return Case(
        "/Organization",
        [("name:contains", "hospital")],
        where(
            c, "Organization", lambda r: any("hospital" in norm(n) for n in [r.get("name", "")] + r.get("alias", []))
        ),
    )


@case("practitioner-name-and-gender")
def _(c: Corpus) -> Case:
    return Case(
        "/Practitioner",
        [("name", "ja"), ("gender", "female")],
        where(
            c,
            "Practitioner",
            lambda r: r.get("gender") == "female" and string_starts(human_name_parts(r["name"]), "ja"),
        ),
    )


@case("medicationrequest-status-intent-authored")
def _(c: Corpus) -> Case:
    params = [("authoredon", "ge2019-01-01")]
    must, may = date_case(
        c, "MedicationRequest", ("authoredOn",), params, lambda r: r["status"] == "stopped" and r["intent"] == "order"
    )
    return Case("/MedicationRequest", [("status", "stopped"), ("intent", "order")] + params, must, may)


@case("immunization-vaccine-date")
def _(c: Corpus) -> Case:
    params = [("date", "le2015-12-31")]
    code = "http://hl7.org/fhir/sid/cvx|140"
    must, may = date_case(
        c, "Immunization", ("occurrenceDateTime",), params, lambda r: token_matches(r.get("vaccineCode"), code)
    )
    return Case("/Immunization", [("vaccine-code", code)] + params, must, may)


@case("procedure-date-year")
def _(c: Corpus) -> Case:
    params = [("date", "2019")]
    must, may = date_case(c, "Procedure", ("performedDateTime", "performedPeriod"), params, lambda r: True)
    return Case("/Procedure", params, must, may)


# -- system level, compartments, POST --------------------------------------------------------------------


@case("system-type-two-types")
def _(c: Corpus) -> Case:
    return Case(
        "",
        [("_type", "Patient,Practitioner"), ("gender", "female")],
        where(c, "Patient", lambda r: r["gender"] == "female")
        | where(c, "Practitioner", lambda r: r.get("gender") == "female"),
    )


@case("compartment-patient-observation")
def _(c: Corpus) -> Case:
    p = moderate_patient(c)
    return Case(f"/Patient/{c.sid(p)}/Observation", [("code", WEIGHT)], _obs_of(c, p, WEIGHT))


@case("compartment-patient-encounter")
def _(c: Corpus) -> Case:
    p = moderate_patient(c)
    return Case(f"/Patient/{c.sid(p)}/Encounter", [], where(c, "Encounter", lambda r: p in ref(c, r, "subject")))


@case("compartment-patient-claim")
def _(c: Corpus) -> Case:
    p = moderate_patient(c)
    return Case(
        f"/Patient/{c.sid(p)}/Claim",
        [],
        where(c, "Claim", lambda r: p in ref(c, r, "patient") or p in ref(c, r, "payee.party")),
    )


@case("post-search-form")
def _(c: Corpus) -> Case:
    params = [("code", HEIGHT), ("date", "ge2019-01-01"), ("patient.gender", "female")]
    must, may = date_case(
        c,
        "Observation",
        ("effectiveDateTime",),
        params[1:2],
        lambda r: has_code(r, HEIGHT) and c.resources[obs_patient(c, r)]["gender"] == "female",
    )
    return Case("/Observation", params, must, may, post=True)


# -- the generic check ------------------------------------------------------------------------------------


def check_bundle(bundle: dict[str, Any]) -> None:
    assert bundle.get("resourceType") == "Bundle", bundle
    assert bundle.get("type") == "searchset"
    for e in bundle.get("entry") or []:
        mode = (e.get("search") or {}).get("mode")
        assert mode in ("match", "include", "outcome"), e.get("search")
        if mode != "outcome":
            res = e["resource"]
            assert e.get("fullUrl") == f"{BASE}/{res['resourceType']}/{res['id']}", e.get("fullUrl")


async def run_search(
    client: httpx.AsyncClient, c: Corpus, case_: Case, count: int = 1000
) -> tuple[list[str], list[dict[str, Any]]]:
    """Uuids of the matches over every page (in order), and the pages."""
    params = list(case_.params)
    if not any(k == "_count" for k, _ in params):
        params.append(("_count", str(count)))
    if case_.post:
        path = (case_.path or "") + "/_search"
        r = await client.post(path, data=dict(params), headers=case_.headers)  # type: ignore[arg-type]
        assert len(dict(params)) == len(params)
        assert r.status_code == 200, r.text[:3000]
        pages = [r.json()]
        while (nxt := link(pages[-1], "next")) is not None:
            r2 = await client.get(relative(nxt))
            assert r2.status_code == 200, r2.text[:3000]
            pages.append(r2.json())
    else:
        pages = await walk(client, case_.path, params)
    return [match_uuid(c, e) for p in pages for e in entries(p)], pages


def match_uuid(c: Corpus, entry: dict[str, Any]) -> str:
    res = entry["resource"]
    key = f"{res['resourceType']}/{res['id']}"
    assert key in c.uuid_of, f"the server returned {key}, which is not one of the loaded resources"
    return c.uuid_of[key]


def _show(c: Corpus, uuids: set[str]) -> str:
    return ", ".join(f"{c.server_ref[u]} ({u})" for u in sorted(uuids)[:5]) + (" …" if len(uuids) > 5 else "")


@pytest.mark.parametrize("name", list(CASES))
async def test_search_matches_independent_expectation(synthea: Loaded, name: str) -> None:
    c = synthea.corpus
    case_ = CASES[name](c)
    may = case_.may if case_.may is not None else case_.must
    assert case_.must <= may
    if not case_.allow_empty:
        assert case_.must, "the test's own expectation is empty: choose another value"
    got, pages = await run_search(synthea.client, c, case_)
    for p in pages:
        check_bundle(p)
    dupes = [u for u, n in Counter(got).items() if n > 1]
    assert not dupes, f"matched more than once: {_show(c, set(dupes))}"
    got_set = set(got)
    missing = case_.must - got_set
    extra = got_set - may
    assert not missing and not extra, (
        f"{case_.path}?{case_.params}: {len(got_set)} matched, expected {len(case_.must)}"
        + (f"..{len(may)}" if may != case_.must else "")
        + f"; missing {len(missing)}: {_show(c, missing)}; unexpected {len(extra)}: {_show(c, extra)}"
    )
    total = pages[0].get("total")
    if total is not None:
        assert total == len(got), f"Bundle.total {total} but {len(got)} matches over the pages"


def test_enough_query_checks() -> None:
    assert len(CASES) >= 50


# -- _include / _revinclude ------------------------------------------------------------------------------


async def _pages_with_includes(s: Loaded, path: str, params: list[tuple[str, str]]) -> list[tuple[set[str], set[str]]]:
    pages = await walk(s.client, path, params)
    out = []
    for p in pages:
        check_bundle(p)
        m = [match_uuid(s.corpus, e) for e in entries(p, "match")]
        i = [match_uuid(s.corpus, e) for e in entries(p, "include")]
        assert len(set(i)) == len(i), "an included resource appears twice on one page"
        assert not set(m) & set(i), "a resource is both match and include on one page"
        out.append((set(m), set(i)))
    return out


async def test_include_observation_patient(synthea: Loaded) -> None:
    c = synthea.corpus
    expected = where(c, "Observation", lambda r: has_code(r, f"{LOINC}|2339-0"))
    pages = await _pages_with_includes(
        synthea, "/Observation", [("code", f"{LOINC}|2339-0"), ("_include", "Observation:patient"), ("_count", "100")]
    )
    assert set().union(*(m for m, _ in pages)) == expected
    for matches, included in pages:
        assert included == {obs_patient(c, c.resources[o]) for o in matches}


async def test_include_diagnosticreport_result(synthea: Loaded) -> None:
    c = synthea.corpus
    code = f"{LOINC}|57698-3"
    pages = await _pages_with_includes(
        synthea, "/DiagnosticReport", [("code", code), ("_include", "DiagnosticReport:result"), ("_count", "50")]
    )
    assert set().union(*(m for m, _ in pages)) == where(c, "DiagnosticReport", lambda r: has_code(r, code))
    for matches, included in pages:
        assert included == {o for d in matches for o in ref(c, c.resources[d], "result")}


async def test_include_iterate(synthea: Loaded) -> None:
    c = synthea.corpus
    p = moderate_patient(c)
    params = [
        ("patient", c.sid(p)),
        ("_include", "DiagnosticReport:encounter"),
        ("_include:iterate", "Encounter:service-provider"),
        ("_count", "40"),
    ]
    pages = await _pages_with_includes(synthea, "/DiagnosticReport", params)
    assert set().union(*(m for m, _ in pages)) == where(c, "DiagnosticReport", lambda r: p in ref(c, r, "subject"))
    for matches, included in pages:
        encs = {e for d in matches for e in ref(c, c.resources[d], "encounter")}
        orgs = {o for e in encs for o in ref(c, c.resources[e], "serviceProvider")}
        assert included == encs | orgs


async def test_include_wildcard(synthea: Loaded) -> None:
    c = synthea.corpus
    code = f"{SNOMED}|15777000"
    pages = await _pages_with_includes(synthea, "/Condition", [("code", code), ("_include", "*")])
    assert set().union(*(m for m, _ in pages)) == where(c, "Condition", lambda r: has_code(r, code))
    for matches, included in pages:
        # every reference of a Synthea Condition that is a search parameter: subject (patient), encounter
        assert included == {
            t for m in matches for t in ref(c, c.resources[m], "subject") + ref(c, c.resources[m], "encounter")
        }


async def test_revinclude_observation_encounter(synthea: Loaded) -> None:
    c = synthea.corpus
    p = moderate_patient(c)
    params = [("patient", c.sid(p)), ("_revinclude", "Observation:encounter"), ("_count", "10")]
    pages = await _pages_with_includes(synthea, "/Encounter", params)
    assert set().union(*(m for m, _ in pages)) == where(c, "Encounter", lambda r: p in ref(c, r, "subject"))
    for matches, included in pages:
        assert included == where(c, "Observation", lambda r: any(e in matches for e in ref(c, r, "encounter")))


async def test_revinclude_with_iterate(synthea: Loaded) -> None:
    c = synthea.corpus
    p = moderate_patient(c)
    params = [("_id", c.sid(p)), ("_revinclude", "Encounter:patient"), ("_revinclude:iterate", "Observation:encounter")]
    pages = await _pages_with_includes(synthea, "/Patient", params)
    assert len(pages) == 1
    matches, included = pages[0]
    assert matches == {p}
    encs = where(c, "Encounter", lambda r: p in ref(c, r, "subject"))
    assert included == encs | where(c, "Observation", lambda r: any(e in encs for e in ref(c, r, "encounter")))


async def test_revinclude_condition_on_has_search(synthea: Loaded) -> None:
    c = synthea.corpus
    code = f"{SNOMED}|840539006"
    params = [("_has:Condition:patient:code", code), ("_revinclude", "Condition:patient"), ("_count", "20")]
    pages = await _pages_with_includes(synthea, "/Patient", params)
    assert set().union(*(m for m, _ in pages)) == _patients_with(c, "Condition", code)
    for matches, included in pages:
        assert included == where(c, "Condition", lambda r: any(m in ref(c, r, "subject") for m in matches))


# -- _sort ----------------------------------------------------------------------------------------------------


async def _sorted_matches(s: Loaded, path: str, params: list[Any]) -> list[dict[str, Any]]:
    pages = await walk(s.client, path, params)
    out = [e["resource"] for p in pages for e in entries(p)]
    ids = [f"{r['resourceType']}/{r['id']}" for r in out]
    assert len(set(ids)) == len(ids), "a resource appears twice over the pages"
    return out


@pytest.mark.parametrize("direction", ["", "-"])
async def test_sort_by_date(synthea: Loaded, direction: str) -> None:
    c = synthea.corpus
    p = moderate_patient(c)
    got = await _sorted_matches(
        synthea, "/Observation", [("patient", c.sid(p)), ("_sort", f"{direction}date"), ("_count", "37")]
    )
    uuids = [c.uuid_of[f"Observation/{r['id']}"] for r in got]
    assert set(uuids) == _obs_of(c, p)
    keys = [date_interval(c.resources[u]["effectiveDateTime"])[0] for u in uuids]
    assert keys == sorted(keys, reverse=direction == "-"), "not in date order"


@pytest.mark.parametrize("direction", ["", "-"])
async def test_sort_by_id(synthea: Loaded, direction: str) -> None:
    c = synthea.corpus
    p = moderate_patient(c)
    got = await _sorted_matches(
        synthea, "/Observation", [("patient", c.sid(p)), ("_sort", f"{direction}_id"), ("_count", "50")]
    )
    ids = [r["id"] for r in got]
    assert {c.uuid_of[f"Observation/{i}"] for i in ids} == _obs_of(c, p)
    assert ids == sorted(ids, reverse=direction == "-")


@pytest.mark.parametrize("direction", ["", "-"])
async def test_sort_by_last_updated(synthea: Loaded, direction: str) -> None:
    got = await _sorted_matches(synthea, "/Patient", [("_sort", f"{direction}_lastUpdated"), ("_count", "25")])
    assert {synthea.corpus.uuid_of[f"Patient/{r['id']}"] for r in got} == set(synthea.corpus.by_type["Patient"])
    stamps = [datetime.fromisoformat(r["meta"]["lastUpdated"].replace("Z", "+00:00")) for r in got]
    assert stamps == sorted(stamps, reverse=direction == "-")


async def test_sort_several_keys(synthea: Loaded) -> None:
    c = synthea.corpus
    got = await _sorted_matches(synthea, "/Patient", [("_sort", "gender,-birthdate"), ("_count", "30")])
    uuids = [c.uuid_of[f"Patient/{r['id']}"] for r in got]
    assert set(uuids) == set(c.by_type["Patient"])
    rows = [(c.resources[u]["gender"], c.resources[u]["birthDate"]) for u in uuids]
    for a, b in zip(rows, rows[1:]):
        assert a[0] < b[0] or (a[0] == b[0] and a[1] >= b[1]), f"{a} before {b}"


async def test_sort_by_birthdate_over_small_pages(synthea: Loaded) -> None:
    c = synthea.corpus
    got = await _sorted_matches(synthea, "/Patient", [("_sort", "birthdate"), ("_count", "7")])
    uuids = [c.uuid_of[f"Patient/{r['id']}"] for r in got]
    assert sorted(uuids) == sorted(c.by_type["Patient"])
    days = [c.resources[u]["birthDate"] for u in uuids]
    assert days == sorted(days)


async def test_sort_by_date_with_filter_and_chain(synthea: Loaded) -> None:
    c = synthea.corpus
    got = await _sorted_matches(
        synthea, "/Observation", [("code", HEIGHT), ("patient.gender", "female"), ("_sort", "-date"), ("_count", "200")]
    )
    uuids = [c.uuid_of[f"Observation/{r['id']}"] for r in got]
    assert set(uuids) == where(
        c, "Observation", lambda r: has_code(r, HEIGHT) and c.resources[obs_patient(c, r)]["gender"] == "female"
    )
    keys = [date_interval(c.resources[u]["effectiveDateTime"])[1] for u in uuids]
    assert keys == sorted(keys, reverse=True)


# -- paging, totals, _summary=count --------------------------------------------------------------------------


async def test_paging_large_result_every_match_once(synthea: Loaded) -> None:
    c = synthea.corpus
    expected = where(c, "Observation", lambda r: has_code(r, f"{OBS_CAT}|vital-signs", "category"))
    assert len(expected) > 10_000
    params = [("category", f"{OBS_CAT}|vital-signs"), ("_count", "500"), ("_total", "accurate")]
    pages = await walk(synthea.client, "/Observation", params)
    seen: list[str] = []
    for n, p in enumerate(pages):
        check_bundle(p)
        matches = entries(p)
        assert len(matches) <= 500
        if n < len(pages) - 1:
            assert len(matches) == 500, f"page {n} is short ({len(matches)}) but has a next link"
        if n == 0:
            assert p.get("total") == len(expected), "_total=accurate"
        else:
            assert p.get("total") in (None, len(expected))
        assert link(p, "self") is not None
        seen.extend(match_uuid(c, e) for e in matches)
    assert len(seen) == len(set(seen)), f"{len(seen) - len(set(seen))} matches repeated over the pages"
    assert set(seen) == expected
    assert len(pages) == -(-len(expected) // 500)


async def test_paging_links_previous_and_first(synthea: Loaded) -> None:
    c = synthea.corpus
    params: list[Any] = [("code", HEIGHT), ("_count", "100")]
    r1 = await synthea.client.get("/Observation", params=params)
    p1 = r1.json()
    assert link(p1, "first") is not None and link(p1, "self") is not None
    assert link(p1, "previous") is None
    p2 = (await synthea.client.get(relative(link(p1, "next")))).json()  # type: ignore[arg-type]
    p3 = (await synthea.client.get(relative(link(p2, "next")))).json()  # type: ignore[arg-type]
    back = (await synthea.client.get(relative(link(p3, "previous")))).json()  # type: ignore[arg-type]
    assert [match_uuid(c, e) for e in entries(back)] == [match_uuid(c, e) for e in entries(p2)]
    first = (await synthea.client.get(relative(link(p3, "first")))).json()  # type: ignore[arg-type]
    assert [match_uuid(c, e) for e in entries(first)] == [match_uuid(c, e) for e in entries(p1)]
    again = (await synthea.client.get(relative(link(p2, "self")))).json()  # type: ignore[arg-type]
    assert [match_uuid(c, e) for e in entries(again)] == [match_uuid(c, e) for e in entries(p2)]


async def test_paging_links_are_cursors_not_offsets(synthea: Loaded) -> None:
    """The issue asks for an opaque cursor in next/previous links, not an offset into the result."""
    r = await synthea.client.get("/Observation", params=[("code", HEIGHT), ("_count", "100")])
    nxt = link(r.json(), "next")
    assert nxt is not None
    assert "_offset" not in nxt and "offset=" not in nxt, nxt


@pytest.mark.parametrize(
    "path,params,builder",
    [
        ("/Observation", [("code", HEIGHT)], lambda c: where(c, "Observation", lambda r: has_code(r, HEIGHT))),
        ("/Patient", [("gender", "female")], lambda c: where(c, "Patient", lambda r: r["gender"] == "female")),
        (
            "/Observation",
            [("patient.gender", "male"), ("code", WEIGHT)],
            lambda c: where(
                c, "Observation", lambda r: has_code(r, WEIGHT) and c.resources[obs_patient(c, r)]["gender"] == "male"
            ),
        ),
        (
            "/Patient",
            [("_has:Condition:patient:code", f"{SNOMED}|840539006")],
            lambda c: _patients_with(c, "Condition", f"{SNOMED}|840539006"),
        ),
        ("/Encounter", [("class", "EMER")], lambda c: where(c, "Encounter", lambda r: r["class"]["code"] == "EMER")),
    ],
    ids=["obs-code", "patient-gender", "chain", "has", "encounter-class"],
)
async def test_summary_count(
    synthea: Loaded, path: str, params: list[Any], builder: Callable[[Corpus], set[str]]
) -> None:
    r = await synthea.client.get(path, params=params + [("_summary", "count")])
    assert r.status_code == 200, r.text[:2000]
    b = r.json()
    check_bundle(b)
    assert b["total"] == len(builder(synthea.corpus))
    assert not entries(b, None), "_summary=count returns no entries"


@pytest.mark.parametrize("count", ["10", "0"])
async def test_total_accurate(synthea: Loaded, count: str) -> None:
    c = synthea.corpus
    r = await synthea.client.get("/Observation", params=[("code", WEIGHT), ("_total", "accurate"), ("_count", count)])
    assert r.status_code == 200, r.text[:2000]
    b = r.json()
    assert b["total"] == len(where(c, "Observation", lambda r: has_code(r, WEIGHT)))
    assert len(entries(b)) == int(count)


async def test_total_none_has_no_total(synthea: Loaded) -> None:
    r = await synthea.client.get("/Observation", params=[("code", WEIGHT), ("_total", "none"), ("_count", "5")])
    assert r.status_code == 200
    assert "total" not in r.json()
    assert len(entries(r.json())) == 5


async def test_concurrent_searches_agree(synthea: Loaded) -> None:
    """Several searches at once (chains, _has, dates) give the same answers as one at a time."""
    c = synthea.corpus
    names = ["chain-patient-gender", "patient-has-two-conditions", "obs-date-ge-day", "obs-value-ge-le-and"]
    cases = [CASES[n](c) for n in names]
    results = await asyncio.gather(*(run_search(synthea.client, c, k, count=300) for k in cases))
    for k, (got, _) in zip(cases, results):
        may = k.may if k.may is not None else k.must
        assert k.must <= set(got) <= may


async def test_paging_sorted_with_many_ties(synthea: Loaded) -> None:
    """Cursor paging over a sort key with many ties (vital signs share their timestamps): every
    match exactly once, and in order."""
    c = synthea.corpus
    expected = where(c, "Observation", lambda r: has_code(r, f"{OBS_CAT}|vital-signs", "category"))
    got = await _sorted_matches(
        synthea, "/Observation", [("category", f"{OBS_CAT}|vital-signs"), ("_sort", "-date"), ("_count", "500")]
    )
    uuids = [c.uuid_of[f"Observation/{r['id']}"] for r in got]
    assert len(uuids) == len(set(uuids)) and set(uuids) == expected
    keys = [date_interval(c.resources[u]["effectiveDateTime"])[0] for u in uuids]
    assert keys == sorted(keys, reverse=True)


async def test_sort_by_quantity_descending(synthea: Loaded) -> None:
    c = synthea.corpus
    got = await _sorted_matches(
        synthea, "/Observation", [("code", WEIGHT), ("_sort", "-value-quantity"), ("_count", "300")]
    )
    uuids = [c.uuid_of[f"Observation/{r['id']}"] for r in got]
    assert set(uuids) == where(c, "Observation", lambda r: has_code(r, WEIGHT))
    values = [value_of(c.resources[u]) for u in uuids]
    assert values == sorted(values, reverse=True)  # type: ignore[type-var]
