"""The master patient index (一人一档): one golden Patient per resident, linked to the source
Patients the connectors store.

Connectors call :func:`link` after storing a source Patient (see /tmp/plan/issue5.md for the
record model). Scoring: fhir_server/mpi/match.py; golden survivorship: golden.py; blocking:
candidates.py; review queue: review.py; merge/unmerge: merge.py; the FHIR operations ($match,
$mpi-resolve, $merge, $unmerge, $everything): fhir_server/interactions/mpi.py.
"""

from fhir_server.mpi.linker import LinkResult, link, link_in, link_many

__all__ = ["LinkResult", "link", "link_in", "link_many"]
