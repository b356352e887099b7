"""Small helpers shared by the test modules."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid


def uid() -> str:
    """A fresh identifier value, so tests sharing one database never see each other's data."""
    return uuid.uuid4().hex


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop a server started in its own process group: SIGTERM, then SIGKILL after 20 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class RecordingLinker:
    """Stands in for fhir_server.mpi.link in connector tests: checks that the source Patient is
    stored when it is called, records the calls, and links every source to a golden of its own."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, server, source_patient_ids: list[str]):  # type: ignore[no-untyped-def]
        from fhir_server.mpi import LinkResult

        results = []
        for source_patient_id in source_patient_ids:
            current = await server.store.current("Patient", source_patient_id)
            assert current is not None and not current.deleted, "link is called after the source Patient is stored"
            self.calls.append(source_patient_id)
            results.append(LinkResult(f"golden-{source_patient_id[-8:]}", "new", 1.0))
        return results
