"""A runnable hospital document registry: WS/T 500 CDA R2 shared documents over HTTP as JSON pages.

``GET /documents?since=<seq>&limit=<n>`` with ``Authorization: Bearer <token>`` answers
``{"since", "next", "documents": [{"id", "code", "xml"}, …]}`` with headers ``X-Next-Since``,
``X-Has-More`` and ``X-Total`` (deliveries left after ``since``), like the immunization upstream.

Documents describe adults of the shared :class:`Population` (the parents of its children), so the
EMR and immunization sources describe the same residents. Each resident has C0002 门(急)诊病历 visits
(with prescriptions) and C0007 检验报告 lab reports; every third a C0001 病历概要 (past illnesses);
every fourth an inpatient stay: a C0053 出院小结 at discharge (in-hospital and discharge medication,
sometimes a procedure) and, two days later, its C0032 住院病案首页 (procedures with surgeons). Both
documents of a stay name the same 住院号, so the 首页 updates the stay's Encounter (its diagnoses).
Planted faults: malformed XML, an unknown local lab code, an impossible birth date, a bad ID check
digit, an unmapped route code on a prescription, an impossible operation date, and re-sent documents.
``truth`` holds the expected outcome counts of a full sync (each planted fault is exactly one
rejection), tallied from the plan, not from the connector.
"""

from __future__ import annotations

import datetime as _dt
import json
import random
from collections import Counter
from http.server import ThreadingHTTPServer
from typing import Sequence
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
DRUG_SYSTEM = "1.2.156.112604.1.2.2"  # the example hospital's local drug codes [prov]
# local drug code ("" = the document names the drug only), name, route (CV06.00.102), dose, unit, frequency, usage
OUTPATIENT_DRUGS = (
    ("XY0102", "硝苯地平控释片", "1", "30", "mg", "qd", "每日1次，每次1片，口服"),
    ("", "盐酸二甲双胍片", "1", "0.5", "g", "tid", "每日3次，每次1片，餐中服"),
    ("XY0207", "阿托伐他汀钙片", "1", "20", "mg", "qn", "每晚1片，口服"),
    ("XY0311", "硫酸氢氯吡格雷片", "1", "75", "mg", "qd", "每日1片，口服"),
    ("XY0455", "沙美特罗替卡松粉吸入剂", "5", "1", "吸", "bid", "每日2次，每次1吸"),
    ("", "苯磺酸氨氯地平片", "1", "5", "mg", "qd", "每日1片，口服"),
    ("XY0120", "硝酸甘油片", "3", "0.5", "mg", "prn", "胸痛时舌下含服1片"),
)
INPATIENT_DRUGS = (
    ("LD0301", "低分子肝素钙注射液", "401", "4100", "IU", "q12h"),
    ("KJ0115", "注射用头孢呋辛钠", "404", "1.5", "g", "q8h"),
    ("", "0.9%氯化钠注射液", "404", "100", "mL", "qd"),
    ("", "阿司匹林肠溶片", "1", "100", "mg", "qd"),
    ("YD0018", "门冬胰岛素注射液", "401", "6", "单位", "tid"),
)
# ICD-9-CM-3 code, name
PROCEDURES = (
    ("88.57", "其他和未特指的冠状动脉造影术"), ("36.07", "药物洗脱冠状动脉支架置入"), ("51.23", "腹腔镜下胆囊切除术"),
    ("81.54", "全膝关节置换"), ("39.95", "血液透析"), ("45.23", "结肠镜检查"), ("33.24", "闭合性[内镜的]支气管活组织检查"),
)


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


def _diagnosis_section(diagnoses: list[tuple[str, str]], day: _dt.date | list[_dt.date], section: str = "29548-5") -> str:
    days = day if isinstance(day, list) else [day] * len(diagnoses)
    entries = "".join(
        '<entry><observation classCode="OBS" moodCode="EVN"><code code="DE05.01.024.00" codeSystem="2.16.156.10011.2.2.1" displayName="疾病诊断编码"/>'
        f'<effectiveTime value="{d:%Y%m%d}"/><value xsi:type="CD" code="{c}" codeSystem="2.16.156.10011.2.3.3.11" codeSystemName="ICD-10" displayName="{n}"/></observation></entry>'
        for (c, n), d in zip(diagnoses, days)
    )
    return f'<component><section><code code="{section}" codeSystem="2.16.840.1.113883.6.1"/><text/>{entries}</section></component>'


def _related(de: str, name: str, value: str) -> str:
    return f'<entryRelationship typeCode="COMP"><observation classCode="OBS" moodCode="EVN"><code code="{de}" codeSystem="2.16.156.10011.2.2.1" displayName="{name}"/>{value}</observation></entryRelationship>'


def _drug(code: str, name: str, route: str, dose: str, unit: str, freq: str, mood: str, time: str, usage: str = "", total: int = 0) -> str:
    """One WS/T 500 用药 entry (substanceAdministration): route CV06.00.102, dose, frequency/usage/total as DE entries."""
    drug = f'<code code="{code}" codeSystem="{DRUG_SYSTEM}" displayName="{name}"/>' if code else "<code/>"
    return (
        f'<entry><substanceAdministration classCode="SBADM" moodCode="{mood}">{time}'
        f'<routeCode code="{route}" codeSystem="2.16.156.10011.2.3.1.158" codeSystemName="用药途径代码表"/><doseQuantity value="{dose}" unit="{unit}"/>'
        f"<consumable><manufacturedProduct><manufacturedLabeledDrug>{drug}<name>{name}</name></manufacturedLabeledDrug></manufacturedProduct></consumable>"
        + _related("DE06.00.133.00", "药物使用频率", f'<value xsi:type="CD" code="{freq}"/>')
        + (_related("DE06.00.136.00", "药物用法", f'<value xsi:type="ST">{usage}</value>') if usage else "")
        + (_related("DE06.00.135.00", "药物使用总剂量", f'<value xsi:type="PQ" value="{total}" unit="片"/>') if total else "")
        + "</substanceAdministration></entry>"
    )


def _medication_section(code: str, entries: list[str]) -> str:
    return f'<component><section><code code="{code}" codeSystem="2.16.840.1.113883.6.1"/><text/>{"".join(entries)}</section></component>'


def _procedure_section(procedures: list[tuple[str, str, str, str]]) -> str:
    """(ICD-9-CM-3 code, name, HL7 date, surgeon) → a 手术操作章节 47519-4."""
    entries = "".join(
        f'<entry><procedure classCode="PROC" moodCode="EVN"><code code="{c}" codeSystem="2.16.156.10011.2.3.3.12" codeSystemName="手术(操作)代码表(ICD-9-CM)" displayName="{n}"/>'
        f'<statusCode/><effectiveTime value="{day}"/>'
        f'<performer><assignedEntity><id/><code displayName="手术者"/><assignedPerson><name>{who}</name></assignedPerson></assignedEntity></performer>'
        + _related("DE06.00.094.00", "手术(操作)名称", f'<value xsi:type="ST">{n}</value>')
        + "</procedure></entry>"
        for c, n, day, who in procedures
    )
    return f'<component><section><code code="47519-4" codeSystem="2.16.840.1.113883.6.1" displayName="HISTORY OF PROCEDURES"/><text/>{entries}</section></component>'


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
            if i % 3 == 0:  # 病历概要: past illnesses with their diagnosis dates, no encounter
                seq += 1
                past = rng.sample(DIAGNOSES, rng.randint(1, 2))
                when = _dt.datetime.combine(self.reference - _dt.timedelta(days=rng.randint(700, 900)), _dt.time(9, 30))
                # diagnosed as an adult, at least a month before the summary was written
                first = p.birth_date + _dt.timedelta(days=18 * 365)
                span = max(0, (when.date() - _dt.timedelta(days=30) - first).days)
                onsets = [first + _dt.timedelta(days=rng.randint(0, span)) for _ in past]
                xml, ok_units = self._c0001(p, hospital, f"EMR{seq:08d}-C0001", when, past, onsets)
                self._deliver(f"EMR{seq:08d}-C0001", "C0001", xml, "", ok_units, patients, p, hospital)
            visits = 1 + rng.randint(0, 2)
            for v in range(visits):
                seq += 1
                day = self.reference - _dt.timedelta(days=rng.randint(1, 700))
                start = _dt.datetime.combine(day, _dt.time(8 + rng.randint(0, 8), rng.randint(0, 59)))
                dx = rng.sample(DIAGNOSES, rng.randint(1, 2))
                drugs = rng.sample(OUTPATIENT_DRUGS, rng.randint(0, 2))
                number = f"MZ{seq:08d}"
                doc_fault = fault if v == 0 else ""
                bad_route = i % 11 == 7 and v == 0
                xml, ok_units = self._c0002(p, hospital, f"EMR{seq:08d}-C0002", start, number, dx, doc_fault, drugs, bad_route)
                self._deliver(f"EMR{seq:08d}-C0002", "C0002", xml, doc_fault, ok_units, patients, p, hospital, int(bad_route))
                if bad_route and not doc_fault:
                    self.planted["unknown-route-code"] += 1
                if rng.random() < 0.7:
                    seq += 1
                    unknown = i % 13 == 3 and v == 0
                    number2 = f"MZ{seq:08d}"
                    xml, ok_units, rejected = self._c0007(rng, p, hospital, f"EMR{seq:08d}-C0007", start + _dt.timedelta(hours=1), number2, doc_fault, unknown)
                    self._deliver(f"EMR{seq:08d}-C0007", "C0007", xml, doc_fault, ok_units, patients, p, hospital, rejected)
                    if unknown and not doc_fault:
                        self.planted["unknown-lab-code"] += 1
            if i % 4 == 1:
                seq = self._stay(rng, p, hospital, seq, patients, bad_date=i % 12 == 5)
            if i % 10 == 0 and i:  # re-send the resident's last clean document: all unchanged
                last = self._last_of(p)
                if last is not None:
                    self.deliveries.append(last)
                    self.planted["re-sent"] += 1
                    self.truth["received"] += self._resent_units[last[0]]
                    self.truth["unchanged"] += self._resent_units[last[0]]

    def _stay(self, rng: random.Random, p: Resident, hospital: tuple[str, str], seq: int, patients: set[str], bad_date: bool) -> int:
        """One inpatient stay: its 出院小结 at discharge, then its 病案首页 two days later (same 住院号)."""
        admit = _dt.datetime.combine(self.reference - _dt.timedelta(days=rng.randint(30, 700)), _dt.time(9 + rng.randint(0, 6), rng.randint(0, 59)))
        discharge = _dt.datetime.combine(admit.date() + _dt.timedelta(days=rng.randint(3, 14)), _dt.time(10, 0))
        number = f"ZY{seq + 1:08d}"
        dx = rng.sample(DIAGNOSES, rng.randint(1, 2))
        surgeon = DOCTORS[rng.randrange(len(DOCTORS))]
        procs = [(c, n, f"{admit + _dt.timedelta(days=rng.randint(1, 2)):%Y%m%d}", surgeon) for c, n in rng.sample(PROCEDURES, rng.randint(1, 2))]
        inpatient = rng.sample(INPATIENT_DRUGS, rng.randint(1, 2))
        discharge_drugs = rng.sample(OUTPATIENT_DRUGS, rng.randint(1, 2))
        seq += 1
        doc = f"EMR{seq:08d}-C0053"
        xml, ok_units = self._c0053(p, hospital, doc, discharge + _dt.timedelta(hours=1), number, admit, discharge, dx, inpatient, discharge_drugs, procs[:1] if rng.random() < 0.5 else [])
        self._deliver(doc, "C0053", xml, "", ok_units, patients, p, hospital)
        seq += 1
        doc = f"EMR{seq:08d}-C0032"
        if bad_date:  # an operation dated 30 February: that entry alone is refused
            procs = procs + [("96.04", "气管内插管", f"{admit.year}0230", surgeon)]
            self.planted["impossible-procedure-date"] += 1
        xml, ok_units = self._c0032(p, hospital, doc, discharge + _dt.timedelta(days=2, hours=5), number, admit, discharge, dx, procs)
        # the stay's Encounter was created by the 出院小结: the 首页 updates it (its own diagnoses)
        self._deliver(doc, "C0032", xml, "", ok_units - int(bad_date), patients, p, hospital, int(bad_date), updated=1)
        return seq

    def _last_of(self, p: Resident) -> tuple[str, str, str] | None:
        for d in reversed(self.deliveries):
            if p.id_number in d[2] and d[0] in self._resent_units:
                return d
        return None

    def _deliver(self, rid: str, code: str, xml: str, fault: str, units: int, patients: set[str], p: Resident, hospital: tuple[str, str], rejected: int = 0, updated: int = 0) -> None:
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
        self.truth["created"] += units - 1 - updated
        self.truth["updated"] += updated
        self.truth["created" if key not in patients else "unchanged"] += 1
        patients.add(key)
        if not rejected:  # re-sends pick documents without refused entries, so a re-send is all unchanged
            self._resent_units[rid] = units

    def _patient_fields(self, p: Resident, fault: str) -> tuple[str, str]:
        birth = f"{p.birth_date:%Y%m%d}"
        id_no = p.id_number
        if fault == "bad-id":
            id_no = id_no[:17] + ("0" if id_no[17] != "0" else "1")
        elif fault == "impossible-birth":
            birth = f"{p.birth_date.year}0230"
        return birth, id_no

    def _c0001(self, p: Resident, hospital: tuple[str, str], doc_id: str, when: _dt.datetime, past: list[tuple[str, str]], onsets: list[_dt.date]) -> tuple[str, int]:
        birth, id_no = self._patient_fields(p, "")
        # no visit number in patientRole: the source Patient must equal the one the visits carry
        body = "<component><structuredBody>" + _diagnosis_section(past, onsets, "11348-0") + "</structuredBody></component>"
        xml = _header("C0001", "2.16.156.10011.2.1.1.21", "病历概要", doc_id, when, p, hospital, birth, id_no, "") + body + "</ClinicalDocument>"
        return xml, 2 + len(past)  # Patient, Conditions, DocumentReference

    def _inpatient_header(self, code: str, template: str, title: str, p: Resident, hospital: tuple[str, str], doc_id: str, when: _dt.datetime, number: str, admit: _dt.datetime, discharge: _dt.datetime) -> str:
        birth, id_no = self._patient_fields(p, "")
        ids = f'<id root="2.16.156.10011.1.12" extension="{number}"/>'
        return _header(code, template, title, doc_id, when, p, hospital, birth, id_no, ids) + _encounter("2.16.156.10011.1.12", number, "IMP", admit, discharge, "内科病区")

    def _c0053(self, p: Resident, hospital: tuple[str, str], doc_id: str, when: _dt.datetime, number: str, admit: _dt.datetime, discharge: _dt.datetime,
               dx: list[tuple[str, str]], inpatient: Sequence[tuple[str, ...]], discharge_drugs: Sequence[tuple[str, ...]], procs: list[tuple[str, str, str, str]]) -> tuple[str, int]:
        stay = f'<effectiveTime xsi:type="IVL_TS"><low value="{admit:%Y%m%d}"/><high value="{discharge:%Y%m%d}"/></effectiveTime>'
        take_home = '<effectiveTime xsi:type="IVL_TS"><width value="30" unit="d"/></effectiveTime>'
        body = (
            "<component><structuredBody>"
            + _diagnosis_section(dx, discharge.date())
            + _medication_section("10160-0", [_drug(c, n, r, d, u, f, "EVN", stay) for c, n, r, d, u, f in inpatient])
            + _medication_section("10183-2", [_drug(c, n, r, d, u, f, "INT", take_home, usage, 30) for c, n, r, d, u, f, usage in discharge_drugs])
            + (_procedure_section(procs) if procs else "")
            + "</structuredBody></component>"
        )
        xml = self._inpatient_header("C0053", "2.16.156.10011.2.1.1.73", "出院小结", p, hospital, doc_id, when, number, admit, discharge) + body + "</ClinicalDocument>"
        return xml, 3 + len(dx) + len(inpatient) + len(discharge_drugs) + len(procs)  # Patient, Encounter, Conditions, medications, Procedures, DocumentReference

    def _c0032(self, p: Resident, hospital: tuple[str, str], doc_id: str, when: _dt.datetime, number: str, admit: _dt.datetime, discharge: _dt.datetime,
               dx: list[tuple[str, str]], procs: list[tuple[str, str, str, str]]) -> tuple[str, int]:
        body = "<component><structuredBody>" + _diagnosis_section(dx, discharge.date()) + _procedure_section(procs) + "</structuredBody></component>"
        xml = self._inpatient_header("C0032", "2.16.156.10011.2.1.1.52", "住院病案首页", p, hospital, doc_id, when, number, admit, discharge) + body + "</ClinicalDocument>"
        return xml, 3 + len(dx) + len(procs)  # Patient, Encounter, Conditions, Procedures, DocumentReference

    def _c0002(self, p: Resident, hospital: tuple[str, str], doc_id: str, start: _dt.datetime, number: str, dx: list[tuple[str, str]], fault: str,
               drugs: Sequence[tuple[str, ...]] = (), bad_route: bool = False) -> tuple[str, int]:
        birth, id_no = self._patient_fields(p, fault)
        ids = f'<id root="2.16.156.10011.1.11" extension="{number}"/>'
        days = f'<effectiveTime xsi:type="IVL_TS"><low value="{start:%Y%m%d}"/><width value="14" unit="d"/></effectiveTime>'
        prescription = [_drug(c, n, r, d, u, f, "RQO", days, usage, 14) for c, n, r, d, u, f, usage in drugs]
        if bad_route:  # 雾化 written with a code CV06.00.102 does not have: that entry alone is refused
            prescription.append(_drug("XY0460", "吸入用布地奈德混悬液", "77", "1", "mg", "bid", "RQO", days))
        body = (
            '<component><structuredBody>'
            '<component><section><code code="10154-3" codeSystem="2.16.840.1.113883.6.1" displayName="CHIEF COMPLAINT"/><text>头晕、乏力一周</text></section></component>'
            + _diagnosis_section(dx, start.date())
            + (_medication_section("10160-0", prescription) if prescription else "")
            + "</structuredBody></component>"
        )
        xml = _header("C0002", "2.16.156.10011.2.1.1.22", "门(急)诊病历", doc_id, start, p, hospital, birth, id_no, ids) + _encounter("2.16.156.10011.1.11", number, "AMB", start, None, "内科门诊") + body + "</ClinicalDocument>"
        if fault == "malformed":
            xml = xml[: len(xml) // 2]
        return xml, 3 + len(dx) + len(drugs)  # Patient, Encounter, Conditions, MedicationRequests, DocumentReference

    def _c0007(self, rng: random.Random, p: Resident, hospital: tuple[str, str], doc_id: str, when: _dt.datetime, number: str, fault: str, unknown: bool) -> tuple[str, int, int]:
        birth, id_no = self._patient_fields(p, fault)
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

