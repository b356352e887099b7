"""The searches the search benchmark sends, and for each the raw PyMongo work giving the same answer.

The raw equivalents read the server's own documents (``{_id, v, t, d, r, s}``, search values in
``s`` as ``fhir_server/search/extract.py`` writes them) with the synchronous driver, one at a time,
and are written as one would by hand: the ceiling of what a server on this database can do. They
know two facts of the storage: a deleted resource is kept with an empty ``s``, so a condition on a
search value needs no ``d: false`` (which would cost a document fetch per match); and the ``count``
command counts from an index alone where it can, which ``count_documents`` (an aggregation) cannot.
A chain becomes two queries (the referenced ids, then the referring resources); ``_has`` a
``distinct`` then a page; ``_include`` a page then the referenced resources.
"""

from __future__ import annotations

import random
import statistics
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any, Callable
from urllib.parse import quote

import orjson
from pymongo.database import Database

from _search_http import stats_ms
from fhir_server.search.extract import normalize_string

LOINC = "http://loinc.org"
PAGE = 50  # the server's default _count
_LOCAL_TZ = timezone(timedelta(hours=8))  # dates without a zone are China Standard Time (extract.py)
_FIELDS = {"v": 1, "t": 1, "d": 1, "r": 1}  # what the server reads for a page


@dataclass
class RawAnswer:
    """The same facts as a searchset Bundle: match ids, included ids, total (None: not counted)."""

    matches: list[str]
    included: list[str] = field(default_factory=list)
    total: int | None = None


RawQuery = Callable[[Database], RawAnswer]


@dataclass
class Query:
    """One measured search: HTTP paths (round-robin) and the raw queries for the same answers."""

    name: str
    label: str
    paths: list[str]
    raw: list[RawQuery]
    explain: Callable[[Database], dict[str, Any]] | None = None


@dataclass
class Values:
    """Query values drawn from the loaded data (at 1×, then reused at every scale)."""

    codes: list[str]  # the most common Observation LOINC codes, most common first
    families: list[str]
    years: list[int]


def pick_values(db: Database, *, codes: int = 20, families: int = 20, seed: int = 7) -> Values:
    top = db.Observation.aggregate([
        {"$match": {"d": False}}, {"$project": {"c": "$s.code"}}, {"$unwind": "$c"},
        {"$match": {"c": {"$regex": "^" + re.escape(LOINC + "|")}}},
        {"$group": {"_id": "$c", "n": {"$sum": 1}}}, {"$sort": {"n": -1, "_id": 1}}, {"$limit": codes},
    ])
    code_list = [row["_id"].split("|", 1)[1] for row in top]
    names = sorted({n["name"][0]["family"] for n in (orjson.loads(d["r"]) for d in db.Patient.find({"d": False}, {"r": 1}))
                    if n.get("name") and isinstance(n["name"][0].get("family"), str)})
    rng = random.Random(seed)
    return Values(code_list, rng.sample(names, min(families, len(names))), list(range(2011, 2021)))


# -- raw building blocks -----------------------------------------------------------------------


def _live(filter_: dict[str, Any]) -> dict[str, Any]:
    """``filter_`` restricted to live resources: as is when it asks for a search value."""
    return filter_ if any(k.startswith("s.") for k in filter_) else {**filter_, "d": False}


def _count_live(db: Database, type_: str, filter_: dict[str, Any]) -> int:
    return int(db.command("count", type_, query=_live(filter_))["n"])


def _page(db: Database, type_: str, filter_: dict[str, Any], count: int, with_total: bool,
          fields: dict[str, int] = _FIELDS) -> tuple[list[dict[str, Any]], int | None]:
    """A first page sorted by _id as the server sorts, and the total when there is a next page."""
    docs = list(db[type_].find(_live(filter_), fields).sort("_id", 1).limit(count + 1))
    if len(docs) <= count:
        return docs, len(docs)
    return docs[:count], _count_live(db, type_, filter_) if with_total else None


def _ids(type_: str, docs: list[dict[str, Any]]) -> list[str]:
    return [f"{type_}/{d['_id']}" for d in docs]


def _referring(db: Database, type_: str, filter_: dict[str, Any], with_total: bool, count: int = PAGE) -> RawAnswer:
    docs, total = _page(db, type_, filter_, count, with_total)
    return RawAnswer(_ids(type_, docs), total=total)


def _patients(db: Database, filter_: dict[str, Any]) -> list[str]:
    return [f"Patient/{d['_id']}" for d in db.Patient.find(_live(filter_), {"_id": 1})]


def _year(year: int) -> tuple[datetime, datetime]:
    return datetime(year, 1, 1, tzinfo=_LOCAL_TZ), datetime(year + 1, 1, 1, tzinfo=_LOCAL_TZ)


def _token(code: str) -> dict[str, Any]:
    return {"s.code": f"{LOINC}|{code}"}


def _date(year: int) -> dict[str, Any]:
    lo, hi = _year(year)
    # date=geY-01-01&date=lt(Y+1)-01-01: the stored range ends on/after lo and starts before hi.
    return {"s.date": {"$elemMatch": {"hi": {"$gte": lo}, "lo": {"$lt": hi}}}}


def _has(db: Database, code: str, with_total: bool) -> RawAnswer:
    refs = db.Observation.distinct("s.patient", {"s.code": code})
    ids = [r[8:] for r in refs if r.startswith("Patient/")]
    return _referring(db, "Patient", {"_id": {"$in": ids}}, with_total)


def _include(db: Database, with_total: bool) -> RawAnswer:
    docs, total = _page(db, "Encounter", {}, PAGE, with_total, {**_FIELDS, "s.patient": 1})
    refs = {r[8:] for d in docs for r in (d.get("s") or {}).get("patient", []) if r.startswith("Patient/")}
    included = list(db.Patient.find(_live({"_id": {"$in": sorted(refs)}}), _FIELDS))
    return RawAnswer(_ids("Encounter", docs), _ids("Patient", included), total)


def _revinclude(db: Database, with_total: bool) -> RawAnswer:
    docs, total = _page(db, "Patient", {}, 20, with_total)
    refs = [f"Patient/{d['_id']}" for d in docs]
    included = list(db.Encounter.find({"s.patient": {"$in": refs}}, _FIELDS))
    return RawAnswer(_ids("Patient", docs), _ids("Encounter", included), total)


def _explain(type_: str, filter_: dict[str, Any]) -> Callable[[Database], dict[str, Any]]:
    def run(db: Database) -> dict[str, Any]:
        return plan_summary(db[type_].find(_live(filter_), _FIELDS).sort("_id", 1).limit(PAGE + 1).explain())

    return run


def _explain_count(filter_: dict[str, Any]) -> Callable[[Database], dict[str, Any]]:
    def run(db: Database) -> dict[str, Any]:
        command = {"count": "Observation", "query": _live(filter_)}
        return plan_summary(db.command("explain", command, verbosity="executionStats"))

    return run


def plan_summary(explained: dict[str, Any]) -> dict[str, Any]:
    """The winning plan as ``LIMIT < FETCH < IXSCAN(index)`` and what it examined."""
    stages, node = [], explained.get("queryPlanner", {}).get("winningPlan", {})
    node = node.get("queryPlan", node)  # the slot-based engine nests the plan one level deeper
    while node:
        stages.append(node.get("stage", "?") + (f"({node['indexName']})" if node.get("indexName") else ""))
        node = node.get("inputStage") or (node.get("inputStages") or [None])[0]
    stats = explained.get("executionStats", {})
    return {"plan": " < ".join(stages), "keys_examined": stats.get("totalKeysExamined"),
            "docs_examined": stats.get("totalDocsExamined"), "returned": stats.get("nReturned")}


# -- the catalogue ----------------------------------------------------------------------------


def _q(text: str) -> str:
    return quote(text, safe="=&:.-_")


def _chain_gender(db: Database, code: str, with_total: bool) -> RawAnswer:
    patients = _patients(db, {"s.gender": "female"})
    return _referring(db, "Observation", {"s.patient": {"$in": patients}, "s.code": code}, with_total)


def _chain_family(db: Database, family: str, with_total: bool) -> RawAnswer:
    patients = _patients(db, {"s.family.n": {"$regex": "^" + re.escape(normalize_string(family))}})
    return _referring(db, "Observation", {"s.subject": {"$in": patients}}, with_total)


def _count(db: Database, filter_: dict[str, Any]) -> RawAnswer:
    return RawAnswer([], total=_count_live(db, "Observation", filter_))


def catalogue(v: Values, *, with_total: bool = True) -> list[Query]:
    """The latency-measured searches (paging is measured apart). ``with_total``: the raw page also
    counts the matches when there is a next page, as the server's Bundle carries ``total``."""
    top, t = v.codes[0], with_total
    return [
        Query("token", "token search, first page: Observation?code=loinc|X",
              [f"/fhir/Observation?code={_q(LOINC + '|' + c)}" for c in v.codes],
              [partial(_referring, type_="Observation", filter_=_token(c), with_total=t) for c in v.codes],
              _explain("Observation", _token(top))),
        Query("date", "date range, first page: Observation?date=geY&date=lt(Y+1)",
              [f"/fhir/Observation?date=ge{y}-01-01&date=lt{y + 1}-01-01" for y in v.years],
              [partial(_referring, type_="Observation", filter_=_date(y), with_total=t) for y in v.years],
              _explain("Observation", _date(v.years[len(v.years) // 2]))),
        Query("chain_gender", "chained: Observation?patient.gender=female&code=X",
              [f"/fhir/Observation?patient.gender=female&code={_q(c)}" for c in v.codes],
              [partial(_chain_gender, code=c, with_total=t) for c in v.codes]),
        Query("chain_family", "chained: Observation?subject:Patient.family=F",
              [f"/fhir/Observation?subject:Patient.family={_q(f)}" for f in v.families],
              [partial(_chain_family, family=f, with_total=t) for f in v.families]),
        Query("has", "_has: Patient?_has:Observation:patient:code=X",
              [f"/fhir/Patient?_has:Observation:patient:code={_q(c)}" for c in v.codes],
              [partial(_has, code=c, with_total=t) for c in v.codes]),
        Query("count_all", "_summary=count: Observation?_summary=count",
              ["/fhir/Observation?_summary=count"], [partial(_count, filter_={})], _explain_count({})),
        Query("count_code", "_summary=count: Observation?code=X&_summary=count (most common code)",
              [f"/fhir/Observation?code={_q(top)}&_summary=count"],
              [partial(_count, filter_={"s.code": top})], _explain_count({"s.code": top})),
        Query("include", "_include: Encounter?_include=Encounter:patient&_count=50",
              ["/fhir/Encounter?_include=Encounter:patient&_count=50"], [partial(_include, with_total=t)]),
        Query("revinclude", "_revinclude: Patient?_revinclude=Encounter:patient&_count=20",
              ["/fhir/Patient?_revinclude=Encounter:patient&_count=20"], [partial(_revinclude, with_total=t)]),
    ]


# -- measuring the raw side -------------------------------------------------------------------


def raw_latency(db: Database, raw: list[RawQuery], *, requests: int, budget: float) -> tuple[dict[str, Any], RawAnswer]:
    """Like the HTTP side: one unmeasured pass, then round-robin up to ``requests`` or ``budget`` s."""
    warm_until = time.perf_counter() + budget
    first = []
    for fn in raw[:20]:
        first.append(fn(db))
        if time.perf_counter() > warm_until:
            break
    times: list[float] = []
    totals: list[tuple[int, float]] = []
    deadline = time.perf_counter() + budget
    i = 0
    while len(times) < requests and (time.perf_counter() < deadline or not times):
        fn = raw[i % len(raw)]
        i += 1
        t0 = time.perf_counter()
        answer = fn(db)
        seconds = time.perf_counter() - t0
        times.append(seconds)
        if answer.total is not None and not answer.matches:
            totals.append((answer.total, seconds))
    out: dict[str, Any] = {"requests": len(times), **stats_ms(times)}
    if totals:
        out["matches_per_s"] = round(statistics.median(n / s for n, s in totals))
    return out, first[0]


def raw_paging(db: Database, target: int) -> dict[str, Any]:
    """One cursor over the Observations in _id order, reading ``target`` raw documents."""
    t0 = time.perf_counter()
    n = 0
    for doc in db.Observation.find({"d": False}, _FIELDS).sort("_id", 1).batch_size(1000).limit(target):
        n += len(doc["r"]) > 0
    seconds = time.perf_counter() - t0
    return {"resources": n, "seconds": round(seconds, 3), "resources_per_s": round(n / seconds) if seconds else 0}
