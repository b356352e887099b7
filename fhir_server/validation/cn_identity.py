"""Checks of Chinese identity data that FHIRPath can state but not explain well.

The resident identity card number (居民身份证号, GB 11643-1999): 6 digits of administrative
division, 8 of birth date, 3 of sequence (the last odd for men, even for women) and an ISO 7064
MOD 11-2 check character. The profiles state the same rules as FHIRPath (cn-id-1..3, cn-name-1);
these implementations give the clerk the precise message ("校验位错误：应为 X").
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

ID_CARD_SYSTEM = "urn:oid:2.16.156.10011.1.3"
_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK = "10X98765432"

Finding = tuple[bool, str, str]


def check_character(first17: str) -> str:
    """The GB 11643 check character of the first 17 digits."""
    return _CHECK[sum(int(d) * w for d, w in zip(first17, _WEIGHTS)) % 11]


def id_card_problem(number: str) -> tuple[str, str] | None:
    """(English, Chinese) description of what is wrong with an ID card number; None when valid."""
    if len(number) != 18:
        return (
            f"ID card number must have 18 characters, found {len(number)}",
            f"身份证号应为 18 位，实际为 {len(number)} 位",
        )
    if not _well_formed(number):
        return (
            "ID card number must be 17 digits followed by a digit or X",
            "身份证号应为 17 位数字加 1 位数字或大写 X",
        )
    if number[0] == "0":
        return ("ID card number cannot start with 0 (no division code does)", "身份证号首位不能为 0（行政区划代码无效）")
    if birth_date(number) is None or not "1800" <= number[6:10] <= "2099":
        return (
            f"ID card number holds an impossible birth date {number[6:14]}",
            f"身份证号中的出生日期 {number[6:14]} 无效",
        )
    expected = check_character(number[:17])
    if number[17] != expected:
        return (
            f"ID card number check character is wrong: expected {expected}, found {number[17]}",
            f"身份证号校验位错误：应为 {expected}",
        )
    return None


def _well_formed(number: str) -> bool:
    return len(number) == 18 and number[:17].isascii() and number[:17].isdigit() and number[17] in "0123456789X"


def birth_date(number: str) -> _dt.date | None:
    try:
        return _dt.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return None


def sex(number: str) -> str:
    """``male`` or ``female`` from the 17th digit."""
    return "male" if int(number[16]) % 2 else "female"


def _id_card_number(patient: dict[str, Any]) -> str | None:
    """The first ID card number of the patient, when it has the right shape (the profiles'
    FHIRPath does the same: a number with an impossible date still disagrees with birthDate)."""
    for ident in patient.get("identifier") or ():
        if isinstance(ident, dict) and ident.get("system") == ID_CARD_SYSTEM:
            value = ident.get("value")
            return value if isinstance(value, str) and _well_formed(value) else None
    return None


def check_id_card_identifier(identifier: Any, resource: dict[str, Any]) -> list[Finding]:
    """cn-id-1, at an Identifier: a valid number."""
    if not isinstance(identifier, dict):
        return []
    value = identifier.get("value")
    if not isinstance(value, str):
        return [(False, "ID card identifier has no value", "身份证号不能为空")]
    problem = id_card_problem(value)
    return [] if problem is None else [(False, *problem)]


def check_birth_date_agrees(patient: Any, resource: dict[str, Any]) -> list[Finding]:
    """cn-id-2, at a Patient: the birth date in the ID card number equals birthDate."""
    if not isinstance(patient, dict):
        return []
    given = patient.get("birthDate")
    number = _id_card_number(patient)
    if not isinstance(given, str) or number is None:
        return []
    in_number = f"{number[6:10]}-{number[10:12]}-{number[12:14]}"
    if in_number == given:
        return []
    return [
        (
            False,
            f"The birth date in the ID card number ({in_number}) differs from birthDate ({given})",
            f"身份证号中的出生日期（{in_number}）与出生日期（{given}）不一致",
        )
    ]


def check_sex_agrees(patient: Any, resource: dict[str, Any]) -> list[Finding]:
    """cn-id-3, at a Patient: the sex digit of the ID card number agrees with gender."""
    if not isinstance(patient, dict):
        return []
    gender = patient.get("gender")
    if gender not in ("male", "female"):
        return []
    number = _id_card_number(patient)
    if number is None or sex(number) == gender:
        return []
    names = {"male": "男", "female": "女"}
    return [
        (
            False,
            f"The ID card number is a {sex(number)}'s but gender is {gender}",
            f"身份证号显示性别为{names[sex(number)]}，与性别（{names[gender]}）不一致",
        )
    ]


def check_chinese_name(name: Any, resource: dict[str, Any]) -> list[Finding]:
    """cn-name-1, at a HumanName: text holds the full name; family + given equal it when present."""
    if not isinstance(name, dict):
        return []
    text = name.get("text")
    if not isinstance(text, str):
        return [(False, "name.text (the full name) is required", "姓名全称（name.text）必填")]
    family = name.get("family") if isinstance(name.get("family"), str) else ""
    given = [g for g in name.get("given") or () if isinstance(g, str)]
    if not family and not given:
        return []
    joined = family + "".join(given)
    if joined != text:
        return [
            (
                False,
                f"name.text {text!r} differs from family + given {joined!r}",
                f"姓名全称“{text}”与姓“{family}”加名“{''.join(given)}”不一致",
            )
        ]
    return []


HEALTH_RECORD_SYSTEM = "urn:oid:2.16.156.10011.1.2"
HEALTH_CARD_SYSTEM = "urn:oid:2.16.156.10011.1.19"
_DOCUMENT_TYPE_SYSTEM_SUFFIX = "/CodeSystem/cv02-01-101-id-document-type"
_GB_SEX_SUFFIX = "/StructureDefinition/cn-gb-sex"


def check_health_record_number(identifier: Any, resource: dict[str, Any]) -> list[Finding]:
    """cn-id-4, at an Identifier: the health-record number is 17 digits."""
    value = identifier.get("value") if isinstance(identifier, dict) else None
    if isinstance(value, str) and len(value) == 17 and value.isascii() and value.isdigit():
        return []
    shown = value if isinstance(value, str) else ""
    return [(False, f"Health record number must be 17 digits, found {shown!r}", f"健康档案编号应为 17 位数字，实际为“{shown}”")]


def check_other_documents(patient: Any, resource: dict[str, Any]) -> list[Finding]:
    """cn-id-5, at a Patient: an identifier that is none of 身份证 / 健康档案编号 / 健康卡 says its
    document type with a CV02.01.101 code."""
    if not isinstance(patient, dict):
        return []
    known = (ID_CARD_SYSTEM, HEALTH_RECORD_SYSTEM, HEALTH_CARD_SYSTEM)
    for i, ident in enumerate(patient.get("identifier") or ()):
        if not isinstance(ident, dict) or ident.get("system") in known:
            continue
        codings = ((ident.get("type") or {}).get("coding") or []) if isinstance(ident.get("type"), dict) else []
        if not any(isinstance(c, dict) and str(c.get("system", "")).endswith(_DOCUMENT_TYPE_SYSTEM_SUFFIX) for c in codings):
            return [
                (
                    False,
                    f"identifier[{i}] is another ID document: its type needs a CV02.01.101 code",
                    f"第 {i + 1} 个标识为其他证件，须用 CV02.01.101 标明证件类别",
                )
            ]
    return []


def check_gb_sex(patient: Any, resource: dict[str, Any]) -> list[Finding]:
    """cn-sex-1, at a Patient: the GB/T 2261.1 code kept on gender agrees with gender
    (1 男 → male, 2 女 → female, 0/9 → unknown)."""
    if not isinstance(patient, dict):
        return []
    companion = patient.get("_gender")
    code = None
    for ext in (companion.get("extension") or ()) if isinstance(companion, dict) else ():
        if isinstance(ext, dict) and str(ext.get("url", "")).endswith(_GB_SEX_SUFFIX):
            coding = ext.get("valueCoding")
            if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                code = coding["code"]
                break
    if code is None:
        return []
    expected = {"1": "male", "2": "female"}.get(code, "unknown")
    if patient.get("gender") == expected:
        return []
    return [
        (
            False,
            f"GB/T 2261.1 sex code {code} means {expected}, but gender is {patient.get('gender')}",
            f"性别代码（GB/T 2261.1：{code}）与性别（{patient.get('gender') or '未填写'}）不一致",
        )
    ]
