"""Structural validation of FHIR R4 resources in their JSON form (no invariants, no profiles).

``validate_resource`` walks the JSON once against tables compiled at import from the official R4
definitions (see ``fhir_server.definitions``) and returns every problem as an :class:`Issue`.
Locations are FHIRPath with JSON property names; a nested resource's type is given with
``ofType``: ``Bundle.entry[3].resource.ofType(Patient).birthDate``,
``Patient.contained[0].ofType(Organization).name``, ``Patient.name[0].given[1]``.
"""

from __future__ import annotations

from typing import Any

from fhir_server.outcome import Issue

from ._walker import Ctx, validate_root

__all__ = ["validate_resource", "Issue", "MAX_DEPTH_LIMIT"]

# The walk recurses once per nested object; this keeps it well inside Python's recursion limit.
MAX_DEPTH_LIMIT = 400


def validate_resource(
    resource: dict[str, Any], *, max_depth: int = 64, extensions: list[tuple[dict[str, Any], str]] | None = None
) -> list[Issue]:
    """All structural problems of ``resource`` (errors and warnings); an empty list when valid.

    Objects nested deeper than ``max_depth`` (capped at ``MAX_DEPTH_LIMIT``) are reported once,
    as an ``invalid`` issue, and not descended into. When ``extensions`` is a list, every
    Extension object met is appended to it with its location (one walk serves both).
    """
    ctx = Ctx(min(max_depth, MAX_DEPTH_LIMIT), extensions)
    validate_root(ctx, resource, "", 1)
    return ctx.issues
