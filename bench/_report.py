"""Machine facts, the results table (console and Markdown) and the JSON file."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import orjson
import psutil
from rich.console import Console
from rich.table import Table

_GOALS = {"ingest_rps": 2000, "read32_rps": 3000, "read32_p99_ms": 20, "rss_mb": 600}


def _spin(seconds: float) -> float:
    """CPU share one busy process gets for ``seconds`` (1.0 = a whole core)."""
    import time

    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        pass
    return (time.process_time() - c0) / (time.perf_counter() - t0)


def available_cores(seconds: float = 1.0) -> float:
    """Cores actually available now: one busy process per core, summed (others' load shows here)."""
    import multiprocessing as mp

    n = os.cpu_count() or 1
    with mp.get_context("spawn").Pool(n) as pool:
        return round(sum(pool.map(_spin, [seconds] * n)), 2)


def machine_facts(mongo_version: str) -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "mongodb": mongo_version,
        "commit": _git_commit(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "available_cores_at_start": available_cores(),
    }


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}{' (uncommitted changes)' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return ""


def _mark(ok: bool | None) -> str:
    return "" if ok is None else ("yes" if ok else "NO")


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measure, value, goal, met) rows of the results table."""
    out: list[tuple[str, str, str, str]] = []
    ingest = results.get("ingest")
    if ingest:
        rate = ingest["rps"]
        fails = f", {len(ingest['failed_files'])} failed files" if ingest["failed_files"] else ""
        out.append(("ingest (Synthea over HTTP)", f"{rate:,.0f} resources/s ({ingest['resources']:,} in {ingest['seconds']:.1f} s{fails})", f">= {_GOALS['ingest_rps']:,}/s", _mark(rate >= _GOALS["ingest_rps"] and not fails)))
    for kind, label in (("read", "read by id"), ("create", "create Observation")):
        for clients, phase in (results.get(kind) or {}).items():
            goal, met = "", None
            if kind == "read" and clients == "32":
                goal = f">= {_GOALS['read32_rps']:,}/s, p99 < {_GOALS['read32_p99_ms']} ms"
                met = phase["rps"] >= _GOALS["read32_rps"] and phase["p99_ms"] < _GOALS["read32_p99_ms"] and not phase["errors"]
            out.append((f"{label}, {clients} client(s)", _phase_text(phase), goal, _mark(met)))
    rss = results.get("server_rss_mb")
    if rss:
        out.append(("peak server RSS (all processes)", f"{rss['peak']:,.0f} MB", f"< {_GOALS['rss_mb']} MB", _mark(rss["peak"] < _GOALS["rss_mb"])))
    ceiling = results.get("ceiling") or {}
    if ceiling.get("insert"):
        c = ceiling["insert"]
        out.append(("ceiling: raw insert_many", f"{c['rps']:,.0f} resources/s ({c['resources']:,} in {c['seconds']:.1f} s)", "", ""))
    for clients, phase in (ceiling.get("find_one") or {}).items():
        out.append((f"ceiling: raw find_one, {clients} client(s)", _phase_text(phase), "", ""))
    return out


def _phase_text(phase: dict[str, Any]) -> str:
    kinds = ", ".join(f"{k} x{n:,}" for k, n in (phase.get("error_kinds") or {}).items())
    errors = f", {phase['errors']:,} errors: {kinds}" if phase["errors"] else ""
    return (
        f"{phase['rps']:,.0f} req/s, p50 {phase['p50_ms']:.2f} ms, p99 {phase['p99_ms']:.2f} ms"
        f" (client CPU {phase['client_cpu_pct']:.0f}%{errors})"
    )


def print_table(results: dict[str, Any], console: Console) -> None:
    table = Table(title="fhir-server benchmark")
    for column in ("measure", "value", "goal", "met"):
        table.add_column(column)
    for row in rows(results):
        table.add_row(*row)
    console.print(table)
    for phase, used in (results.get("cpu") or {}).items():
        console.print(f"{phase}: server {used['server_cores']} cores, mongod {used['mongod_cores']} cores over {used['wall_s']} s")
    for failed in (results.get("ingest") or {}).get("failed_files", [])[:20]:
        console.print(f"[red]failed[/red] {failed['file']}: {failed['error']}")
    for line in results.get("server_errors", []):
        console.print(f"[red]server log[/red] {line}")


def machine_table(m: dict[str, Any]) -> list[str]:
    """The Markdown rows describing the machine a run came from (see :func:`machine_facts`)."""
    return [
        "| machine | |",
        "|---|---|",
        f"| CPU | {m['cpu']} |",
        f"| cores | {m['logical_cores']} logical ({m['physical_cores']} physical) |",
        f"| RAM | {m['ram_gb']} GB |",
        f"| OS | {m['os']} |",
        f"| Python | {m['python']} |",
        f"| MongoDB | {m['mongodb']} (embedded, single-node replica set, on the same machine) |",
        f"| commit | {m['commit']} |",
        f"| load at start | load average {m['load_average_at_start']}; {m['available_cores_at_start']} of"
        f" {m['logical_cores']} cores free for busy processes (the machine may be shared) |",
    ]


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    cfg = results["config"]
    lines = [
        "# fhir-server benchmark",
        "",
        f"Run {results['generated']} — `{cfg['command']}`",
        "",
        *machine_table(m),
        "",
        f"Server: `fhir-server serve --workers {cfg['workers']}`; data: {cfg['files']} Synthea files from `{cfg['data_dir']}`"
        f" (decompressed beforehand), loader concurrency {cfg['concurrency']}; read/create phases"
        f" {cfg['phase_seconds']} s each after a {cfg['warmup_seconds']} s warm-up; the load generator runs in its own process.",
        "",
        "| measure | value | goal | met |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(results)]
    if results.get("cpu"):
        lines += ["", "CPU used per phase (cores = CPU seconds / wall seconds; the machine has "
                  f"{m['logical_cores']}):", "", "| phase | wall s | server cores | mongod cores |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['wall_s']} | {v['server_cores']} | {v['mongod_cores']} |" for k, v in results["cpu"].items()]
    failed = (results.get("ingest") or {}).get("failed_files", [])
    if failed:
        lines += ["", f"## Failed files ({len(failed)})", "", "| file | error |", "|---|---|"]
        lines += [f"| {f['file']} | {f['error'].replace('|', '/')} |" for f in failed]
    if results.get("server_errors"):
        lines += ["", "## Server log errors", ""] + [f"- `{line}`" for line in results["server_errors"]]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], folder: Path, name: str = "latest") -> None:
    """``folder/name.json`` and ``folder/name.md``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    (folder / f"{name}.md").write_text(markdown(results), encoding="utf-8")
