"""The master patient index (一人一档): one golden Patient per resident, linked to the source
Patients the connectors store.

Record model: a connector stores, per source record, a *source* Patient (identified by the source
system's own id) and the clinical resources of that record, which reference the source Patient.
Each resident has one *golden* Patient (meta.tag ``https://fhir.cn-ehr.org/CodeSystem/mpi|golden``)
linked both ways: golden.link → source (``seealso``), source.link → golden (``refer``); so unmerge
never rewrites clinical data. Connectors call :func:`link` after storing a source Patient. Scoring: fhir_server/mpi/match.py; golden survivorship: golden.py; blocking:
candidates.py; review queue: review.py; merge/unmerge: merge.py; the FHIR operations ($match,
$mpi-resolve, $merge, $unmerge, $everything): fhir_server/interactions/mpi.py.
"""

from fhir_server.mpi.linker import LinkResult, link, link_in, link_many

__all__ = ["LinkResult", "link", "link_in", "link_many"]
