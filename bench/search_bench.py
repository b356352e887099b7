"""Search benchmark of fhir-server (issue #3), at the Synthea set's size and grown tenfold.

Starts a throwaway embedded mongod and ``fhir-server serve --workers N``, loads the Synthea set over
HTTP with the loader (``0-…`` files first), then times searches one at a time from one client:
first pages of token, date-range, chained and ``_has`` searches, ``_summary=count``, paging through
20,000 Observations and ``_include``/``_revinclude`` pages, each beside the raw PyMongo queries
giving the same answer (the ceiling). Then it loads ``scale - 1`` clones of every patient bundle
(new ids throughout) and measures again. A search the server refuses is reported as not
supported, not a crash. Results: ``bench/results/search-latest.{json,md}`` (``search-quick`` with
``--quick``).

    .venv/bin/python bench/search_bench.py [--quick] [--scale 10] [--workers 2] [--data DIR]
"""

from __future__ import annotations

import argparse
import bz2
import shutil
import signal
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pymongo import MongoClient
from pymongo.database import Database
from rich.console import Console

import _ceiling
import _procs
import _report
import _search_clone
import _search_http
import _search_queries
import _search_report
from fhir_server.cli.loader import run_load

_HERE = Path(__file__).resolve().parent
_DEFAULT_DATA = _HERE.parents[1] / "shared" / "data" / "synthea-120"
_PAGING_PATH = "/fhir/Observation?_count=1000"
_console = Console()


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=_DEFAULT_DATA, help="Synthea folder (*.json.bz2 or *.json)")
    p.add_argument("--quick", action="store_true", help="10 patient files, scale 2, short phases: a sanity run")
    p.add_argument("--scale", type=int, default=None, help="grow the data this many times (default 10; 2 with --quick)")
    p.add_argument("--patients", type=int, default=None, help="patient files to load (default: all; 10 with --quick)")
    p.add_argument("--workers", type=int, default=2, help="server worker processes")
    p.add_argument("--concurrency", type=int, default=4, help="loader requests in flight")
    p.add_argument("--requests", type=int, default=None, help="measured requests per search (default 200; 40 with --quick)")
    p.add_argument("--budget", type=float, default=None, help="seconds per search and side at most (default 15; 3 with --quick)")
    p.add_argument("--page-target", type=int, default=20_000, help="resources to page through")
    p.add_argument("--out", default=None, help="results name under bench/results (default search-latest; search-quick with --quick)")
    return p.parse_args()


def _decompress(data: Path, patients: int | None, into: Path) -> tuple[list[Path], list[Path]]:
    """Plain-JSON copies of the ``0-…`` files and of the first ``patients`` patient files."""
    files = sorted(p for p in data.iterdir() if p.name.endswith((".json", ".json.bz2")))
    shared = [p for p in files if p.name.startswith("0-")]
    people = [p for p in files if not p.name.startswith("0-")][:patients]
    into.mkdir(parents=True)
    out: list[Path] = []
    for path in shared + people:
        target = into / path.name.removesuffix(".bz2")
        target.write_bytes(bz2.decompress(path.read_bytes()) if path.name.endswith(".bz2") else path.read_bytes())
        out.append(target)
    return out[: len(shared)], out[len(shared) :]


def _load(label: str, folder: Path, url: str, concurrency: int, meter: _procs.CpuMeter) -> tuple[dict[str, Any], dict[str, Any]]:
    _console.print(f"[bold]load[/bold] {label} …")
    mark = meter.snapshot()
    report = run_load([folder], url, concurrency=concurrency, order="auto")
    cpu = meter.since(mark)
    failed = [{"file": f.path.name, "error": f.error or f"{f.failed} resources failed"} for f in report.failed_files]
    _console.print(f"  {report.resources:,} resources in {report.seconds:.1f} s = {report.rate:,.0f}/s ({len(failed)} failed files)")
    for f in failed[:5]:
        _console.print(f"  [red]failed[/red] {f['file']}: {f['error']}")
    ingest = {"files": len(report.files), "resources": report.resources, "seconds": round(report.seconds, 2),
              "rps": round(report.rate, 1), "failed_files": failed}
    return ingest, cpu


def _check(http: _search_http.Answer | None, raw: _search_queries.RawAnswer | None) -> str:
    """Whether the server's first answer is the raw query's (same matches in order, same included
    resources, same total)."""
    if http is None or raw is None:
        return "–"
    problems = []
    if http.matches != raw.matches:
        common = len(set(http.matches) & set(raw.matches))
        problems.append(f"matches differ (server {len(http.matches)}, raw {len(raw.matches)}, {common} in common)")
    if set(http.included) != set(raw.included):
        problems.append(f"included differ (server {len(set(http.included))}, raw {len(set(raw.included))})")
    if http.total is not None and raw.total is not None and http.total != raw.total:
        problems.append(f"total differs (server {http.total}, raw {raw.total})")
    return "; ".join(problems) or "same answer"


def _query(client: _search_http.Client, db: Database, q: _search_queries.Query, alt: _search_queries.Query,
           requests: int, budget: float) -> dict[str, Any]:
    """One search over HTTP, then its raw equivalent (``alt``: the raw form without the count, used
    when the server's first page carries no ``total``)."""
    out: dict[str, Any] = {"label": q.label}
    try:
        out["http"], answer = _search_http.latency(client, q.paths, requests=requests, budget=budget)
    except Exception as e:  # keep measuring the others: a crash here is a finding, not the end
        out["http"], answer = {"status": f"error: {type(e).__name__}: {e}"[:300]}, None
    if answer is not None and answer.total is None and answer.next_path:
        q = alt
    try:
        out["ceiling"], raw = _search_queries.raw_latency(db, q.raw, requests=requests, budget=budget)
    except Exception as e:
        out["ceiling"], raw = {"status": f"error: {type(e).__name__}: {e}"[:300]}, None
    out["check"] = _check(answer, raw)
    if q.explain:
        try:
            out["plan"] = q.explain(db)
        except Exception as e:
            out["plan"] = {"error": str(e)[:200]}
    http = out["http"]
    shown = (f"p50 {http['p50_ms']} ms p99 {http['p99_ms']} ms" if "p50_ms" in http else http["status"])
    rate = f", {http['matches_per_s']:,}/s" if "matches_per_s" in http else ""
    raw_p50 = out["ceiling"].get("p50_ms", out["ceiling"].get("status"))
    _console.print(f"  {q.name}: {shown}{rate}; raw p50 {raw_p50} ms; {out['check']}")
    return out


def _paging(client: _search_http.Client, db: Database, wanted: int, available: int, walks: int) -> dict[str, Any]:
    """Walks through ``wanted`` Observations (fewer when there are not so many), the median walk."""
    target = min(wanted, available)
    out: dict[str, Any] = {"label": f"paging: Observation?_count=1000, following next to {wanted:,} resources", "walks": walks}
    try:
        runs = [_search_http.walk(client, _PAGING_PATH, target) for _ in range(walks)]
        ok = [r for r in runs if r["status"] == "ok"]
        out["http"] = sorted(ok, key=lambda r: r["resources_per_s"])[len(ok) // 2] if ok else runs[0]
    except Exception as e:
        out["http"] = {"status": f"error: {type(e).__name__}: {e}"[:300]}
    try:
        raws = [_search_queries.raw_paging(db, target) for _ in range(walks)]
        out["ceiling"] = sorted(raws, key=lambda r: r["resources_per_s"])[len(raws) // 2]
    except Exception as e:
        out["ceiling"] = {"status": f"error: {type(e).__name__}: {e}"[:300]}
    http = out["http"]
    shown = f"{http['resources_per_s']:,} resources/s over {http['pages']} pages" if http.get("status") == "ok" else http["status"]
    _console.print(f"  paging: {shown}; raw {out['ceiling'].get('resources_per_s', out['ceiling'].get('status'))}/s")
    return out


def _measure(scale: int, server: _procs.Server, db: Database, values: _search_queries.Values,
             args: argparse.Namespace, meter: _procs.CpuMeter) -> dict[str, Any]:
    _console.print(f"[bold]measure at {scale}×[/bold] …")
    observations = db.Observation.count_documents({"d": False})
    result: dict[str, Any] = {
        "scale": scale,
        "resources": sum(db[n].count_documents({"d": False}) for n in db.list_collection_names() if n[:1].isupper()),
        "observations": observations, "patients": db.Patient.count_documents({"d": False}), "queries": {},
    }
    mark = meter.snapshot()
    client = _search_http.Client("127.0.0.1", server.port)
    try:
        with_total = _search_queries.catalogue(values, with_total=True)
        without = {q.name: q for q in _search_queries.catalogue(values, with_total=False)}
        for q in with_total:
            result["queries"][q.name] = _query(client, db, q, without[q.name], args.requests, args.budget)
        result["paging"] = _paging(client, db, args.page_target, observations, args.walks)
    finally:
        client.close()
    result["cpu"] = {"measure": meter.since(mark)}
    return result


def _bench(args: argparse.Namespace, stack: ExitStack, results: dict[str, Any], save: Callable[[], None]) -> None:
    """Fill ``results``; ``save()`` after each scale, so an interrupted run keeps what it measured."""
    if not args.data.is_dir():
        raise SystemExit(f"no Synthea data at {args.data} (use --data)")
    tmp = Path(tempfile.mkdtemp(prefix="fhir-search-bench-"))
    stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    _console.print(f"decompressing into {tmp} …")
    shared, people = _decompress(args.data, args.patients, tmp / "data")

    mongod = _procs.Mongod(tmp / "mongod")
    stack.callback(mongod.stop)
    database = f"search_{uuid.uuid4().hex[:8]}"
    server = _procs.Server(mongod.uri, database, args.workers, tmp / "server.log")
    stack.callback(server.stop)
    server.wait_ready()
    meter = _procs.CpuMeter(server.proc.pid, tmp / "mongod")
    mongo: MongoClient = MongoClient(mongod.uri)
    stack.callback(mongo.close)
    db = mongo[database]
    _console.print(f"server {server.url} (pid {server.proc.pid}, {args.workers} workers), mongod {mongod.uri}")

    results.update({
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _report.machine_facts(_ceiling.mongo_version(mongod.uri)),
        "config": {
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "data_dir": str(args.data),
            "patient_files": len(people), "shared_files": len(shared), "scale": args.scale, "workers": args.workers,
            "concurrency": args.concurrency, "requests": args.requests, "budget_s": args.budget,
            "page_target": args.page_target, "walks": args.walks,
        },
        "scales": {},
    })
    ingest, cpu = _load("1× (Synthea as is)", tmp / "data", server.url, args.concurrency, meter)
    values = _search_queries.pick_values(db)
    results["values"] = {"codes": values.codes, "families": values.families, "years": values.years}
    one = _measure(1, server, db, values, args, meter)
    one["ingest"], one["cpu"]["ingest"] = ingest, cpu
    results["scales"]["1"] = one
    save()

    if args.scale > 1:
        _console.print(f"cloning {len(people)} patient files ×{args.scale - 1} …")
        t0 = time.perf_counter()
        clones, entries = _search_clone.write_clones(people, args.scale - 1, tmp / "clones")
        results["config"]["clone_seconds"] = round(time.perf_counter() - t0, 1)
        _console.print(f"  {len(clones):,} files, {entries:,} resources in {results['config']['clone_seconds']} s")
        ingest, cpu = _load(f"{args.scale}× ({len(clones):,} cloned bundles)", tmp / "clones", server.url, args.concurrency, meter)
        shutil.rmtree(tmp / "clones", ignore_errors=True)  # up to 2 GB of JSON, no longer needed
        grown = _measure(args.scale, server, db, values, args, meter)
        grown["ingest"], grown["cpu"]["ingest"] = ingest, cpu
        results["scales"][str(args.scale)] = grown
    results["server_errors"] = server.error_lines()


def _defaults(args: argparse.Namespace) -> None:
    args.scale = args.scale or (2 if args.quick else 10)
    args.patients = args.patients if args.patients is not None else (10 if args.quick else None)
    args.requests = args.requests or (40 if args.quick else 200)
    args.budget = args.budget or (3.0 if args.quick else 15.0)
    args.walks = 1 if args.quick else 3


def _failed(results: dict[str, Any]) -> bool:
    """A failed load or a server error (5xx, crash) fails the run; unsupported searches do not."""
    for scale in results["scales"].values():
        if scale["ingest"]["failed_files"]:
            return True
        parts = [q.get("http", {}) for q in scale["queries"].values()] + [scale["paging"].get("http", {})]
        if any(str(p.get("status", "")).startswith("error") or p.get("errors") for p in parts):
            return True
    return False


def main() -> int:
    args = _args()
    _defaults(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    name = args.out or ("search-quick" if args.quick else "search-latest")
    folder = _HERE / "results"
    results: dict[str, Any] = {}

    def save() -> None:
        results["seconds"] = round(time.monotonic() - started)
        _search_report.write(results, folder, name)

    try:
        with ExitStack() as stack:
            _bench(args, stack, results, save)
    except (KeyboardInterrupt, SystemExit) as stop:
        code = 130 if isinstance(stop, KeyboardInterrupt) else stop.code
        if not isinstance(code, int):
            raise  # a usage error, with its message
        _console.print("[yellow]interrupted; everything started was stopped[/yellow]")
        if results.get("scales"):
            results["interrupted"] = True
            save()
            _console.print(f"the scales measured so far are in {folder / (name + '.md')}")
        return code
    save()
    _search_report.print_table(results, Console(width=max(_console.width, 150)))
    _console.print(f"written {folder / (name + '.json')} and {folder / (name + '.md')} in {results['seconds']} s")
    return 1 if _failed(results) else 0


if __name__ == "__main__":
    sys.exit(main())
