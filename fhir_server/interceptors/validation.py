"""Validation of every resource before it is stored.

- Structure of the base R4 type, always: errors give 400 with every issue found.
- Profiles, when the resource claims one the server holds in ``meta.profile`` or the server
  requires one for its type (setting ``required_profiles``): the R4 invariants, extensions against their definitions
  and each profile. Errors give 422 (http.html: the resource violates applicable profiles);
  warnings (an ID card number whose birth date disagrees with birthDate ...) do not block.
  Claims of profiles the server does not hold (US Core on Synthea data ...) are not checked; a
  required profile that is missing is an error, so a misconfigured server refuses rather than
  accepting unchecked.
"""

from __future__ import annotations

from typing import Any

from fhir_server.interactions.context import Server, Tx
from fhir_server.outcome import FhirError
from fhir_server.storage.base import Stored
from fhir_server.validation import validate_resource
from fhir_server.validation.registry_definitions import validator_for


async def validate_before_store(tx: Tx, resource: dict[str, Any], current: Stored | None) -> None:
    validator = validator_for(tx.server.conformance, tx.settings.required_profiles)
    profiled = validator.applicable(resource) if isinstance(resource, dict) else False
    found: list[tuple[dict[str, Any], str]] | None = [] if profiled else None
    issues = validate_resource(resource, max_depth=tx.settings.max_json_depth, extensions=found)
    if any(i.severity in ("error", "fatal") for i in issues):
        raise FhirError(400, issues)
    if not profiled:
        return
    issues = validator.validate(
        resource, structure=False, extensions=found, claimed_unknown="warning", max_depth=tx.settings.max_json_depth
    )
    if any(i.severity in ("error", "fatal") for i in issues):
        raise FhirError(422, [i for i in issues if i.severity != "information"])


def install(server: Server) -> None:
    """Add the hook; a malformed ``required_profiles`` setting fails here, at startup."""
    validator_for(server.conformance, server.settings.required_profiles)
    server.pre_store.append(validate_before_store)
