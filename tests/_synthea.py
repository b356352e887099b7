"""Loading the Synthea sample (../shared/data/synthea-120) into a server, and an independent model
of the same data to compute search expectations from the raw JSON.

Synthea bundles create every resource with POST, so the server assigns the ids. The
transaction/batch responses give, entry by entry, the ``Type/id`` the server chose; that is the only
thing taken from the server. Expectations are computed here from the raw input (by Synthea uuid)
and the server's answers are mapped back to uuids the same way, so both sides are compared as
sets (or sequences) of Synthea uuids.

Raw references in the input are of three kinds, all resolved here without the server:
``urn:uuid:X`` (an entry of the same bundle), ``Type?identifier=system|value`` (conditional
references to the ``0-…`` files) and ``#contained``.
"""

from __future__ import annotations

import asyncio
import bz2
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import parse_qsl, urlsplit

import httpx
import orjson

# Dates without a zone are China Standard Time (README, fhir_server/search/extract.py LOCAL_TZ).
LOCAL_TZ = timezone(timedelta(hours=8))


# -- loading -------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """The raw Synthea resources and the server ids they were given."""

    resources: dict[str, dict[str, Any]] = field(default_factory=dict)  # uuid -> raw resource
    by_type: dict[str, list[str]] = field(default_factory=dict)  # type -> uuids (input order)
    server_ref: dict[str, str] = field(default_factory=dict)  # uuid -> "Type/serverid"
    uuid_of: dict[str, str] = field(default_factory=dict)  # "Type/serverid" -> uuid
    by_identifier: dict[tuple[str, str], str] = field(default_factory=dict)  # (type, "sys|val") -> uuid
    started: datetime = field(default_factory=lambda: datetime.now(timezone.utc))  # before the first write
    load_seconds: float = 0.0
    loaded_resources: int = 0

    # -- references in the raw data --

    def resolve(self, ref: Any) -> str | None:
        """The uuid a raw Reference points to (None when it is contained, logical or unknown)."""
        if not isinstance(ref, dict):
            return None
        text = ref.get("reference")
        if not isinstance(text, str):
            return None
        if text.startswith("urn:uuid:"):
            u = text[len("urn:uuid:") :]
            return u if u in self.resources else None
        if "?" in text:
            type_, query = text.split("?", 1)
            params = dict(parse_qsl(query))
            ident = params.get("identifier")
            if ident is None:
                return None
            return self.by_identifier.get((type_, ident))
        return None

    def type_of(self, u: str) -> str:
        return self.resources[u]["resourceType"]

    def of_type(self, type_: str) -> list[tuple[str, dict[str, Any]]]:
        return [(u, self.resources[u]) for u in self.by_type.get(type_, [])]

    def sid(self, u: str) -> str:
        """The server id of a Synthea uuid."""
        return self.server_ref[u].split("/", 1)[1]


def synthea_files(folder: Path) -> tuple[list[Path], list[Path]]:
    files = sorted(folder.glob("*.json.bz2"))
    first = [f for f in files if f.name.startswith("0-")]
    rest = [f for f in files if not f.name.startswith("0-")]
    return first, rest


def _location_ref(location: str) -> str:
    # "Type/id/_history/n" (maybe absolute) -> "Type/id"
    path = urlsplit(location).path if "://" in location else location
    parts = [p for p in path.split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:])


async def load_synthea(client: httpx.AsyncClient, folder: Path, concurrency: int = 6) -> Corpus:
    """POST every bundle (``0-…`` first, then the rest ``concurrency`` at a time) and build the corpus."""
    corpus = Corpus(started=datetime.now(timezone.utc))
    first, rest = synthea_files(folder)
    started = time.monotonic()

    def read(path: Path) -> tuple[bytes, dict[str, Any]]:
        data = bz2.decompress(path.read_bytes())
        return data, orjson.loads(data)

    def register(doc: dict[str, Any]) -> None:
        for e in doc["entry"]:
            r = e["resource"]
            full = e.get("fullUrl", "")
            u = full[len("urn:uuid:") :] if full.startswith("urn:uuid:") else r["id"]
            corpus.resources[u] = r
            corpus.by_type.setdefault(r["resourceType"], []).append(u)
            for ident in r.get("identifier") or []:
                if isinstance(ident, dict) and "system" in ident and "value" in ident:
                    corpus.by_identifier.setdefault((r["resourceType"], f"{ident['system']}|{ident['value']}"), u)

    async def post(path: Path, data: bytes, doc: dict[str, Any]) -> None:
        r = await client.post(
            "",
            content=data,
            headers={"Content-Type": "application/fhir+json", "Prefer": "return=minimal"},
        )
        assert r.status_code == 200, f"{path.name}: {r.status_code} {r.text[:2000]}"
        answer = r.json()
        entries = answer.get("entry") or []
        assert len(entries) == len(doc["entry"]), f"{path.name}: {len(entries)} response entries"
        for sent, got in zip(doc["entry"], entries):
            status = got["response"]["status"]
            assert status.startswith(("200", "201")), f"{path.name}: entry {status}: {orjson.dumps(got)[:1000]!r}"
            full = sent.get("fullUrl", "")
            u = full[len("urn:uuid:") :] if full.startswith("urn:uuid:") else sent["resource"]["id"]
            ref = _location_ref(got["response"]["location"])
            corpus.server_ref[u] = ref
            corpus.uuid_of[ref] = u
            corpus.loaded_resources += 1

    for path in first:
        data, doc = read(path)
        register(doc)
        await post(path, data, doc)

    sem = asyncio.Semaphore(concurrency)

    async def one(path: Path) -> None:
        async with sem:
            data, doc = await asyncio.to_thread(read, path)
            register(doc)
            await post(path, data, doc)

    await asyncio.gather(*(one(p) for p in rest))
    corpus.load_seconds = time.monotonic() - started
    return corpus


# -- reading the server's answers -----------------------------------------------------------------


def entries(bundle: dict[str, Any], mode: str | None = "match") -> list[dict[str, Any]]:
    return [e for e in bundle.get("entry") or [] if mode is None or (e.get("search") or {}).get("mode") == mode]


def link(bundle: dict[str, Any], relation: str) -> str | None:
    for item in bundle.get("link") or []:
        if item.get("relation") == relation:
            return item.get("url")
    return None


def relative(url: str, base: str = "http://testserver/fhir") -> str:
    """A link of the server made relative to the client's base URL."""
    assert url.startswith(base), url
    return url[len(base) :]


async def walk(
    client: httpx.AsyncClient, first_url: str, params: Any = None, max_pages: int = 1000
) -> list[dict[str, Any]]:
    """Every page of a search, following ``next`` links."""
    r = await client.get(first_url, params=params)
    assert r.status_code == 200, r.text[:2000]
    pages = [r.json()]
    while (nxt := link(pages[-1], "next")) is not None:
        assert len(pages) < max_pages, "too many pages"
        r = await client.get(relative(nxt))
        assert r.status_code == 200, r.text[:2000]
        pages.append(r.json())
    return pages


# -- an independent model of FHIR search values --------------------------------------------------

_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$")


def _zone(tz: str | None) -> timezone:
    if not tz:
        return LOCAL_TZ
    if tz == "Z":
        return timezone.utc
    sign = 1 if tz[0] == "+" else -1
    return timezone(sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])))


def date_interval(text: str) -> tuple[datetime, datetime]:
    """The half-open instant interval [lo, hi) that a FHIR date/dateTime/instant denotes
    (search.html#date: the implicit range of its precision)."""
    m = _DATE.match(text)
    if m is None:
        raise ValueError(text)
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    zone = _zone(tz)
    if hh is not None:
        lo = datetime(int(y), int(mo), int(d), int(hh), int(mi), int(ss or 0), tzinfo=zone)
        if frac:
            digits = frac[1:]
            lo += timedelta(microseconds=int(Decimal("0." + digits) * 1_000_000))
            hi = lo + timedelta(microseconds=int(Decimal(1).scaleb(-len(digits)) * 1_000_000))
        elif ss is None:
            hi = lo + timedelta(minutes=1)
        else:
            hi = lo + timedelta(seconds=1)
    elif d is not None:
        lo = datetime(int(y), int(mo), int(d), tzinfo=zone)
        hi = lo + timedelta(days=1)
    elif mo is not None:
        lo = datetime(int(y), int(mo), 1, tzinfo=zone)
        hi = datetime(int(y) + (int(mo) == 12), int(mo) % 12 + 1, 1, tzinfo=zone)
    else:
        lo = datetime(int(y), 1, 1, tzinfo=zone)
        hi = datetime(int(y) + 1, 1, 1, tzinfo=zone)
    return lo, hi


FAR_PAST = datetime(1, 1, 1, tzinfo=timezone.utc)
FAR_FUTURE = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)


def period_interval(period: dict[str, Any]) -> tuple[datetime, datetime]:
    lo = date_interval(period["start"])[0] if period.get("start") else FAR_PAST
    hi = date_interval(period["end"])[1] if period.get("end") else FAR_FUTURE
    return lo, hi


def date_matches(
    prefix: str, target: tuple[datetime, datetime], search: tuple[datetime, datetime]
) -> tuple[bool, bool]:
    """(must, may): whether a target range matches a search range for a prefix.

    ``must`` is the strict reading of the R4 prefix table (search.html#prefix); ``may`` also
    accepts the looser, widely used overlap reading of ge/le (target reaches into or beyond the
    search range). Where both readings agree must == may. ``ap`` is left to the server (None)."""
    tlo, thi = target
    slo, shi = search
    contained = slo <= tlo and thi <= shi
    if prefix == "eq":
        return contained, contained
    if prefix == "ne":
        return not contained, not contained
    if prefix == "gt":
        return thi > shi, thi > shi
    if prefix == "lt":
        return tlo < slo, tlo < slo
    if prefix == "ge":
        strict = thi > shi or contained
        return strict, strict or thi > slo
    if prefix == "le":
        strict = tlo < slo or contained
        return strict, strict or tlo < shi
    if prefix == "sa":
        return tlo >= shi, tlo >= shi
    if prefix == "eb":
        return thi <= slo, thi <= slo
    raise ValueError(prefix)


def number_matches(prefix: str, value: Decimal, search: str) -> tuple[bool, bool]:
    """(must, may) for a number/quantity value against a search number ``search`` (no prefix).

    eq/ne use the implicit range of the search value's precision (search.html#number:
    ``5.4`` means [5.35, 5.45)). For gt/lt/ge/le, values inside that implicit range are
    ambiguous (the exact reading and the range reading may differ): they are in ``must`` only
    when both readings agree."""
    d = Decimal(search)
    exp = d.as_tuple().exponent
    assert isinstance(exp, int)
    half = Decimal(5).scaleb(exp - 1)
    lo, hi = d - half, d + half
    inside = lo <= value < hi
    if prefix == "eq":
        return inside, inside
    if prefix == "ne":
        return not inside, not inside
    exact = {"gt": value > d, "lt": value < d, "ge": value >= d, "le": value <= d}[prefix]
    if inside:
        # range reading: gt/lt exclude the implicit range, ge/le include it (they are "or eq")
        if prefix in ("ge", "le"):
            return exact, True
        return False, exact
    return exact, exact


def norm(text: str) -> str:
    """Case- and accent-insensitive form (search.html#string)."""
    import unicodedata

    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def human_name_parts(names: Iterable[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for n in names or []:
        for key in ("text", "family"):
            if isinstance(n.get(key), str):
                out.append(n[key])
        for key in ("given", "prefix", "suffix"):
            out.extend(x for x in n.get(key) or [] if isinstance(x, str))
    return out


def string_starts(values: Iterable[str], query: str) -> bool:
    q = norm(query)
    return any(norm(v).startswith(q) for v in values)


def codings(concept: Any) -> list[tuple[str | None, str]]:
    if isinstance(concept, list):
        return [c for item in concept for c in codings(item)]
    if not isinstance(concept, dict):
        return []
    return [(c.get("system"), c["code"]) for c in concept.get("coding") or [] if "code" in c]


def token_matches(concept: Any, query: str) -> bool:
    """code / system|code / |code / system| against a CodeableConcept (or list of them)."""
    pairs = codings(concept)
    if "|" not in query:
        return any(code == query for _, code in pairs)
    system, code = query.split("|", 1)
    if system == "":
        return any(s is None and c == code for s, c in pairs)
    if code == "":
        return any(s == system for s, _ in pairs)
    return any(s == system and c == code for s, c in pairs)


def effective_interval(resource: dict[str, Any], *keys: str) -> tuple[datetime, datetime] | None:
    for key in keys:
        v = resource.get(key)
        if isinstance(v, str):
            return date_interval(v)
        if isinstance(v, dict) and ("start" in v or "end" in v):
            return period_interval(v)
    return None
