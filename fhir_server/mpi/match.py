"""Scoring two Patient records: are they the same resident?

Deterministic first: two VALID 身份证 numbers (cn_identity.id_card_problem is None) decide alone -
equal means the same resident, different means different residents. An invalid number (bad check
character, impossible date) is a data error and is ignored here, never evidence either way.

Otherwise a Fellegi-Sunter comparison: each field contributes log2(m/u) bits when it agrees and
log2((1-m)/(1-u)) when it disagrees (m = P(agree | same resident), u = P(agree | different
residents)), nothing when a side lacks it. The total W becomes a match probability with a prior
of 2^-22 (about one pair in four million compared at random is a match):

    score = 1 / (1 + 2^(PRIOR_BITS - W))

so the thresholds (settings ``mpi_auto_link``, ``mpi_review``) read as probabilities.

Household fields (phone, address, guardian) are shared by family members - twins have the same
birth date, address, parents and often phone - so FS's independence assumption fails for them.
Their positive weights count only when the names agree (same characters or same pinyin); their
negative weights always count. Weights (bits):

=================  ==========================================================  ======
field              outcome                                                      bits
=================  ==========================================================  ======
ID number          both valid and different                                     -25
name               same characters: two-character name / three or more         +9.8 / +13.1
                   same pinyin, other characters (同音字: 张三/章三), same      +5.3 / +8.2
                   same length, one character differs                          +1.0
                   same family name, given name different (siblings, twins)     -8
                   different                                                    -5
birth date         equal                                                       +14.2
                   one of year/month/day differs, or month/day swapped          +3.9
                   different                                                    -6
sex                equal / different                                      +0.97 / -4.6
phone              a number in common / both have numbers, none in common     +10 / -1
district (2260)    same / different                                           +3.2 / -1.85
address text       character-bigram Dice >= 0.85 / >= 0.6                       +7 / +3
guardian           same ID number / same name / same pinyin / none agree   +12 / +9 / +5 / -3
=================  ==========================================================  ======
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from fhir_server.validation.cn_identity import ID_CARD_SYSTEM, birth_date, id_card_problem

PRIOR_BITS = 22.0
DIVISION_EXT = "https://fhir.cn-ehr.org/StructureDefinition/cn-address-division"
_HEALTH_RECORD = "urn:oid:2.16.156.10011.1.2"
_GB_T_4761 = "urn:oid:2.16.156.10011.2.3.3.8"
_V3_ROLE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
_V2_0131 = "http://terminology.hl7.org/CodeSystem/v2-0131"
# Relationship codes that make a contact a parent or guardian (GB/T 4761, v3 RoleCode, v2-0131).
_GUARDIAN_CODES = {
    (_GB_T_4761, c) for c in ("50", "51", "52", "57", "58", "59", "60", "61", "62", "63", "64")
} | {(_V3_ROLE, c) for c in ("MTH", "FTH", "PRN", "NMTH", "NFTH", "GUARD", "GRPRN", "STPMTH", "STPFTH")} | {
    (_V2_0131, c) for c in ("N", "C")
}
_PUNCT = re.compile(r"[\s\W_·•]+", re.UNICODE)
_PHONE_NOISE = re.compile(r"[^0-9]")


@dataclass(frozen=True)
class Guardian:
    name: str | None
    id_number: str | None  # a valid 身份证 number only
    phones: frozenset[str]


@dataclass(frozen=True)
class Demographics:
    """The comparable facts of one Patient, normalised."""

    id_number: str | None = None  # valid only
    name: str | None = None
    family: str | None = None
    birth_date: str | None = None  # YYYY-MM-DD
    sex: str | None = None  # male | female
    phones: frozenset[str] = frozenset()
    divisions: frozenset[str] = frozenset()
    addresses: tuple[str, ...] = ()
    guardians: tuple[Guardian, ...] = ()
    invalid_ids: tuple[str, ...] = field(default=(), compare=False)

    @property
    def readings(self) -> tuple[frozenset[str], ...]:
        return char_readings(self.name or "")


@dataclass(frozen=True)
class Comparison:
    weight: float
    parts: dict[str, float]
    certain: bool | None = None  # True: same valid ID; False: different valid IDs

    @property
    def score(self) -> float:
        if self.certain:
            return 1.0
        return probability(self.weight)


def probability(weight: float) -> float:
    """The match probability of a total weight (bits), rounded to 4 places."""
    x = PRIOR_BITS - weight
    if x > 60:
        return 0.0
    return round(1.0 / (1.0 + math.pow(2.0, x)), 4)


# -- extraction -------------------------------------------------------------------------------


def normalise_text(text: str) -> str:
    return _PUNCT.sub("", unicodedata.normalize("NFKC", text)).casefold()


def name_text(patient: dict[str, Any]) -> tuple[str | None, str | None]:
    """(full name, family name) of the first usable HumanName (official first)."""
    names = [n for n in patient.get("name") or () if isinstance(n, dict)]
    names.sort(key=lambda n: 0 if n.get("use") == "official" else 1 if n.get("use") in (None, "usual") else 2)
    for n in names:
        text = n.get("text")
        family = n.get("family") if isinstance(n.get("family"), str) else None
        given = "".join(g for g in n.get("given") or () if isinstance(g, str))
        if not isinstance(text, str) or not text.strip():
            text = (family or "") + given
        text = normalise_text(text)
        if text:
            return text, normalise_text(family) if family else None
    return None, None


def id_numbers(patient: dict[str, Any]) -> tuple[str | None, list[str]]:
    """(the first valid 身份证 number, the invalid ones)."""
    valid, invalid = None, []
    for ident in patient.get("identifier") or ():
        if not isinstance(ident, dict) or ident.get("system") != ID_CARD_SYSTEM:
            continue
        value = ident.get("value")
        if not isinstance(value, str):
            continue
        value = value.strip().upper()
        if id_card_problem(value) is None:
            valid = valid or value
        else:
            invalid.append(value)
    return valid, invalid


def _phones(telecoms: Any) -> frozenset[str]:
    out = set()
    for t in telecoms or ():
        if isinstance(t, dict) and t.get("system") in ("phone", "sms", None) and isinstance(t.get("value"), str):
            digits = _PHONE_NOISE.sub("", t["value"])
            if digits.startswith("86") and len(digits) == 13:
                digits = digits[2:]
            if len(digits) >= 7:
                out.add(digits)
    return frozenset(out)


@lru_cache(maxsize=1)
def _division_names() -> dict[str, str]:
    """GB/T 2260 names → codes, from the shipped terminology (empty when it is absent)."""
    path = Path(__file__).resolve().parents[2] / "terminology" / "CodeSystem-gb-t-2260-division.json"
    out: dict[str, str] = {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return out

    def walk(concepts: Iterable[dict[str, Any]]) -> None:
        for c in concepts:
            if isinstance(c.get("display"), str):
                out.setdefault(c["display"], c["code"])
            walk(c.get("concept") or ())

    walk(data.get("concept") or ())
    return out


def _address(address: dict[str, Any]) -> tuple[str | None, str]:
    """(GB/T 2260 division code, normalised text without province/city/district)."""
    code = None
    for ext in address.get("extension") or ():
        if isinstance(ext, dict) and ext.get("url") == DIVISION_EXT and isinstance(ext.get("valueCoding"), dict):
            code = ext["valueCoding"].get("code")
    district = address.get("district") if isinstance(address.get("district"), str) else None
    if code is None and district:
        code = _division_names().get(district.strip())
    lines = [x for x in address.get("line") or () if isinstance(x, str)]
    full = address.get("text")
    text: str = "".join(lines) or (full if isinstance(full, str) else "")
    for part in (address.get("state"), address.get("city"), district, "上海市", "上海"):
        if isinstance(part, str) and part and text.startswith(part):
            text = text[len(part):]
    if code is None:
        for name, c in _division_names().items():
            if len(c) == 6 and not c.endswith("00") and name in text:
                code = c
                break
    for name in _division_names():
        if text.startswith(name):
            text = text[len(name):]
    return code if isinstance(code, str) else None, normalise_text(text)


def _guardians(patient: dict[str, Any]) -> tuple[Guardian, ...]:
    out = []
    for contact in patient.get("contact") or ():
        if not isinstance(contact, dict):
            continue
        codes = {
            (c.get("system"), c.get("code"))
            for rel in contact.get("relationship") or ()
            if isinstance(rel, dict)
            for c in rel.get("coding") or ()
            if isinstance(c, dict)
        }
        if not codes & _GUARDIAN_CODES:
            continue
        name = contact.get("name") if isinstance(contact.get("name"), dict) else {}
        text, _ = name_text({"name": [name]}) if name else (None, None)
        id_number = None
        # A guardian's ID number: any extension on the contact carrying a 身份证 Identifier.
        for ext in contact.get("extension") or ():
            ident = ext.get("valueIdentifier") if isinstance(ext, dict) else None
            if isinstance(ident, dict) and ident.get("system") == ID_CARD_SYSTEM:
                value = str(ident.get("value") or "").strip().upper()
                if id_card_problem(value) is None:
                    id_number = value
        out.append(Guardian(text, id_number, _phones(contact.get("telecom"))))
    return tuple(out)


def demographics(patient: dict[str, Any]) -> Demographics:
    valid, invalid = id_numbers(patient)
    name, family = name_text(patient)
    born = patient.get("birthDate") if isinstance(patient.get("birthDate"), str) else None
    if valid and not born:
        d = birth_date(valid)
        born = d.isoformat() if d else None
    sex = patient.get("gender") if patient.get("gender") in ("male", "female") else None
    divisions, texts = set(), []
    for a in patient.get("address") or ():
        if isinstance(a, dict):
            code, text = _address(a)
            if code:
                divisions.add(code)
            if text:
                texts.append(text)
    return Demographics(
        id_number=valid,
        name=name,
        family=family,
        birth_date=born[:10] if born and len(born) >= 10 else None,
        sex=sex,
        phones=_phones(patient.get("telecom")),
        divisions=frozenset(divisions),
        addresses=tuple(dict.fromkeys(texts)),
        guardians=_guardians(patient),
        invalid_ids=tuple(invalid),
    )


# -- pinyin -----------------------------------------------------------------------------------


@lru_cache(maxsize=65536)
def _char_reading(ch: str) -> frozenset[str]:
    from fhir_server.search.pinyin import has_cjk

    if not has_cjk(ch):
        return frozenset({ch})
    from pypinyin import Style, pinyin

    readings = pinyin(ch, style=Style.NORMAL, heteronym=True, errors="ignore")
    return frozenset(r.casefold() for r in (readings[0] if readings else ()) if r) or frozenset({ch})


@lru_cache(maxsize=65536)
def char_readings(text: str) -> tuple[frozenset[str], ...]:
    """The toneless pinyin readings of each character (several for polyphones such as 乐)."""
    return tuple(_char_reading(ch) for ch in text)


def _same_sound(a: str, b: str) -> bool:
    ra, rb = char_readings(a), char_readings(b)
    return len(ra) == len(rb) and all(x & y for x, y in zip(ra, rb))


# -- comparison -------------------------------------------------------------------------------


def _name_weight(a: Demographics, b: Demographics) -> tuple[float, bool]:
    """(weight, whether the names agree well enough for household fields to count)."""
    if not a.name or not b.name:
        return 0.0, True
    # Three-character names are about ten times rarer than two-character ones (u 1e-4 vs 1e-3).
    long = len(a.name) >= 3
    if a.name == b.name:
        return (13.1 if long else 9.8), True
    if _same_sound(a.name, b.name):
        return (8.2 if long else 5.3), True
    if len(a.name) == len(b.name) >= 2 and sum(x != y for x, y in zip(a.name, b.name)) == 1:
        return 1.0, False
    family_a = a.family or a.name[:1]
    family_b = b.family or b.name[:1]
    if family_a == family_b:
        return -8.0, False
    return -5.0, False


def _birth_weight(a: str | None, b: str | None) -> float:
    if not a or not b:
        return 0.0
    if a == b:
        return 14.2
    ya, ma, da = a[:4], a[5:7], a[8:10]
    yb, mb, db = b[:4], b[5:7], b[8:10]
    differing = (ya != yb) + (ma != mb) + (da != db)
    if differing == 1 or (ya == yb and ma == db and da == mb):
        return 3.9
    return -6.0


def _dice(a: str, b: str) -> float:
    if a == b:
        return 1.0
    ga = {a[i : i + 2] for i in range(len(a) - 1)} or {a}
    gb = {b[i : i + 2] for i in range(len(b) - 1)} or {b}
    return 2 * len(ga & gb) / (len(ga) + len(gb))


def _guardian_weight(a: tuple[Guardian, ...], b: tuple[Guardian, ...]) -> float:
    if not a or not b:
        return 0.0
    best = -3.0
    for x in a:
        for y in b:
            if x.id_number and x.id_number == y.id_number:
                return 12.0
            if x.name and y.name:
                if x.name == y.name:
                    best = max(best, 9.0)
                elif _same_sound(x.name, y.name):
                    best = max(best, 5.0)
    return best


def compare(a: Demographics, b: Demographics) -> Comparison:
    """How strongly ``a`` and ``b`` look like the same resident."""
    if a.id_number and b.id_number:
        if a.id_number == b.id_number:
            return Comparison(50.0, {"id": 50.0}, certain=True)
        return Comparison(-25.0, {"id": -25.0}, certain=False)
    parts: dict[str, float] = {}
    name, household = _name_weight(a, b)
    if name:
        parts["name"] = name
    born = _birth_weight(a.birth_date, b.birth_date)
    if born:
        parts["birthDate"] = born
    if a.sex and b.sex:
        parts["gender"] = 0.97 if a.sex == b.sex else -4.6
    if a.phones and b.phones:
        parts["phone"] = 10.0 if a.phones & b.phones else -1.0
    if a.divisions and b.divisions:
        parts["district"] = 3.2 if a.divisions & b.divisions else -1.85
    if a.addresses and b.addresses:
        sim = max(_dice(x, y) for x in a.addresses for y in b.addresses)
        if sim >= 0.85:
            parts["address"] = 7.0
        elif sim >= 0.6:
            parts["address"] = 3.0
    guardian = _guardian_weight(a.guardians, b.guardians)
    if guardian:
        parts["guardian"] = guardian
    if not household:
        # Family members share these: without agreeing names they are no evidence of identity.
        for key in ("phone", "district", "address", "guardian"):
            if parts.get(key, 0.0) > 0:
                parts[key] = 0.0
    return Comparison(round(sum(parts.values()), 3), parts)


def grade(comparison: Comparison, auto_link: float, review: float) -> str:
    """The match-grade code (certain | probable | possible | certainly-not) of a comparison."""
    if comparison.certain is True:
        return "certain"
    if comparison.certain is False:
        return "certainly-not"
    s = comparison.score
    return "certain" if s >= auto_link else "probable" if s >= review else "possible"
