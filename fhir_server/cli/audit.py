"""``fhir-server audit verify|anchor``: check the audit hash chain (fhir_server/audit/chain.py), or
record its head as an anchor now."""

from __future__ import annotations

import asyncio
import re

import click
from pymongo import AsyncMongoClient
from rich.console import Console
from rich.table import Table

from fhir_server.audit.chain import VerifyReport, anchor, verify
from fhir_server.config import load_settings

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_EXPECT = re.compile(r"^\s*(?:seq=)?(\d+)\s*[:= ]\s*(?:hash=)?([0-9a-fA-F]{64})\s*$")
_KINDS = {
    "modified": "内容被修改 / modified",
    "gap": "序号缺失（已删除）/ gap (deleted)",
    "reordered": "顺序被调换 / reordered",
    "relinked": "前驱被替换或重算 / relinked",
    "truncated": "尾部被截断 / truncated",
    "head": "链头不一致 / head mismatch",
    "anchor": "锚点不一致 / anchor mismatch",
    "copy-modified": "AuditEvent 副本被修改 / copy modified",
    "copy-missing": "AuditEvent 副本缺失 / copy missing",
}


def _settings(mongodb_uri: str | None, database: str | None):
    try:
        settings = load_settings(mongodb_uri=mongodb_uri, database=database)
    except ValueError as e:
        raise click.ClickException(f"settings: {e}") from None
    if not settings.mongodb_uri:
        raise click.ClickException("MONGODB_URI is not set; pass --mongodb-uri")
    return settings


def _expected(values: tuple[str, ...]) -> list[tuple[int, str]]:
    out = []
    for v in values:
        m = _EXPECT.match(v)
        if not m:
            raise click.BadParameter(f"{v!r}: expected SEQ:HASH (64 hex digits), as in the anchor log line", param_hint="--expect")
        out.append((int(m.group(1)), m.group(2).lower()))
    return out


async def _run_verify(uri: str, database: str, expected: list[tuple[int, str]], copies: bool) -> VerifyReport:
    client: AsyncMongoClient = AsyncMongoClient(uri, tz_aware=True)
    try:
        return await verify(client.get_database(database), expected=expected, check_copies=copies)
    finally:
        await client.close()


def _print(report: VerifyReport, console: Console) -> None:
    summary = Table(title="审计链校验 / audit chain verification", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    span = f"{report.first_seq} … {report.last_seq}" if report.links else "—"
    summary.add_row("链节点 / links", f"{report.links:,}  (seq {span})")
    summary.add_row("链头 / head", f"seq {report.head_seq}  {report.head_hash or ''}" if report.head_seq is not None else "—")
    summary.add_row("缺失序号 / missing seqs", f"{report.missing:,}")
    summary.add_row("锚点 / anchors checked", f"{report.anchors:,}")
    summary.add_row("AuditEvent 副本 / copies compared", f"{report.copies:,}")
    verdict = "[green]完好 / intact[/green]" if report.ok else "[red]已被破坏 / BROKEN[/red]"
    summary.add_row("结论 / verdict", verdict)
    console.print(summary)
    if report.ok:
        return
    first = report.first
    if first is not None:
        console.print(f"[red]第一个断点 / first broken link: seq {first.seq} — {_KINDS.get(first.kind, first.kind)}: {first.detail}[/red]")
    counts = Table(title="问题统计 / problems by kind")
    counts.add_column("类型 / kind")
    counts.add_column("数量 / count", justify="right")
    for kind, n in sorted(report.counts.items()):
        counts.add_row(_KINDS.get(kind, kind), f"{n:,}")
    console.print(counts)
    details = Table(title=f"问题明细 / problems (first {len(report.problems)})")
    details.add_column("seq", justify="right")
    details.add_column("类型 / kind")
    details.add_column("说明 / detail")
    for p in sorted(report.problems, key=lambda p: p.seq):
        details.add_row(str(p.seq), _KINDS.get(p.kind, p.kind), p.detail)
    console.print(details)


@click.group(context_settings=_CONTEXT)
def audit_group() -> None:
    """审计日志 / The audit trail (hash-chained AuditEvents)."""


@audit_group.command("verify", context_settings=_CONTEXT)
@click.option("--mongodb-uri", envvar="MONGODB_URI", help="MongoDB 连接串 / MongoDB URI (default: MONGODB_URI)")
@click.option("--database", default=None, help="数据库名 / database (default: FHIR_DATABASE or fhir)")
@click.option(
    "--expect",
    multiple=True,
    metavar="SEQ:HASH",
    help="日志中记录的锚点（可重复）/ an anchor from the log, 'seq=N hash=H' or N:H (repeatable)",
)
@click.option("--no-copies", is_flag=True, help="不比对 AuditEvent 资源副本 / skip comparing the searchable AuditEvents")
def verify_command(mongodb_uri: str | None, database: str | None, expect: tuple[str, ...], no_copies: bool) -> None:
    """校验审计哈希链 / Verify the audit hash chain; exit status 1 when it is broken."""
    settings = _settings(mongodb_uri, database)
    expected = _expected(expect)
    try:
        report = asyncio.run(_run_verify(settings.mongodb_uri, settings.database, expected, not no_copies))
    except Exception as e:  # connection refused, authentication ...
        raise click.ClickException(f"cannot read the audit chain: {e}") from None
    _print(report, Console())
    if not report.ok:
        raise SystemExit(1)


@audit_group.command("anchor", context_settings=_CONTEXT)
@click.option("--mongodb-uri", envvar="MONGODB_URI", help="MongoDB 连接串 / MongoDB URI (default: MONGODB_URI)")
@click.option("--database", default=None, help="数据库名 / database (default: FHIR_DATABASE or fhir)")
def anchor_command(mongodb_uri: str | None, database: str | None) -> None:
    """记录链头锚点 / Record the chain's head as an anchor now; keep the printed line outside the database."""
    settings = _settings(mongodb_uri, database)

    async def run() -> dict | None:
        client: AsyncMongoClient = AsyncMongoClient(settings.mongodb_uri, tz_aware=True)
        try:
            return await anchor(client.get_database(settings.database))
        finally:
            await client.close()

    doc = asyncio.run(run())
    if doc is None:
        click.echo("审计链为空 / the audit chain is empty")
    else:
        click.echo(f"seq={doc['seq']} hash={doc['h']}")
