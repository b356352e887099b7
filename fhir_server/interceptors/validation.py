"""Structural validation of every resource before it is stored (400 with every issue found)."""

from __future__ import annotations

from typing import Any

from fhir_server.interactions.context import Tx
from fhir_server.outcome import FhirError
from fhir_server.storage.base import Stored
from fhir_server.validation import validate_resource


async def validate_before_store(tx: Tx, resource: dict[str, Any], current: Stored | None) -> None:
    issues = validate_resource(resource, max_depth=tx.settings.max_json_depth)
    errors = [i for i in issues if i.severity in ("error", "fatal")]
    if errors:
        raise FhirError(400, issues)
