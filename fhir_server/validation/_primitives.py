"""Checks of FHIR primitive values in their JSON form, compiled once from the R4 regexes."""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from fhir_server.definitions import RESOURCE_TYPES, load_model

__all__ = ["Fault", "CHECKERS", "check_reference", "json_kind"]


class Fault:
    """One kind of primitive problem; ``describe`` builds the texts only when it is reported."""

    __slots__ = ("code", "en", "zh")

    def __init__(self, code: str, en: str, zh: str) -> None:
        self.code = code
        self.en = en
        self.zh = zh


Checker = Callable[[Any], "Fault | None"]

_ZH_FORMAT = {
    "date": "日期格式错误",
    "dateTime": "日期时间格式错误",
    "instant": "时间戳格式错误",
    "time": "时间格式错误",
    "id": "id 格式错误",
    "code": "代码格式错误",
    "uri": "URI 格式错误",
    "url": "URL 格式错误",
    "canonical": "规范 URL 格式错误",
    "oid": "OID 格式错误",
    "uuid": "UUID 格式错误",
    "base64Binary": "Base64 编码错误",
    "string": "字符串含非法字符",
    "markdown": "字符串含非法字符",
    "xhtml": "XHTML 叙述格式错误",
}
_JSON_ZH = {"string": "字符串", "boolean": "布尔值 true/false", "integer": "整数", "decimal": "数字"}
_INT32 = (-(2**31), 2**31 - 1)
_MAX_STRING = 1024 * 1024  # "strings SHALL NOT exceed 1 MB" (datatypes.html#string)


def _format_fault(name: str) -> Fault:
    return Fault("value", f"Invalid {name} value", _ZH_FORMAT.get(name, f"{name} 格式错误"))


def _json_fault(name: str, kind: str) -> Fault:
    article = "an" if kind[0] in "aeiou" else "a"
    return Fault("structure", f"Expected {article} JSON {kind} for {name}", f"JSON 类型错误：{name} 应为{_JSON_ZH[kind]}")


EMPTY_STRING = Fault("structure", "Empty string not allowed (omit the element instead)", "不允许空字符串")
TOO_LONG = Fault("value", "String longer than 1 MB", "字符串超过 1MB")
NOT_A_DATE = Fault("value", "Not a calendar date", "日期不存在")
XHTML_UNSAFE = Fault("value", "Narrative contains active or external content", "叙述含有脚本或外部内容")
REFERENCE_FORMAT = Fault("value", "Invalid reference format", "引用格式错误")
REFERENCE_TYPE = Fault("value", "Reference names an unknown resource type", "引用中的资源类型未知")
_DAYS = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def _string_checker(name: str) -> Checker:
    wrong = _json_fault(name, "string")
    bad = _format_fault(name)

    # Equivalent to the R4 regex [ \r\n\t\S]+ under Java's ASCII \s: only \v and \f are excluded.
    def check(v: Any) -> Fault | None:
        if type(v) is not str:
            return wrong
        if not v:
            return EMPTY_STRING
        if "\x0b" in v or "\x0c" in v:
            return bad
        if len(v) > _MAX_STRING:
            return TOO_LONG
        return None

    return check


def _regex_checker(name: str, pattern: str) -> Checker:
    # re.ASCII: FHIR's regexes are Java's, where \s is ASCII whitespace; U+3000 in Chinese text is \S.
    match = re.compile(pattern, re.ASCII).fullmatch
    wrong = _json_fault(name, "string")
    bad = _format_fault(name)
    calendar = name in ("date", "dateTime", "instant")

    def check(v: Any) -> Fault | None:
        if type(v) is not str:
            return wrong
        if not v:
            return EMPTY_STRING
        if match(v) is None:
            return bad
        # The regex lets 31 days through in every month; days past the 28th need the calendar.
        if calendar and len(v) >= 10 and v[8:10] > "28":
            year, month, day = int(v[0:4]), int(v[5:7]), int(v[8:10])
            leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
            if day > _DAYS[month] or (month == 2 and day == 29 and not leap):
                return NOT_A_DATE
        return None

    return check


def _base64_checker() -> Checker:
    # The R4 regex (\s*([0-9a-zA-Z\+/=]){4}\s*)+ backtracks exponentially on bad input with
    # whitespace; this is the same test (groups of 4 alphabet chars, whitespace ignored) in O(n).
    alphabet = re.compile(r"[0-9a-zA-Z+/=]+").fullmatch
    wrong = _json_fault("base64Binary", "string")
    bad = _format_fault("base64Binary")

    def check(v: Any) -> Fault | None:
        if type(v) is not str:
            return wrong
        if not v:
            return EMPTY_STRING
        compact = "".join(v.split()) if any(c in v for c in " \t\r\n") else v
        if len(compact) % 4 or alphabet(compact) is None:
            return bad
        return None

    return check


def _xhtml_checker() -> Checker:
    wrong = _json_fault("xhtml", "string")
    bad = _format_fault("xhtml")
    usual_root = '<div xmlns="http://www.w3.org/1999/xhtml"'
    root = re.compile(r"\s*<div\b[^>]*\bxmlns\s*=\s*[\"']http://www\.w3\.org/1999/xhtml[\"']").match
    # narrative.html#xhtml forbids scripts, forms, frames, objects, base/link and event handlers.
    # Run on the lowercased text: one literal-prefixed pattern is several times faster than IGNORECASE.
    unsafe_tag = re.compile(
        r"<\s*(?:script|head|body|form|base|link|frame|frameset|iframe|object|embed|applet|meta)\b"
        r"|<[^<>]*?\son[a-z]+\s*="  # [^<>]: each "<" scans only to the next tag, so O(n) overall
    ).search

    def check(v: Any) -> Fault | None:
        if type(v) is not str:
            return wrong
        if not v:
            return EMPTY_STRING
        if not v.startswith(usual_root) and root(v) is None:
            return bad
        low = v.lower()
        if unsafe_tag(low) is not None or "javascript:" in low:
            return XHTML_UNSAFE
        return None

    return check


def _boolean_checker() -> Checker:
    wrong = _json_fault("boolean", "boolean")

    def check(v: Any) -> Fault | None:
        return None if type(v) is bool else wrong

    return check


def _integer_checker(name: str, low: int) -> Checker:
    wrong = _json_fault(name, "integer")
    out_of_range = Fault("value", f"{name} out of range ({low}..{_INT32[1]})", "数值超出范围")

    def check(v: Any) -> Fault | None:
        if type(v) is not int:  # bool is an int subclass; 1.0 is a float: both wrong in FHIR JSON
            return wrong
        if v < low or v > _INT32[1]:
            return out_of_range
        return None

    return check


def _decimal_checker() -> Checker:
    wrong = _json_fault("decimal", "decimal")
    bad = _format_fault("decimal")

    def check(v: Any) -> Fault | None:
        t = type(v)
        if t is int:
            return None
        if t is not float:
            return wrong
        return None if math.isfinite(v) else bad

    return check


def _build() -> tuple[dict[str, Checker], dict[str, str]]:
    checkers: dict[str, Checker] = {}
    kinds: dict[str, str] = {}
    lows = {"integer": _INT32[0], "unsignedInt": 0, "positiveInt": 1}
    for name, spec in load_model()["primitives"].items():
        kind = spec["json"]
        kinds[name] = kind
        if kind == "boolean":
            checkers[name] = _boolean_checker()
        elif kind == "integer":
            checkers[name] = _integer_checker(name, lows.get(name, _INT32[0]))
        elif kind == "decimal":
            checkers[name] = _decimal_checker()
        elif name in ("string", "markdown"):
            checkers[name] = _string_checker(name)
        elif name == "base64Binary":
            checkers[name] = _base64_checker()
        elif name == "xhtml":
            checkers[name] = _xhtml_checker()
        elif name in ("uri", "url", "canonical"):
            # The R4 regex \S* admits "", which FHIR JSON forbids anyway; \S+ says both at once.
            checkers[name] = _regex_checker(name, r"\S+")
        else:
            checkers[name] = _regex_checker(name, spec["regex"])
    return checkers, kinds


CHECKERS, _KINDS = _build()


def json_kind(primitive: str) -> str:
    """``string``, ``boolean``, ``integer`` or ``decimal``: how the primitive appears in JSON."""
    return _KINDS[primitive]


_REFERENCE = re.compile(
    r"(?P<type>[A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(?:/_history/[A-Za-z0-9\-.]{1,64})?"  # relative
    r"|https?://\S+"  # absolute
    r"|urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|urn:oid:[0-2](?:\.(?:0|[1-9][0-9]*))+"
    r"|#\S*"  # contained (bare "#" points at the container)
    r"|(?P<ctype>[A-Za-z]+)\?\S+",  # conditional, resolved by the server in transactions
    re.ASCII,
).fullmatch
_REFERENCE_WRONG = _json_fault("Reference.reference", "string")


def check_reference(v: Any) -> Fault | None:
    """Reference.reference: relative, absolute, urn:uuid/oid, #fragment or conditional."""
    if type(v) is not str:
        return _REFERENCE_WRONG
    if not v:
        return EMPTY_STRING
    m = _REFERENCE(v)
    if m is None:
        return REFERENCE_FORMAT
    # lastindex: 1 = relative "Type/id", 2 = conditional "Type?query", None = no type named.
    if m.lastindex is not None and m.group(m.lastindex) not in RESOURCE_TYPES:
        return REFERENCE_TYPE
    return None
