"""A runnable hospital document registry: WS/T 500 CDA R2 shared documents over HTTP as JSON pages.

``GET /documents?since=<seq>&limit=<n>`` with ``Authorization: Bearer <token>`` answers
``{"since", "next", "documents": [{"id", "code", "xml"}, …]}`` with headers ``X-Next-Since``,
``X-Has-More`` and ``X-Total`` (deliveries left after ``since``), like the immunization upstream.

Documents describe adults of the shared :class:`Population` (the parents of its children), so the
EMR and immunization sources describe the same residents. Each resident has C0002 门(急)诊病历 visits
and C0007 检验报告 lab reports, some inpatient stays with C0032 住院病案首页 and C0053 出院小结, and a
C0001 病历概要. Planted faults: malformed XML, an unknown local lab code, an impossible birth date,
a bad ID check digit, and re-sent documents. ``truth`` holds the expected outcome counts of a full
sync (each planted fault is exactly one rejection), tallied from the plan, not from the connector.
"""

from __future__ import annotations

import datetime as _dt
import json
import random
from collections import Counter
from http.server import ThreadingHTTPServer
from typing import Any
from xml.sax.saxutils import escape

from fhir_server.simulators.immunization import Faults
from fhir_server.simulators import _http
from fhir_server.simulators.population import Population, Resident

HOSPITALS = (
    ("42500000000001", "上海市第一人民医院"),
    ("42500000000002", "复旦大学附属中山医院"),
    ("42500000000003", "上海交通大学医学院附属瑞金医院"),
    ("42500000000004", "上海市第六人民医院"),
)
LAB_SYSTEM = "1.2.156.112604.1.2.1"
# local code, name, unit, low, high, typical value generator (mean, sd)
LABS = (
    ("GLU", "空腹血糖", "mmol/L", 3.9, 6.1, 5.4, 0.9),
    ("HBA1C", "糖化血红蛋白", "%", 4.0, 6.0, 5.6, 0.6),
    ("TC", "总胆固醇", "mmol/L", 2.8, 5.2, 4.8, 0.8),
    ("TG", "甘油三酯", "mmol/L", 0.56, 1.7, 1.4, 0.5),
    ("ALT", "丙氨酸氨基转移酶", "U/L", 7, 40, 25, 10),
    ("CREA", "肌酐", "μmol/L", 57, 111, 80, 15),
)
DIAGNOSES = (("I10", "高血压"), ("E11", "2型糖尿病"), ("J45", "哮喘"), ("J44", "慢性阻塞性肺病"), ("I25", "慢性缺血性心脏病"), ("N18", "慢性肾脏病"))
DOCTORS = ("王建国", "李红", "张伟", "陈静", "刘洋", "周敏")


def _ts(t: _dt.datetime) -> str:
    return t.strftime("%Y%m%d%H%M%S")


def _header(code: str, template: str, title: str, doc_id: str, when: _dt.datetime, p: Resident, hospital: tuple[str, str], birth: str, id_no: str, extra_ids: str) -> str:
    return (
        '<ClinicalDocument xmlns="urn:hl7-org:v3" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        '<realmCode code="CN"/><typeId root="2.16.840.1.113883.1.3" extension="POCD_MT000040"/>'
        f'<templateId root="{template}"/><id root="2.16.156.10011.1.1" extension="{doc_id}"/>'
        f'<code code="{code}" codeSystem="2.16.156.10011.2.4" codeSystemName="卫生信息共享文档编码体系"/><title>{title}</title>'
        f'<effectiveTime value="{_ts(when)}"/><confidentialityCode code="N" codeSystem="2.16.840.1.113883.5.25"/><languageCode code="zh-CN"/>'
        f'<setId/><versionNumber value="1"/>'
        f'<recordTarget typeCode="RCT" contextControlCode="OP"><patientRole classCode="PAT">{extra_ids}'
        f'<addr use="H">{escape(p.address)}</addr><telecom value="tel:{p.phone}"/>'
        f'<patient classCode="PSN" determinerCode="INSTANCE"><id root="2.16.156.10011.1.3" extension="{id_no}"/>'
        f'<name>{escape(p.name)}</name><administrativeGenderCode code="{p.sex}" codeSystem="2.16.156.10011.2.3.3.4" displayName="{"男性" if p.sex == "1" else "女性"}"/>'
        f'<birthTime value="{birth}"/></patient></patientRole></recordTarget>'
        f'<author typeCode="AUT" contextControlCode="OP"><time value="{_ts(when)}"/><assignedAuthor classCode="ASSIGNED">'
        f'<id root="2.16.156.10011.1.4" extension="D{sum(map(ord, doc_id)) % 10000:04d}"/><assignedPerson><name>{DOCTORS[len(doc_id) % len(DOCTORS)]}</name></assignedPerson></assignedAuthor></author>'
        f'<custodian typeCode="CST"><assignedCustodian classCode="ASSIGNED"><representedCustodianOrganization classCode="ORG" determinerCode="INSTANCE">'
        f'<id root="2.16.156.10011.1.5" extension="{hospital[0]}"/><name>{hospital[1]}</name></representedCustodianOrganization></assignedCustodian></custodian>'
    )


def _encounter(root: str, number: str, cls: str, start: _dt.datetime, end: _dt.datetime | None, dept: str) -> str:
    time = f'<effectiveTime><low value="{_ts(start)}"/>' + (f'<high value="{_ts(end)}"/>' if end else "") + "</effectiveTime>"
    return (
        f'<componentOf><encompassingEncounter><id root="{root}" extension="{number}"/><code code="{cls}" codeSystem="2.16.840.1.113883.5.4"/>{time}'
        f'<location><healthCareFacility><serviceProviderOrganization><name>{dept}</name></serviceProviderOrganization></healthCareFacility></location>'
        "</encompassingEncounter></componentOf>"
    )


def _diagnosis_section(diagnoses: list[tuple[str, str]], day: _dt.date) -> str:
    entries = "".join(
        '<entry><observation classCode="OBS" moodCode="EVN"><code code="DE05.01.024.00" codeSystem="2.16.156.10011.2.2.1" displayName="疾病诊断编码"/>'
        f'<effectiveTime value="{day:%Y%m%d}"/><value xsi:type="CD" code="{c}" codeSystem="2.16.156.10011.2.3.3.11" codeSystemName="ICD-10" displayName="{n}"/></observation></entry>'
        for c, n in diagnoses
    )
    return f'<component><section><code code="29548-5" codeSystem="2.16.840.1.113883.6.1" displayName="Diagnosis"/><text/>{entries}</section></component>'


class EmrUpstream:
    """The simulated registry: a change log of CDA documents and a small HTTP server over it."""

    def __init__(self, seed: int = 7, residents: int = 100, *, population: Population | None = None) -> None:
        self.seed = seed
        self.population = population or Population(seed)
        self.reference = self.population.reference
        self.deliveries: list[tuple[str, str, str]] = []  # (registry id, document code, xml)
        self.truth: Counter = Counter()
        self.planted: Counter = Counter()
        self.faults = Faults()
        self._resent_units: dict[str, int] = {}  # units of each well-formed document, for re-sends
        self._build(residents)

    def resident(self, i: int) -> Resident:
        child = self.population.child(i)
        parent = child.mother if i % 2 else child.father
        assert parent is not None
        return parent

    def _build(self, n: int) -> None:
        rng = random.Random(f"emr|{self.seed}")
        seq = 0
        patients: set[str] = set()
        for i in range(n):
            p = self.resident(i)
            hospital = HOSPITALS[i % len(HOSPITALS)]
            fault = ""
            if i % 17 == 5:
                fault = rng.choice(("malformed", "bad-id", "impossible-birth"))
            visits = 1 + rng.randint(0, 2)
            for v in range(visits):
                seq += 1
                day = self.reference - _dt.timedelta(days=rng.randint(1, 700))
                start = _dt.datetime.combine(day, _dt.time(8 + rng.randint(0, 8), rng.randint(0, 59)))
                dx = rng.sample(DIAGNOSES, rng.randint(1, 2))
                number = f"MZ{seq:08d}"
                doc_fault = fault if v == 0 else ""
                xml, ok_units = self._c0002(p, hospital, f"EMR{seq:08d}-C0002", start, number, dx, doc_fault)
                self._deliver(f"EMR{seq:08d}-C0002", "C0002", xml, doc_fault, ok_units, patients, p, hospital)
                if rng.random() < 0.7:
                    seq += 1
                    unknown = i % 13 == 3 and v == 0
                    number2 = f"MZ{seq:08d}"
                    xml, ok_units, rejected = self._c0007(rng, p, hospital, f"EMR{seq:08d}-C0007", start + _dt.timedelta(hours=1), number2, doc_fault, unknown)
                    self._deliver(f"EMR{seq:08d}-C0007", "C0007", xml, doc_fault, ok_units, patients, p, hospital, rejected)
                    if unknown and not doc_fault:
                        self.planted["unknown-lab-code"] += 1
            if i % 10 == 0 and i:  # re-send the resident's first document: all unchanged
                rid, code, xml = self._last_of(p)
                self.deliveries.append((rid, code, xml))
                self.planted["re-sent"] += 1
                self.truth["received"] += self._resent_units.get(rid, 1)
                self.truth["unchanged"] += self._resent_units.get(rid, 1)

    def _last_of(self, p: Resident) -> tuple[str, str, str]:
        for d in reversed(self.deliveries):
            if p.id_number in d[2] and d[0] in self._resent_units:
                return d
        return self.deliveries[-1]

    def _deliver(self, rid: str, code: str, xml: str, fault: str, units: int, patients: set[str], p: Resident, hospital: tuple[str, str], rejected: int = 0) -> None:
        self.deliveries.append((rid, code, xml))
        if fault:
            self.planted[fault] += 1
            self.truth["received"] += 1
            self.truth["rejected"] += 1
            return
        key = f"{hospital[0]}/{p.id_number}"
        # units: Patient + the rest; the Patient is created once per (hospital, resident), then unchanged
        self.truth["received"] += units + rejected
        self.truth["rejected"] += rejected
        self.truth["created"] += units - 1
        self.truth["created" if key not in patients else "unchanged"] += 1
        patients.add(key)
        self._resent_units[rid] = units + rejected

    def _c0002(self, p: Resident, hospital: tuple[str, str], doc_id: str, start: _dt.datetime, number: str, dx: list[tuple[str, str]], fault: str) -> tuple[str, int]:
        birth = f"{p.birth_date:%Y%m%d}"
        id_no = p.id_number
        if fault == "bad-id":
            id_no = id_no[:17] + ("0" if id_no[17] != "0" else "1")
        elif fault == "impossible-birth":
            birth = f"{p.birth_date.year}0230"
        ids = f'<id root="2.16.156.10011.1.11" extension="{number}"/>'
        body = (
            '<component><structuredBody>'
            '<component><section><code code="10154-3" codeSystem="2.16.840.1.113883.6.1" displayName="CHIEF COMPLAINT"/><text>头晕、乏力一周</text></section></component>'
            + _diagnosis_section(dx, start.date())
            + "</structuredBody></component>"
        )
        xml = _header("C0002", "2.16.156.10011.2.1.1.22", "门(急)诊病历", doc_id, start, p, hospital, birth, id_no, ids) + _encounter("2.16.156.10011.1.11", number, "AMB", start, None, "内科门诊") + body + "</ClinicalDocument>"
        if fault == "malformed":
            xml = xml[: len(xml) // 2]
        return xml, 3 + len(dx)  # Patient, Encounter, Conditions, DocumentReference

    def _c0007(self, rng: random.Random, p: Resident, hospital: tuple[str, str], doc_id: str, when: _dt.datetime, number: str, fault: str, unknown: bool) -> tuple[str, int, int]:
        birth = f"{p.birth_date:%Y%m%d}"
        id_no = p.id_number
        if fault == "bad-id":
            id_no = id_no[:17] + ("0" if id_no[17] != "0" else "1")
        elif fault == "impossible-birth":
            birth = f"{p.birth_date.year}0230"
        labs = rng.sample(LABS, rng.randint(2, 4))
        obs = ""
        for code, name, unit, low, high, mean, sd in labs:
            value = round(max(0.1, rng.gauss(mean, sd)), 1 if unit != "U/L" else 0)
            flag = "H" if value > high else "L" if value < low else "N"
            obs += (
                '<entry><observation classCode="OBS" moodCode="EVN">'
                f'<code code="{code}" codeSystem="{LAB_SYSTEM}" displayName="{name}"/><effectiveTime value="{_ts(when)}"/>'
                f'<value xsi:type="PQ" value="{value:g}" unit="{unit}"/><interpretationCode code="{flag}" codeSystem="2.16.840.1.113883.5.83"/>'
                f'<referenceRange><observationRange><value xsi:type="IVL_PQ"><low value="{low:g}" unit="{unit}"/><high value="{high:g}" unit="{unit}"/></value></observationRange></referenceRange>'
                "</observation></entry>"
            )
        if unknown:
            obs += (
                '<entry><observation classCode="OBS" moodCode="EVN">'
                f'<code code="XYZ-99" codeSystem="{LAB_SYSTEM}" displayName="未知项目"/><effectiveTime value="{_ts(when)}"/>'
                '<value xsi:type="PQ" value="1.0" unit="g/L"/><referenceRange><observationRange><text>0-2</text></observationRange></referenceRange></observation></entry>'
            )
        body = (
            "<component><structuredBody>"
            '<component><section><code code="30954-2" codeSystem="2.16.840.1.113883.6.1" displayName="STUDIES SUMMARY"/><text/>'
            f"{obs}</section></component></structuredBody></component>"
        )
        ids = f'<id root="2.16.156.10011.1.11" extension="{number}"/>'
        header = _header("C0007", "2.16.156.10011.2.1.1.27", "检验报告", doc_id, when, p, hospital, birth, id_no, ids)
        header = header.replace("<setId/>", f'<id root="2.16.156.10011.1.33" extension="LAB{doc_id[3:11]}"/><setId/>', 1)
        xml = header + _encounter("2.16.156.10011.1.11", number, "AMB", when, None, "检验科") + body + "</ClinicalDocument>"
        if fault == "malformed":
            xml = xml[: len(xml) // 2]
        return xml, 3 + len(labs), int(unknown)

    # -- pages ---------------------------------------------------------------------------------

    def page(self, since: int, limit: int) -> tuple[bytes, int, bool, int]:
        since = max(0, since)
        chunk = self.deliveries[since : since + limit]
        nxt = since + len(chunk)
        body = json.dumps({"since": since, "next": nxt, "documents": [{"id": r, "code": c, "xml": x} for r, c, x in chunk]}, ensure_ascii=False)
        return body.encode("utf-8"), nxt, nxt < len(self.deliveries), len(self.deliveries) - since

    def server(self, host: str = "127.0.0.1", port: int = 0, token: str = "demo-token") -> ThreadingHTTPServer:
        """An HTTP server (not yet serving): ``serve_forever()``, or :meth:`start` for a thread."""
        return _http.serve(self, '/documents', 'application/json; charset=utf-8', host, port, token)

    def start(self, host: str = "127.0.0.1", port: int = 0, token: str = "demo-token") -> tuple[ThreadingHTTPServer, str]:
        """Serve in a background thread; (server, URL of the pages). ``shutdown()`` stops it."""
        httpd = _http.start(self.server(host, port, token), "emr-upstream")
        return httpd, f"http://{host}:{httpd.server_address[1]}/documents"

