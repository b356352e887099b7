"""Connector benchmark: source records/s of the immunization connector, end to end.

A throwaway mongod, the server wiring with the CN profiles loaded (so every write is validated),
the simulated upstream over HTTP (gzip XML pages), and one full sync: fetch → parse → map →
validated transactional writes with Provenance and raw payload → MPI link. Then a re-run from
the start (idempotent: nothing written) is timed too. Writes bench/results/connector-latest.md.

    .venv/bin/python bench/connector_bench.py [--children 1000] [--page-size 100] [--no-mpi]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


async def _run(children: int, page_size: int, use_mpi: bool) -> dict:
    from fhir_server.config import load_settings
    from fhir_server.connectors import runner
    from fhir_server.connectors._db import database
    from fhir_server.connectors.immunization import ImmunizationConnector
    from fhir_server.connectors.transport import HttpTransport
    from fhir_server.http.app import create_app
    from fhir_server.simulators.immunization import ImmunizationUpstream
    from fhir_server.storage import mongod as embedded

    dbpath = Path(tempfile.mkdtemp(prefix="connector-bench-"))
    uri = embedded.start(embedded.free_port(), dbpath)
    try:
        app = create_app(load_settings(mongodb_uri=uri, database="bench", load_conformance=True))
        async with app.router.lifespan_context(app):
            server = app.state.server
            t0 = time.perf_counter()
            up = ImmunizationUpstream(seed=7, children=children)
            build = time.perf_counter() - t0
            httpd, url = up.start(token="bench")
            linker = runner.default_linker() if use_mpi else None
            out: dict = {"children": children, "deliveries": len(up.deliveries), "build_s": build, "mpi": linker is not None}
            try:
                for label, full in (("first", True), ("rerun", True)):
                    transport = HttpTransport(url, "bench", page_size=page_size)
                    try:
                        report = await runner.sync(server, ImmunizationConnector(), transport, linker=linker, full=full)
                    finally:
                        await transport.close()
                    assert report.error is None, report.error
                    assert report.balanced
                    out[label] = report
                out["history"] = await database(server)["_history"].count_documents({})
                out["truth"] = dict(up.truth)
            finally:
                httpd.shutdown()
                httpd.server_close()
            return out
    finally:
        embedded.stop(dbpath)
        shutil.rmtree(dbpath, ignore_errors=True)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _markdown(r: dict, page_size: int) -> str:
    first, rerun = r["first"], r["rerun"]
    rows = []
    for label, rep in (("first sync (writes)", first), ("re-run (no-op)", rerun)):
        rows.append(
            f"| {label} | {rep.received:,} | {rep.created:,} | {rep.updated:,} | {rep.unchanged:,} | {rep.rejected:,} | {rep.linked:,} | {rep.seconds:,.1f} | **{rep.rate:,.0f}** |"
        )
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"""# Connector benchmark (bench/connector_bench.py)

Immunization connector, end to end: simulated upstream over HTTP (gzip XML, {page_size} deliveries a
page) → parse → declarative mapping → validated transactional writes (cn-patient, cn-immunization,
cn-provenance; a Binary with the raw record and a Provenance per resource version) → MPI link
({'fhir_server.mpi.link' if r['mpi'] else 'none'}). {r['children']:,} synthetic children, {r['deliveries']:,} deliveries
(re-sends, new doses, corrections, stale snapshots and malformed records planted). A source record
is one child, inoculation or AEFI.

| run | received | created | updated | unchanged | rejected | linked | seconds | source records/s |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Goal: ≥ 500 source records/s. Planted truth: {', '.join(f"{k} {r['truth'][k]:,}" for k in ('received', 'created', 'updated', 'unchanged', 'rejected'))}.
Versions in `_history` after both runs: {r['history']:,} (the re-run added none).

| machine | |
|---|---|
| CPU | {cpu} |
| cores | {os.cpu_count()} logical |
| OS | {platform.platform()} |
| Python | {platform.python_version()} |
| commit | {_commit()} (with uncommitted changes) |
| load at start | {', '.join(f'{x:.2f}' for x in os.getloadavg())} |
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=1000)
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--no-mpi", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(_run(args.children, args.page_size, not args.no_mpi))
    text = _markdown(result, args.page_size)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "connector-latest.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
