"""OperationOutcome issues and the one exception type every layer raises.

Every error that leaves the server is an OperationOutcome. Code anywhere below the HTTP layer
raises :class:`FhirError` with one or more :class:`Issue` objects; the HTTP layer turns it into a
response with the right status. Nothing else should build OperationOutcome JSON by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

Severity = Literal["fatal", "error", "warning", "information"]


@dataclass(frozen=True, slots=True)
class Issue:
    """One OperationOutcome.issue.

    ``code`` is from http://hl7.org/fhir/issue-type (invalid, structure, required, value,
    invariant, not-found, conflict, not-supported, too-costly, processing, exception, ...).
    ``expression`` holds FHIRPath locations such as ``Patient.name[0].given[1]``.
    ``details_zh`` is the Simplified Chinese text a clerk can act on, when there is one.
    """

    code: str
    diagnostics: str
    severity: Severity = "error"
    expression: tuple[str, ...] = ()
    details_zh: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"severity": self.severity, "code": self.code}
        if self.details_zh:
            out["details"] = {"text": self.details_zh}
        out["diagnostics"] = self.diagnostics
        if self.expression:
            out["expression"] = list(self.expression)
        return out


@dataclass
class FhirError(Exception):
    """An error with an HTTP status and the issues that explain it."""

    status: int
    issues: list[Issue] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        Exception.__init__(self, self.status, [i.diagnostics for i in self.issues])

    @classmethod
    def of(
        cls,
        status: int,
        code: str,
        diagnostics: str,
        *,
        expression: Iterable[str] = (),
        details_zh: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> "FhirError":
        return cls(
            status,
            [Issue(code, diagnostics, expression=tuple(expression), details_zh=details_zh)],
            headers or {},
        )

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)


def operation_outcome(issues: Iterable[Issue]) -> dict[str, Any]:
    items = [i.to_json() for i in issues]
    if not items:
        items = [Issue("informational", "All OK", severity="information").to_json()]
    return {"resourceType": "OperationOutcome", "issue": items}


# Shorthands for the statuses used throughout the interactions.
def bad_request(diagnostics: str, *, expression: Iterable[str] = (), code: str = "invalid") -> FhirError:
    return FhirError.of(400, code, diagnostics, expression=expression)


def not_found(diagnostics: str) -> FhirError:
    return FhirError.of(404, "not-found", diagnostics)


def gone(diagnostics: str, headers: dict[str, str] | None = None) -> FhirError:
    return FhirError.of(410, "deleted", diagnostics, headers=headers)


def conflict(diagnostics: str) -> FhirError:
    return FhirError.of(409, "conflict", diagnostics)


def precondition_failed(diagnostics: str) -> FhirError:
    return FhirError.of(412, "conflict", diagnostics)


def unprocessable(issues: list[Issue]) -> FhirError:
    return FhirError(422, issues)
