"""医院电子病历共享文档 (WS/T 500 CDA R2) → FHIR, driven by mappings/emr/mapping.yaml.

A page is JSON ``{"documents": [{"id": …, "xml": "<ClinicalDocument …>"}, …]}`` (the registry
simulator's format); a pushed file may also be one bare CDA document. Each document yields units:
the source Patient (raw = the recordTarget element, so the same patient in many documents is one
unchanged record), its Encounter, Conditions (ICD-10), lab Observations (local code → LOINC through
the ConceptMap), medications (MedicationRequest for prescriptions and discharge medication,
MedicationStatement for in-hospital use), Procedures (ICD-9-CM-3) and a DocumentReference; all but the
Patient keep the whole document as raw payload, so the DocumentReference's attachment points at the
Binary holding the original bytes.

A document whose header cannot be mapped is one rejection (kind ``document``; a malformed one is
kind ``page`` so that a replay re-parses its bytes); an unmappable diagnosis, lab, medication or
procedure entry rejects that entry only.
DTDs and entity declarations are refused before parsing: external entities are never resolved.
"""

from __future__ import annotations

import base64
import copy
import datetime as _dt
import hashlib
import json
import re
import xml.etree.ElementTree as ET
from functools import lru_cache
from typing import Any

import orjson

from fhir_server.connectors.deadletter import Rejection
from fhir_server.connectors.unit import BadRecord as _Bad, Unit
from fhir_server.connectors.mapping import MAPPINGS, MappedSource
from fhir_server.validation.cn_identity import id_card_problem

BASE = "https://fhir.cn-ehr.org"
_SD = f"{BASE}/StructureDefinition"
_CN_TZ = _dt.timezone(_dt.timedelta(hours=8))
_XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
_PREFIX = {"document": "emr-d-", "patient": "emr-p-", "encounter": "emr-e-", "condition": "emr-c-", "observation": "emr-o-", "medication": "emr-m-", "procedure": "emr-x-"}


@lru_cache(maxsize=4)
def _concept_map(path: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(source system, local code) → the first target of the ConceptMap."""
    data = json.loads((MAPPINGS.parent / path).read_text(encoding="utf-8"))
    out = {}
    for group in data.get("group", []):
        for el in group.get("element", []):
            if el.get("target"):
                out[(group["source"], el["code"])] = {**el["target"][0], "system": group["target"], "source_display": el.get("display")}
    return out


def _safe_parse(raw: bytes) -> ET.Element:
    """Parse without DTDs: a DOCTYPE or ENTITY declaration is refused, so nothing is expanded or fetched."""
    head = raw[:4096].upper()
    if b"<!DOCTYPE" in head or b"<!ENTITY" in raw.upper():
        raise ET.ParseError("DTD / entity declarations are not accepted")
    return ET.fromstring(raw)


def _ts(value: str, what: str) -> tuple[str, _dt.date]:
    """An HL7 TS (YYYYMMDD[HHMM[SS]]) → (FHIR date or dateTime in China time, the day)."""
    m = re.fullmatch(r"(\d{4})(\d{2})(\d{2})(?:(\d{2})(\d{2})(\d{2})?)?(?:[+-]\d{4})?", value or "")
    if not m:
        raise _Bad("impossible-date", f"{what}“{value}”不是有效日期", f"{what} '{value}' is not a valid HL7 date")
    y, mo, d, hh, mi, ss = m.groups()
    try:
        day = _dt.date(int(y), int(mo), int(d))
        if hh is None:
            return day.isoformat(), day
        t = _dt.datetime(day.year, day.month, day.day, int(hh), int(mi), int(ss or 0), tzinfo=_CN_TZ)
    except ValueError:
        raise _Bad("impossible-date", f"{what}“{value}”不是有效日期", f"{what} '{value}' is not a valid date") from None
    return t.isoformat(), day


def _today() -> _dt.date:
    return _dt.datetime.now(_CN_TZ).date()


def _bytes(el: ET.Element) -> bytes:
    el = copy.copy(el)
    el.tail = None
    return ET.tostring(el, encoding="utf-8", xml_declaration=False)


class EmrConnector(MappedSource):
    """Parse and map pages of the hospital document registry (CDA R2 documents)."""

    source_kind = "emr"

    def __init__(self, mapping: dict[str, Any] | None = None) -> None:
        super().__init__(mapping)
        m = self.mapping
        self.ns: dict[str, str] = m["namespaces"]
        self._surnames = sorted(m.get("compound_surnames") or [], key=len, reverse=True)
        self._labs = _concept_map(m["lab"]["concept_map"])

    # -- helpers ---------------------------------------------------------------------------

    def resource_id(self, kind: str, record_id: str) -> str:
        return _PREFIX[kind] + hashlib.sha256(f"{self.code}|{record_id}".encode()).hexdigest()[:40]


    def _find(self, el: ET.Element, path: str) -> ET.Element | None:
        return el.find(path, self.ns)

    def _attr(self, el: ET.Element, path: str, attr: str) -> str:
        found = el.find(path, self.ns)
        return (found.get(attr) or "").strip() if found is not None else ""

    def _text(self, el: ET.Element, path: str) -> str:
        found = el.find(path, self.ns)
        return "".join(found.itertext()).strip() if found is not None else ""

    def _related(self, el: ET.Element, path: str, de_code: str) -> ET.Element | None:
        """The ``value`` of the entryRelationship observation coded ``de_code`` (WS/T 500 keys entry details by DE code)."""
        for obs in el.iterfind(path, self.ns):
            if self._attr(obs, "h:code", "code") == de_code:
                return self._find(obs, "h:value")
        return None

    def _sections(self, root: ET.Element, codes: Any) -> list[tuple[str, ET.Element]]:
        """(LOINC code, section) of every section whose code is one of ``codes``, in document order."""
        out = []
        for section in root.iterfind(".//h:section", self.ns):
            code = self._attr(section, "h:code", "code")
            if code in codes:
                out.append((code, section))
        return out

    # -- the page --------------------------------------------------------------------------

    def parse_page(self, body: bytes) -> tuple[list[Unit], list[Rejection], int]:
        """(units, rejections, received): every record of the page is in exactly one of the lists."""
        if body.lstrip()[:1] == b"{":
            try:
                docs = [(str(d.get("id", "")), d["xml"].encode("utf-8")) for d in orjson.loads(body)["documents"]]
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                digest = hashlib.sha256(body).hexdigest()[:16]
                return [], [Rejection("page", f"page/{digest}", "schema", f"文档列表页格式错误：{e}", f"the document page is not valid: {e}", body)], 1
        else:
            docs = [("", body)]  # a pushed file: one bare CDA document
        units: list[Unit] = []
        rejections: list[Rejection] = []
        for registry_id, raw in docs:
            u, r = self.parse_document(raw, registry_id)
            units += u
            rejections += r
        return units, rejections, len(units) + len(rejections)

    def parse_document(self, raw: bytes, registry_id: str = "") -> tuple[list[Unit], list[Rejection]]:
        try:
            root = _safe_parse(raw)
        except ET.ParseError as e:
            rid = f"doc/{registry_id or hashlib.sha256(raw).hexdigest()[:16]}"
            return [], [Rejection("page", rid, "not-well-formed", f"CDA 文档 XML 格式错误：{e}", f"the CDA document is not well-formed XML: {e}", raw)]
        return self.parse_child(root, raw=raw, registry_id=registry_id)

    def parse_child(self, root: ET.Element, only: str | None = None, *, raw: bytes | None = None, registry_id: str = "") -> tuple[list[Unit], list[Rejection]]:
        """The units of one ClinicalDocument; ``only`` (a record id) keeps that one and what it needs (replay)."""
        raw = raw if raw is not None else _bytes(root)
        context = {"element": raw.decode("utf-8", "replace")}
        doc_id = self._attr(root, self.mapping["header"]["document_id"], "extension") or registry_id
        doc_rid = self.mapping["record_ids"]["document"].format(doc=doc_id or hashlib.sha256(raw).hexdigest()[:16])
        try:
            units, rejections = self._document(root, raw, doc_id, doc_rid, context)
        except _Bad as bad:
            return [], [Rejection("document", doc_rid, bad.code, bad.zh, bad.en, raw, context)]
        if only is not None:
            keep = {"patient", "encounter"}
            units = [u for u in units if u.record_id == only or u.kind in keep]
            rejections = [r for r in rejections if r.record_id == only]
        return units, rejections

    # -- the document ----------------------------------------------------------------------

    def _document(self, root: ET.Element, raw: bytes, doc_id: str, doc_rid: str, context: dict[str, Any]) -> tuple[list[Unit], list[Rejection]]:
        m, h = self.mapping, self.mapping["header"]
        if not doc_id:
            raise _Bad("schema", "文档缺少文档流水号 ClinicalDocument/id", "the document has no ClinicalDocument/id")
        code = self._attr(root, h["document_code"], "code")
        spec = m["documents"].get(code)
        if spec is None:
            raise _Bad("unknown-code", f"文档类型代码“{code}”没有映射", f"document code '{code}' has no map")
        when, day = _ts(self._attr(root, h["effective_time"], "value"), "文档生成时间 effectiveTime")
        if day > _today():
            raise _Bad("impossible-date", f"文档时间 {day} 在未来", f"document time {day} is in the future")
        org_code = self._attr(root, h["custodian_id"], "extension") or self._attr(root, h["author_org_id"], "extension")
        org_name = self._text(root, h["custodian_name"]) or self._text(root, h["author_org_name"])
        if not org_code:
            raise _Bad("schema", "文档缺少机构标识（custodian/author）", "the document names no institution (custodian/author)")
        org = {"identifier": {"system": "urn:oid:2.16.156.10011.1.5", "value": org_code}, "display": org_name or org_code}
        patient, p_rid, birth = self._patient(root, org_code)
        pid = patient["id"]
        role = self._find(root, h["patient_role"])
        assert role is not None
        units = [Unit("patient", p_rid, _bytes(role), patient, when, doc_rid, context=context)]
        rejections: list[Rejection] = []
        encounter = self._encounter(root, spec, org_code, org, pid, when)
        eref = None
        if encounter is not None:
            units.append(Unit("encounter", encounter[0], raw, encounter[1], when, doc_rid, context=context))
            eref = {"reference": f"Encounter/{encounter[1]['id']}"}
        diagnoses = []
        for obs in root.iterfind(m["diagnosis"]["observations"], self.ns):
            if self._attr(obs, "h:code", "code") not in m["diagnosis"]["de_codes"]:
                continue
            rid = m["record_ids"]["condition"].format(doc=doc_id, code=self._attr(obs, m["diagnosis"]["value"], "code") or "?")
            try:
                cond = self._condition(obs, rid, pid, eref, when, birth, spec.get("condition_category"))
            except _Bad as bad:
                rejections.append(Rejection("condition", rid, bad.code, bad.zh, bad.en, raw, context))
                continue
            units.append(Unit("condition", rid, raw, cond, when, doc_rid, context=context))
            diagnoses.append(cond["id"])
        if encounter is not None and diagnoses:
            encounter[1]["diagnosis"] = [{"condition": {"reference": f"Condition/{c}"}, "rank": i + 1} for i, c in enumerate(diagnoses)]
        if "Observation" in spec["yields"]:
            lab = m["lab"]
            report_no = self._attr(root, lab["report_no"], "extension")
            for section in root.iterfind(lab["section"], self.ns):
                if self._attr(section, "h:code", "code") != lab["section_code"]:
                    continue
                for obs in section.iterfind(lab["observations"], self.ns):
                    if not self._attr(obs, lab["code"], "code"):
                        continue
                    rid = m["record_ids"]["observation"].format(doc=doc_id, code=self._attr(obs, lab["code"], "code"))
                    try:
                        o = self._observation(obs, rid, pid, eref, org, report_no, when, birth)
                    except _Bad as bad:
                        rejections.append(Rejection("observation", rid, bad.code, bad.zh, bad.en, raw, context))
                        continue
                    units.append(Unit("observation", rid, raw, o, when, doc_rid, context=context))
        author = self._text(root, h["author_name"])
        n = 0
        for section_code, section in self._sections(root, spec.get("medications") or {}):
            kind = m["medication"]["kinds"][spec["medications"][section_code]]
            for entry in section.iterfind(m["medication"]["entries"], self.ns):
                n += 1
                rid = m["record_ids"]["medication"].format(doc=doc_id, n=n)
                try:
                    med = self._medication(entry, kind, rid, pid, eref, author, when, birth)
                except _Bad as bad:
                    rejections.append(Rejection("medication", rid, bad.code, bad.zh, bad.en, raw, context))
                    continue
                units.append(Unit("medication", rid, raw, med, when, doc_rid, context=context))
        n = 0
        for _, section in self._sections(root, spec.get("procedures") or []):
            for entry in section.iterfind(m["procedure"]["entries"], self.ns):
                n += 1
                rid = m["record_ids"]["procedure"].format(doc=doc_id, n=n)
                try:
                    proc = self._procedure(entry, rid, pid, eref, birth)
                except _Bad as bad:
                    rejections.append(Rejection("procedure", rid, bad.code, bad.zh, bad.en, raw, context))
                    continue
                units.append(Unit("procedure", rid, raw, proc, when, doc_rid, context=context))
        units.append(Unit("document", doc_rid, raw, self._document_reference(root, raw, spec, code, doc_id, doc_rid, pid, eref, org, when, units), when, doc_rid, context=context))
        return units, rejections

    # -- Patient ---------------------------------------------------------------------------

    def _split_name(self, name: str) -> tuple[str, str]:
        for s in self._surnames:
            if name.startswith(s) and len(name) > len(s):
                return s, name[len(s) :]
        return name[:1], name[1:]

    def _patient(self, root: ET.Element, org_code: str) -> tuple[dict[str, Any], str, _dt.date]:
        m, h = self.mapping, self.mapping["header"]
        ids = {el.get("root", ""): (el.get("extension") or "").strip() for el in root.iterfind(h["patient_ids"], self.ns)}
        id_card = self._attr(root, h["id_card"], "extension")
        if id_card:
            ids.setdefault("2.16.156.10011.1.3", id_card)
        key = next(((k["root"], ids[k["root"]]) for k in m["patient_keys"] if ids.get(k["root"])), None)
        if key is None:
            raise _Bad("schema", "患者（recordTarget）没有可用的标识", "the patient (recordTarget) has no usable identifier")
        name = self._text(root, h["name"])
        if not name:
            raise _Bad("schema", "患者姓名缺失", "the patient has no name")
        sex_code = self._attr(root, h["sex"], "code")
        sex = m["sex"].get(sex_code)
        if sex is None:
            raise _Bad("unknown-code", f"性别代码“{sex_code}”没有映射", f"sex code '{sex_code}' has no map")
        birth_iso, birth = _ts(self._attr(root, h["birth_time"], "value")[:8], "出生日期 birthTime")
        if birth > _today() or birth.year < 1900:
            raise _Bad("impossible-date", f"出生日期 {birth} 不可能（未来或过早）", f"birth date {birth} is impossible (future or too early)")
        if id_card:
            problem = id_card_problem(id_card)
            if problem:
                raise _Bad("id-check-digit" if "check" in problem[0] else "id-invalid", f"身份证号无效：{problem[1]}", f"the ID card number is not valid: {problem[0]}")
        rid = m["record_ids"]["patient"].format(org=org_code, patient=f"{key[0]}/{key[1]}")
        identifiers: list[dict[str, Any]] = [
            self.source_identifier(rid)
        ]
        if id_card:
            identifiers.append(
                {
                    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "NNCHN"}, {"system": f"{BASE}/CodeSystem/cv02-01-101-id-document-type", "code": "01", "display": "居民身份证"}]},
                    "system": "urn:oid:2.16.156.10011.1.3",
                    "value": id_card,
                }
            )
        if ids.get("2.16.156.10011.1.19"):
            identifiers.append({"system": "urn:oid:2.16.156.10011.1.19", "value": ids["2.16.156.10011.1.19"]})
        family, given = self._split_name(name)
        hn: dict[str, Any] = {"text": name, "family": family}
        if given:
            hn["given"] = [given]
        patient: dict[str, Any] = {
            "resourceType": "Patient",
            "id": self.resource_id("patient", rid),
            "meta": self._meta(rid, m["profiles"]["Patient"]),
            "identifier": identifiers,
            "name": [hn],
        }
        phone = self._attr(root, h["phone"], "value").removeprefix("tel:")
        if phone:
            patient["telecom"] = [{"system": "phone", "value": phone, "use": "mobile"}]
        patient["gender"] = sex["gender"]
        patient["_gender"] = {"extension": [{"url": f"{_SD}/cn-gb-sex", "valueCoding": {"system": "urn:oid:2.16.156.10011.2.3.3.4", "code": sex_code, "display": sex["display"]}}]}
        patient["birthDate"] = birth_iso[:10]
        address = self._text(root, h["address"])
        if address:
            patient["address"] = [{"use": "home", "text": address, "country": "CN"}]
        return patient, rid, birth

    # -- Encounter -------------------------------------------------------------------------

    def _encounter(self, root: ET.Element, spec: dict[str, Any], org_code: str, org: dict[str, Any], pid: str, when: str) -> tuple[str, dict[str, Any]] | None:
        m, h = self.mapping, self.mapping["header"]
        if self._find(root, h["encounter"]) is None:
            return None
        identifiers, visit = [], ""
        for el in root.iterfind(h["encounter_ids"], self.ns):
            known = m["encounter_ids"].get(el.get("root", ""))
            if known and el.get("extension"):
                identifiers.append({"system": known["system"], "value": el.get("extension")})
                visit = visit or f"{el.get('root')}/{el.get('extension')}"
        if not visit:
            raise _Bad("schema", "就诊（encompassingEncounter）缺少门(急)诊号或住院号", "the encounter has no outpatient or inpatient number")
        cls = self._attr(root, h["encounter_code"], "code") or spec.get("default_class", "")
        if cls not in m["encounter_classes"]:
            raise _Bad("unknown-code", f"就诊类型代码“{cls}”没有映射", f"encounter class '{cls}' has no map")
        if cls == "IMP" and not any(i["system"].endswith(".1.12") for i in identifiers):
            raise _Bad("schema", "住院就诊缺少住院号", "an inpatient encounter lacks the inpatient number")
        period: dict[str, str] = {}
        t = self._find(root, h["encounter_time"])
        if t is not None:
            if t.get("value"):
                period["start"] = _ts(t.get("value", ""), "就诊时间")[0]
            for part, key in (("low", "start"), ("high", "end")):
                v = self._attr(t, f"h:{part}", "value")
                if v:
                    period[key] = _ts(v, "就诊时间")[0]
        if not period:
            period["start"] = when
        rid = m["record_ids"]["encounter"].format(org=org_code, visit=visit)
        enc: dict[str, Any] = {
            "resourceType": "Encounter",
            "id": self.resource_id("encounter", rid),
            "meta": self._meta(rid, m["profiles"]["Encounter"]),
            "identifier": identifiers,
            "status": "finished",
            "class": {"system": m["encounter_class_system"], "code": cls, "display": m["encounter_classes"][cls]},
            "subject": {"reference": f"Patient/{pid}"},
            "period": period,
            "serviceProvider": org,
        }
        dept = self._text(root, h["encounter_department"])
        if dept:
            enc["location"] = [{"location": {"display": dept}}]
        return rid, enc

    # -- Condition -------------------------------------------------------------------------

    def _condition(self, obs: ET.Element, rid: str, pid: str, eref: dict[str, Any] | None, when: str, birth: _dt.date, category: str | None = None) -> dict[str, Any]:
        d = self.mapping["diagnosis"]
        value = self._find(obs, d["value"])
        code = (value.get("code") or "").strip() if value is not None else ""
        if value is None or value.get("codeSystem") != d["icd10_oid"] or not re.match(d["icd10_pattern"], code):
            raise _Bad("unknown-code", f"诊断代码“{code}”不是 ICD-10 编码", f"diagnosis code '{code}' is not an ICD-10 code")
        cond: dict[str, Any] = {
            "resourceType": "Condition",
            "id": self.resource_id("condition", rid),
            "meta": self._meta(rid, d["profile"]),
            "identifier": [{"system": self.system, "value": rid}],
            "category": [{"coding": [{**d["category"], "code": category or d["category"]["code"]}]}],
            "code": {"coding": [{"system": d["icd10_system"], "code": code, **({"display": value.get("displayName")} if value.get("displayName") else {})}], "text": value.get("displayName") or code},
            "subject": {"reference": f"Patient/{pid}"},
        }
        if eref:
            cond["encounter"] = eref
        t = self._attr(obs, d["time"], "value")
        if t:
            onset, day = _ts(t, "诊断日期")
            if day < birth or day > _today():
                raise _Bad("impossible-date", f"诊断日期 {day} 不可能", f"diagnosis date {day} is impossible")
            cond["onsetDateTime"] = onset
        elif category == "problem-list-item":
            # cn-cond-1: a past illness records when it was diagnosed; without the date it says too little
            raise _Bad("schema", f"既往疾病 {code} 缺少确诊日期", f"past illness {code} has no diagnosis date")
        cond["recordedDate"] = when
        return cond

    # -- Observation (labs) ----------------------------------------------------------------

    def _observation(self, obs: ET.Element, rid: str, pid: str, eref: dict[str, Any] | None, org: dict[str, Any], report_no: str, when: str, birth: _dt.date) -> dict[str, Any]:
        lab = self.mapping["lab"]
        local = self._find(obs, lab["code"])
        assert local is not None
        local_code, local_oid = local.get("code", ""), local.get("codeSystem", "")
        local_system = lab["local_systems"].get(local_oid)
        if local_system is None:
            raise _Bad("unknown-code", f"检验代码系统“{local_oid}”没有映射", f"local lab code system '{local_oid}' has no map")
        target = self._labs.get((local_system, local_code))
        if target is None:
            raise _Bad("unknown-code", f"本地检验代码“{local_code}”在 ConceptMap 中没有映射", f"local lab code '{local_code}' has no map to LOINC")
        value = self._find(obs, lab["value"])
        if value is None or value.get(_XSI_TYPE, "PQ") != "PQ":
            raise _Bad("schema", f"检验项目 {local_code} 没有定量结果", f"lab item {local_code} has no quantitative result")
        try:
            float(value.get("value", ""))
        except ValueError:
            raise _Bad("schema", f"检验项目 {local_code} 的结果“{value.get('value')}”不是数值", f"lab item {local_code}: result '{value.get('value')}' is not a number") from None
        unit = value.get("unit", "")
        ucum = lab["units"].get(unit)
        if ucum is None:
            raise _Bad("unknown-code", f"检验单位“{unit}”没有 UCUM 映射", f"unit '{unit}' has no UCUM map")
        t = self._attr(obs, lab["time"], "value")
        effective, day = _ts(t, "检验时间") if t else (when, None)
        if day is not None and (day < birth or day > _today()):
            raise _Bad("impossible-date", f"检验时间 {day} 不可能", f"lab time {day} is impossible")
        rng: dict[str, Any] = {}
        for part in ("low", "high"):
            el = self._find(obs, lab[part])
            if el is not None and el.get("value"):
                rng[part] = {"value": _num(el.get("value", "")), "unit": unit, "system": "http://unitsofmeasure.org", "code": lab["units"].get(el.get("unit") or unit, ucum)}
        text = self._text(obs, lab["range_text"])
        if text:
            rng["text"] = text
        if not rng:
            raise _Bad("schema", f"检验项目 {local_code} 缺少参考范围", f"lab item {local_code} has no reference range")
        o: dict[str, Any] = {
            "resourceType": "Observation",
            "id": self.resource_id("observation", rid),
            "meta": self._meta(rid, lab["profile"]),
            "identifier": [{"system": self.system, "value": rid}] + ([{"system": "urn:oid:2.16.156.10011.1.33", "value": f"{report_no}/{local_code}"}] if report_no else []),
            "status": "final",
            "category": [{"coding": [lab["category"]]}],
            "code": {
                "coding": [
                    {"system": target["system"], "code": target["code"], "display": target.get("display")},
                    {"system": local_system, "code": local_code, "display": local.get("displayName") or target.get("source_display")},
                ],
                "text": local.get("displayName") or target.get("source_display") or local_code,
            },
            "subject": {"reference": f"Patient/{pid}"},
        }
        if eref:
            o["encounter"] = eref
        o["effectiveDateTime"] = effective
        o["performer"] = [org]
        o["valueQuantity"] = {"value": _num(value.get("value", "")), "unit": unit, "system": "http://unitsofmeasure.org", "code": ucum}
        flag = self._attr(obs, lab["interpretation"], "code")
        if flag:
            o["interpretation"] = [{"coding": [{"system": lab["interpretation_system"], "code": flag}]}]
        o["referenceRange"] = [rng]
        return o

    # -- MedicationRequest / MedicationStatement -------------------------------------------

    def _day(self, value: str, what: str, what_en: str, birth: _dt.date) -> tuple[str, _dt.date]:
        """An entry's HL7 time that must fall between the patient's birth and today."""
        iso, day = _ts(value, f"{what} {what_en}")
        if day < birth or day > _today():
            raise _Bad("impossible-date", f"{what} {day} 不可能（早于出生或在未来）", f"{what_en} {day} is impossible (before birth or in the future)")
        return iso, day

    def _period(self, el: ET.Element | None, what: str, what_en: str, birth: _dt.date) -> dict[str, str]:
        """IVL_TS low/high → a FHIR Period (end not before start)."""
        period: dict[str, str] = {}
        days: dict[str, _dt.date] = {}
        if el is None:
            return period
        for part, key in (("low", "start"), ("high", "end")):
            v = self._attr(el, f"h:{part}", "value")
            if v:
                period[key], days[key] = self._day(v, what, what_en, birth)
        if "start" in days and "end" in days and days["end"] < days["start"]:
            raise _Bad("impossible-date", f"{what}结束 {days['end']} 早于开始 {days['start']}", f"{what_en}: end {days['end']} is before start {days['start']}")
        return period

    def _dosage(self, entry: ET.Element, name: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(Dosage, total quantity) of a substanceAdministration: route, dose, frequency, duration, usage text."""
        md = self.mapping["medication"]
        dosage: dict[str, Any] = {}
        usage = self._related(entry, md["related"], md["usage_de"])
        if usage is not None and "".join(usage.itertext()).strip():
            dosage["text"] = "".join(usage.itertext()).strip()
        timing: dict[str, Any] = {}
        repeat: dict[str, Any] = {}
        freq_el = self._related(entry, md["related"], md["frequency_de"])
        if freq_el is not None:
            freq = (freq_el.get("code") or "".join(freq_el.itertext())).strip()
            rule = md["frequencies"].get(freq.lower())
            if rule is None:
                raise _Bad("unknown-code", f"药物“{name}”的使用频率“{freq}”没有映射", f"frequency '{freq}' of '{name}' has no map")
            timing["code"] = {"text": freq}
            repeat.update({k: v for k, v in rule.items() if k != "as_needed"})
            if rule.get("as_needed"):
                dosage["asNeededBoolean"] = True
        width = self._find(entry, md["duration"])
        if width is not None and width.get("value"):
            unit = md["duration_units"].get(width.get("unit") or "d")
            if unit is None:
                raise _Bad("unknown-code", f"用药天数单位“{width.get('unit')}”没有映射", f"duration unit '{width.get('unit')}' has no map")
            repeat["boundsDuration"] = {"value": self._number(width.get("value", ""), "用药天数", "duration"), "unit": unit, "system": md["ucum_system"], "code": unit}
        if repeat:
            timing["repeat"] = repeat
        if timing:
            dosage["timing"] = timing
        route = self._find(entry, md["route"])
        if route is not None and route.get("code"):
            code = route.get("code", "")
            known = md["routes"].get(code) if route.get("codeSystem", md["route_oid"]) == md["route_oid"] else None
            if known is None:
                raise _Bad("unknown-code", f"用药途径代码“{code}”没有映射", f"route code '{code}' has no map")
            coding = [{"system": md["route_system"], "code": code, "display": known["display"]}]
            if known.get("snomed"):
                coding.append({"system": md["snomed_system"], "code": known["snomed"]})
            dosage["route"] = {"coding": coding, "text": known["display"]}
        dose = self._find(entry, md["dose"])
        if dose is not None and dose.get("value"):
            dosage["doseAndRate"] = [{"doseQuantity": self._quantity(dose, "药物使用次剂量", "dose")}]
        total = self._related(entry, md["related"], md["total_de"])
        return dosage, self._quantity(total, "药物使用总剂量", "total dose") if total is not None and total.get("value") else None

    def _number(self, text: str, what: str, what_en: str) -> float | int:
        try:
            return _num(text)
        except ValueError:
            raise _Bad("schema", f"{what}“{text}”不是数值", f"{what_en} '{text}' is not a number") from None

    def _quantity(self, el: ET.Element, what: str, what_en: str) -> dict[str, Any]:
        """A PQ → Quantity; a UCUM code only where the unit has one (片, 粒… stay text)."""
        unit = el.get("unit") or ""
        q: dict[str, Any] = {"value": self._number(el.get("value", ""), what, what_en)}
        if unit:
            q["unit"] = unit
            ucum = self.mapping["medication"]["dose_units"].get(unit)
            if ucum:
                q.update({"system": self.mapping["medication"]["ucum_system"], "code": ucum})
        return q

    def _medication(self, entry: ET.Element, kind: dict[str, Any], rid: str, pid: str, eref: dict[str, Any] | None, author: str, when: str, birth: _dt.date) -> dict[str, Any]:
        md = self.mapping["medication"]
        drug = self._find(entry, md["drug_code"])
        name = self._text(entry, md["drug_name"]) or (drug.get("displayName", "") if drug is not None else "")
        if not name:
            raise _Bad("schema", "用药条目缺少药物名称", "the medication entry has no drug name")
        concept: dict[str, Any] = {}
        if drug is not None and drug.get("code"):
            oid = drug.get("codeSystem", "")
            if not oid:
                raise _Bad("schema", f"药物“{name}”的代码没有代码系统", f"the code of drug '{name}' names no code system")
            coding = {"system": md["drug_systems"].get(oid, f"urn:oid:{oid}"), "code": drug.get("code")}
            if drug.get("displayName"):
                coding["display"] = drug.get("displayName")
            concept["coding"] = [coding]
        concept["text"] = name
        dosage, total = self._dosage(entry, name)
        period = self._period(self._find(entry, md["time"]), "用药时间", "medication period", birth)
        cda_status = self._attr(entry, md["status"], "code")
        status = md["status_codes"].get(cda_status, kind["status"])
        res: dict[str, Any] = {"resourceType": kind["resource"], "id": self.resource_id("medication", rid), "meta": self._meta(rid, None), "identifier": [{"system": self.system, "value": rid}], "status": status}
        if kind["resource"] == "MedicationRequest":
            repeat = dosage.get("timing", {}).get("repeat", {})
            if period and "boundsDuration" not in repeat:
                # bounds[x] is one choice: the prescribed number of days (width) wins over the dates
                dosage.setdefault("timing", {}).setdefault("repeat", {})["boundsPeriod"] = period
            res["intent"] = kind["intent"]
            res["category"] = [{"coding": [{"system": md["request_category_system"], "code": kind["category"]}]}]
            res["medicationCodeableConcept"] = concept
            res["subject"] = {"reference": f"Patient/{pid}"}
            if eref:
                res["encounter"] = eref
            res["authoredOn"] = when
            if author:
                res["requester"] = {"display": author}
            if dosage:
                res["dosageInstruction"] = [dosage]
            dispense: dict[str, Any] = {}
            if total:
                dispense["quantity"] = total
            bounds = dosage.get("timing", {}).get("repeat", {}).get("boundsDuration")
            if bounds:
                dispense["expectedSupplyDuration"] = bounds
            if dispense:
                res["dispenseRequest"] = dispense
        else:
            res["category"] = {"coding": [{"system": md["statement_category_system"], "code": kind["category"]}]}
            res["medicationCodeableConcept"] = concept
            res["subject"] = {"reference": f"Patient/{pid}"}
            if eref:
                res["context"] = eref
            if period:
                res["effectivePeriod"] = period
            res["dateAsserted"] = when
            if author:
                res["informationSource"] = {"display": author}
            if dosage:
                res["dosage"] = [dosage]
        return res

    # -- Procedure -------------------------------------------------------------------------

    def _procedure(self, entry: ET.Element, rid: str, pid: str, eref: dict[str, Any] | None, birth: _dt.date) -> dict[str, Any]:
        pm = self.mapping["procedure"]
        code_el = self._find(entry, pm["code"])
        code = (code_el.get("code") or "").strip() if code_el is not None else ""
        if code_el is None or code_el.get("codeSystem") != pm["icd9_oid"] or not re.match(pm["icd9_pattern"], code):
            raise _Bad("unknown-code", f"手术操作代码“{code}”不是 ICD-9-CM-3 编码", f"procedure code '{code}' is not an ICD-9-CM-3 code")
        name_el = self._related(entry, pm["related"], pm["name_de"])
        name = ("".join(name_el.itertext()).strip() if name_el is not None else "") or code_el.get("displayName") or code
        coding = {"system": pm["icd9_system"], "code": code}
        if code_el.get("displayName"):
            coding["display"] = code_el.get("displayName")
        proc: dict[str, Any] = {
            "resourceType": "Procedure",
            "id": self.resource_id("procedure", rid),
            "meta": self._meta(rid, None),
            "identifier": [{"system": self.system, "value": rid}],
            "status": "completed",
            "code": {"coding": [coding], "text": name},
            "subject": {"reference": f"Patient/{pid}"},
        }
        if eref:
            proc["encounter"] = eref
        t = self._find(entry, pm["time"])
        if t is not None and t.get("value"):
            proc["performedDateTime"] = self._day(t.get("value", ""), "手术操作日期", "procedure date", birth)[0]
        else:
            period = self._period(t, "手术操作日期", "procedure date", birth)
            if period:
                proc["performedPeriod"] = period
        performers = []
        for who in entry.iterfind(pm["performers"], self.ns):
            # the name's own text: some hospitals add the role as <prefix> inside <name>
            name_el = self._find(who, pm["performer_name"])
            name_p = ((name_el.text or "").strip() or self._text(who, pm["performer_name"])) if name_el is not None else ""
            if name_p:
                role = self._attr(who, pm["performer_role"], "displayName") or pm["default_role"]
                performers.append({"function": {"text": role}, "actor": {"display": name_p}})
        if performers:
            proc["performer"] = performers
        return proc

    # -- DocumentReference -----------------------------------------------------------------

    def _document_reference(self, root: ET.Element, raw: bytes, spec: dict[str, Any], code: str, doc_id: str, rid: str, pid: str, eref: dict[str, Any] | None, org: dict[str, Any], when: str, units: list[Unit]) -> dict[str, Any]:
        m, h = self.mapping, self.mapping["header"]
        sha256 = hashlib.sha256(raw).hexdigest()
        title = self._text(root, h["title"]) or spec["name"]
        ref: dict[str, Any] = {
            "resourceType": "DocumentReference",
            "id": self.resource_id("document", rid),
            "meta": self._meta(rid, None),
            "masterIdentifier": {"system": "urn:oid:2.16.156.10011.1.1", "value": doc_id},
            "status": "current",
            "docStatus": "final",
            "type": {"coding": [{"system": m["document_type_system"], "code": code, "display": spec["name"]}], "text": spec["name"]},
            "subject": {"reference": f"Patient/{pid}"},
            "date": _instant(when),
            "custodian": org,
            "description": title,
            "content": [
                {
                    "attachment": {
                        "contentType": m["document_content_type"],
                        "language": "zh-CN",
                        "url": f"Binary/{sha256}",
                        "size": len(raw),
                        "hash": base64.b64encode(hashlib.sha1(raw).digest()).decode(),
                        "title": title,
                    },
                    "format": {"system": m["document_format_system"], "code": self._attr(root, h["template_id"], "root") or spec["template"]},
                }
            ],
        }
        author = self._text(root, h["author_name"])
        if author:
            ref["author"] = [{"display": author}]
        related = [{"reference": u.key} for u in units if u.kind in ("condition", "observation", "medication", "procedure")]
        context: dict[str, Any] = {}
        if eref:
            context["encounter"] = [eref]
        if related:
            context["related"] = related
        if context:
            ref["context"] = context
        return ref


def _num(text: str) -> float | int:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def _instant(when: str) -> str:
    """DocumentReference.date is an instant: a bare date becomes midnight China time."""
    return when if "T" in when else f"{when}T00:00:00+08:00"
