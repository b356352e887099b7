"""The search benchmark's tables (console and Markdown), side by side per scale, and its files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from _report import machine_table

# name -> (figure, goal, higher is better); the figures of issue #3.
GOALS: dict[str, tuple[str, float, bool]] = {
    "token": ("p50_ms", 20, False), "date": ("p50_ms", 20, False),
    "include": ("p50_ms", 20, False), "revinclude": ("p50_ms", 20, False),
    "chain_gender": ("p50_ms", 100, False), "chain_family": ("p50_ms", 100, False), "has": ("p50_ms", 100, False),
    "count_all": ("matches_per_s", 1_000_000, True), "count_code": ("matches_per_s", 1_000_000, True),
    "paging": ("resources_per_s", 5_000, True),
}


def _goal_text(name: str) -> str:
    figure, goal, higher = GOALS[name]
    unit = {"p50_ms": " ms p50", "matches_per_s": " matches/s", "resources_per_s": " resources/s"}[figure]
    return f"{'>=' if higher else '<'} {goal:,.0f}{unit}"


def _measure(scale: dict[str, Any], name: str) -> dict[str, Any]:
    return scale["paging"] if name == "paging" else scale["queries"].get(name, {})


def _figure(part: dict[str, Any] | None, figure: str) -> float | None:
    if not part or not str(part.get("status", "ok")).startswith("ok"):
        return None
    value = part.get(figure)
    return float(value) if isinstance(value, (int, float)) else None


def _value_text(part: dict[str, Any] | None, figure: str) -> str:
    if not part:
        return "not measured"
    status = str(part.get("status", "ok"))
    if not status.startswith("ok"):
        return status[:90]
    if figure == "p50_ms":
        text = f"p50 {part['p50_ms']:.1f} ms, p99 {part['p99_ms']:.1f} ms"
    elif figure == "matches_per_s":
        text = f"{part['matches_per_s']:,.0f} matches/s (p50 {part['p50_ms']:.1f} ms)"
    else:
        text = f"{part['resources_per_s']:,.0f} resources/s"
    return text + (f" [{part['errors']} errors]" if part.get("errors") else "")


def _short_text(part: dict[str, Any] | None, figure: str) -> str:
    """A narrow cell for the console: p50/p99 ms, or the rate."""
    if not part:
        return "–"
    status = str(part.get("status", "ok"))
    if not status.startswith("ok"):
        return status.split(":", 1)[0]
    errors = " !" if part.get("errors") else ""
    if figure == "p50_ms":
        return f"{part['p50_ms']:.1f}/{part['p99_ms']:.1f} ms{errors}"
    return f"{part[figure]:,.0f}/s{errors}"


def _met(part: dict[str, Any] | None, name: str) -> str:
    figure, goal, higher = GOALS[name]
    value = _figure(part, figure)
    if value is None:
        return "–"
    return "yes" if (value >= goal if higher else value < goal) else "NO"


def _ratio(a: float | None, b: float | None) -> str:
    return f"×{b / a:.2f}" if a and b is not None else "–"


def rows(results: dict[str, Any], *, short: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per measure, the figure at each scale, the ratio last/first, the goal and
    whether each scale meets it, then the raw MongoDB ceiling at each scale. ``short``: narrow
    cells (p50/p99 in ms, rates) and the measure's key for a label."""
    scales = results["scales"]
    keys = list(scales)
    text = _short_text if short else _value_text
    ratio = [f"{keys[-1]}× / {keys[0]}×"] if len(keys) > 1 else []
    header = ["measure", "goal", *[f"{k}×" for k in keys], *ratio, "met", *[f"raw MongoDB {k}×" for k in keys]]
    out = []
    for name, (figure, _, _) in GOALS.items():
        label = next((s["queries"][name]["label"] for s in scales.values() if name in s["queries"]), name)
        if name == "paging":
            label = scales[keys[0]]["paging"].get("label", "paging")
        parts = [(_measure(s, name).get("http")) for s in scales.values()]
        ceilings = [(_measure(s, name).get("ceiling")) for s in scales.values()]
        met = " / ".join(_met(p, name) for p in parts) if short else " / ".join(f"{k}×: {_met(p, name)}" for k, p in zip(keys, parts))
        goal = _goal_text(name).replace(",000,000", "M").replace(" resources/s", "/s").replace(" matches/s", "/s")
        grew = [_ratio(_figure(parts[0], figure), _figure(parts[-1], figure))] if ratio else []
        out.append([name if short else label, goal if short else _goal_text(name), *[text(p, figure) for p in parts],
                    *grew, met,
                    *[text(c, figure) if c else "–" for c in ceilings]])
    return header, out


def _data_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for key, s in results["scales"].items():
        ingest = s.get("ingest") or {}
        failed = f", {len(ingest.get('failed_files', []))} failed files" if ingest.get("failed_files") else ""
        lines.append(f"{key}×: {s['resources']:,} resources ({s['observations']:,} Observations, {s['patients']:,} Patients);"
                     f" loaded at {ingest.get('rps', 0):,.0f}/s{failed}")
    return lines


def _detail_lines(results: dict[str, Any]) -> list[str]:
    """Per scale and query: the answer checks against the raw query and the raw query's plan."""
    lines = []
    for key, s in results["scales"].items():
        for name, q in s["queries"].items():
            http = q.get("http") or {}
            first = http.get("first") or {}
            plan = q.get("plan") or {}
            shape = f"first answer {first.get('matches', '?')} matches + {first.get('included', 0)} included, total {first.get('total')}" if first else ""
            plan_text = f"; raw plan {plan['plan']} (keys {plan['keys_examined']}, docs {plan['docs_examined']})" if plan.get("plan") else ""
            lines.append(f"{key}× {name}: {shape}; check: {q.get('check', '–')}{plan_text}")
        paging = s["paging"].get("http") or {}
        if paging.get("status") == "ok":
            lines.append(f"{key}× paging: {paging['resources']:,} resources in {paging['pages']} pages, first page"
                         f" {paging['first_page_ms']} ms, last {paging['last_page_ms']} ms (median of {s['paging'].get('walks', 1)} walks)")
    return lines


def print_table(results: dict[str, Any], console: Console) -> None:
    header, body = rows(results, short=True)
    table = Table(title="fhir-server search benchmark (latency: p50/p99 ms; the labels are in the .md)")
    for column in header:
        table.add_column(column, overflow="fold")
    for row in body:
        table.add_row(*row)
    console.print(table)
    for line in _data_lines(results) + _detail_lines(results):
        console.print(line, soft_wrap=True)
    for line in results.get("server_errors", []):
        console.print(f"[red]server log[/red] {line}")


def markdown(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    header, body = rows(results)
    lines = [
        "# fhir-server search benchmark", "",
        f"Run {results['generated']} — `{cfg['command']}`", "",
        *machine_table(m),
        "",
        f"Server: `fhir-server serve --workers {cfg['workers']}`; data: {cfg['patient_files']} Synthea patient files"
        f" from `{cfg['data_dir']}` plus the shared `0-…` files, grown ×{cfg['scale']} with cloned patients (new ids)."
        f" One client, one request at a time, keep-alive; up to {cfg['requests']} requests or {cfg['budget_s']} s per"
        " search after one unmeasured pass, round-robin over up to 20 values drawn from the data at 1×"
        " (the most common LOINC codes, random family names, years 2011–2020). Latency is until the"
        " last byte of the body. Paging: resources / time waiting for the server while following `next`."
        " Raw MongoDB: synchronous PyMongo on the server's own collections, hand-written queries for"
        " the same answer (a page sorted by `_id` plus the count when the server reports `total`).", "",
        *[f"- {line}" for line in _data_lines(results)], "",
        *(["**Interrupted**: the run stopped before its last scale; the scales above are complete.", ""]
          if results.get("interrupted") else []),
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
        *["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body],
        "", "## Answers and plans", "",
        *[f"- {line.replace('|', chr(92) + '|')}" for line in _detail_lines(results)],
    ]
    cpu = [(k, phase, used) for k, s in results["scales"].items() for phase, used in (s.get("cpu") or {}).items()]
    if cpu:
        lines += ["", "| phase | wall s | server cores | mongod cores |", "|---|---|---|---|"]
        lines += [f"| {k}× {phase} | {u['wall_s']} | {u['server_cores']} | {u['mongod_cores']} |" for k, phase, u in cpu]
    if results.get("server_errors"):
        lines += ["", "## Server log errors", ""] + [f"- `{line}`" for line in results["server_errors"]]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], folder: Path, name: str) -> None:
    """``folder/name.json`` and ``folder/name.md``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    (folder / f"{name}.md").write_text(markdown(results), encoding="utf-8")
