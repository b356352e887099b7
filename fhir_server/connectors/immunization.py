"""免疫规划 (immunization information system) XML → FHIR, driven by mappings/immunization/mapping.yaml.

A page is ``<children><child>…<inoculations><inoculation>…</inoculation></inoculations>
<aefis><aefi>…</aefi></aefis></child></children>``. Each child, inoculation and AEFI is one source
record (a *unit*): its own record id, raw bytes, SHA-256, FHIR resource. The child's bytes are the
child element without its inoculations and AEFIs, so that a new dose does not make the child
record look changed. Everything the parser refuses comes back as a :class:`Rejection` with the
reason; a refused child takes its inoculations and AEFIs with it (they have no Patient to point to).
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import re
import xml.etree.ElementTree as ET
from typing import Any, Callable

from fhir_server.connectors.deadletter import Rejection
from fhir_server.connectors.mapping import MappedSource
from fhir_server.connectors.unit import BadRecord as _Bad, Unit, as_bad_record
from fhir_server.validation.cn_identity import id_card_problem

BASE = "https://fhir.cn-ehr.org"
_SD = f"{BASE}/StructureDefinition"
_CN_TZ = _dt.timezone(_dt.timedelta(hours=8))
_NESTED = ("inoculations", "aefis", "infections")


def _text(el: ET.Element, name: str) -> str:
    child = el.find(name)
    return (child.text or "").strip() if child is not None else ""


def _escape(text: str) -> str:
    if "&" in text or "<" in text or ">" in text:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text


def _bytes(el: ET.Element) -> bytes:
    """``ET.tostring(el)`` without its tail, byte for byte (the ledger's hashes depend on it).

    ElementTree's serializer is pure Python and was a third of a sync's parsing time: a record
    here is flat (an element of plain-text children), which this writes directly."""
    if el.attrib or any(len(c) or c.attrib for c in el):
        el = copy.copy(el)
        el.tail = None
        return ET.tostring(el, encoding="utf-8", xml_declaration=False)
    if len(el) == 0 and not el.text:
        return f"<{el.tag} />".encode()
    parts = [f"<{el.tag}>", _escape(el.text or "")]
    for c in el:
        parts.append(f"<{c.tag}>{_escape(c.text)}</{c.tag}>" if c.text else f"<{c.tag} />")
        if c.tail:
            parts.append(_escape(c.tail))
    parts.append(f"</{el.tag}>")
    return "".join(parts).encode()


def _element_text(el: ET.Element) -> Callable[[], str]:
    """The whole child element, serialised only if a dead letter needs it (for its replay)."""
    return lambda: _bytes(el).decode()


def _date(value: str, what: str) -> _dt.date:
    digits = value[:10].replace("-", "").replace("/", "")
    try:
        if len(digits) != 8 or not digits.isdigit():
            raise ValueError
        return _dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
    except ValueError:
        raise _Bad("impossible-date", f"{what}“{value}”不是有效日期", f"{what} '{value}' is not a valid date") from None


def _date_time(value: str, what: str) -> str:
    """A FHIR date, or dateTime in China time when the source gives a time."""
    day = _date(value, what)
    m = re.match(r"^.{10}[ T](\d{2}):(\d{2})(?::(\d{2}))?", value)
    if not m:
        return day.isoformat()
    try:
        t = _dt.datetime(day.year, day.month, day.day, int(m.group(1)), int(m.group(2)), int(m.group(3) or 0), tzinfo=_CN_TZ)
    except ValueError:
        raise _Bad("impossible-date", f"{what}“{value}”不是有效时间", f"{what} '{value}' is not a valid time") from None
    return t.isoformat()


def _today() -> _dt.date:
    return _dt.datetime.now(_CN_TZ).date()


class ImmunizationConnector(MappedSource):
    """Parse and map one page of the immunization platform's XML."""

    source_kind = "immunization"

    def __init__(self, mapping: dict[str, Any] | None = None) -> None:
        super().__init__(mapping)
        m = self.mapping
        self._patterns = {
            kind: {k: re.compile(v) for k, v in (m[kind].get("patterns") or {}).items()} for kind in ("child", "inoculation")
        }
        self._surnames = sorted(m["child"].get("compound_surnames") or [], key=len, reverse=True)

    # -- ids -------------------------------------------------------------------------------

    def resource_id(self, kind: str, record_id: str) -> str:
        """Deterministic ids: the same source record always lands on the same resource."""
        prefix = {"child": "imz-p-", "inoculation": "imz-i-", "aefi": "imz-a-"}[kind]
        return prefix + hashlib.sha256(f"{self.code}|{record_id}".encode()).hexdigest()[:40]

    def record_id(self, kind: str, values: dict[str, str]) -> str:
        return self.mapping["record_ids"][kind].format(**values)


    # -- the page --------------------------------------------------------------------------

    def parse_page(self, body: bytes) -> tuple[list[Unit], list[Rejection], int]:
        """(units, rejections, received): every record of the page is in exactly one of the lists."""
        try:
            root = ET.fromstring(body)
        except ET.ParseError as e:
            digest = hashlib.sha256(body).hexdigest()[:16]
            return [], [Rejection("page", f"page/{digest}", "not-well-formed", f"XML 格式错误：{e}", f"XML is not well-formed: {e}", body)], 1
        units: list[Unit] = []
        rejections: list[Rejection] = []
        for child in root.iter("child"):
            u, r = self.parse_child(child)
            units += u
            rejections += r
        return units, rejections, len(units) + len(rejections)

    def parse_child(self, el: ET.Element, only: str | None = None) -> tuple[list[Unit], list[Rejection]]:
        """The units of one child element; ``only`` (a record id) keeps just that one (replay)."""
        values = {c.tag: (c.text or "").strip() for c in el if c.tag not in _NESTED}
        stripped = copy.copy(el)
        for nested in [c for c in stripped if c.tag in _NESTED]:
            stripped.remove(nested)
        child_raw = _bytes(stripped)
        child_code = values.get("chil_code", "")
        child_rid = self.record_id("child", {"chil_code": child_code or "?"})
        source_time = values.get("chil_updatetime", "")
        inocs = el.findall("inoculations/inoculation")
        aefis = el.findall("aefis/aefi")
        try:
            patient, birth = self._patient(values, child_rid)
        except Exception as e:
            bad = as_bad_record(e, child_rid)
            ctx = {"element": _element_text(el)}
            out = [Rejection("child", child_rid, bad.code, bad.zh, bad.en, child_raw, ctx)]
            why_zh, why_en = f"所属儿童记录 {child_rid} 被拒收：{bad.zh}", f"its child record {child_rid} was rejected: {bad.en}"
            for kind, items in (("inoculation", inocs), ("aefi", aefis)):
                for item in items:
                    iv = {c.tag: (c.text or "").strip() for c in item}
                    rid = self._safe_record_id(kind, child_code, iv)
                    out.append(Rejection(kind, rid, "parent-rejected", why_zh, why_en, _bytes(item), ctx))
            return [], out
        pid = patient["id"]
        context = {"element": _element_text(el)}  # shared by the child's units: what a replay re-reads
        units = [Unit("child", child_rid, child_raw, patient, source_time, child_code, context=context)]
        rejections: list[Rejection] = []
        doses: list[tuple[str, str, str]] = []
        for item in inocs:
            iv = {c.tag: (c.text or "").strip() for c in item}
            rid = self._safe_record_id("inoculation", child_code, iv)
            try:
                imm = self._immunization(iv, rid, pid, birth)
            except Exception as e:
                bad = as_bad_record(e, rid)
                rejections.append(Rejection("inoculation", rid, bad.code, bad.zh, bad.en, _bytes(item), context))
                continue
            units.append(Unit("inoculation", rid, _bytes(item), imm, source_time, child_code, context=context))
            doses.append((iv["inoc_bact_code"], imm["occurrenceDateTime"][:10], imm["id"]))
        for item in aefis:
            av = {c.tag: (c.text or "").strip() for c in item}
            rid = self._safe_record_id("aefi", child_code, av)
            try:
                event = self._adverse_event(av, rid, pid, birth, doses)
            except Exception as e:
                bad = as_bad_record(e, rid)
                rejections.append(Rejection("aefi", rid, bad.code, bad.zh, bad.en, _bytes(item), context))
                continue
            units.append(Unit("aefi", rid, _bytes(item), event, source_time, child_code, context=context))
        if only is not None:
            units = [u for u in units if u.record_id == only or u.kind == "child"]
            rejections = [r for r in rejections if r.record_id == only]
        return units, rejections

    def _safe_record_id(self, kind: str, child_code: str, values: dict[str, str]) -> str:
        fields = re.findall(r"{(\w+)}", self.mapping["record_ids"][kind])
        return self.record_id(kind, {f: (child_code if f == "chil_code" else values.get(f) or "?") for f in fields})

    # -- checks ----------------------------------------------------------------------------

    def _required(self, kind: str, values: dict[str, str], label: str) -> None:
        for name in self.mapping[kind]["required"]:
            if not values.get(name):
                raise _Bad("schema", f"{label}缺少必填字段 {name}", f"{label}lacks the required field {name}")
        for name, pattern in self._patterns.get(kind, {}).items():
            value = values.get(name)
            if value and not pattern.match(value):
                raise _Bad("schema", f"{label}字段 {name} 的值“{value}”格式不符", f"{label}field {name} '{value}' does not match {pattern.pattern}")

    def _code(self, table: dict[str, Any], value: str, field_: str, label: str) -> Any:
        if value not in table:
            raise _Bad("unknown-code", f"{label}字段 {field_} 的代码“{value}”没有映射", f"{label}field {field_}: code '{value}' has no map")
        return table[value]

    # -- Patient ---------------------------------------------------------------------------

    def _split_name(self, name: str) -> tuple[str, str]:
        for s in self._surnames:
            if name.startswith(s) and len(name) > len(s):
                return s, name[len(s) :]
        return name[:1], name[1:]

    def _division(self, text: str, fallback: str | None = None) -> tuple[str, str] | None:
        codes = self.mapping["divisions"]["codes"]
        for code, name in codes.items():
            if name in text:
                return code, name
        if fallback and fallback in codes:
            return fallback, codes[fallback]
        return None

    def _address(self, text: str, category: str, display: str, fallback: str | None) -> dict[str, Any]:
        ext = [
            {"url": f"{_SD}/cn-address-category", "valueCoding": {"system": f"{BASE}/CodeSystem/address-category", "code": category, "display": display}}
        ]
        address: dict[str, Any] = {"extension": ext, "use": "home", "text": text, "city": "上海市"}
        division = self._division(text, fallback)
        if division:
            ext.append({"url": f"{_SD}/cn-address-division", "valueCoding": {"system": self.mapping["divisions"]["system"], "code": division[0], "display": division[1]}})
            address["district"] = division[1]
        address["country"] = "CN"
        return address

    def _patient(self, v: dict[str, str], rid: str) -> tuple[dict[str, Any], _dt.date]:
        m = self.mapping
        self._required("child", v, "儿童记录 / child: ")
        sex = self._code(m["sex"], v["chil_sex"], "chil_sex", "儿童记录 / child: ")
        birth = _date(v["chil_birthday"], "出生日期 chil_birthday")
        if birth > _today() or birth.year < 1900:
            raise _Bad("impossible-date", f"出生日期 {birth} 不可能（未来或过早）", f"birth date {birth} is impossible (future or too early)")
        identifiers: list[dict[str, Any]] = [
            self.source_identifier(v["chil_code"])
        ]
        if v.get("chil_no"):
            problem = id_card_problem(v["chil_no"])
            if problem:
                raise _Bad("id-check-digit" if "check" in problem[0] else "id-invalid", f"身份证号 chil_no 无效：{problem[1]}", f"chil_no is not valid: {problem[0]}")
            identifiers.append(
                {
                    "type": {
                        "coding": [
                            {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "NNCHN"},
                            {"system": f"{BASE}/CodeSystem/cv02-01-101-id-document-type", "code": "01", "display": "居民身份证"},
                        ]
                    },
                    "system": "urn:oid:2.16.156.10011.1.3",
                    "value": v["chil_no"],
                }
            )
        family, given = self._split_name(v["chil_name"])
        patient: dict[str, Any] = {
            "resourceType": "Patient",
            "id": self.resource_id("child", rid),
            "meta": self._meta(rid, m["child"]["profile"]),
        }
        extensions = []
        nation = v.get("chil_nati_id", "")
        if re.fullmatch(r"0[1-9]|[1-4][0-9]|5[0-6]|9[78]", nation):
            extensions.append({"url": f"{_SD}/cn-ethnicity", "valueCodeableConcept": {"coding": [{"system": "urn:oid:2.16.156.10011.2.3.3.3", "code": nation}]}})
        residence = m["residence"].get(v.get("chil_residence", ""))
        if residence:
            extensions.append({"url": f"{_SD}/cn-residence-type", "valueCodeableConcept": {"coding": [{"system": f"{BASE}/CodeSystem/residence-type", **residence}]}})
        if extensions:
            patient["extension"] = extensions
        patient["identifier"] = identifiers
        status = m["status"].get(v.get("chil_status", ""), {})
        if "active" in status:
            patient["active"] = status["active"]
        name: dict[str, Any] = {"text": v["chil_name"], "family": family}
        if given:
            name["given"] = [given]
        patient["name"] = [name]
        patient["gender"] = sex["gender"]
        patient["_gender"] = {"extension": [{"url": f"{_SD}/cn-gb-sex", "valueCoding": {"system": "urn:oid:2.16.156.10011.2.3.3.4", "code": v["chil_sex"], "display": sex["display"]}}]}
        patient["birthDate"] = birth.isoformat()
        if status.get("deceased"):
            patient["deceasedBoolean"] = True
        clinic = v.get("chil_curdepartment", "")
        addresses = []
        if v.get("chil_habiaddress"):
            addresses.append(self._address(v["chil_habiaddress"], "household", "户籍地址", None))
        if v.get("chil_address"):
            addresses.append(self._address(v["chil_address"], "residence", "常住地址", clinic[:6] or None))
        if addresses:
            patient["address"] = addresses
        phone = v.get("chil_tel", "")
        contacts = []
        for field_, relation in m["guardians"].items():
            if v.get(field_) and phone:  # cn-patient: a contact has a phone
                g_family, g_given = self._split_name(v[field_])
                g_name: dict[str, Any] = {"text": v[field_], "family": g_family}
                if g_given:
                    g_name["given"] = [g_given]
                contacts.append(
                    {
                        "relationship": [{"coding": [{"system": "urn:oid:2.16.156.10011.2.3.3.8", **relation}]}],
                        "name": g_name,
                        "telecom": [{"system": "phone", "value": phone, "use": "mobile"}],
                    }
                )
        if contacts:
            patient["contact"] = contacts
        return patient, birth

    # -- Immunization ----------------------------------------------------------------------

    def _immunization(self, v: dict[str, str], rid: str, pid: str, birth: _dt.date) -> dict[str, Any]:
        m = self.mapping
        label = "接种记录 / inoculation: "
        self._required("inoculation", v, label)
        vaccine = self._code(m["vaccines"]["codes"], v["inoc_bact_code"], "inoc_bact_code", label)
        when = _date_time(v["inoc_date"], "接种日期 inoc_date")
        day = _date(v["inoc_date"], "接种日期 inoc_date")
        if day < birth:
            raise _Bad("impossible-date", f"接种日期 {day} 早于出生日期 {birth}", f"inoculation date {day} is before the birth date {birth}")
        if day > _today():
            raise _Bad("impossible-date", f"接种日期 {day} 在未来", f"inoculation date {day} is in the future")
        imm: dict[str, Any] = {
            "resourceType": "Immunization",
            "id": self.resource_id("inoculation", rid),
            "meta": self._meta(rid, m["inoculation"]["profile"]),
        }
        identifiers = []
        if v.get("inoc_regulatory_code"):
            identifiers.append({"system": f"{BASE}/identifier/vaccine-trace", "value": v["inoc_regulatory_code"]})
        identifiers.append({"system": self.system, "value": rid})
        imm["identifier"] = identifiers
        imm["status"] = "completed"
        imm["vaccineCode"] = {"coding": [{"system": m["vaccines"]["system"], **vaccine}], "text": vaccine["display"]}
        imm["patient"] = {"reference": f"Patient/{pid}"}
        imm["occurrenceDateTime"] = when
        imm["primarySource"] = True
        corp = v.get("inoc_corp_code")
        if corp:
            imm["manufacturer"] = {"identifier": {"system": m["source"]["manufacturer_system"], "value": corp}, "display": m["manufacturers"].get(corp, corp)}
        imm["lotNumber"] = v["inoc_batchno"]
        if v.get("inoc_validdate"):
            imm["expirationDate"] = _date(v["inoc_validdate"], "有效期 inoc_validdate").isoformat()
        if v.get("inoc_inpl_id"):
            site = self._code(m["sites"]["codes"], v["inoc_inpl_id"], "inoc_inpl_id", label)
            if site.get("site"):
                imm["site"] = {"coding": [{"system": m["sites"]["site_system"], "code": site["site"]}], "text": site["text"]}
            else:
                imm["site"] = {"text": site["text"]}
            imm["route"] = {"coding": [{"system": m["sites"]["route_system"], "code": site["route"]}]}
        performers = []
        if v.get("inoc_nurse"):
            performers.append({"function": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0443", "code": "AP"}]}, "actor": {"display": v["inoc_nurse"]}})
        if v.get("inoc_depa_code"):
            performers.append({"actor": {"identifier": {"system": m["source"]["clinic_system"], "value": v["inoc_depa_code"]}, "display": f"接种单位 {v['inoc_depa_code']}"}})
        if performers:
            imm["performer"] = performers
        if v.get("inoc_free"):
            funding = self._code(m["funding"]["codes"], v["inoc_free"], "inoc_free", label)
            imm["fundingSource"] = {"coding": [{"system": m["funding"]["system"], **funding}]}
        imm["protocolApplied"] = [{"doseNumberPositiveInt": int(v["inoc_time"])}]
        return imm

    # -- AdverseEvent ----------------------------------------------------------------------

    def _adverse_event(self, v: dict[str, str], rid: str, pid: str, birth: _dt.date, doses: list[tuple[str, str, str]]) -> dict[str, Any]:
        m = self.mapping
        label = "疑似预防接种异常反应 / AEFI: "
        for name in m["aefi"]["required"]:
            if not v.get(name):
                raise _Bad("schema", f"{label}缺少必填字段 {name}", f"{label}lacks the required field {name}")
        vaccine = self._code(m["vaccines"]["codes"], v["aefi_bact_code"], "aefi_bact_code", label)
        reaction = self._code(m["aefi"]["reactions"], v["aefi_code"], "aefi_code", label)
        day = _date(v["aefi_date"], "反应日期 aefi_date")
        if day < birth or day > _today():
            raise _Bad("impossible-date", f"反应日期 {day} 不可能", f"AEFI date {day} is impossible")
        candidates = [d for d in doses if d[0] == v["aefi_bact_code"] and d[1] <= day.isoformat()]
        suspect = {"reference": f"Immunization/{max(candidates)[2]}"} if candidates else {"display": vaccine["display"]}
        return {
            "resourceType": "AdverseEvent",
            "id": self.resource_id("aefi", rid),
            "meta": self._meta(rid, None),
            "identifier": {"system": self.system, "value": rid},
            "actuality": "actual",
            "event": {"coding": [{"system": m["aefi"]["reactions_system"], "code": v["aefi_code"], "display": reaction}], "text": reaction},
            "subject": {"reference": f"Patient/{pid}"},
            "date": _date_time(v["aefi_date"], "反应日期 aefi_date"),
            "suspectEntity": [{"instance": suspect}],
        }
