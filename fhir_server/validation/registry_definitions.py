"""The server's conformance registry and terminology service, as profile validation sees them."""

from __future__ import annotations

import weakref
from typing import Any

from fhir_server.conformance.registry import ConformanceRegistry
from fhir_server.terminology.service import terminology_for

from .validator import Validator, parse_required_profiles

__all__ = ["RegistryDefinitions", "validator_for"]


class RegistryDefinitions:
    """:class:`~fhir_server.validation.profiles.Definitions` over a :class:`ConformanceRegistry`."""

    def __init__(self, registry: ConformanceRegistry) -> None:
        self.registry = registry
        self.terminology = terminology_for(registry)

    @property
    def generation(self) -> int:
        return self.registry.generation

    def structure_definition(self, url: str) -> dict[str, Any] | None:
        return self.registry.get("StructureDefinition", url)

    def value_set_contains(self, url: str, system: str | None, code: str) -> bool | None:
        found = self.terminology.contains(url, system, code)
        if found is False and system is not None and self._takes_all_of(url, system):
            # A code system shipped as a fragment (ICD-10, vaccine codes, divisions) lists only
            # part of its codes: in a value set taking all of it, an unlisted code is unknown,
            # not wrong. (A value set that enumerates its codes decides by itself.)
            cs = self.registry.get("CodeSystem", system)
            if cs is not None and cs.get("content") not in (None, "complete"):
                return None
        return found

    def _takes_all_of(self, url: str, system: str) -> bool:
        vs = self.registry.get("ValueSet", url)
        includes = (vs or {}).get("compose", {}).get("include", ())
        return any(inc.get("system") == system and not inc.get("concept") for inc in includes if isinstance(inc, dict))


_validators: "weakref.WeakKeyDictionary[ConformanceRegistry, tuple[str, Validator]]" = weakref.WeakKeyDictionary()


def validator_for(registry: ConformanceRegistry, required_profiles: str = "") -> Validator:
    """The validator (and its compiled profiles) shared by everything that uses ``registry``."""
    hit = _validators.get(registry)
    if hit is None or hit[0] != required_profiles:
        hit = (required_profiles, Validator(RegistryDefinitions(registry), parse_required_profiles(required_profiles)))
        _validators[registry] = hit
    return hit[1]
