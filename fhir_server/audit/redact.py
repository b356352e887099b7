"""Personal data out of the logs (等保三级: 个人信息 must not reach logs in clear).

:class:`RedactingFilter` rewrites log records before any handler formats them:

- 18-digit 居民身份证 numbers (GB 11643: region, birth date, sequence, check character) are
  replaced whole by ``[身份证已脱敏]``: the region and check digits are no help in a log, and
  with a name and a district even the last four narrow a resident down;
- mainland mobile numbers (``1[3-9]`` + 9 digits, with or without +86) keep the first three and
  last four digits, ``138****5678``, as is usual in China;
- the values of name search parameters (``name=``, ``family=``, ``given=``, ``phonetic=``, chained
  ``patient.name=``, with modifiers), percent-encoded or not, keep their first character
  (``name=张**``; pinyin ``name=z*******``).

Digits inside longer runs of letters and digits (resource ids, hashes, hex) are left alone.
The message and its arguments are redacted separately, so formatters that read the arguments
(uvicorn's access log reads a 5-tuple) still work; an argument that is not a string but whose text
holds personal data turns the record into its redacted, formatted message. Exception text and
stack info are redacted too.

:func:`install_log_redaction` installs the filter on the ``fhir_server`` and ``uvicorn.access``
loggers. A logger's filters see only the records logged on that very logger, not those of its
children (``fhir_server.mpi``) that propagate to it, so it also wraps the log record factory to
redact the records of every ``fhir_server.*`` logger as they are created.
"""

from __future__ import annotations

import logging
import re
import traceback
import urllib.parse
from typing import Any

ID_MASK = "[身份证已脱敏]"
# Not inside a longer run of letters and digits; a percent-escape just before (``%7C`` of an
# encoded ``|`` in a logged URL) is a separator, not part of the run.
_BEFORE = r"(?:(?<![0-9A-Za-z])|(?<=%[0-9A-Fa-f]{2}))"
_ID_CARD = re.compile(
    _BEFORE + r"[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![0-9A-Za-z])"
)
_MOBILE = re.compile(_BEFORE + r"((?:\+|00)?86[- ]?)?(1[3-9]\d)(\d{4})(\d{4})(?![0-9A-Za-z])")
_NAME_PARAM = re.compile(
    r"(?P<key>(?:(?<=[?&;\s'\"(,])|^)[A-Za-z_.:-]*?(?:name|family|given|phonetic)(?::[A-Za-z-]+)?=)(?P<value>[^&\s'\",;)]+)",
    re.IGNORECASE,
)
_LOGGERS = ("fhir_server", "uvicorn.access")


def _mask_name(value: str) -> str:
    try:
        text = urllib.parse.unquote_plus(value, errors="strict")
    except UnicodeDecodeError:
        return "***"
    if not text:
        return value
    return text[0] + "*" * max(len(text) - 1, 1)


def redact(text: str) -> str:
    """``text`` with ID card numbers, mobile numbers and name parameter values masked."""
    if not text:
        return text
    text = _ID_CARD.sub(ID_MASK, text)
    text = _MOBILE.sub(lambda m: f"{m.group(1) or ''}{m.group(2)}****{m.group(4)}", text)
    text = _NAME_PARAM.sub(lambda m: m.group("key") + _mask_name(m.group("value")), text)
    return text


def _redact_value(value: Any) -> tuple[Any, bool]:
    """(redacted value, whether a non-string value held personal data)."""
    if isinstance(value, str):
        return redact(value), False
    if isinstance(value, (bool, float)) or value is None:
        return value, False
    try:
        text = str(value)
    except Exception:
        return value, False
    return value, redact(text) != text


class RedactingFilter(logging.Filter):
    """Masks personal data in a record's message, arguments, exception and stack text; never drops."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    if getattr(record, "_pii_redacted", False):
        return record
    record._pii_redacted = True  # type: ignore[attr-defined]
    flatten = False
    if isinstance(record.msg, str):
        record.msg = redact(record.msg)
    else:
        _, flatten = _redact_value(record.msg)
    args = record.args
    if isinstance(args, tuple):
        out = []
        for a in args:
            v, bad = _redact_value(a)
            flatten |= bad
            out.append(v)
        record.args = tuple(out)
    elif isinstance(args, dict):
        new: dict[Any, Any] = {}
        for k, a in args.items():
            v, bad = _redact_value(a)
            flatten |= bad
            new[k] = v
        record.args = new
    if flatten:
        try:
            record.msg = redact(record.getMessage())
            record.args = ()
        except Exception:
            record.msg, record.args = redact(str(record.msg)), ()
    if record.exc_info and not record.exc_text:
        record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record


_FILTER = RedactingFilter()
# Every logger name redaction was installed for, and their descendants' prefixes: a later call with
# more names (the server adds "uvicorn" and "pymongo") extends the record factory already in place.
_NAMES: set[str] = set()
_PREFIXES: list[tuple[str, ...]] = [()]


def install_log_redaction(loggers: tuple[str, ...] = _LOGGERS) -> RedactingFilter:
    """Install the redacting filter on ``loggers`` (and, through the record factory, on every
    descendant of them). Safe to call more than once (each worker calls it at startup)."""
    for name in loggers:
        lg = logging.getLogger(name)
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)
    _NAMES.update(loggers)
    _PREFIXES[0] = tuple(sorted(n + "." for n in _NAMES))
    previous = logging.getLogRecordFactory()
    if not getattr(previous, "_pii_redacting", False):

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if record.name in _NAMES or record.name.startswith(_PREFIXES[0]):
                redact_record(record)
            return record

        factory._pii_redacting = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(factory)
    return _FILTER


def blind_numbers(text: str) -> str:
    """``text`` (an audited query string) with each 身份证 and mobile number replaced by its blind
    index (``h1:…``, fhir_server/storage/field_crypto.py): a database dump of the audit trail does
    not reveal them, and an auditor who blinds a number can still find the queries that asked for
    it. Without field encryption the text is returned as it is (nothing is protected at rest)."""
    from fhir_server.storage import field_crypto

    crypto = field_crypto.active()
    if crypto is None or not text:
        return text
    plain = urllib.parse.unquote_plus(text) if "%" in text or "+" in text else text
    blinded = _ID_CARD.sub(lambda m: crypto.blind(m.group(0)), plain)
    blinded = _MOBILE.sub(lambda m: crypto.blind(m.group(2) + m.group(3) + m.group(4)), blinded)
    return text if blinded == plain else blinded
