"""The audit trail (issue #6, 等保三级): one BALP AuditEvent per request (per patient touched),
appended to a hash chain and searchable as FHIR AuditEvents; log redaction of personal data.

The HTTP layer: at startup ``trail = AuditTrail.from_settings(store, settings); await trail.start()``
and ``install_log_redaction()``; once per request, after the response status is known (refusals
included), ``await trail.record(RequestRecord(...))``; at shutdown ``await trail.stop()``.
``fhir-server audit verify`` checks the chain. See chain.py for what is and is not guaranteed.
"""

from fhir_server.audit.chain import AuditTrail, AuditUnavailable, VerifyReport, anchor, append, verify
from fhir_server.audit.events import AuditSource, RequestRecord, build_events, classify
from fhir_server.audit.redact import RedactingFilter, install_log_redaction, redact

__all__ = [
    "AuditSource",
    "AuditTrail",
    "AuditUnavailable",
    "RedactingFilter",
    "RequestRecord",
    "VerifyReport",
    "anchor",
    "append",
    "build_events",
    "classify",
    "install_log_redaction",
    "redact",
    "verify",
]
