"""What every connector's parser produces: one source record mapped to one FHIR resource."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

_log = logging.getLogger("fhir_server.connectors")


@dataclass
class Unit:
    """One source record mapped to one FHIR resource; ``raw`` is kept (as a Binary) for tracing."""

    kind: str
    record_id: str
    raw: bytes
    resource: dict[str, Any]
    source_time: str  # the source's modification time (ISO); orders snapshots of one record
    group: str  # records written together or not at all (a child and its doses, a document)
    sha256: str = ""
    context: dict[str, Any] = field(default_factory=dict)
    content_type: str = "application/xml"  # of ``raw``

    def __post_init__(self) -> None:
        self.sha256 = self.sha256 or hashlib.sha256(self.raw).hexdigest()

    @property
    def key(self) -> str:
        return f"{self.resource['resourceType']}/{self.resource['id']}"


class BadRecord(Exception):
    """A source record the mapping refuses: ``code`` is the dead-letter reason code."""

    def __init__(self, code: str, zh: str, en: str) -> None:
        super().__init__(en)
        self.code, self.zh, self.en = code, zh, en


def as_bad_record(error: Exception, record: str) -> BadRecord:
    """``error`` as a dead-letter reason: a refusal stays what it is; any other exception is a
    defect of the mapping, logged, and the record waits in the dead letters for a fixed mapping
    (a replay) instead of stopping the whole sync."""
    if isinstance(error, BadRecord):
        return error
    _log.error("mapping %s failed", record, exc_info=error)
    return BadRecord("mapping-error", f"映射程序出错（{type(error).__name__}），待修复后重放", f"the mapping failed: {type(error).__name__}: {error}")
