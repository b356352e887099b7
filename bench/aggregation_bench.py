"""Aggregation benchmark: the three connectors, one after another, into one server with the MPI.

The city of fhir_server/simulators/scenario.py (each source with its own clerical noise), served
by the three simulators over HTTP on this machine. Each connector's first sync and its re-sync
(idempotent: nothing written) are timed; then the golden records are measured against the
planted truth (pairwise precision and recall of "same golden" against "same resident").

Every mapped resource goes through what a client's write goes through: the CN profiles are
loaded, so Patients, Immunizations, Encounters ... are validated; ID and phone numbers are
encrypted at rest; each resource version gets its Binary and Provenance; every source Patient is
linked by ``fhir_server.mpi.link_many``.

The ceiling: the same number of documents inserted by raw PyMongo (one insert_many per page of
the same size, no validation, no Provenance, no MPI) — what MongoDB alone costs.

    .venv/bin/python bench/aggregation_bench.py [--children 1000] [--families 600] [--adults 800]

Writes bench/results/aggregation-latest.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _ceiling import mongo_version  # noqa: E402
from _report import machine_facts  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GOAL_RPS, GOAL_PRECISION, GOAL_RECALL = 500, 0.995, 0.98


async def _raw_ceiling(uri: str, docs: int, page: int) -> float:
    """Documents/s of plain insert_many into one collection, pages of ``page``: MongoDB's share."""
    from pymongo import AsyncMongoClient

    client: AsyncMongoClient = AsyncMongoClient(uri)
    try:
        coll = client["ceiling"]["docs"]
        body = {"resourceType": "Immunization", "status": "completed", "vaccineCode": {"coding": [{"code": "0101"}]}, "note": "x" * 600}
        started = time.perf_counter()
        for start in range(0, docs, page):
            await coll.insert_many([{**body, "_id": f"d{i}"} for i in range(start, min(docs, start + page))], ordered=False)
        return docs / (time.perf_counter() - started)
    finally:
        await client.close()


async def _run(children: int, families: int, adults: int, page_size: int) -> dict[str, Any]:
    from fhir_server.config import load_settings
    from fhir_server.connectors import runner
    from fhir_server.connectors._db import database
    from fhir_server.connectors.emr import EmrConnector
    from fhir_server.connectors.immunization import ImmunizationConnector
    from fhir_server.connectors.mch import MchConnector
    from fhir_server.connectors.transport import HttpTransport
    from fhir_server.http.app import create_app
    from fhir_server.mpi import golden as g
    from fhir_server.mpi import link_many
    from fhir_server.simulators._http import serving
    from fhir_server.simulators.emr import EmrUpstream
    from fhir_server.simulators.immunization import ImmunizationUpstream
    from fhir_server.simulators.mch import MchUpstream
    from fhir_server.simulators.scenario import Scenario, link_quality
    from fhir_server.storage import field_crypto
    from fhir_server.storage import mongod as embedded

    import orjson

    dbpath = Path(tempfile.mkdtemp(prefix="aggregation-bench-"))
    uri = embedded.start(embedded.free_port(), dbpath)
    out: dict[str, Any] = {"runs": []}
    try:
        scenario = Scenario(seed=2026)
        t0 = time.perf_counter()
        upstreams = [
            ("immunization 免疫规划", ImmunizationUpstream(seed=41, children=children, population=scenario.view("immunization")), ImmunizationConnector),
            ("妇幼 mch", MchUpstream(seed=42, children=families, population=scenario.view("mch")), MchConnector),
            ("hospital EMR 电子病历", EmrUpstream(seed=43, residents=adults, population=scenario.view("emr")), EmrConnector),
        ]
        out["simulators_s"] = time.perf_counter() - t0
        # As deployed (profiles loaded, ID and phone numbers encrypted), without access control and
        # audit: the connectors run in-process, not through HTTP requests.
        key = base64.b64encode(os.urandom(32)).decode()
        settings = load_settings(mongodb_uri=uri, database="bench", load_conformance=True, auth_enabled=False, audit_enabled=False, field_key=key)
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            server = app.state.server
            for label, up, connector in upstreams:
                with serving(up, "bench") as url:
                    for run in ("first sync", "re-sync"):
                        transport = HttpTransport(url, "bench", page_size=page_size)
                        cpu0 = time.process_time()
                        try:
                            report = await runner.sync(server, connector(), transport, linker=link_many, full=True)
                        finally:
                            await transport.close()
                        assert report.error is None and report.balanced, (label, report.error)
                        out["runs"].append((label, run, report, time.process_time() - cpu0))
            sources, goldens = {}, {}
            async for doc in database(server)["Patient"].find({"d": False}, {"r": 1}):
                patient = orjson.loads(field_crypto.decode(doc["r"], "Patient"))
                if g.is_golden(patient):
                    if patient.get("active") is not False:
                        goldens[patient["id"]] = patient
                else:
                    sources[patient["id"]] = patient
            out["quality"] = link_quality(scenario, sources, goldens)
            out["versions"] = await database(server)["_history"].count_documents({})
        stored = sum(r.created + r.updated for _, run, r, _ in out["runs"] if run == "first sync")
        out["ceiling_docs_per_s"] = await _raw_ceiling(uri, min(stored, 20_000), page_size)
        out["mongodb"] = mongo_version(uri)
    finally:
        embedded.stop(dbpath)
        shutil.rmtree(dbpath, ignore_errors=True)
    return out


def _markdown(r: dict[str, Any], args: argparse.Namespace) -> str:
    facts = machine_facts(r["mongodb"])
    rows = []
    for label, run, rep, cpu in r["runs"]:
        rows.append(
            f"| {label} | {run} | {rep.received:,} | {rep.created:,} | {rep.updated:,} | {rep.unchanged:,} | {rep.rejected:,} | "
            f"{rep.linked:,} | {rep.seconds:,.1f} | {cpu:,.1f} | **{rep.rate:,.0f}** |"
        )
    q = r["quality"]
    return f"""# Aggregation benchmark (bench/aggregation_bench.py)

Three simulated upstreams over HTTP on this machine → connectors → validated, traceable writes
(Binary + Provenance per version) → MPI (`link_many`), one connector after another, on one
embedded mongod. City: {args.children:,} immunized children, {args.families:,} 妇幼 families,
{args.adults:,} adults with hospital documents ({q.residents:,} residents), each source with its own noise
(homophone name typos, changed phones, children without ID numbers) plus each feed's re-sends,
corrections, out-of-order snapshots and malformed records.

| connector | run | received | created | updated | unchanged | rejected | linked | seconds | CPU s (server process) | source records/s |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Goal: ≥ {GOAL_RPS} source records/s per connector. The simulators run in the same process (their
threads share its GIL), so the CPU seconds include serving the pages.
Ceiling, raw MongoDB: {r['ceiling_docs_per_s']:,.0f} documents/s (insert_many of {args.page_size}, no
validation, Provenance, history or MPI) — a first sync writes about three documents per resource
version (resource, history, Provenance) plus the Binary.

## MPI against the planted truth

| residents | source Patients | goldens | in review | pairs found | true pairs | precision | recall |
|---|---|---|---|---|---|---|---|
| {q.residents:,} | {q.sources:,} | {q.goldens:,} | {q.in_review:,} | {q.found_pairs:,} | {q.true_pairs:,} | **{q.precision:.2%}** | **{q.recall:.2%}** |

Goals: precision ≥ {GOAL_PRECISION:.1%}, recall ≥ {GOAL_RECALL:.0%}. Residents split over several goldens:
{q.split_residents}; goldens holding two residents: {q.shared_goldens}; unrecognised source Patients: {len(q.unknown)}.
Resource versions stored: {r['versions']:,}.

| machine | |
|---|---|
| CPU | {facts['cpu']} |
| cores | {facts['logical_cores']} logical ({facts['available_cores_at_start']} available at start) |
| RAM | {facts['ram_gb']} GB |
| OS | {facts['os']} |
| Python / MongoDB | {facts['python']} / {facts['mongodb']} |
| commit | {facts['commit']} |
| load at start | {', '.join(map(str, facts['load_average_at_start']))} |
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=1000)
    parser.add_argument("--families", type=int, default=600)
    parser.add_argument("--adults", type=int, default=800)
    parser.add_argument("--page-size", type=int, default=100)
    args = parser.parse_args()
    result = asyncio.run(_run(args.children, args.families, args.adults, args.page_size))
    text = _markdown(result, args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "aggregation-latest.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
