"""医院电子病历共享文档 (WS/T 500 CDA R2) → FHIR, driven by mappings/emr/mapping.yaml.

A page is JSON ``{"documents": [{"id": …, "xml": "<ClinicalDocument …>"}, …]}`` (the registry
simulator's format); a pushed file may also be one bare CDA document. Each document yields units:
the source Patient (raw = the recordTarget element, so the same patient in many documents is one
unchanged record), its Encounter, Conditions (ICD-10), lab Observations (local code → LOINC through
the ConceptMap) and a DocumentReference; all but the Patient keep the whole document as raw payload,
so the DocumentReference's attachment points at the Binary holding the original bytes.

A document whose header cannot be mapped is one rejection (kind ``document``; a malformed one is
kind ``page`` so that a replay re-parses its bytes); an unmappable lab entry rejects that entry only.
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
from pathlib import Path
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
_PREFIX = {"document": "emr-d-", "patient": "emr-p-", "encounter": "emr-e-", "condition": "emr-c-", "observation": "emr-o-"}


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
                cond = self._condition(obs, rid, pid, eref, when, birth)
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

    def _condition(self, obs: ET.Element, rid: str, pid: str, eref: dict[str, Any] | None, when: str, birth: _dt.date) -> dict[str, Any]:
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
            "category": [{"coding": [d["category"]]}],
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
            number = float(value.get("value", ""))
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
        related = [{"reference": u.key} for u in units if u.kind in ("condition", "observation")]
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
