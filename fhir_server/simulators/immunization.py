"""A runnable 免疫规划 upstream: the provincial platform's gzip XML pages over HTTP.

``GET /children?since=<seq>&limit=<n>`` with ``Authorization: Bearer <token>`` answers the next
``n`` deliveries of the change log after watermark ``since`` as gzip-compressed XML
(``children/child/inoculations/inoculation``, ``child/aefis/aefi``) with headers ``X-Next-Since``,
``X-Has-More`` and ``X-Total`` (deliveries left after ``since``).

The change log is deterministic for (seed, children) and plants what real feeds do: children
without an ID number yet, AEFIs, re-sent records, later snapshots with new doses, corrected lots,
stale snapshots arriving after newer ones (out of order), and malformed records (bad ID check
digit, missing name, impossible dates, an unknown vaccine code, a missing lot number).
``truth`` holds the expected outcome counts of a full sync, from that plan.

Faults for transport tests (:class:`Faults`): every n-th request a 503, every n-th request slow
(a client timeout), or a persistent failure after k pages (an interrupted sync).
"""

from __future__ import annotations

import datetime as _dt
import gzip
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any
from xml.sax.saxutils import escape

from fhir_server.simulators import _http
from fhir_server.simulators.population import DISTRICTS, Child, Population

# (vaccine code, dose, age in days, programme?, site code, manufacturer codes)
SCHEDULE: tuple[tuple[str, int, int, bool, str, tuple[str, ...]], ...] = (
    ("0101", 1, 0, True, "2", ("08", "07")),
    ("0201", 1, 0, True, "6", ("02", "04")),
    ("0101", 2, 30, True, "2", ("08", "07")),
    ("0303", 1, 60, True, "3", ("09", "05")),
    ("0303", 2, 90, True, "3", ("09", "05")),
    ("0401", 1, 90, True, "4", ("03", "06")),
    ("0311", 1, 120, True, "5", ("01", "05")),
    ("0401", 2, 120, True, "4", ("03", "06")),
    ("0401", 3, 150, True, "4", ("03", "06")),
    ("0101", 3, 180, True, "2", ("08", "07")),
    ("1701", 1, 180, True, "1", ("06", "10")),
    ("1401", 1, 240, True, "1", ("02", "01")),
    ("1601", 1, 240, True, "1", ("04", "03")),
    ("1701", 2, 270, True, "1", ("06", "10")),
    ("1201", 1, 540, True, "1", ("01", "02")),
    ("0401", 4, 540, True, "1", ("03", "06")),
    ("1901", 1, 540, True, "1", ("05", "02")),
    ("1601", 2, 730, True, "1", ("04", "03")),
    ("1801", 1, 1095, True, "1", ("10", "06")),
    ("0311", 2, 1460, True, "5", ("01", "05")),
    ("1801", 2, 2190, True, "2", ("10", "06")),
)
OPTIONAL: tuple[tuple[str, int, int, bool, str, tuple[str, ...]], ...] = (
    ("2301", 1, 60, False, "4", ("10",)),
    ("2301", 2, 90, False, "4", ("10",)),
    ("2301", 3, 120, False, "4", ("10",)),
    ("2801", 1, 365, False, "1", ("07", "02")),
    ("2801", 2, 1460, False, "1", ("07", "02")),
)
NURSES = ("李护士", "王护士", "张护士", "陈护士", "周护士", "顾护士")
_BAD_INOCULATIONS = ("unknown-vaccine", "before-birth", "impossible-date", "no-lot")
_BAD_CHILDREN = ("id-check-digit", "no-name", "impossible-birthday", "future-birthday")


@dataclass
class Faults:
    """Injected failures; change them while the server runs."""

    transient_every: int = 0  # every n-th request answers 503
    slow_every: int = 0  # every n-th request waits ``delay`` seconds first
    delay: float = 2.0
    fail_after_pages: int | None = None  # after k pages served, every request fails (500)
    requests: int = 0
    pages_served: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def next(self) -> tuple[int, bool]:
        with self._lock:
            self.requests += 1
            return self.requests, self.fail_after_pages is not None and self.pages_served >= self.fail_after_pages


@dataclass
class _Dose:
    code: str
    dose: int
    date: _dt.date
    free: bool
    site: str
    corp: str
    lot: str
    valid: _dt.date
    trace: str
    clinic: str
    nurse: str
    bad: str = ""

    def xml(self) -> str:
        date = self.date.isoformat()
        code, lot = self.code, self.lot
        if self.bad == "unknown-vaccine":
            code = "9999"
        elif self.bad == "impossible-date":
            date = f"{self.date.year}-02-30"
        elif self.bad == "no-lot":
            lot = ""
        fields = (
            ("inoc_bact_code", code), ("inoc_time", str(self.dose)), ("inoc_date", f"{date} 09:{self.dose:02d}:00"),
            ("inoc_batchno", lot), ("inoc_validdate", self.valid.isoformat()), ("inoc_corp_code", self.corp),
            ("inoc_regulatory_code", self.trace), ("inoc_free", "1" if self.free else "0"), ("inoc_property", "1"),
            ("inoc_county", self.clinic[:6]), ("inoc_inpl_id", self.site), ("inoc_nurse", self.nurse), ("inoc_depa_code", self.clinic),
        )
        return "<inoculation>" + "".join(f"<{k}>{escape(v)}</{k}>" for k, v in fields) + "</inoculation>"


@dataclass
class _Snapshot:
    child: Child
    code: str
    doses: list[_Dose]
    aefis: list[tuple[str, str, _dt.date]]
    updated: _dt.datetime
    has_id: bool = True
    bad: str = ""

    def xml(self) -> str:
        c = self.child
        id_no = c.id_number if self.has_id else ""
        birthday = c.birth_date.isoformat()
        name = c.name
        if self.bad == "id-check-digit":
            id_no = id_no[:17] + ("0" if id_no[17] != "0" else "1")
        elif self.bad == "no-name":
            name = ""
        elif self.bad == "impossible-birthday":
            birthday = f"{c.birth_date.year}-02-30"
        elif self.bad == "future-birthday":
            birthday = "2099-01-01"
        fields = [
            ("chil_code", self.code), ("chil_name", name), ("chil_sex", c.sex), ("chil_birthday", birthday),
            ("chil_nati_id", "01"), ("chil_no", id_no),
            ("chil_mother", c.mother.name if c.mother else ""), ("chil_motherno", c.mother.id_number if c.mother else ""),
            ("chil_father", c.father.name if c.father else ""), ("chil_fatherno", c.father.id_number if c.father else ""),
            ("chil_tel", c.phone), ("chil_habiaddress", c.address), ("chil_address", c.residence_address),
            ("chil_residence", "1" if c.residence_district == c.district else "2"),
            ("chil_curdepartment", f"{c.residence_district}0001"), ("chil_birthhospital", f"{DISTRICTS[c.district][0]}妇幼保健院"),
            ("chil_sensitivity", ""), ("chil_status", "1"), ("chil_updatetime", self.updated.strftime("%Y-%m-%d %H:%M:%S")),
        ]
        head = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in fields)
        inocs = "<inoculations>" + "".join(d.xml() for d in self.doses) + "</inoculations>"
        aefis = ""
        if self.aefis:
            aefis = "<aefis>" + "".join(
                f"<aefi><aefi_bact_code>{b}</aefi_bact_code><aefi_code>{r}</aefi_code><aefi_date>{d.isoformat()}</aefi_date></aefi>" for b, r, d in self.aefis
            ) + "</aefis>"
        return f"<child>{head}{inocs}{aefis}</child>"

    def units(self) -> list[tuple[str, str, Any]]:
        """(record id, validity, content) of each record, for the expected counts."""
        out: list[tuple[str, str, Any]] = [(f"child/{self.code}", self.bad or "ok", (self.child, self.has_id))]
        for d in self.doses:
            out.append((f"inoc/{self.code}/{'9999' if d.bad == 'unknown-vaccine' else d.code}/{d.dose}", "bad" if self.bad or d.bad else "ok", (d.lot, d.date, d.bad)))
        for b, r, day in self.aefis:
            out.append((f"aefi/{self.code}/{b}/{r}/{day}", "bad" if self.bad else "ok", None))
        return out


class ImmunizationUpstream:
    """The simulated platform: a change log of child snapshots and a small HTTP server over it."""

    def __init__(self, seed: int = 7, children: int = 200, *, population: Population | None = None) -> None:
        self.seed = seed
        self.population = population or Population(seed)
        self.reference = self.population.reference
        self.deliveries: list[str] = []  # XML of each delivery; the watermark is the index
        self.truth: Counter = Counter()  # expected outcome counts of a full sync
        self.planted: Counter = Counter()
        self.faults = Faults()
        self._build(children)

    # -- the plan ------------------------------------------------------------------------------

    def _doses(self, rng: random.Random, child: Child, index: int) -> list[_Dose]:
        plan = list(SCHEDULE) + [o for o in OPTIONAL if rng.random() < 0.35]
        clinic = f"{child.residence_district}{rng.randint(1, 40):04d}"
        out = []
        for code, dose, age, free, site, corps in sorted(plan, key=lambda p: (p[2], p[0])):
            day = child.birth_date + _dt.timedelta(days=age + (rng.randint(0, 20) if age else 0))
            if day > self.reference:
                continue
            lot = f"{day.year}{rng.randint(0, 999_999):06d}"
            trace = f"8{rng.randint(0, 10**19 - 1):019d}"
            out.append(_Dose(code, dose, day, free, site, rng.choice(corps), lot, day + _dt.timedelta(days=rng.randint(300, 720)), trace, clinic, rng.choice(NURSES)))
        return out

    def _build(self, n: int) -> None:
        rng = random.Random(f"immunization|{self.seed}")
        log: list[tuple[float, _Snapshot]] = []
        for i in range(n):
            child = self.population.child(i)
            crng = random.Random(f"immunization|{self.seed}|{i}")
            code = f"{child.residence_district}{self.seed % 1000:03d}{i:09d}"
            doses = self._doses(crng, child, i)
            if not doses:
                continue
            has_id = crng.random() >= 0.15
            aefis: list[tuple[str, str, _dt.date]] = []
            if crng.random() < 0.05:
                d = crng.choice(doses)
                aefis.append((d.code, crng.choice(("01", "02", "03", "04")), d.date + _dt.timedelta(days=1)))
                self.planted["aefi"] += 1
            if crng.random() < 0.04:
                kind = _BAD_INOCULATIONS[i % len(_BAD_INOCULATIONS)]
                base = crng.choice(doses)
                bad = _Dose(base.code, base.dose + 10, base.date, base.free, base.site, base.corp, base.lot, base.valid, base.trace + "9", base.clinic, base.nurse, kind)
                if kind == "before-birth":
                    bad.date = child.birth_date - _dt.timedelta(days=30)
                doses.append(bad)
                self.planted[f"bad-inoculation:{kind}"] += 1
            if not has_id:
                self.planted["no-id"] += 1
            stamp = lambda d: _dt.datetime.combine(d, _dt.time(18, 0)) + _dt.timedelta(minutes=crng.randint(0, 300))  # noqa: E731
            last = max(d.date for d in doses)
            key = rng.random()
            aefi_day = aefis[0][2] if aefis else None
            if len(doses) > 3 and crng.random() < 0.25:
                # first known with fewer doses; the later snapshot adds the rest
                cut = [d for d in doses[: len(doses) - 2]]
                first_aefis = [a for a in aefis if any(d.code == a[0] and d.date < a[2] for d in cut)]
                log.append((key, _Snapshot(child, code, cut, first_aefis, stamp(max(d.date for d in cut)), has_id)))
                key += crng.uniform(0.01, 0.3)
                self.planted["new-doses"] += 1
            final = _Snapshot(child, code, doses, aefis, stamp(max(last, aefi_day or last)) + _dt.timedelta(days=1), has_id)
            log.append((key, final))
            if crng.random() < 0.10:
                log.append((key + crng.uniform(0.01, 0.3), final))
                self.planted["re-sent"] += 1
            if crng.random() < 0.06:
                good = [d for d in doses if not d.bad]
                target = crng.choice(good)
                fixed = [(_Dose(**{**d.__dict__, "lot": d.lot + "A"}) if d is target else d) for d in doses]
                corrected = _Snapshot(child, code, fixed, aefis, final.updated + _dt.timedelta(days=3), has_id)
                ckey = key + crng.uniform(0.01, 0.3)
                log.append((ckey, corrected))
                self.planted["corrected"] += 1
                if crng.random() < 0.5:
                    log.append((ckey + crng.uniform(0.01, 0.3), final))  # the older snapshot, late
                    self.planted["out-of-order"] += 1
        for j in range(max(len(_BAD_CHILDREN), n * 3 // 100)):
            kind = _BAD_CHILDREN[j % len(_BAD_CHILDREN)]
            child = self.population.child(1_000_000 + j)
            crng = random.Random(f"immunization|{self.seed}|bad|{j}")
            code = f"{child.residence_district}{self.seed % 1000:03d}{900_000_000 + j:09d}"
            doses = self._doses(crng, child, j)[:3]
            log.append((rng.random(), _Snapshot(child, code, doses, [], _dt.datetime.combine(self.reference, _dt.time(8, 0)), True, kind)))
            self.planted[f"bad-child:{kind}"] += 1
        log.sort(key=lambda item: item[0])
        self._expect([s for _, s in log])
        self.deliveries = [s.xml() for _, s in log]

    def _expect(self, snapshots: list[_Snapshot]) -> None:
        """The outcome of each record in delivery order, from the plan (not from the connector)."""
        state: dict[str, tuple[Any, _dt.datetime]] = {}
        for s in snapshots:
            for rid, validity, content in s.units():
                kind = rid.split("/", 1)[0]
                self.truth["received"] += 1
                self.truth[f"received:{kind}"] += 1
                if validity != "ok":
                    self.truth["rejected"] += 1
                    continue
                if rid not in state:
                    outcome = "created"
                elif state[rid][0] == content or state[rid][1] > s.updated:
                    outcome = "unchanged"
                else:
                    outcome = "updated"
                if outcome != "unchanged":
                    state[rid] = (content, s.updated)
                self.truth[outcome] += 1
                self.truth[f"{outcome}:{kind}"] += 1
        self.truth["records"] = len(state)

    # -- pages ---------------------------------------------------------------------------------

    def page(self, since: int, limit: int) -> tuple[bytes, int, bool, int]:
        """(gzip XML, next watermark, more?, deliveries left after ``since``)."""
        since = max(0, since)
        chunk = self.deliveries[since : since + limit]
        nxt = since + len(chunk)
        xml = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<children since="{since}" next="{nxt}" count="{len(chunk)}">'
            + "".join(chunk)
            + "</children>"
        )
        return gzip.compress(xml.encode("utf-8"), compresslevel=5), nxt, nxt < len(self.deliveries), len(self.deliveries) - since

    # -- HTTP ----------------------------------------------------------------------------------

    def server(self, host: str = "127.0.0.1", port: int = 0, token: str = "demo-token") -> ThreadingHTTPServer:
        """An HTTP server (not yet serving): ``serve_forever()``, or :meth:`start` for a thread."""
        return _http.serve(self, '/children', 'application/gzip', host, port, token)

    def start(self, host: str = "127.0.0.1", port: int = 0, token: str = "demo-token") -> tuple[ThreadingHTTPServer, str]:
        """Serve in a background thread; (server, URL of the pages). ``shutdown()`` stops it."""
        httpd = _http.start(self.server(host, port, token), "immunization-upstream")
        return httpd, f"http://{host}:{httpd.server_address[1]}/children"
