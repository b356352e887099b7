"""The golden Patient: one per resident, built from its linked source Patients.

Record model (decided with the connectors): the golden carries meta.tag MPI|golden and
``link = [{other: Patient/<source>, type: seealso}, ...]``; each source carries
``link = [{other: Patient/<golden>, type: refer}]``. Clinical data references the sources only, so
linking, merging and unmerging never rewrite clinical resources. The MPI writes nothing to a
source but its ``link`` element: a source's own data is never overwritten.

Each golden.link entry of a source records how it was linked (extension mpi-link-decision,
valueCode id-match | auto-link | review | new) and the score (mpi-match-score, valueDecimal), so
that ``link()`` is idempotent and the decision stays visible.

Survivorship (sources in link order; "latest" = the most recently linked source holding the
element - connectors link a record when they store it, so that is the arrival order):

- identifier: the 身份证 number of the latest source with a VALID one; the health-record number
  (urn:oid:2.16.156.10011.1.2) and health-card number (...1.19) of the latest source holding each.
  Source-system identifiers stay on the sources.
- name: the latest source's name that has ``name.text``; otherwise the latest name.
- gender: the sex digit of the surviving 身份证 number; otherwise the most frequent male/female
  among sources (ties: latest); otherwise the latest gender.
- birthDate: the birth date of the surviving 身份证 number; otherwise the most frequent (ties: latest).
- telecom: every distinct value, latest source first (at most 6).
- address, contact, maritalStatus, communication, generalPractitioner, patient-level extensions
  (by url): from the latest source holding them.
- deceased[x]: from the latest source that has it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from fhir_server.validation.cn_identity import ID_CARD_SYSTEM, birth_date, id_card_problem, sex

MPI_SYSTEM = "https://fhir.cn-ehr.org/CodeSystem/mpi"
GOLDEN_TAG = {"system": MPI_SYSTEM, "code": "golden", "display": "主索引（一人一档）"}
DECISION_EXT = "https://fhir.cn-ehr.org/StructureDefinition/mpi-link-decision"
SCORE_EXT = "https://fhir.cn-ehr.org/StructureDefinition/mpi-match-score"
_HEALTH_RECORD = "urn:oid:2.16.156.10011.1.2"
_HEALTH_CARD = "urn:oid:2.16.156.10011.1.19"
_LATEST_ELEMENTS = ("address", "contact", "maritalStatus", "communication", "generalPractitioner")
_MAX_TELECOM = 6


def is_golden(patient: dict[str, Any]) -> bool:
    return any(
        isinstance(t, dict) and t.get("system") == MPI_SYSTEM and t.get("code") == "golden"
        for t in (patient.get("meta") or {}).get("tag") or ()
    )


def ref_id(reference: Any) -> str | None:
    """The id of a ``Patient/<id>`` reference (absolute or relative)."""
    if not isinstance(reference, dict) or not isinstance(reference.get("reference"), str):
        return None
    parts = reference["reference"].split("/_history/")[0].rstrip("/").split("/")
    return parts[-1] if len(parts) >= 2 and parts[-2] == "Patient" else None


def golden_of(source: dict[str, Any]) -> str | None:
    """The golden id a source's ``link`` (type refer) points to."""
    for link in source.get("link") or ():
        if isinstance(link, dict) and link.get("type") == "refer":
            return ref_id(link.get("other"))
    return None


def source_links(golden: dict[str, Any]) -> list[dict[str, Any]]:
    """The golden's seealso link entries (one per source), in link order."""
    return [
        l for l in golden.get("link") or () if isinstance(l, dict) and l.get("type") == "seealso" and ref_id(l.get("other"))
    ]


def source_ids(golden: dict[str, Any]) -> list[str]:
    return [ref_id(l["other"]) for l in source_links(golden)]  # type: ignore[misc]


def link_entry(source_id: str, decision: str, score: float) -> dict[str, Any]:
    return {
        "extension": [
            {"url": DECISION_EXT, "valueCode": decision},
            {"url": SCORE_EXT, "valueDecimal": round(score, 4)},
        ],
        "other": {"reference": f"Patient/{source_id}"},
        "type": "seealso",
    }


def entry_decision(entry: dict[str, Any]) -> tuple[str, float]:
    decision, score = "auto-link", 0.0
    for ext in entry.get("extension") or ():
        if ext.get("url") == DECISION_EXT:
            decision = ext.get("valueCode", decision)
        elif ext.get("url") == SCORE_EXT:
            score = float(ext.get("valueDecimal", score))
    return decision, score


def with_source_link(source: dict[str, Any], golden_id: str) -> dict[str, Any] | None:
    """The source with its ``refer`` link set to the golden; None when it already is."""
    links = [l for l in source.get("link") or () if isinstance(l, dict)]
    current = [l for l in links if l.get("type") == "refer"]
    if len(current) == 1 and ref_id(current[0].get("other")) == golden_id:
        return None
    out = {k: v for k, v in source.items() if k != "link"}
    out["link"] = [l for l in links if l.get("type") != "refer"] + [
        {"other": {"reference": f"Patient/{golden_id}"}, "type": "refer"}
    ]
    return out


def without_source_link(source: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in source.items() if k != "link"}
    rest = [l for l in source.get("link") or () if isinstance(l, dict) and l.get("type") != "refer"]
    if rest:
        out["link"] = rest
    return out


def _latest(sources: list[dict[str, Any]], key: str) -> Any:
    for s in reversed(sources):
        if s.get(key) not in (None, [], {}):
            return s[key]
    return None


def _identifier(sources: list[dict[str, Any]], system: str, valid_only: bool) -> dict[str, Any] | None:
    for s in reversed(sources):
        for ident in s.get("identifier") or ():
            if isinstance(ident, dict) and ident.get("system") == system and isinstance(ident.get("value"), str):
                if valid_only and id_card_problem(ident["value"].strip().upper()) is not None:
                    continue
                return {k: v for k, v in ident.items() if k in ("use", "type", "system", "value")}
    return None


def _most_frequent(values: list[str]) -> str | None:
    if not values:
        return None
    counts = Counter(values)
    top = max(counts.values())
    return next(v for v in reversed(values) if counts[v] == top)


def build(golden_id: str, sources: list[dict[str, Any]], links: list[dict[str, Any]], active: bool = True) -> dict[str, Any]:
    """The golden Patient from its sources (in link order) and its link entries."""
    out: dict[str, Any] = {"resourceType": "Patient", "id": golden_id, "meta": {"tag": [dict(GOLDEN_TAG)]}}
    extensions: dict[str, dict[str, Any]] = {}
    for s in sources:
        for ext in s.get("extension") or ():
            if isinstance(ext, dict) and isinstance(ext.get("url"), str):
                extensions.pop(ext["url"], None)
                extensions[ext["url"]] = ext
    if extensions:
        out["extension"] = list(extensions.values())
    identifiers = [
        i
        for i in (
            _identifier(sources, ID_CARD_SYSTEM, True),
            _identifier(sources, _HEALTH_RECORD, False),
            _identifier(sources, _HEALTH_CARD, False),
        )
        if i
    ]
    if identifiers:
        out["identifier"] = identifiers
    out["active"] = active
    names = [n for s in sources for n in s.get("name") or () if isinstance(n, dict)]
    with_text = [n for n in names if isinstance(n.get("text"), str) and n["text"].strip()]
    if with_text or names:
        out["name"] = [(with_text or names)[-1]]
    phones: dict[str, dict[str, Any]] = {}
    for s in reversed(sources):
        for t in s.get("telecom") or ():
            if isinstance(t, dict) and isinstance(t.get("value"), str):
                phones.setdefault(f"{t.get('system')}|{t['value']}", {k: v for k, v in t.items() if k != "rank"})
    if phones:
        out["telecom"] = list(phones.values())[:_MAX_TELECOM]
    id_number = identifiers[0]["value"].strip().upper() if identifiers and identifiers[0]["system"] == ID_CARD_SYSTEM else None
    genders = [s["gender"] for s in sources if s.get("gender") in ("male", "female")]
    gender = sex(id_number) if id_number else _most_frequent(genders) or _latest(sources, "gender")
    if gender:
        out["gender"] = gender
        for s in reversed(sources):
            if s.get("gender") == gender and isinstance(s.get("_gender"), dict):
                out["_gender"] = s["_gender"]
                break
    born = birth_date(id_number) if id_number else None
    births = [s["birthDate"] for s in sources if isinstance(s.get("birthDate"), str)]
    birth = born.isoformat() if born else _most_frequent(births)
    if birth:
        out["birthDate"] = birth
    for s in reversed(sources):
        deceased = {k: v for k, v in s.items() if k.startswith("deceased")}
        if deceased:
            out.update(deceased)
            break
    for key in _LATEST_ELEMENTS:
        value = _latest(sources, key)
        if value is not None:
            out[key] = value
    if links:
        out["link"] = links
    return out


def same_content(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    """Equal apart from meta.versionId/lastUpdated (no new version is needed)."""
    if a is None:
        return False

    def strip(r: dict[str, Any]) -> dict[str, Any]:
        meta = {k: v for k, v in (r.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
        return {**{k: v for k, v in r.items() if k != "meta"}, "meta": meta}

    return strip(a) == strip(b)
