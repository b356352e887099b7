"""End-to-end benchmark of fhir-server (``make bench``).

Starts a throwaway embedded mongod and ``fhir-server serve --workers N`` as a user would, loads the
Synthea set over HTTP with the loader (``0-…`` batches first), then measures reads by id and creates
at 1 and 32 clients (the load generator runs in its own process), samples the server's RSS, and
finally the ceiling: the same resources through raw PyMongo ``insert_many`` and ``find_one``.
Everything it starts is stopped on exit, Ctrl-C or error. Results: ``bench/results/latest.{json,md}``.

    .venv/bin/python bench/run.py [--quick] [--data DIR] [--workers 2] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
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

import orjson
from rich.console import Console

import _ceiling
import _httpload
import _procs
import _report
from fhir_server.cli.loader import run_load

_HERE = Path(__file__).resolve().parent
_DEFAULT_DATA = _HERE.parents[1] / "shared" / "data" / "synthea-120"
_KEYS = 20_000
_MAX_REQUESTS = 1_000_000
_console = Console()


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=_DEFAULT_DATA, help="Synthea folder (*.json.bz2 or *.json)")
    p.add_argument("--quick", action="store_true", help="10 patient files, short phases: a sanity run")
    p.add_argument("--patients", type=int, default=None, help="patient files to load (default: all; 10 with --quick)")
    p.add_argument("--workers", type=int, default=2, help="server worker processes")
    p.add_argument("--concurrency", type=int, default=4, help="loader requests in flight")
    p.add_argument("--seconds", type=float, default=None, help="length of each read/create phase (default 15; 4 with --quick)")
    p.add_argument("--out", default=None, help="results name under bench/results (default latest; quick with --quick)")
    return p.parse_args()


def _select(data: Path, patients: int | None) -> list[Path]:
    files = sorted(p for p in data.iterdir() if p.name.endswith((".json", ".json.bz2")))
    first = [p for p in files if p.name.startswith("0-")]
    rest = [p for p in files if not p.name.startswith("0-")]
    return first + (rest[:patients] if patients is not None else rest)


def _decompress(files: list[Path], into: Path) -> tuple[list[Path], int]:
    """Plain-JSON copies (so bz2 does not compete with the server for CPU) and their entry count."""
    import bz2

    into.mkdir(parents=True)
    out, entries = [], 0
    for path in files:
        data = bz2.decompress(path.read_bytes()) if path.name.endswith(".bz2") else path.read_bytes()
        target = into / path.name.removesuffix(".bz2")
        target.write_bytes(data)
        entries += len(orjson.loads(data).get("entry") or [])
        out.append(target)
    return out, entries


def _in_process(fn: Callable[..., dict[str, Any]], *args: Any, timeout: float) -> dict[str, Any]:
    """Run ``fn(*args)`` in a fresh process (spawned; terminated when done or on error)."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply_async(fn, args).get(timeout=timeout)


def _observation(patient_id: str) -> bytes:
    return orjson.dumps(
        {
            "resourceType": "Observation",
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}]},
            "subject": {"reference": f"Patient/{patient_id}"},
            "effectiveDateTime": "2024-05-01T08:30:00+08:00",
            "valueQuantity": {"value": 61.5, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
        }
    )


def _phases(label: str, run: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for clients in (1, 32):
        _console.print(f"[bold]{label}[/bold], {clients} client(s)…")
        out[str(clients)] = result = run(clients)
        _console.print(f"  {result['rps']:,.0f}/s  p50 {result['p50_ms']} ms  p99 {result['p99_ms']} ms  errors {result['errors']}  client CPU {result['client_cpu_pct']}%")
        if result["first_error"]:
            _console.print(f"  [red]first error[/red]: {result['first_error']}")
    return out


def _bench(args: argparse.Namespace, stack: ExitStack) -> dict[str, Any]:
    patients = args.patients if args.patients is not None else (10 if args.quick else None)
    seconds = args.seconds or (4.0 if args.quick else 15.0)
    warmup = 1.0 if args.quick else 2.0
    if not args.data.is_dir():
        raise SystemExit(f"no Synthea data at {args.data} (use --data)")
    tmp = Path(tempfile.mkdtemp(prefix="fhir-bench-"))
    stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    sources = _select(args.data, patients)
    _console.print(f"decompressing {len(sources)} files into {tmp} …")
    files, expected = _decompress(sources, tmp / "data")

    mongod = _procs.Mongod(tmp / "mongod")
    stack.callback(mongod.stop)
    database = f"bench_{uuid.uuid4().hex[:8]}"
    server = _procs.Server(mongod.uri, database, args.workers, tmp / "server.log")
    stack.callback(server.stop)
    server.wait_ready()
    sampler = _procs.RssSampler(server.proc.pid)
    sampler.start()
    stack.callback(sampler.stop)
    meter = _procs.CpuMeter(server.proc.pid, tmp / "mongod")
    cpu: dict[str, Any] = {}
    _console.print(f"server {server.url} (pid {server.proc.pid}, {args.workers} workers), mongod {mongod.uri}")

    results: dict[str, Any] = {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _report.machine_facts(_ceiling.mongo_version(mongod.uri)),
        "config": {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "data_dir": str(args.data), "files": len(files), "workers": args.workers,
            "concurrency": args.concurrency, "phase_seconds": seconds, "warmup_seconds": warmup,
        },
    }

    sampler.phase = "ingest"
    mark = meter.snapshot()
    report = run_load([tmp / "data"], server.url, concurrency=args.concurrency, order="auto")
    cpu["ingest"] = meter.since(mark)
    stored = _ceiling.count_resources(mongod.uri, database)
    results["ingest"] = {
        "files": len(report.files), "resources": report.resources, "seconds": round(report.seconds, 2),
        "rps": round(report.rate, 1), "expected_resources": expected, "stored_resources": stored,
        "failed_files": [{"file": f.path.name, "error": f.error or f"{f.failed} resources failed"} for f in report.failed_files],
    }
    _console.print(f"ingest: {report.resources:,} resources in {report.seconds:.1f} s = {report.rate:,.0f}/s "
                   f"({len(report.failed_files)} failed files; {stored:,} stored of {expected:,} in the files)")
    for failed in results["ingest"]["failed_files"][:5]:
        _console.print(f"  [red]failed[/red] {failed['file']}: {failed['error']}")

    host, port = "127.0.0.1", server.port
    keys = _ceiling.sample_keys(mongod.uri, database, _KEYS, live_only=True)
    if not keys:
        raise RuntimeError("nothing was stored; cannot measure reads")
    reads = [_httpload.http_get(host, port, f"/fhir/{t}/{i}") for t, i in keys]
    patient_ids = [i for t, i in keys if t == "Patient"] or [i for t, i in _ceiling.sample_keys(mongod.uri, database, 10**6, live_only=True) if t == "Patient"]
    creates = [_httpload.http_post(host, port, "/fhir/Observation", _observation(p)) for p in patient_ids[:200]]
    budget = warmup + seconds + 120

    sampler.phase, mark = "read", meter.snapshot()
    results["read"] = _phases("read by id", lambda c: _in_process(_httpload.http_phase, host, port, reads, c, warmup, seconds, _MAX_REQUESTS, timeout=budget))
    cpu["read"] = meter.since(mark)
    if creates:
        sampler.phase, mark = "create", meter.snapshot()
        results["create"] = _phases("create Observation", lambda c: _in_process(_httpload.http_phase, host, port, creates, c, warmup, seconds, _MAX_REQUESTS, timeout=budget))
        cpu["create"] = meter.since(mark)
    results["cpu"] = cpu
    results["server_rss_mb"] = {"peak": round(sampler.peak / 2**20, 1), "by_phase": {k: round(v / 2**20, 1) for k, v in sampler.peaks.items()}}
    results["server_errors"] = server.error_lines()
    sampler.stop()
    server.stop()

    _console.print("[bold]ceiling[/bold]: raw insert_many …")
    raw_db = f"{database}_raw"
    ceiling: dict[str, Any] = {"insert": _ceiling.raw_insert(mongod.uri, raw_db, files)}
    raw_keys = _ceiling.sample_keys(mongod.uri, raw_db, _KEYS)
    mark = meter.snapshot()
    ceiling["find_one"] = _phases("raw find_one", lambda c: _in_process(_httpload.mongo_phase, mongod.uri, raw_db, raw_keys, c, warmup, seconds, _MAX_REQUESTS, timeout=budget))
    cpu["raw find_one"] = meter.since(mark)
    results["ceiling"] = ceiling
    return results


def main() -> int:
    args = _args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    try:
        with ExitStack() as stack:
            results = _bench(args, stack)
    except KeyboardInterrupt:
        _console.print("[yellow]interrupted; everything started was stopped[/yellow]")
        return 130
    name = args.out or ("quick" if args.quick else "latest")
    folder = _HERE / "results"
    _report.print_table(results, _console)
    _report.write(results, folder, name)
    _console.print(f"written {folder / (name + '.json')} and {folder / (name + '.md')} in {time.monotonic() - started:.0f} s")
    failed = bool(results["ingest"]["failed_files"]) or any(p["errors"] for k in ("read", "create") for p in results.get(k, {}).values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
