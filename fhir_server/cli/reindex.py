"""``fhir-server reindex``: start a re-index job on a running server (``POST $reindex``) and follow
its progress (``GET $reindex?job=…``) until it ends."""

from __future__ import annotations

import time
from typing import Any

import click

from fhir_server.cli.loader import with_token
import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_HEADERS = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}


def _values(parameters: dict[str, Any]) -> dict[str, Any]:
    """Parameters → {name: value} (the first value of each name)."""
    out: dict[str, Any] = {}
    for p in parameters.get("parameter") or ():
        value = next((v for k, v in p.items() if k.startswith("value")), None)
        out.setdefault(p.get("name"), value)
    return out


def _problem(resp: httpx.Response) -> str:
    try:
        issues = resp.json().get("issue") or []
        text = "; ".join(i.get("diagnostics") or (i.get("details") or {}).get("text", "") for i in issues)
    except ValueError:
        text = resp.text[:300]
    return f"HTTP {resp.status_code}: {text}"


@click.command(context_settings=_CONTEXT)
@click.option("--url", default="http://127.0.0.1:8080/fhir", show_default=True, help="FHIR 服务基础地址 / FHIR base URL")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="SP_URL",
    help="只为该检索参数重建（SearchParameter.url，可重复）/ only the base types of this SearchParameter url "
    "(repeatable); default: every type",
)
@click.option("--interval", default=0.5, show_default=True, help="查询进度的间隔（秒）/ seconds between progress polls")
@click.option("--timeout", default=60.0, show_default=True, help="单个请求超时（秒）/ per-request timeout in seconds")
@click.option("--token", envvar="FHIR_TOKEN", help="访问令牌（或环境变量 FHIR_TOKEN）/ bearer token (or FHIR_TOKEN) with system/*.u")
@click.option("--quiet", "-q", is_flag=True, help="不显示进度条 / no progress bar")
def reindex_command(url: str, params: tuple[str, ...], interval: float, timeout: float, token: str | None, quiet: bool) -> None:
    """重建检索索引 / Re-index stored resources for search parameters, and wait until done."""
    base = url.rstrip("/")
    console = Console(stderr=True, quiet=quiet)
    body = {"resourceType": "Parameters", "parameter": [{"name": "url", "valueUri": p} for p in params]}
    started = time.monotonic()
    try:
        with httpx.Client(timeout=timeout, headers=with_token(_HEADERS, token)) as http:
            resp = http.post(f"{base}/$reindex", json=body)
            if resp.status_code not in (200, 202):
                raise click.ClickException(f"the server refused the re-index: {_problem(resp)}")
            job = _values(resp.json())
            job_id = job["job"]
            console.print(f"re-index job {job_id} started / 重建索引任务已开始")
            columns = (
                TextColumn("[bold]重建索引 / re-indexing"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=console, transient=False) as progress:
                task = progress.add_task("reindex", total=job.get("total"))
                while job.get("status") not in ("done", "failed"):
                    time.sleep(interval)
                    resp = http.get(f"{base}/$reindex", params={"job": job_id})
                    if resp.status_code != 200:
                        raise click.ClickException(f"cannot read the job's progress: {_problem(resp)}")
                    job = _values(resp.json())
                    progress.update(task, total=job.get("total"), completed=job.get("done") or 0)
    except httpx.HTTPError as e:
        raise click.ClickException(f"cannot reach {base}: {e}") from None
    seconds = time.monotonic() - started
    if job.get("status") == "failed":
        raise click.ClickException(f"re-index job {job_id} failed: {job.get('error')}")
    click.echo(f"re-index job {job_id} done: {job.get('done') or 0} resources in {seconds:.1f} s / 重建索引完成")
