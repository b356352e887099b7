"""妇幼保健 JSON (mappings/mch/mch-record.schema.json) → FHIR, driven by mappings/mch/mapping.yaml.

A page is ``{"records": [...]}``. Each record is validated with ``jsonschema`` and then mapped to
several resources; each resource is one framework :class:`Unit` whose record id is
``<recordId>/<part>`` and whose raw bytes are the whole record (canonical JSON), so a changed
record re-checks all its resources but only the changed ones get new versions. The record's
person (mother or child) is its own unit (``mother/<id>``, ``child/<id>``, raw = the person block),
so a person repeated in many records is written once. A refused record is one rejection.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import xml.etree.ElementTree as ET
from functools import lru_cache, partial
from typing import Any
from xml.sax.saxutils import escape

import jsonschema
import orjson

from fhir_server.connectors.deadletter import Rejection
from fhir_server.connectors.unit import BadRecord as _Bad, Unit, as_bad_record
from fhir_server.connectors.mapping import MAPPINGS, MappedSource
from fhir_server.validation.cn_identity import id_card_problem

_CN_TZ = _dt.timezone(_dt.timedelta(hours=8))
_UCUM = "http://unitsofmeasure.org"
_LOINC = "http://loinc.org"
_DE = "urn:oid:2.16.156.10011.2.2.1"
_SD = "https://fhir.cn-ehr.org/StructureDefinition"
_json_unit = partial(Unit, content_type="application/json")


def _years_later(day: _dt.date, years: int) -> _dt.date:
    """The same day ``years`` later; 29 February becomes 1 March in a common year."""
    try:
        return day.replace(year=day.year + years)
    except ValueError:
        return _dt.date(day.year + years, 3, 1)


@lru_cache(maxsize=1)
def schema_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((MAPPINGS / "mch" / "mch-record.schema.json").read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _day(value: str, path: str) -> _dt.date:
    try:
        return _dt.date.fromisoformat(value[:10])
    except ValueError:
        raise _Bad("impossible-date", f"{path}：日期“{value}”不存在", f"{path}: date '{value}' does not exist") from None


def _when(value: str, path: str) -> str:
    day = _day(value, path)
    if len(value) > 10:
        try:
            t = _dt.datetime.fromisoformat(value.replace(" ", "T"))
        except ValueError:
            raise _Bad("impossible-date", f"{path}：时间“{value}”无效", f"{path}: time '{value}' is invalid") from None
        return t.replace(tzinfo=_CN_TZ).isoformat()
    return day.isoformat()


class MchConnector(MappedSource):
    """Parse and map one page of the 妇幼 JSON exchange format."""

    source_kind = "mch"

    # -- ids -------------------------------------------------------------------------------

    def resource_id(self, type_: str, record_id: str) -> str:
        """Deterministic: the same source record part always lands on the same resource."""
        return f"mch-{type_[:3].lower()}-" + hashlib.sha256(f"{self.code}|{record_id}".encode()).hexdigest()[:36]


    # -- the page --------------------------------------------------------------------------

    def parse_page(self, body: bytes) -> tuple[list[Unit], list[Rejection], int]:
        """(units, rejections, received records)."""
        try:
            page = orjson.loads(body)
            records = page["records"]
            if not isinstance(records, list):
                raise TypeError("records is not an array")
        except (orjson.JSONDecodeError, KeyError, TypeError) as e:
            digest = hashlib.sha256(body).hexdigest()[:16]
            return [], [Rejection("page", f"page/{digest}", "not-well-formed", f"JSON 格式错误：{e}", f"JSON page is not well-formed: {e}", body)], 1
        units: list[Unit] = []
        rejections: list[Rejection] = []
        for record in records:
            u, r = self.parse_record(record)
            units += u
            rejections += r
        return units, rejections, len(records)

    def parse_child(self, el: ET.Element, only: str | None = None) -> tuple[list[Unit], list[Rejection]]:
        """Replay entry point of the runner (which hands over an XML element): the record's JSON is its text."""
        units, rejections = self.parse_record(orjson.loads(el.text or "null"))
        return units, rejections

    def parse_record(self, record: Any) -> tuple[list[Unit], list[Rejection]]:
        raw = _canonical(record)
        rid = str(record.get("recordId") or "?") if isinstance(record, dict) else "?"
        kind = str(record.get("recordType") or "record") if isinstance(record, dict) else "record"
        context = {"element": f"<record>{escape(raw.decode())}</record>"}
        try:
            error = jsonschema.exceptions.best_match(schema_validator().iter_errors(record))
            if error is not None:
                raise _Bad("schema", f"不符合交换格式（{error.json_path}）：{error.message}", f"schema violation at {error.json_path}: {error.message}")
            units = self._map(record, raw)
        except Exception as e:
            bad = as_bad_record(e, f"{kind}/{rid}")
            return [], [Rejection(kind, f"{kind}/{rid}", bad.code, bad.zh, bad.en, raw, context)]
        for u in units:
            u.context = context
        return units, []

    # -- mapping ---------------------------------------------------------------------------

    def _map(self, r: dict[str, Any], raw: bytes) -> list[Unit]:
        m = self.mapping
        kind = r["recordType"]
        spec = m["records"][kind]
        role = spec["subject"]
        person = r[role]
        birth = _day(person["birthDate"], f"$.{role}.birthDate")
        visit = r.get("visitDate") or r.get("issueDate")
        visit_day = _day(visit, "$.visitDate") if visit else birth
        if visit_day < birth or visit_day > _dt.datetime.now(_CN_TZ).date():
            raise _Bad("impossible-date", f"$.visitDate：日期 {visit_day} 早于出生或在未来", f"$.visitDate: {visit_day} is before birth or in the future")
        for path, value in (("$.lmp", r.get("lmp")), ("$.edd", r.get("edd")), ("$.deliveryDate", r.get("deliveryDate"))):
            if value:
                _day(value, path)
        base = f"{kind}/{r['recordId']}"
        st = r["updatedAt"]
        group = f"{role}/{person['id']}"
        units: list[Unit] = []
        patients = [(role, person)]
        if kind == "birth-certificate":
            patients.append(("mother", r["mother"]))
        for prole, p in patients:
            praw = _canonical(p)
            prid = f"{prole}/{p['id']}"
            units.append(_json_unit(prole, prid, praw, self._patient(p, prid, prole), st, group))
        pid = units[0].resource["id"]

        def put(part: str, type_: str, body: dict[str, Any], profile: str | None = None) -> str:
            rid = f"{base}/{part}"
            res: dict[str, Any] = {"resourceType": type_, "id": self.resource_id(type_, rid), "meta": self._meta(rid, profile), **body}
            units.append(_json_unit(kind, rid, raw, res, st, group))
            return f"{type_}/{res['id']}"

        when = _when(visit or person["birthDate"], "$.visitDate")
        subject = {"reference": f"Patient/{pid}"}
        org = {"identifier": {"system": m["source"]["institution_system"], "value": r["institution"]["code"]}, "display": r["institution"]["name"]}
        doc = {"system": m["document_system"], "code": spec["doc"], "display": spec["display"]}
        episode_ref = None
        if "pregnancyId" in r:
            if kind == "pregnancy-registration":
                episode_ref = {"reference": f"EpisodeOfCare/{self.resource_id('EpisodeOfCare', 'pregnancy/' + r['pregnancyId'])}"}
            else:
                # Visits may arrive before their registration (or without it): a logical reference
                # by the pregnancy's identifier, which the registration's EpisodeOfCare carries,
                # never dangles and loses nothing.
                episode_ref = {
                    "type": "EpisodeOfCare",
                    "identifier": {"system": m["source"]["pregnancy_system"], "value": r["pregnancyId"]},
                }
        encounter_ref = None
        if spec.get("encounter"):
            cls = spec["encounter"]
            enc: dict[str, Any] = {
                "identifier": [{"system": self.system, "value": base}],
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": cls},
                "type": [{"coding": [doc], "text": spec["display"]}],
                "subject": subject,
                "period": {"start": when, "end": when},
                "serviceProvider": org,
            }
            if episode_ref:
                enc["episodeOfCare"] = [episode_ref]
            encounter_ref = {"reference": put("encounter", "Encounter", enc, _SD + "/cn-encounter" if cls == "AMB" else None)}
        if kind == "pregnancy-registration":
            put_episode = {
                "identifier": [{"system": m["source"]["pregnancy_system"], "value": r["pregnancyId"]}],
                "status": "active",
                "type": [{"coding": [m["episode"]["type"]], "text": "孕产妇健康管理"}],
                "patient": subject,
                "managingOrganization": org,
                "period": {"start": _day(r["visitDate"], "$.visitDate").isoformat()},
            }
            rid = f"pregnancy/{r['pregnancyId']}"
            units.append(_json_unit(kind, rid, raw, {"resourceType": "EpisodeOfCare", "id": self.resource_id("EpisodeOfCare", rid), "meta": self._meta(rid, m["episode"]["profile"]), **put_episode}, st, group))
            self._careplan(put, "maternal", subject, r["visitDate"], None, episode_ref)
        if kind == "birth-certificate":
            b = _day(person["birthDate"], "$.child.birthDate")
            self._careplan(put, "child", subject, b.isoformat(), _years_later(b, 7) - _dt.timedelta(days=1), None)
        for field, obs in m["observations"].items():
            if field in r:
                put(f"obs/{field}", "Observation", self._observation(obs, r[field], subject, when, encounter_ref), obs.get("profile"))
        if "bloodPressure" in r:
            put("obs/bloodPressure", "Observation", self._bp(r["bloodPressure"], subject, when, encounter_ref), m["blood_pressure"]["profile"])
        colour = r.get("riskColour")
        if colour and m["risk_colours"][colour]["condition"]:
            rc = m["risk_colours"][colour]
            cond: dict[str, Any] = {
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "problem-list-item"}]}],
                "code": {"coding": [m["risk_condition"], {"system": m["risk_colour_system"], "code": colour, "display": rc["display"]}], "text": f"妊娠风险 {rc['display']}"},
                "subject": subject,
                "recordedDate": when,
            }
            if encounter_ref:
                cond["encounter"] = encounter_ref
            put("condition/risk", "Condition", cond)
        return units

    def _careplan(self, put: Any, which: str, subject: dict[str, Any], start: str, end: _dt.date | None, episode: dict[str, Any] | None) -> None:
        spec, m = self.mapping["careplans"][which], self.mapping
        names = {v["doc"]: v["display"] for v in m["records"].values()}
        period: dict[str, Any] = {"start": start[:10]}
        if end:
            period["end"] = end.isoformat()
        plan: dict[str, Any] = {
            "status": "active",
            "intent": "plan",
            "category": [{"coding": [spec["category"]]}],
            "title": "孕产妇健康管理" if which == "maternal" else "0-6岁儿童健康管理",
            "subject": subject,
            "period": period,
            "activity": [
                {"detail": {"code": {"coding": [{"system": m["document_system"], "code": c, "display": names[c]}]}, "status": "scheduled"}}
                for c in spec["activities"]
            ],
        }
        if episode:
            plan["supportingInfo"] = [episode]
        put(f"careplan/{which}", "CarePlan", plan, spec["profile"])

    def _observation(self, obs: dict[str, Any], value: float, subject: dict[str, Any], when: str, encounter: dict[str, Any] | None) -> dict[str, Any]:
        coding = [{"system": _LOINC, "code": obs["loinc"]}]
        if obs.get("de"):
            coding.append({"system": _DE, "code": obs["de"]})
        out: dict[str, Any] = {
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": obs["category"]}]}],
            "code": {"coding": coding, "text": obs["display"]},
            "subject": subject,
            "effectiveDateTime": when,
            "valueQuantity": {"value": value, "unit": obs["unit"], "system": _UCUM, "code": obs["ucum"]},
        }
        if encounter:
            out["encounter"] = encounter
        return out

    def _bp(self, bp: dict[str, int], subject: dict[str, Any], when: str, encounter: dict[str, Any] | None) -> dict[str, Any]:
        spec = self.mapping["blood_pressure"]
        out: dict[str, Any] = {
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": _LOINC, "code": spec["panel"]["loinc"]}], "text": spec["panel"]["display"]},
            "subject": subject,
            "effectiveDateTime": when,
            "component": [
                {
                    "code": {"coding": [{"system": _LOINC, "code": spec[k]["loinc"]}, {"system": _DE, "code": spec[k]["de"]}], "text": spec[k]["display"]},
                    "valueQuantity": {"value": bp[k], "unit": "mmHg", "system": _UCUM, "code": "mm[Hg]"},
                }
                for k in ("systolic", "diastolic")
            ],
        }
        if encounter:
            out["encounter"] = encounter
        return out

    def _patient(self, p: dict[str, Any], rid: str, role: str) -> dict[str, Any]:
        m = self.mapping
        path = f"$.{role}"
        identifiers: list[dict[str, Any]] = [self.source_identifier(p["id"])]
        if p.get("idNumber"):
            problem = id_card_problem(p["idNumber"])
            if problem:
                raise _Bad("id-check-digit" if "check" in problem[0] else "id-invalid", f"{path}.idNumber 身份证号无效：{problem[1]}", f"{path}.idNumber is not valid: {problem[0]}")
            identifiers.append(
                {
                    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "NNCHN"}]},
                    "system": "urn:oid:2.16.156.10011.1.3",
                    "value": p["idNumber"],
                }
            )
        sex = m["sex"][p["sex"]]
        birth = _day(p["birthDate"], f"{path}.birthDate")
        if birth.year < 1900 or birth > _dt.datetime.now(_CN_TZ).date():
            raise _Bad("impossible-date", f"{path}.birthDate：出生日期 {birth} 不可能", f"{path}.birthDate: birth date {birth} is impossible")
        patient: dict[str, Any] = {
            "resourceType": "Patient",
            "id": self.resource_id("Patient", rid),
            "meta": self._meta(rid, m["patient_profile"]),
            "identifier": identifiers,
            "name": [{"text": p["name"], "family": p["name"][:1], "given": [p["name"][1:]] if len(p["name"]) > 1 else []}],
            "gender": sex["gender"],
            "_gender": {"extension": [{"url": f"{_SD}/cn-gb-sex", "valueCoding": {"system": "urn:oid:2.16.156.10011.2.3.3.4", "code": p["sex"], "display": sex["display"]}}]},
            "birthDate": birth.isoformat(),
        }
        if not patient["name"][0]["given"]:
            del patient["name"][0]["given"]
        if p.get("phone"):
            patient["telecom"] = [{"system": "phone", "value": p["phone"], "use": "mobile"}]
        if p.get("address"):
            patient["address"] = [{"use": "home", "text": p["address"], "city": "上海市", "country": "CN"}]
        mother = p.get("mother")
        phone = (mother or {}).get("phone") or p.get("phone")
        if mother and phone:  # cn-patient: a contact has a name and a phone
            patient["contact"] = [
                {
                    "relationship": [{"coding": [m["mother_relationship"]]}],
                    "name": {"text": mother["name"]},
                    "telecom": [{"system": "phone", "value": phone, "use": "mobile"}],
                }
            ]
        return patient
