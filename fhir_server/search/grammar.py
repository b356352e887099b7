"""The lexical rules of search values (search.html#escaping, #prefix, #number, #date).

Pure functions over strings: they split and decode what a client sent and raise a 400 naming the
parameter when it is malformed. Nothing here knows about MongoDB.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal, InvalidOperation

from fhir_server.outcome import FhirError, bad_request
from fhir_server.search.extract import date_range

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")


def split_unescaped(value: str, sep: str) -> list[str]:
    """Split on ``sep`` where it is not escaped by a backslash; escapes are kept."""
    out, start, i = [], 0, 0
    while i < len(value):
        ch = value[i]
        if ch == "\\":
            i += 2
            continue
        if ch == sep:
            out.append(value[start:i])
            start = i + 1
        i += 1
    out.append(value[start:])
    return out


def unescape(value: str) -> str:
    """``\\,`` ``\\|`` ``\\$`` ``\\\\`` → the character itself."""
    return re.sub(r"\\(.)", r"\1", value) if "\\" in value else value


def split_or(value: str) -> list[str]:
    """The comma-separated alternatives of one parameter value, still escaped."""
    return split_unescaped(value, ",")


def split_pipe(value: str) -> list[str]:
    """``system|code`` parts, unescaped."""
    return [unescape(p) for p in split_unescaped(value, "|")]


def prefix(value: str) -> tuple[str, str]:
    """The comparison prefix of a number, date or quantity value (``eq`` when none)."""
    if len(value) > 2 and value[:2] in PREFIXES and (value[2].isdigit() or value[2] in "-+."):
        return value[:2], value[2:]
    return "eq", value


def number(name: str, text: str) -> Decimal:
    try:
        d = Decimal(text)
    except InvalidOperation:
        raise bad_request(f"Invalid number '{text[:60]}' for parameter '{name}'", expression=[name]) from None
    if not d.is_finite():
        raise bad_request(f"Invalid number '{text[:60]}' for parameter '{name}'", expression=[name])
    return d


def number_range(d: Decimal) -> tuple[float, float]:
    """The implicit range of a decimal's precision: ``5.4`` is [5.35, 5.45) (search.html#number)."""
    exp = d.as_tuple().exponent
    half = Decimal(5).scaleb(exp - 1) if isinstance(exp, int) else Decimal(0)
    return float(d - half), float(d + half)


def date_bounds(name: str, raw: str) -> tuple[str, datetime, datetime]:
    """(prefix, low, high) of a date value; dates without a zone are China Standard Time."""
    pfx, text = prefix(raw)
    bounds = date_range(text)
    if bounds is None:
        raise bad_request(
            f"Invalid date '{raw[:60]}' for parameter '{name}' (expected [prefix]YYYY[-MM[-DD[Thh:mm[:ss][zone]]]])",
            expression=[name],
        )
    return pfx, bounds[0], bounds[1]


def not_supported(message: str, name: str) -> FhirError:
    return FhirError.of(400, "not-supported", message, expression=[name])


def unsupported_modifier(name: str, modifier: str) -> FhirError:
    return not_supported(f"Modifier ':{modifier[:40]}' is not supported on parameter '{name}'", name)
