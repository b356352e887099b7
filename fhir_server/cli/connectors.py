"""``fhir-server simulate-upstream``, ``fhir-server sync`` and ``fhir-server deadletter``.

``sync`` runs in-process against MONGODB_URI (the same database the server uses): it builds the
server's wiring (validation, integrity, conformance) without serving HTTP, so every resource is
validated exactly as a client's write would be, and the MPI link runs in the same process.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
# source → (simulator module, class, path it serves, title)
_UPSTREAMS = {
    "immunization": ("fhir_server.simulators.immunization", "ImmunizationUpstream", "children", "免疫规划模拟上游 immunization upstream"),
    "emr": ("fhir_server.simulators.emr", "EmrUpstream", "documents", "医院电子病历文档库 EMR registry"),
    "mch": ("fhir_server.simulators.mch", "MchUpstream", "mch/records", "妇幼保健模拟上游 MCH upstream"),
}
_SOURCES = tuple(_UPSTREAMS)


def _connector(source: str) -> Any:
    from fhir_server.connectors import pulled_connector

    return pulled_connector(source)


@asynccontextmanager
async def server_context(config: str | None = None) -> AsyncIterator[Any]:
    """The server's wiring on MONGODB_URI (the app's lifespan, without HTTP)."""
    import os

    from fhir_server.config import load_settings
    from fhir_server.http.app import create_app

    if config:
        os.environ["FHIR_SERVER_CONFIG"] = config
    if not os.environ.get("MONGODB_URI"):
        raise click.ClickException("MONGODB_URI is not set (start one with `fhir-server mongod start`)")
    app = create_app(load_settings())
    async with app.router.lifespan_context(app):
        yield app.state.server


def summary_table(report: Any, title: str = "Sync summary / 同步汇总") -> Table:
    table = Table(title=f"{title}: {report.source}")
    table.add_column("records / 记录", style="bold")
    for name in ("received", "created", "updated", "unchanged", "rejected"):
        table.add_column(name, justify="right")
    labels = {"child": "child 儿童 → Patient", "inoculation": "inoculation 接种 → Immunization", "aefi": "AEFI 异常反应 → AdverseEvent", "page": "page 页面"}
    for kind, counts in sorted(report.by_kind.items()):
        table.add_row(labels.get(kind, kind), *(f"{counts[n]:,}" for n in ("received", "created", "updated", "unchanged", "rejected")))
    table.add_row("total 合计", *(f"{getattr(report, n):,}" for n in ("received", "created", "updated", "unchanged", "rejected")), style="bold")
    table.caption = (
        f"linked 已关联主索引 {report.linked:,}"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(report.decisions.items()))})" if report.decisions else "")
        + f" · stale 过期快照 {report.stale:,} · pages 页 {report.pages:,} · retries 重试 {report.retries:,}"
        + f" · {report.seconds:,.1f} s · {report.rate:,.0f} records/s"
        + ("" if report.balanced else " · [red]counts do not balance[/red]")
    )
    return table


@click.command("simulate-upstream", context_settings=_CONTEXT)
@click.argument("source", type=click.Choice(_SOURCES))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8091, show_default=True)
@click.option("--seed", default=7, show_default=True, help="随机种子 / seed of the synthetic population")
@click.option("--children", default=1000, show_default=True, help="儿童数 / children")
@click.option("--token", default="demo-token", show_default=True, help="Bearer token the upstream expects")
@click.option("--transient-every", default=0, help="每 N 次请求返回 503 / answer 503 to every N-th request")
@click.option("--slow-every", default=0, help="每 N 次请求延迟 / delay every N-th request")
@click.option("--delay", default=5.0, show_default=True, help="延迟秒数 / seconds of a slow answer")
def simulate_upstream(source: str, host: str, port: int, seed: int, children: int, token: str, transient_every: int, slow_every: int, delay: float) -> None:
    """运行模拟上游 / Serve a simulated upstream system (synthetic, reproducible Chinese data)."""
    module, cls, path, title = _UPSTREAMS[source]
    started = time.perf_counter()
    # --children: children (immunization), residents with hospital documents (emr), families (mch)
    upstream: Any = getattr(importlib.import_module(module), cls)(seed, children)
    upstream.faults.transient_every, upstream.faults.slow_every, upstream.faults.delay = transient_every, slow_every, delay
    httpd = upstream.server(host, port, token)
    console = Console()
    console.print(
        f"{title}: {len(upstream.deliveries):,} deliveries for {children:,} children "
        f"(seed {seed}, built in {time.perf_counter() - started:.1f} s)\n"
        f"  GET http://{host}:{port}/{path}?since=0&limit=100  (Authorization: Bearer {token})\n"
        + (
            "  expected full-sync counts: " + ", ".join(f"{k} {upstream.truth[k]:,}" for k in ("received", "created", "updated", "unchanged", "rejected"))
            if hasattr(upstream, "truth")
            else f"  planted bad records: {getattr(upstream, 'planted_bad', '?')}"
        )
    )
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


async def _sync_once(server: Any, source: str, url: str | None, token: str | None, files: tuple[str, ...], page_size: int, timeout: float, full: bool, quiet: bool) -> Any:
    from fhir_server.connectors import runner
    from fhir_server.connectors.transport import FileTransport, HttpTransport

    connector = _connector(source)
    path = _UPSTREAMS[source][2]
    if url and url.endswith("/children") and path != "children":  # the default names the immunization path
        url = url[: -len("children")] + path
    transport = FileTransport(list(files)) if files else HttpTransport(url or "", token, page_size=page_size, timeout=timeout)
    console = Console(stderr=True)
    try:
        if quiet:
            return await runner.sync(server, connector, transport, full=full)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task(f"sync {source} / 同步", total=None, detail="")
            done = [0]

            def on_page(report: Any, page: Any) -> None:
                body_records = report.received
                if page.total is not None and progress.tasks[0].total is None:
                    progress.update(task, total=page.total)
                try:  # the simulators' watermark is the index of the next delivery
                    done[0] += int(page.next_since) - int(page.since or 0)
                except ValueError:
                    done[0] += page.body.count(b"<child>") + page.body.count(b'"xml":')
                progress.update(task, completed=done[0], detail=f"{body_records:,} records · {report.created:,} new · {report.rejected:,} rejected")

            return await runner.sync(server, connector, transport, full=full, on_page=on_page)
    finally:
        await transport.close()


@click.command("sync", context_settings=_CONTEXT)
@click.argument("source", type=click.Choice(_SOURCES))
@click.option("--url", default="http://127.0.0.1:8091/children", show_default=True, help="上游地址 / upstream endpoint")
@click.option("--token", default="demo-token", show_default=True, help="上游 Bearer token")
@click.option("--file", "files", multiple=True, type=click.Path(exists=True, dir_okay=False), help="推送文件 / a pushed page (.xml or .xml.gz) instead of the upstream; repeatable")
@click.option("--page-size", default=100, show_default=True)
@click.option("--timeout", default=30.0, show_default=True, help="单次请求超时（秒）/ per-request timeout")
@click.option("--full", is_flag=True, help="忽略检查点，从头同步 / ignore the checkpoint, read the upstream from the start")
@click.option("--every", type=float, default=None, help="定时同步间隔（秒）/ run again every SECONDS until Ctrl-C")
@click.option("--replay-dead-letters", "replay", is_flag=True, help="重放死信 / replay the open dead letters instead of syncing")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), help="TOML settings file")
@click.option("--quiet", "-q", is_flag=True)
def sync_command(source: str, url: str, token: str, files: tuple[str, ...], page_size: int, timeout: float, full: bool, every: float | None, replay: bool, config: str | None, quiet: bool) -> None:
    """同步上游数据 / Pull SOURCE's upstream into the FHIR store (MONGODB_URI), with a summary table.

    Incremental from the stored checkpoint; re-running is a no-op; an interrupted run resumes."""

    async def main() -> int:
        from fhir_server.connectors import runner

        failed = 0
        from_start = full
        async with server_context(config) as server:
            while True:
                if replay:
                    report = await runner.replay_dead_letters(server, _connector(source))
                    Console().print(summary_table(report, "Dead-letter replay / 死信重放"))
                else:
                    report = await _sync_once(server, source, url, token, files, page_size, timeout, from_start, quiet)
                    Console().print(summary_table(report))
                if report.error:
                    failed = 1
                    Console(stderr=True).print(f"[red]sync stopped / 同步中断: {report.error}[/red] — the next run resumes from the checkpoint / 下次从检查点继续")
                if every is None:
                    return failed
                from_start = False
                await asyncio.sleep(every)

    try:
        code = asyncio.run(main())
    except KeyboardInterrupt:
        code = 130
    if code:
        raise SystemExit(code)


@click.group("deadletter", context_settings=_CONTEXT)
def deadletter_group() -> None:
    """死信：被拒收的源记录 / Dead letters: source records that were refused."""


@deadletter_group.command("list", context_settings=_CONTEXT)
@click.argument("source", type=click.Choice(_SOURCES))
@click.option("--status", default="open", type=click.Choice(["open", "resolved", "all"]), show_default=True)
@click.option("--limit", default=100, show_default=True)
@click.option("--config", type=click.Path(exists=True, dir_okay=False))
def deadletter_list(source: str, status: str, limit: int, config: str | None) -> None:
    """列出死信 / List dead letters with their reasons."""

    async def main() -> None:
        from fhir_server.connectors import deadletter

        async with server_context(config) as server:
            code = _connector(source).code
            letters = await deadletter.list_open(server, code, status=status, limit=limit)
            total = await deadletter.count(server, code, status)
        table = Table(title=f"Dead letters / 死信: {source} ({len(letters)} of {total}, {status})", show_lines=True)
        for col in ("record / 源记录", "code", "reason 原因", "seen", "status"):
            table.add_column(col, overflow="fold")
        for d in letters:
            table.add_row(f"{d['kind']} {d['record_id']}", d["code"], f"{d['reason_zh']}\n{d['reason_en']}", str(d.get("seen", 1)), d["status"])
        Console().print(table)

    asyncio.run(main())


@deadletter_group.command("replay", context_settings=_CONTEXT)
@click.argument("source", type=click.Choice(_SOURCES))
@click.option("--config", type=click.Path(exists=True, dir_okay=False))
def deadletter_replay(source: str, config: str | None) -> None:
    """重放死信 / Run the open dead letters through the current mapping again."""

    async def main() -> None:
        from fhir_server.connectors import runner

        async with server_context(config) as server:
            report = await runner.replay_dead_letters(server, _connector(source))
        Console().print(summary_table(report, "Dead-letter replay / 死信重放"))

    asyncio.run(main())
