"""Connectors: pull records from upstream systems, map them to CN-profiled FHIR, link the source
Patient to its resident (MPI) and keep every step traceable (meta.source, Provenance, raw payload).

The framework (transport, checkpoint, dead letters, provenance, runner) is source-agnostic; each
source contributes a parser and a declarative mapping under mappings/<source>/.
"""

from fhir_server.connectors.runner import SyncReport, replay_dead_letters, sync

__all__ = ["SyncReport", "replay_dead_letters", "sync"]
