"""A runnable 妇幼保健 upstream: pages of the JSON exchange format (mappings/mch/) over HTTP.

``GET <any path>?since=<seq>&limit=<n>`` (Bearer token) answers the next ``n`` records of the
change log as gzip JSON ``{"records": [...]}`` with ``X-Next-Since``, ``X-Has-More``, ``X-Total`` —
the contract of :class:`~fhir_server.connectors.transport.HttpTransport`.

Residents come from :class:`Population` (the same mothers and children as the other sources).
Per child: 早孕建册, antenatal visits, 出生医学证明, newborn visit, postpartum and 42-day visits,
child check-ups up to the reference date. Planted: re-sent records, a corrected record (new
content, later ``updatedAt``), and bad records (``planted_bad``: bad ID check digit, missing
field, impossible date, unknown risk colour, visit before birth).
"""

from __future__ import annotations

import copy
import datetime as _dt
import gzip
import random
from collections import Counter
from http.server import ThreadingHTTPServer
from typing import Any

import orjson

from fhir_server.simulators.immunization import Faults
from fhir_server.simulators import _http
from fhir_server.simulators.population import DISTRICTS, Child, Population, id_number

_BAD = ("id-check-digit", "missing-field", "impossible-date", "unknown-colour", "before-birth")
_CHECKUP_MONTHS = (1, 3, 6, 12, 24, 36, 48, 60, 72)


def _person(p: Any, pid: str, mother: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": pid, "name": p.name, "sex": p.sex, "birthDate": p.birth_date.isoformat(), "phone": p.phone, "address": p.address}
    if p.id_number:
        out["idNumber"] = p.id_number
    if mother is not None:
        out["mother"] = {"personId": pid.replace("C", "M"), "name": mother.name, "idNumber": mother.id_number, "phone": mother.phone}
    return out


class MchUpstream:
    """The simulated 妇幼 system: a deterministic change log and a small HTTP server over it."""

    def __init__(self, seed: int = 7, children: int = 100, *, population: Population | None = None) -> None:
        self.seed = seed
        self.population = population or Population(seed)
        self.reference = self.population.reference
        self.deliveries: list[dict[str, Any]] = []
        self.planted: Counter = Counter()
        self.faults = Faults()
        self._build(children)

    @property
    def planted_bad(self) -> int:
        return sum(v for k, v in self.planted.items() if k.startswith("bad:"))

    def _records(self, i: int, child: Child, rng: random.Random) -> list[dict[str, Any]]:
        mother = child.mother
        assert mother is not None
        cid, mid = f"C{self.seed:03d}{i:08d}", f"M{self.seed:03d}{i:08d}"
        inst = {"code": f"{child.district}MCH1", "name": f"{DISTRICTS[child.district][0]}妇幼保健院"}
        clinic = {"code": f"{child.residence_district}CHC{rng.randint(1, 20):02d}", "name": f"{DISTRICTS[child.residence_district][0]}社区卫生服务中心"}
        born = child.birth_date
        weeks_at_birth = rng.randint(37, 41)
        lmp = born - _dt.timedelta(weeks=weeks_at_birth)
        preg = f"P{self.seed:03d}{i:08d}"
        mp = _person(mother, mid)
        cp = _person(child, cid, mother)
        stamp = lambda d: f"{d.isoformat()} 18:{rng.randint(0, 59):02d}:00"  # noqa: E731
        colour = rng.choices(("green", "yellow", "orange", "red"), (70, 20, 7, 3))[0]
        out: list[dict[str, Any]] = []
        reg = lmp + _dt.timedelta(weeks=rng.randint(8, 12))
        out.append({"recordType": "pregnancy-registration", "recordId": f"R{preg}", "updatedAt": stamp(reg), "institution": inst, "mother": mp, "pregnancyId": preg,
                    "visitDate": reg.isoformat(), "lmp": lmp.isoformat(), "edd": (lmp + _dt.timedelta(days=280)).isoformat(), "gravidity": rng.randint(1, 3), "parity": rng.randint(0, 1),
                    "gestationalWeek": (reg - lmp).days // 7, "bloodPressure": {"systolic": rng.randint(100, 125), "diastolic": rng.randint(62, 82)},
                    "weightKg": round(rng.uniform(48, 70), 1), "heightCm": round(rng.uniform(152, 172), 1), "riskColour": colour})
        for n, week in enumerate((16, 20, 24, 28, 32, 36), 1):
            day = lmp + _dt.timedelta(weeks=week, days=rng.randint(0, 4))
            if day >= born:
                break
            out.append({"recordType": "antenatal-visit", "recordId": f"A{preg}{n}", "updatedAt": stamp(day), "institution": inst, "mother": mp, "pregnancyId": preg,
                        "visitDate": day.isoformat(), "gestationalWeek": week, "bloodPressure": {"systolic": rng.randint(100, 135), "diastolic": rng.randint(60, 88)},
                        "weightKg": round(55 + week * 0.35 + rng.uniform(-3, 3), 1), "fundalHeightCm": float(week - rng.randint(0, 2)), "fetalHeartRate": rng.randint(120, 160), "riskColour": colour})
        cert = f"S{self.seed:03d}{i:07d}"
        out.append({"recordType": "birth-certificate", "recordId": cert, "updatedAt": stamp(born + _dt.timedelta(days=3)), "institution": inst, "child": cp, "mother": mp,
                    "certificateNo": cert, "fatherName": child.father.name if child.father else "", "gestationalWeeksAtBirth": weeks_at_birth,
                    "birthWeightG": rng.randint(2700, 4000), "birthLengthCm": float(rng.randint(47, 53)), "issueDate": (born + _dt.timedelta(days=3)).isoformat()})
        for kind, days, who in (("newborn-visit", 7, "child"), ("postpartum-visit", 7, "mother"), ("postpartum-42d", 42, "mother")):
            day = born + _dt.timedelta(days=days + rng.randint(0, 3))
            if day > self.reference:
                continue
            rec: dict[str, Any] = {"recordType": kind, "recordId": f"{kind[:2].upper()}{preg}{days}", "updatedAt": stamp(day), "institution": clinic, who: cp if who == "child" else mp, "visitDate": day.isoformat()}
            if who == "child":
                rec.update(weightKg=round(rng.uniform(3.0, 4.2), 2), jaundice=rng.random() < 0.2, feeding="breast")
            else:
                rec.update(pregnancyId=preg, deliveryDate=born.isoformat(), bloodPressure={"systolic": rng.randint(100, 130), "diastolic": rng.randint(60, 85)},
                           weightKg=round(rng.uniform(50, 72), 1), classification="normal")
            out.append(rec)
        for months in _CHECKUP_MONTHS:
            day = born + _dt.timedelta(days=int(months * 30.4) + rng.randint(0, 10))
            if day > self.reference:
                break
            out.append({"recordType": "child-checkup", "recordId": f"K{cid}{months:02d}", "updatedAt": stamp(day), "institution": clinic, "child": cp, "visitDate": day.isoformat(),
                        "weightKg": round(3.4 + months * 0.45 - months**2 * 0.003 + rng.uniform(-0.5, 0.5), 1), "heightCm": round(50 + months * 1.9 - months**2 * 0.012 + rng.uniform(-1, 1), 1),
                        "headCircumferenceCm": round(35 + 12 * (1 - 0.97**months) + rng.uniform(-0.5, 0.5), 1)})
        return out

    def _build(self, n: int) -> None:
        rng = random.Random(f"mch|{self.seed}")
        log: list[tuple[float, dict[str, Any]]] = []
        for i in range(n):
            child = self.population.child(i)
            crng = random.Random(f"mch|{self.seed}|{i}")
            for rec in self._records(i, child, crng):
                key = rng.random()
                log.append((key, rec))
                if crng.random() < 0.05:
                    log.append((key + 0.001, rec))  # re-sent as is
                    self.planted["re-sent"] += 1
                elif rec["recordType"] == "child-checkup" and crng.random() < 0.08:
                    fixed = copy.deepcopy(rec)
                    fixed["weightKg"] = round(fixed["weightKg"] + 0.2, 1)
                    fixed["updatedAt"] = rec["updatedAt"][:11] + "23:59:59"
                    log.append((key + 0.002, fixed))  # a correction: a new version
                    self.planted["corrected"] += 1
        for j in range(max(len(_BAD), n // 10)):
            kind = _BAD[j % len(_BAD)]
            child = self.population.child(2_000_000 + j)
            recs = self._records(900_000 + j, child, random.Random(f"mch|{self.seed}|bad|{j}"))
            bad = copy.deepcopy(next(r for r in recs if r["recordType"] == "child-checkup"))
            bad["recordId"] += "X"
            if kind == "id-check-digit":
                # a child recorded without a number (a scenario's noise) gets one to mistype
                idn = bad["child"].get("idNumber") or id_number(child.district, child.birth_date, 1, child.sex)
                bad["child"]["idNumber"] = idn[:17] + ("0" if idn[17] != "0" else "1")
            elif kind == "missing-field":
                del bad["heightCm"]
            elif kind == "impossible-date":
                bad["visitDate"] = f"{bad['visitDate'][:4]}-02-30"
            elif kind == "unknown-colour":
                bad = copy.deepcopy(recs[0])
                bad["recordId"] += "X"
                bad["riskColour"] = "blue"
            elif kind == "before-birth":
                bad["visitDate"] = (child.birth_date - _dt.timedelta(days=10)).isoformat()
            log.append((rng.random(), bad))
            self.planted[f"bad:{kind}"] += 1
        log.sort(key=lambda item: item[0])
        self.deliveries = [r for _, r in log]

    def page(self, since: int, limit: int) -> tuple[bytes, int, bool, int]:
        since = max(0, since)
        chunk = self.deliveries[since : since + limit]
        nxt = since + len(chunk)
        body = orjson.dumps({"since": since, "next": nxt, "records": chunk})
        return gzip.compress(body, compresslevel=5), nxt, nxt < len(self.deliveries), len(self.deliveries) - since

    def server(self, host: str = "127.0.0.1", port: int = 0, token: str = "demo-token") -> ThreadingHTTPServer:
        """An HTTP server (not yet serving): ``serve_forever()``, or :meth:`start` for a thread."""
        return _http.serve(self, None, 'application/gzip', host, port, token)

    def start(self, host: str = "127.0.0.1", port: int = 0, token: str = "demo-token") -> tuple[ThreadingHTTPServer, str]:
        """Serve in a background thread; (server, URL of the pages). ``shutdown()`` stops it."""
        httpd = _http.start(self.server(host, port, token), "mch-upstream")
        return httpd, f"http://{host}:{httpd.server_address[1]}/mch/records"
