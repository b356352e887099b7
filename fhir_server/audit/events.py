"""AuditEvents for FHIR REST requests, after the IHE Basic Audit Log Patterns (BALP, ITI
profiles IHE.BasicAudit.Read / Query / Create / Update / Delete and their Patient* variants).

One request gives one AuditEvent per patient whose data it touched, and one without a patient
entity when it touched none: BALP's PatientQuery rule ("one AuditEvent is created for every Patient
identified in the resulting search set"). A resident who later asks for the AuditEvents about
their record (``AuditEvent?entity=Patient/x`` or ``?patient=Patient/x``) then never learns whose
records were read together with theirs. The events of one request share the request id entity.

Shape (codes as the BALP and R4 code systems spell them):

- ``type`` audit-event-type ``rest``; ``subtype`` restful-interaction (read, vread, search-type,
  create, update, patch, delete, history-instance, transaction, batch, operation, ...);
  ``action`` C/R/U/D/E (searches, operations, batches and transactions are E, as BALP's Query);
- ``recorded`` (the end of the request), ``period`` (its start and end), ``outcome`` 0/4/8/12
  from the HTTP status, ``outcomeDesc`` (``HTTP 403``, plus the caller's short reason);
- agents: the client application (DCM 110153 Source Role ID; 110150 Application for a delete),
  its network address; the user when known (IRCP for reads and queries, AUT for writes,
  ``requestor`` true, ``who.identifier`` / ``display``, a reference to the fhirUser); the server
  (DCM 110152 Destination Role ID; provenance-participant-type custodian for a delete);
- ``source``: this server as observer, the site, security-source-type 4 (application server);
- entities: the addressed resource(s) (audit-entity-type 2, object-role 4, ``what`` = Type/id),
  the query (object-role 24, ``query`` = base64 of the raw query string: BALP keeps exactly what
  was asked, hostile patterns included), the patient (audit-entity-type 1 Person, object-role 1
  Patient) and the X-Request-Id (BALP BasicAuditEntityType XrequestId).

The query string may hold ID numbers and names: it is kept here (the AuditEvent is access
controlled) but must never be logged; :mod:`fhir_server.audit.redact` masks what slips through.
"""

from __future__ import annotations

import base64
import re
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

from fhir_server.audit.redact import blind_numbers
from fhir_server.interactions._resource import instant, new_id

EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
INTERACTION = "http://hl7.org/fhir/restful-interaction"
OUTCOME = "http://terminology.hl7.org/CodeSystem/audit-event-outcome"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
BALP_ENTITY_TYPE = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType"
PURPOSE = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
# Identifier systems of this server's own agents (client ids and user ids from its tokens).
CLIENT_SYSTEM = "https://fhir.cn-ehr.org/sid/oauth-client"
USER_SYSTEM = "https://fhir.cn-ehr.org/sid/user"

_ACTION = {
    "create": "C",
    "read": "R",
    "vread": "R",
    "history": "R",
    "history-instance": "R",
    "history-type": "R",
    "history-system": "R",
    "capabilities": "R",
    "update": "U",
    "patch": "U",
    "delete": "D",
}  # everything else (search-*, operation, batch, transaction) is E (execute), as BALP's Query
READ_ONLY = frozenset(
    {"read", "vread", "history", "history-instance", "history-type", "history-system", "capabilities", "search", "search-type", "search-system"}
)
_OUTCOME_DISPLAY = {"0": "Success", "4": "Minor failure", "8": "Serious failure", "12": "Major failure"}
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
# Parameters whose value names a patient (BALP PatientQuery: "the requestor includes a Patient id").
_PATIENT_PARAMS = ("patient", "subject", "subject:Patient", "patient:Patient")


@dataclass(slots=True)
class RequestRecord:
    """What the HTTP layer knows about one request once it has answered (or refused) it.

    Only ``method``, ``path`` and ``status`` are required; the rest is derived from the path when
    not given (``interaction``, ``resource_type``, ``resource_id``, ``version``, ``operation``)."""

    method: str
    path: str  # as received (``/fhir/Patient/1``) or relative to the base (``Patient/1``); no query
    status: int
    interaction: str | None = None  # restful-interaction code; classify(method, path) when None
    resource_type: str | None = None
    resource_id: str | None = None
    version: str | None = None
    operation: str | None = None  # "$everything"
    query: str = ""  # the raw query string (percent-encoded, as received); POST _search: the form body
    client_id: str | None = None  # the OAuth client (application)
    user_id: str | None = None  # the token's subject
    user_name: str | None = None  # display name of the user
    fhir_user: str | None = None  # "Practitioner/123" (SMART fhirUser)
    roles: tuple[str, ...] = ()
    purpose_of_use: tuple[str, ...] = ()  # v3-ActReason codes (TREAT, HPAYMT, ...) from the token
    patient_context: str | None = None  # SMART launch patient id
    patients: Iterable[str] = ()  # ids (or Patient/ids) of the patients whose data was read or written
    resources: Iterable[str] = ()  # other "Type/id" addressed (created ids, transaction entries)
    remote_addr: str | None = None
    user_agent: str | None = None
    server_address: str | None = None  # the host the client addressed
    request_id: str | None = None  # X-Request-Id
    started: datetime | None = None
    ended: datetime | None = None
    reason: str | None = None  # a short, non-identifying reason for a refusal ("token expired")


@dataclass(frozen=True, slots=True)
class AuditSource:
    """This server as the observer that records events."""

    observer: str = "fhir-server-cn"
    site: str = ""
    base_path: str = "/fhir"


@dataclass(slots=True)
class _Path:
    interaction: str
    type: str | None = None
    id: str | None = None
    version: str | None = None
    operation: str | None = None
    compartment: tuple[str, str] | None = None
    extra: list[str] = field(default_factory=list)


def _segments(path: str, base_path: str) -> list[str]:
    path = path.split("?", 1)[0]
    base = base_path.strip("/")
    parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/") if p]
    if base:
        b = base.split("/")
        if parts[: len(b)] == b:
            parts = parts[len(b) :]
    return parts


def classify(method: str, path: str, base_path: str = "/fhir", *, bundle_type: str | None = None) -> _Path:
    """The restful-interaction (and type, id, version, operation) of a request by method and path.
    ``bundle_type`` (``batch`` or ``transaction``) answers a POST to the base; batch by default."""
    m = method.upper()
    s = _segments(path, base_path)
    n = len(s)
    if n == 0:
        if m == "POST":
            return _Path(bundle_type if bundle_type in ("batch", "transaction") else "batch")
        return _Path("search-system")
    if s[0] == "metadata" and n == 1:
        return _Path("capabilities")
    if s[0] == "_history" and n == 1:
        return _Path("history-system")
    if s[0] == "_search" and n == 1:
        return _Path("search-system")
    if s[0].startswith("$"):
        return _Path("operation", operation=s[0])
    type_ = s[0]
    if n == 1:
        inter = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(m, "search-type")
        return _Path(inter, type_)
    second = s[1]
    if n == 2 and second == "_search":
        return _Path("search-type", type_)
    if n == 2 and second == "_history":
        return _Path("history-type", type_)
    if n == 2 and second.startswith("$"):
        return _Path("operation", type_, operation=second)
    id_ = second
    if n == 2:
        inter = {"PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(m, "read")
        return _Path(inter, type_, id_)
    third = s[2]
    if third == "_history":
        if n == 3:
            return _Path("history-instance", type_, id_)
        return _Path("vread", type_, id_, version=s[3])
    if third.startswith("$"):
        return _Path("operation", type_, id_, operation=third)
    # A compartment search: Patient/123/Observation or Patient/123/*.
    return _Path("search-system" if third == "*" else "search-type", None if third == "*" else third, compartment=(type_, id_))


def outcome_code(status: int) -> str:
    """audit-event-outcome from the HTTP status: 0 success (1xx-3xx), 4 minor failure (a refused or
    malformed request: 4xx), 8 serious failure (a fault: 5xx), 12 major failure (503: unavailable)."""
    if status < 400:
        return "0"
    if status < 500:
        return "4"
    return "12" if status == 503 else "8"


def _coding(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    c = {"system": system, "code": code}
    if display:
        c["display"] = display
    return c


def _patient_id(value: str) -> str | None:
    """``x``, ``Patient/x`` or an absolute URL ending in ``Patient/x`` → x (None for other types)."""
    value = value.strip()
    if "/" in value:
        parts = value.rstrip("/").split("/")
        if "_history" in parts:
            parts = parts[: parts.index("_history")]
        if len(parts) < 2 or parts[-2] != "Patient":
            return None
        value = parts[-1]
    return value if _ID.match(value) else None


def _query_patients(query: str, type_: str | None) -> list[str]:
    out = []
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=False):
        if key in _PATIENT_PARAMS or (type_ == "Patient" and key == "_id"):
            for v in value.split(","):
                if key.startswith("subject") and key != "subject:Patient" and not v.strip().startswith("Patient/") and "/Patient/" not in v:
                    continue  # subject=Group/1, or a bare id whose type is not known
                pid = _patient_id(v)
                if pid:
                    out.append(pid)
    return out


def patients_of(rec: RequestRecord, where: _Path) -> list[str]:
    """The patient ids the request is about, deduplicated in order of appearance."""
    found: list[str] = []
    for p in rec.patients:
        pid = _patient_id(p)
        if pid:
            found.append(pid)
    if rec.patient_context:
        found.append(rec.patient_context)
    type_ = rec.resource_type or where.type
    id_ = rec.resource_id or where.id
    if type_ == "Patient" and id_ and where.compartment is None:
        found.append(id_)
    if where.compartment and where.compartment[0] == "Patient":
        found.append(where.compartment[1])
    found.extend(_query_patients(rec.query, type_))
    for r in rec.resources:
        pid = _patient_id(r) if r.startswith("Patient/") else None
        if pid:
            found.append(pid)
    return [p for p in dict.fromkeys(found) if _ID.match(p)]


def _agents(rec: RequestRecord, interaction: str, source: AuditSource) -> list[dict[str, Any]]:
    delete = interaction == "delete"
    writes = _ACTION.get(interaction) in ("C", "U", "D")
    has_user = bool(rec.user_id or rec.fhir_user)
    client: dict[str, Any] = {
        "type": {"coding": [_coding(DCM, "110150", "Application") if delete else _coding(DCM, "110153", "Source Role ID")]},
        "who": {"identifier": {"system": CLIENT_SYSTEM, "value": rec.client_id or "anonymous"}},
        "requestor": not has_user,
    }
    if rec.user_agent:
        client["who"]["display"] = rec.user_agent[:200]
    if rec.remote_addr:
        client["network"] = {"address": rec.remote_addr, "type": "2"}  # 2: IP address
    agents = [client]
    if has_user:
        user_type = _coding(PARTICIPATION, "AUT", "author (originator)") if writes else _coding(PARTICIPATION, "IRCP", "information recipient")
        who: dict[str, Any] = {}
        if rec.fhir_user:
            who["reference"] = rec.fhir_user
        if rec.user_id:
            who["identifier"] = {"system": USER_SYSTEM, "value": rec.user_id}
        if rec.user_name:
            who["display"] = rec.user_name
        user: dict[str, Any] = {"type": {"coding": [user_type]}, "who": who, "requestor": True}
        if rec.user_name:
            user["name"] = rec.user_name
        if rec.roles:
            user["role"] = [{"text": r} for r in rec.roles]
        if rec.purpose_of_use:
            user["purposeOfUse"] = [{"coding": [_coding(PURPOSE, p)]} for p in rec.purpose_of_use]
        agents.append(user)
    server: dict[str, Any] = {
        "type": {
            "coding": [
                _coding(PROVENANCE_PARTICIPANT, "custodian", "Custodian") if delete else _coding(DCM, "110152", "Destination Role ID")
            ]
        },
        "who": {"identifier": {"system": "urn:ietf:rfc:3986", "value": source.observer}, "display": source.observer},
        "requestor": False,
    }
    if rec.server_address:
        server["network"] = {"address": rec.server_address, "type": "1" if re.search(r"[A-Za-z]", rec.server_address) else "2"}
    agents.append(server)
    return agents


def _data_entities(rec: RequestRecord, where: _Path) -> list[dict[str, Any]]:
    type_ = rec.resource_type or where.type
    id_ = rec.resource_id or where.id
    version = rec.version or where.version
    targets: list[str] = []
    if type_ and id_ and _TYPE.match(type_) and _ID.match(id_):
        targets.append(f"{type_}/{id_}" + (f"/_history/{version}" if version and _ID.match(version) else ""))
    for r in rec.resources:
        parts = r.split("/")
        if len(parts) == 4 and parts[2] == "_history":  # Type/id/_history/version
            parts = parts[:2] + parts[3:]
        if len(parts) in (2, 3) and _TYPE.match(parts[0]) and all(_ID.match(p) for p in parts[1:]):
            targets.append(r)
    return [
        {
            "what": {"reference": t},
            "type": _coding(ENTITY_TYPE, "2", "System Object"),
            "role": _coding(OBJECT_ROLE, "4", "Domain Resource"),
        }
        for t in dict.fromkeys(targets)
    ]


def build_events(rec: RequestRecord, source: AuditSource = AuditSource(), *, bundle_type: str | None = None) -> list[dict[str, Any]]:
    """The AuditEvents (R4 JSON, with a fresh id, no meta) that record ``rec``."""
    where = classify(rec.method, rec.path, source.base_path, bundle_type=bundle_type)
    interaction = rec.interaction or where.interaction
    if rec.operation and interaction == "operation":
        where.operation = rec.operation
    ended = (rec.ended or datetime.now(timezone.utc)).astimezone(timezone.utc)
    started = (rec.started or ended).astimezone(timezone.utc)
    outcome = outcome_code(rec.status)
    desc = f"HTTP {rec.status}"
    if rec.reason:
        desc += f": {rec.reason[:200]}"
    subtype = [_coding(INTERACTION, interaction)]
    base: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": _coding(EVENT_TYPE, "rest", "Restful Operation"),
        "subtype": subtype,
        "action": _ACTION.get(interaction, "E"),
        "period": {"start": instant(started), "end": instant(ended)},
        "recorded": instant(ended),
        "outcome": outcome,
        "outcomeDesc": desc,
        "agent": _agents(rec, interaction, source),
        "source": {
            "observer": {"identifier": {"system": "urn:ietf:rfc:3986", "value": source.observer}, "display": source.observer},
            "type": [_coding(SOURCE_TYPE, "4", "Application Server")],
        },
    }
    if source.site:
        base["source"]["site"] = source.site
    entities = _data_entities(rec, where)
    if where.operation:
        # The operation's name, kept as the entity's name (no patient data in it).
        entities.append({"type": _coding(ENTITY_TYPE, "2", "System Object"), "role": _coding(OBJECT_ROLE, "20", "Job"), "name": where.operation[:64]})
    if rec.query or interaction.startswith("search"):
        entities.append(
            {
                "type": _coding(ENTITY_TYPE, "2", "System Object"),
                "role": _coding(OBJECT_ROLE, "24", "Query"),
                # ID and phone numbers as their blind index: the trail is hashed byte for byte and
                # not encrypted at rest (redact.blind_numbers).
                "query": base64.b64encode(blind_numbers(rec.query).encode("utf-8")).decode("ascii"),
            }
        )
    if rec.request_id:
        entities.append(
            {
                "what": {"identifier": {"value": rec.request_id[:128]}},
                "type": _coding(BALP_ENTITY_TYPE, "XrequestId", "transport specific unique identifier where http X-Request-Id is used"),
            }
        )
    patients: list[str | None] = list(patients_of(rec, where)) or [None]
    events = []
    for pid in patients:
        event = {"resourceType": "AuditEvent", "id": new_id(), **{k: v for k, v in base.items() if k != "resourceType"}}
        ents = list(entities)
        if pid is not None:
            ents.append(
                {
                    "what": {"reference": f"Patient/{pid}"},
                    "type": _coding(ENTITY_TYPE, "1", "Person"),
                    "role": _coding(OBJECT_ROLE, "1", "Patient"),
                }
            )
        if ents:
            event["entity"] = ents
        events.append(event)
    return events


def waits(rec: RequestRecord, source: AuditSource = AuditSource()) -> bool:
    """Whether the request changed (or may have changed) data: its events must be durable before the
    response goes out. Reads, searches and history are recorded in the background."""
    interaction = rec.interaction or classify(rec.method, rec.path, source.base_path).interaction
    return interaction not in READ_ONLY
