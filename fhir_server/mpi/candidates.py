"""Blocking and candidate scoring: which golden Patients could a record belong to, and how well.

Blocking costs two indexed queries, never a scan. The first finds SOURCE Patients (golden ones are
skipped: a golden is compared through its sources) that share, through the server's own search
parameters (fhir_server/search, the pinyin index of ``phonetic``):

- the valid 身份证 number (``identifier``), the deterministic match; or
- the birth year and the sound of the name (``birthdate=YYYY`` + ``phonetic``: catches 同音字
  typos and mistyped days or months),
- birth date and a phone, the sound of the name and a phone (a mistyped birth date),
- birth date and the family name (a child renamed, a non-homophone typo in the given name).

The second reads every source of the goldens those hit (``link=Patient/<golden>``), so a record
is scored against all of a resident's records, not just the one the block found; a golden's score
is its best source's. A golden holding a different valid 身份证 number is ``certainly-not``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import orjson

from fhir_server.mpi.golden import golden_of, is_golden
from fhir_server.mpi.match import Comparison, Demographics, compare, demographics
from fhir_server.search.pinyin import pinyin_keys
from fhir_server.search.query import compile_search
from fhir_server.storage.base import Store, Stored, UnitOfWork
from fhir_server.validation.cn_identity import ID_CARD_SYSTEM, birth_date

_BLOCK_LIMIT = 300
_SOURCES_LIMIT = 2000


# The reads the MPI needs: a Store (outside a transaction) or a UnitOfWork (inside one).
Reader = Store | UnitOfWork


@dataclass(frozen=True)
class Candidate:
    golden: str
    comparison: Comparison
    source: str  # the source Patient that scored best

    @property
    def score(self) -> float:
        return self.comparison.score


async def _filter(reader: Reader, query: list[tuple[str, str]], type_: str = "Patient") -> dict[str, Any]:
    """The database filter of a search, compiled by the server's own search layer."""
    compiled = await compile_search(type_, query, lookup=reader, default_count=10, max_count=1000)  # type: ignore[arg-type]
    return compiled.filter


def _full_readings(name: str) -> list[str]:
    keys = list(pinyin_keys(name))
    return keys[: max(1, len(keys) // 2)]  # full readings come first, then the initials


def block_keys(demo: Demographics) -> list[str]:
    """Lock keys: any two records that some blocking branch can pair share one of them (the
    birth date or the sound of the name; the ID number when it disagrees with the birth date), so
    locking them serialises the links of one resident's records."""
    keys = []
    if demo.birth_date:
        keys.append(f"dob:{demo.birth_date}")
    if demo.name:
        keys += [f"py:{r}" for r in _full_readings(demo.name)[:1]]
    if not keys:
        keys += [f"tel:{p}" for p in sorted(demo.phones)]
    if demo.id_number:
        d = birth_date(demo.id_number)
        if d is None or d.isoformat() != demo.birth_date:
            keys.append(f"id:{demo.id_number}")
    return keys


async def block(reader: Reader, demo: Demographics, exclude: set[str]) -> list[dict[str, Any]]:
    """Linked source Patients that share a blocking key with ``demo``."""
    branches: list[list[tuple[str, str]]] = []
    if demo.id_number:
        branches.append([("identifier", f"{ID_CARD_SYSTEM}|{demo.id_number}")])
    sounds = ",".join(_full_readings(demo.name)) if demo.name else ""
    phones = ",".join(sorted(demo.phones))
    if demo.birth_date and sounds:
        # The year, not the day: a mistyped day or month still meets the same sound.
        branches.append([("birthdate", demo.birth_date[:4]), ("phonetic", sounds)])
    if demo.birth_date and phones:
        branches.append([("birthdate", demo.birth_date), ("phone", phones)])
    if sounds and phones:
        branches.append([("phonetic", sounds), ("phone", phones)])
    if demo.birth_date and demo.family:
        branches.append([("birthdate", demo.birth_date), ("family:exact", demo.family)])
    if not branches:
        return []
    filters = [await _filter(reader, b) for b in branches]
    rows = await reader.find("Patient", {"$or": filters} if len(filters) > 1 else filters[0], limit=_BLOCK_LIMIT)
    out = []
    for row in rows:
        if row.raw is None or row.id in exclude:
            continue
        patient = orjson.loads(row.raw)
        if not is_golden(patient) and golden_of(patient):
            out.append(patient)
    return out


Source = tuple[Stored, dict[str, Any]]  # a source Patient's current version and its JSON


async def sources_of(reader: Reader, golden_ids: Sequence[str]) -> dict[str, list[Source]]:
    """The live source Patients linked to each golden (by their ``refer`` link)."""
    if not golden_ids:
        return {}
    flt = await _filter(reader, [("link", ",".join(f"Patient/{g}" for g in golden_ids))])
    out: dict[str, list[Source]] = {g: [] for g in golden_ids}
    for row in await reader.find("Patient", flt, limit=_SOURCES_LIMIT):
        if row.raw is None:
            continue
        patient = orjson.loads(row.raw)
        g = golden_of(patient)
        if g in out and not is_golden(patient):
            out[g].append((row, patient))
    return out


def best_of(demo: Demographics, sources: list[dict[str, Any]], golden_id: str) -> Candidate | None:
    """The golden's candidacy: its best source, or certainly-not on a conflicting valid ID."""
    best: Candidate | None = None
    for s in sources:
        c = compare(demo, demographics(s))
        if c.certain is False:
            return Candidate(golden_id, c, s["id"])
        if best is None or c.certain or (not best.comparison.certain and c.weight > best.comparison.weight):
            best = Candidate(golden_id, c, s["id"])
    return best


async def candidates(reader: Reader, demo: Demographics, exclude: set[str]) -> tuple[list[Candidate], dict[str, Source]]:
    """Every golden the blocks reach, best first (an ID match first of all), and the source
    Patients read on the way (by id), which a link reuses instead of reading them again."""
    hits = await block(reader, demo, exclude)
    goldens = list(dict.fromkeys(g for g in (golden_of(p) for p in hits) if g))
    by_golden = await sources_of(reader, goldens)
    out = []
    seen: dict[str, Source] = {}
    for g, sources in by_golden.items():
        seen.update((row.id, (row, p)) for row, p in sources)
        c = best_of(demo, [p for _, p in sources if p.get("id") not in exclude], g)
        if c is not None:
            out.append(c)
    out.sort(key=lambda c: (c.comparison.certain is True, c.comparison.weight), reverse=True)
    return out, seen
