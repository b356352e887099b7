"""Profile validation on write: a resource that claims profiles in ``meta.profile``, or whose type
the server requires a profile for (setting ``required_profiles``), must conform before it is stored.

Errors give 422 (http.html: the resource violates applicable profiles) with every issue;
warnings (an ID card number whose birth date disagrees with birthDate ...) do not block. A claimed
profile the server does not hold is a warning (it may belong to another guide); a required one
that is missing is an error, so a misconfigured server refuses rather than accepting unchecked.
"""

from __future__ import annotations

from typing import Any

from fhir_server.interactions.context import Server, Tx
from fhir_server.outcome import FhirError
from fhir_server.storage.base import Stored
from fhir_server.validation.registry_definitions import validator_for


async def check_profiles(tx: Tx, resource: dict[str, Any], current: Stored | None) -> None:
    validator = validator_for(tx.server.conformance, tx.settings.required_profiles)
    if not validator.profiles_for(resource):
        return
    issues = validator.validate(resource, structure=False, claimed_unknown="warning", max_depth=tx.settings.max_json_depth)
    if any(i.severity in ("error", "fatal") for i in issues):
        raise FhirError(422, [i for i in issues if i.severity != "information"])


def install(server: Server) -> None:
    """Add the hook (after structural validation) and fail fast on a malformed setting."""
    validator_for(server.conformance, server.settings.required_profiles)
    server.pre_store.append(check_profiles)
