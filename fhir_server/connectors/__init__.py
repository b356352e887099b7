"""Connectors: pull records from upstream systems, map them to CN-profiled FHIR, link the source
Patient to its resident (MPI) and keep every step traceable (meta.source, Provenance, raw payload).

The framework (transport, checkpoint, dead letters, provenance, runner) is source-agnostic; each
source contributes a parser and a declarative mapping under mappings/<source>/. Hospitals that
speak FHIR push Bundles instead (fhir_push.py), under the same rules.
"""

from __future__ import annotations

from typing import Any

from fhir_server.connectors.runner import SyncReport, replay_dead_letters, sync

__all__ = ["PULLED", "SyncReport", "pulled_connector", "replay_dead_letters", "sync"]

# The pulled sources: name → (module, class).
PULLED = {
    "immunization": ("fhir_server.connectors.immunization", "ImmunizationConnector"),
    "emr": ("fhir_server.connectors.emr", "EmrConnector"),
    "mch": ("fhir_server.connectors.mch", "MchConnector"),
}


def pulled_connector(name_or_code: str) -> Any | None:
    """A pulled source's connector, by name (``mch``) or by its source code (``sh-mch``)."""
    import importlib

    for name, (module, cls) in PULLED.items():
        connector = getattr(importlib.import_module(module), cls)()
        if name_or_code in (name, connector.code):
            return connector
    return None
