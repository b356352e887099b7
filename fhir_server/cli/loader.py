"""``fhir-server load``: send FHIR Bundles, single resources and NDJSON files to a server over HTTP.

Transaction and batch Bundles are POSTed to the base URL as they are (the bytes of the file);
any other resource is POSTed to its type, or PUT to ``Type/id`` when it has an id; NDJSON lines
are grouped into batch Bundles. Prerequisite files (``0-…`` files, batches of Organization /
Practitioner / PractitionerRole / Location) are sent first, one at a time, so that conditional
references in the other files resolve; the rest are sent with ``--concurrency`` requests in flight.
"""

from __future__ import annotations

import asyncio
import bz2
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit

import click
import httpx
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

_SUFFIXES = (".json", ".json.bz2", ".ndjson", ".ndjson.bz2")
_FIRST_TYPES = frozenset({"Organization", "Practitioner", "PractitionerRole", "Location"})
_HEADERS = {
    "Content-Type": "application/fhir+json",
    "Accept": "application/fhir+json",
    "Prefer": "return=minimal",
}
_PEEK_BYTES = 64 * 1024
_BUNDLE_TYPE = re.compile(rb'"type"\s*:\s*"([a-z-]+)"')
_CONNECT_RETRIES = 3


class BadFile(Exception):
    """A file that cannot be loaded (not JSON, not FHIR, unreadable); the message says why."""


@dataclass
class FileResult:
    """What happened to one file."""

    path: Path
    resources: int = 0  # resources the server accepted
    failed: int = 0  # resources the server refused (or that were never sent)
    error: str | None = None  # the first problem, readable
    requests: int = 0
    _pending: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.failed == 0


@dataclass
class LoadReport:
    """The outcome of a load: per-file results and the wall time."""

    files: list[FileResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def resources(self) -> int:
        return sum(f.resources for f in self.files)

    @property
    def failed_resources(self) -> int:
        return sum(f.failed for f in self.files)

    @property
    def failed_files(self) -> list[FileResult]:
        return [f for f in self.files if not f.ok]

    @property
    def rate(self) -> float:
        return self.resources / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Request:
    file: FileResult
    method: str
    path: str  # relative to the base URL; "" is the base itself
    body: bytes
    resources: int
    batch: bool  # the response is a batch-response whose entries must be checked


# -- finding and ordering files ---------------------------------------------------------------


def _loadable(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_SUFFIXES)


def discover(paths: Iterable[str | Path]) -> list[Path]:
    """The loadable files under ``paths`` (directories are walked, sorted), without duplicates."""
    out: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if _loadable(child):
                    out.setdefault(child, None)
        elif path.is_file():
            out.setdefault(path, None)
    return list(out)


def _is_ndjson(path: Path) -> bool:
    return path.name.lower().endswith((".ndjson", ".ndjson.bz2"))


def _open(path: Path) -> Any:
    return bz2.open(path, "rb") if path.name.lower().endswith(".bz2") else path.open("rb")


def _read(path: Path) -> bytes:
    try:
        with _open(path) as fh:
            return fh.read()
    except (OSError, EOFError, ValueError) as e:
        raise BadFile(f"cannot read: {e}") from None


def _peek_bundle_type(path: Path) -> str | None:
    """The Bundle.type found before ``"entry"`` in the head of the file, if there is one."""
    try:
        with _open(path) as fh:
            head = fh.read(_PEEK_BYTES)
    except (OSError, EOFError, ValueError):
        return None
    before_entries = head.split(b'"entry"', 1)[0]
    if b'"Bundle"' not in before_entries:
        return "not-a-bundle" if b'"resourceType"' in before_entries else None
    match = _BUNDLE_TYPE.search(before_entries)
    return match.group(1).decode() if match else None


def _is_prerequisite(path: Path) -> bool:
    """Files the others depend on: ``0-…``, NDJSON of shared types, batches of shared types."""
    name = path.name
    if name.startswith("0-"):
        return True
    if _is_ndjson(path):
        return name.split(".", 1)[0] in _FIRST_TYPES
    kind = _peek_bundle_type(path)
    if kind not in ("batch", None):
        return False
    try:
        doc = orjson.loads(_read(path))
    except (BadFile, orjson.JSONDecodeError):
        return False
    if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle" or doc.get("type") != "batch":
        return False
    types = {(e.get("resource") or {}).get("resourceType") for e in doc.get("entry") or [] if isinstance(e, dict)}
    return bool(types) and types <= _FIRST_TYPES


def plan(files: Sequence[Path], order: str = "auto") -> tuple[list[Path], list[Path]]:
    """Split ``files`` into (sent first, one at a time) and (sent concurrently)."""
    if order == "none":
        return [], list(files)
    first = sorted((f for f in files if _is_prerequisite(f)), key=lambda p: p.name)
    chosen = set(first)
    return first, [f for f in files if f not in chosen]


# -- turning a file into requests -------------------------------------------------------------


def _json_requests(result: FileResult, data: bytes) -> list[_Request]:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise BadFile(f"not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
        raise BadFile("not a FHIR resource: the top level has no resourceType")
    type_ = doc["resourceType"]
    if type_ == "Bundle" and doc.get("type") in ("transaction", "batch"):
        entries = doc.get("entry", [])
        if not isinstance(entries, list):
            raise BadFile("Bundle.entry is not an array")
        return [_Request(result, "POST", "", data, len(entries), doc["type"] == "batch")]
    id_ = doc.get("id")
    if isinstance(id_, str) and id_:
        return [_Request(result, "PUT", f"{type_}/{id_}", data, 1, False)]
    return [_Request(result, "POST", type_, data, 1, False)]


def _ndjson_requests(result: FileResult, data: bytes, batch_size: int) -> list[_Request]:
    entries: list[dict[str, Any]] = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise BadFile(f"line {number}: not valid JSON: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
            raise BadFile(f"line {number}: not a FHIR resource (no resourceType)")
        id_ = doc.get("id")
        url = f"{doc['resourceType']}/{id_}" if isinstance(id_, str) and id_ else doc["resourceType"]
        method = "PUT" if "/" in url else "POST"
        entries.append({"resource": orjson.Fragment(line), "request": {"method": method, "url": url}})
    requests = []
    for start in range(0, len(entries), batch_size):
        chunk = entries[start : start + batch_size]
        body = orjson.dumps({"resourceType": "Bundle", "type": "batch", "entry": chunk})
        requests.append(_Request(result, "POST", "", body, len(chunk), True))
    return requests


def prepare(path: Path, batch_size: int = 500) -> tuple[FileResult, list[_Request]]:
    """Read ``path`` and build its requests; a malformed file comes back with ``error`` set."""
    result = FileResult(path)
    try:
        data = _read(path)
        requests = _ndjson_requests(result, data, batch_size) if _is_ndjson(path) else _json_requests(result, data)
    except BadFile as e:
        result.error = str(e)
        return result, []
    result.requests = result._pending = len(requests)
    return result, requests


# -- sending ----------------------------------------------------------------------------------


def _diagnostics(outcome: Any) -> str:
    """The first issue of an OperationOutcome, as text."""
    if isinstance(outcome, dict):
        for issue in outcome.get("issue") or []:
            if isinstance(issue, dict):
                text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code")
                where = issue.get("expression") or issue.get("location")
                suffix = f" (at {', '.join(where)})" if isinstance(where, list) and where else ""
                if text:
                    return f"{text}{suffix}"
    return ""


def _error_text(response: httpx.Response) -> str:
    try:
        detail = _diagnostics(orjson.loads(response.content))
    except orjson.JSONDecodeError:
        detail = ""
    if not detail:
        detail = response.text[:300].strip() or response.reason_phrase
    return f"HTTP {response.status_code}: {detail}"


def _batch_failures(response: httpx.Response) -> tuple[int, str | None]:
    """(failed entries, the first failure) of a batch-response."""
    try:
        bundle = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return 0, None
    failed, first = 0, None
    for index, entry in enumerate(bundle.get("entry") or [] if isinstance(bundle, dict) else []):
        reply = entry.get("response") or {} if isinstance(entry, dict) else {}
        status = str(reply.get("status", ""))
        if not status[:1] == "2":
            failed += 1
            if first is None:
                first = f"entry {index}: {status} {_diagnostics(reply.get('outcome'))}".strip()
    return failed, first


async def _send(client: httpx.AsyncClient, req: _Request) -> None:
    """Send one request and record what the server said on its file."""
    result = req.file
    for attempt in range(_CONNECT_RETRIES + 1):
        try:
            response = await client.request(req.method, req.path, content=req.body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            if attempt < _CONNECT_RETRIES:
                await asyncio.sleep(0.5 * 2**attempt)
                continue
            error: str | None = f"cannot connect to {client.base_url}: {e}"
            break
        except httpx.ReadError as e:
            error = f"the server closed the connection without answering ({str(e) or 'ReadError'}); see the server log"
            break
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {str(e) or 'no detail'}"
            break
        if response.status_code in (429, 503) and attempt < _CONNECT_RETRIES:
            await asyncio.sleep(0.5 * 2**attempt)
            continue
        if not response.is_success:
            error = _error_text(response)
            break
        failed, first = _batch_failures(response) if req.batch else (0, None)
        result.resources += req.resources - failed
        result.failed += failed
        if first and result.error is None:
            result.error = f"{failed} of {req.resources} entries failed; first: {first}"
        return
    result.failed += req.resources
    if result.error is None:
        result.error = error


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f}/s" if speed else "", style="progress.data.speed")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


async def load(
    paths: Iterable[str | Path],
    url: str,
    *,
    concurrency: int = 4,
    order: str = "auto",
    batch_size: int = 500,
    timeout: float = 300.0,
    progress: Progress | None = None,
    token: str | None = None,
) -> LoadReport:
    """Load every file under ``paths`` into the FHIR server at ``url``."""
    files = discover(paths)
    first, rest = plan(files, order)
    report = LoadReport()
    files_task = progress.add_task("files / 文件", total=len(files)) if progress else None
    res_task = progress.add_task("resources / 资源", total=None) if progress else None
    processed = [0]

    def finished(req: _Request) -> None:
        processed[0] += req.resources
        if progress and res_task is not None:
            progress.advance(res_task, req.resources)
        req.file._pending -= 1
        if req.file._pending == 0 and progress and files_task is not None:
            progress.advance(files_task)

    limits = httpx.Limits(max_connections=max(concurrency, 1), max_keepalive_connections=max(concurrency, 1))
    timeouts = httpx.Timeout(connect=10.0, read=timeout, write=60.0, pool=None)
    started = time.perf_counter()
    async with httpx.AsyncClient(
        base_url=url.rstrip("/") + "/", headers=with_token(_HEADERS, token), timeout=timeouts, limits=limits, trust_env=not _is_loopback(url)
    ) as client:
        for group, width in ((first, 1), (rest, max(concurrency, 1))):
            queue: asyncio.Queue[_Request | None] = asyncio.Queue(maxsize=2 * width)

            async def worker() -> None:
                while (req := await queue.get()) is not None:
                    await _send(client, req)
                    finished(req)

            workers = [asyncio.create_task(worker()) for _ in range(width)]
            try:
                for path in group:
                    result, requests = await asyncio.to_thread(prepare, path, batch_size)
                    report.files.append(result)
                    if not requests and progress and files_task is not None:
                        progress.advance(files_task)
                    for req in requests:
                        await queue.put(req)
                for _ in workers:
                    await queue.put(None)
                await asyncio.gather(*workers)
            finally:
                for task in workers:
                    task.cancel()
    report.seconds = time.perf_counter() - started
    if progress and res_task is not None:
        progress.update(res_task, total=processed[0])
    return report


def with_token(headers: dict[str, str], token: str | None) -> dict[str, str]:
    """``headers`` with ``Authorization: Bearer <token>`` when a token is given."""
    return {**headers, "Authorization": f"Bearer {token}"} if token else headers


def run_load(paths: Iterable[str | Path], url: str, *, show_progress: bool = True, **options: Any) -> LoadReport:
    """:func:`load` from synchronous code (used by the benchmark)."""
    if not show_progress:
        return asyncio.run(load(paths, url, **options))
    with _progress(Console(stderr=True)) as progress:
        return asyncio.run(load(paths, url, progress=progress, **options))


# -- the command ------------------------------------------------------------------------------


def summary_tables(report: LoadReport) -> list[Table]:
    """The summary table, and a table of failed files when there are any."""
    totals = Table(title="Load summary / 导入汇总", show_header=False)
    totals.add_column(style="bold")
    totals.add_column(justify="right")
    ok_files = len(report.files) - len(report.failed_files)
    totals.add_row("files loaded / 文件", f"{ok_files:,} of {len(report.files):,}")
    totals.add_row("resources sent / 已导入资源", f"{report.resources:,}")
    totals.add_row("resources failed / 失败资源", f"{report.failed_resources:,}")
    totals.add_row("elapsed / 用时", f"{report.seconds:,.1f} s")
    totals.add_row("resources/s / 每秒资源数", f"{report.rate:,.0f}")
    tables = [totals]
    if report.failed_files:
        failed = Table(title="Failed files / 失败文件", show_lines=True)
        failed.add_column("file / 文件", overflow="fold")
        failed.add_column("error / 错误 (first OperationOutcome diagnostics)", overflow="fold")
        for f in report.failed_files:
            failed.add_row(str(f.path), f.error or f"{f.failed} resources failed")
        tables.append(failed)
    return tables


_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command(context_settings=_CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--url", default="http://127.0.0.1:8080/fhir", show_default=True, help="FHIR 服务基础地址 / FHIR base URL")
@click.option("--concurrency", "-c", default=4, show_default=True, type=click.IntRange(1, 256), help="并发请求数 / concurrent requests")
@click.option(
    "--order",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "none"]),
    help="auto: 先依次导入 0-… 文件及机构/医生批次 / prerequisite files (0-…, batches of Organization/Practitioner/Location) "
    "first, one at a time; none: 全部并发 / everything concurrently",
)
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 10_000), help="NDJSON 每批条数 / NDJSON lines per batch Bundle")
@click.option("--timeout", default=300.0, show_default=True, help="单个请求超时（秒）/ per-request timeout in seconds")
@click.option("--token", envvar="FHIR_TOKEN", help="访问令牌（或环境变量 FHIR_TOKEN）/ bearer token (or FHIR_TOKEN), e.g. from `fhir-server auth dev-token --kind hospital`")
@click.option("--quiet", "-q", is_flag=True, help="不显示进度条 / no progress bar")
def load_command(paths: tuple[Path, ...], url: str, concurrency: int, order: str, batch_size: int, timeout: float, token: str | None, quiet: bool) -> None:
    """导入 FHIR 数据 / Load FHIR data: PATH... are files or folders of .json, .json.bz2 (a Bundle or a
    single resource), .ndjson or .ndjson.bz2 (one resource per line).

    Transaction and batch Bundles are POSTed to the base URL as they are; a single resource is POSTed
    to its type (PUT when it has an id); NDJSON lines go in batch Bundles. Exits non-zero when any
    file fails.
    """
    files = discover(paths)
    if not files:
        raise click.ClickException(f"no {', '.join(_SUFFIXES)} files under {', '.join(map(str, paths))}")
    report = run_load(files, url, show_progress=not quiet, concurrency=concurrency, order=order, batch_size=batch_size, timeout=timeout, token=token)
    console = Console()
    for table in summary_tables(report):
        console.print(table)
    if report.failed_files:
        raise click.ClickException(f"{len(report.failed_files)} of {len(report.files)} file(s) failed / 个文件导入失败")
