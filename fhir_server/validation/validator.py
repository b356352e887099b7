"""Everything a resource is checked against, in one place: what ``$validate`` reports and what
a write must pass.

1. Structure of the base R4 type (always; fast, see _walker.py).
2. The R4 invariants (``dom-3``, ``pat-1`` ...), evaluated as FHIRPath.
3. Extensions whose definitions the server holds.
4. Profiles: those the resource claims in ``meta.profile``, those the caller names, and those the
   server requires for the type (setting ``required_profiles``).
"""

from __future__ import annotations

from typing import Any, Iterable

from fhir_server.outcome import Issue

from . import validate_resource
from .base_invariants import check_base_invariants
from .profiles import Definitions, ProfileValidator

__all__ = ["Validator", "parse_required_profiles"]


def parse_required_profiles(setting: str) -> dict[str, tuple[str, ...]]:
    """``"Patient=url1,Observation=url2"`` → {"Patient": ("url1",), ...}; ValueError when malformed."""
    out: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in setting.split(","))):
        type_, sep, url = part.partition("=")
        if not sep or not type_.strip() or not url.strip():
            raise ValueError(f"required_profiles: {part!r} is not Type=url")
        out.setdefault(type_.strip(), []).append(url.strip())
    return {k: tuple(v) for k, v in out.items()}


class Validator:
    """Full validation of resources against the server's definitions."""

    def __init__(self, definitions: Definitions, required: dict[str, tuple[str, ...]] | None = None) -> None:
        self.profiles = ProfileValidator(definitions)
        self.required = required or {}

    def profiles_for(self, resource: dict[str, Any], extra: Iterable[str] = ()) -> list[str]:
        """Claimed (meta.profile), requested and required profiles, each once, in that order."""
        return list(self._profiles(resource, extra))

    def applicable(self, resource: dict[str, Any]) -> bool:
        """Whether a write of ``resource`` is checked beyond its structure: it claims a profile
        this server holds, or its type has a required profile. (Claims of profiles the server
        does not hold, such as US Core on Synthea data, change nothing.)"""
        for url, only_claimed in self._profiles(resource, ()).items():
            if not only_claimed or self.profiles.definitions.structure_definition(url) is not None:
                return True
        return False

    def _profiles(self, resource: dict[str, Any], extra: Iterable[str]) -> dict[str, bool]:
        """url → whether it is only claimed (so an unknown one is not the caller's error)."""
        out: dict[str, bool] = {}
        meta = resource.get("meta")
        claimed = meta.get("profile") if isinstance(meta, dict) else None
        for url in claimed if isinstance(claimed, list) else ():
            if isinstance(url, str):
                out.setdefault(url.split("|", 1)[0], True)
        for url in [*extra, *self.required.get(resource.get("resourceType", ""), ())]:
            out[url.split("|", 1)[0]] = False
        return out

    def validate(
        self,
        resource: dict[str, Any],
        *,
        profiles: Iterable[str] = (),
        max_depth: int = 64,
        structure: bool = True,
        extensions: list[tuple[dict[str, Any], str]] | None = None,
        claimed_unknown: str = "warning",
    ) -> list[Issue]:
        """Every issue of ``resource``: errors, warnings and information. ``claimed_unknown`` is
        the severity of a profile claimed in meta.profile that the server does not hold (a
        warning, as HL7's validator says it; one asked for or required is an error). Without
        ``structure`` (checked already), ``extensions`` may pass on what that check collected."""
        found: list[tuple[dict[str, Any], str]] | None = [] if structure else extensions
        issues = validate_resource(resource, max_depth=max_depth, extensions=found) if structure else []
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            return issues
        rtype = resource["resourceType"]
        issues += check_base_invariants(resource)
        issues += self.profiles.check_extensions(resource, rtype, found)
        for url, only_claimed in self._profiles(resource, profiles).items():
            found = self.profiles.validate(resource, url)
            if only_claimed and claimed_unknown != "error":
                found = [
                    Issue(i.code, i.diagnostics, claimed_unknown, i.expression, i.details_zh)  # type: ignore[arg-type]
                    if i.code == "not-found" and i.diagnostics.startswith("Profile ")
                    else i
                    for i in found
                ]
            issues += found
        return _unique(issues)


def _unique(issues: list[Issue]) -> list[Issue]:
    # An extension is checked against its definition both as a profile's slice and on its own.
    seen: set[tuple[Any, ...]] = set()
    out = []
    for i in issues:
        key = (i.severity, i.code, i.details_zh or i.diagnostics, i.expression)
        if key not in seen:
            seen.add(key)
            out.append(i)
    return out
