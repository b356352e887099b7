"""Conformance resources at run time: the in-memory registry of canonical resources
(``registry``), loading the shipped profiles and terminology into the database (``seed``), and
keeping every worker's registry current (``watch``).

Only the registry is imported here: fhir_server/interactions/context.py needs it, and ``seed`` and
``watch`` import the interactions.
"""

from fhir_server.conformance.registry import CANONICAL_TYPES, ConformanceRegistry

__all__ = ["CANONICAL_TYPES", "ConformanceRegistry"]
