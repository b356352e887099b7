"""Pull pages from an upstream over HTTP: watermark + keyset paging, bearer token, timeouts,
retries with exponential backoff and jitter.

The upstream contract (the simulator implements it; a real platform gets an adapter):
``GET {url}?since=<watermark>&limit=<n>`` answers one page (gzip-compressed XML or plain XML) with
headers ``X-Next-Since`` (the watermark after this page) and ``X-Has-More`` (``true``/``false``).
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import random
from dataclasses import dataclass
from typing import AsyncIterator, Callable
from urllib.parse import urlsplit

import httpx

log = logging.getLogger("fhir_server.connectors")

_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class TransportError(Exception):
    """The upstream could not be read (after the retries, or a refusal that retrying cannot fix)."""


@dataclass(frozen=True)
class Page:
    since: str  # the watermark this page was asked from
    next_since: str  # the watermark after it
    has_more: bool
    body: bytes  # decompressed XML
    attempts: int = 1
    total: int | None = None  # records left upstream from ``since`` (X-Total), for progress bars


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5
    base: float = 0.2  # seconds before the first retry
    cap: float = 10.0
    jitter: float = 0.5  # each wait is drawn from [delay·(1-jitter), delay]

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Exponential backoff with jitter, so that many clients do not retry in step."""
        delay = min(self.cap, self.base * 2**attempt)
        return delay * (1 - self.jitter * rng.random())


def gunzip(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


class HttpTransport:
    """One upstream endpoint read page by page."""

    checkpointed = True

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        page_size: int = 100,
        timeout: float = 30.0,
        policy: RetryPolicy = RetryPolicy(),
        seed: int | None = None,
        sleep: Callable[[float], object] = asyncio.sleep,
    ) -> None:
        self.url = url
        self.page_size = page_size
        self.policy = policy
        self.retried = 0  # retries made (all pages), for the summary
        self._rng = random.Random(seed)
        self._sleep = sleep
        headers = {"Accept": "application/gzip, application/xml"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        host = urlsplit(url).hostname or ""
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            trust_env=not (host in ("localhost", "::1") or host.startswith("127.")),
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> "HttpTransport":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def page(self, since: str) -> Page:
        """The page after ``since``, retried on timeouts, connection errors, 408/429/5xx."""
        params = {"since": since, "limit": str(self.page_size)}
        last = ""
        for attempt in range(self.policy.retries + 1):
            if attempt:
                self.retried += 1
            try:
                response = await self._client.get(self.url, params=params)
            except httpx.TimeoutException as e:
                last = f"timeout ({type(e).__name__})"
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if response.status_code in (401, 403):
                    raise TransportError(f"upstream refused the credentials: HTTP {response.status_code} / 上游拒绝了认证信息")
                if response.is_success:
                    return Page(
                        since,
                        response.headers.get("x-next-since", since),
                        response.headers.get("x-has-more", "false").lower() == "true",
                        gunzip(response.content),
                        attempt + 1,
                        int(response.headers["x-total"]) if response.headers.get("x-total", "").isdigit() else None,
                    )
                last = f"HTTP {response.status_code}"
                if response.status_code not in _RETRY_STATUS:
                    raise TransportError(f"upstream answered {last} for since={since}")
                retry_after = response.headers.get("retry-after", "")
                if retry_after.isdigit() and attempt < self.policy.retries:
                    await self._sleep(min(float(retry_after), self.policy.cap))
                    continue
            if attempt < self.policy.retries:
                wait = self.policy.delay(attempt, self._rng)
                log.info("upstream %s (since=%s); retry %d in %.2fs", last, since, attempt + 1, wait)
                await self._sleep(wait)
        raise TransportError(f"upstream failed {self.policy.retries + 1} times for since={since}: {last} / 上游多次请求失败")

    async def pages(self, since: str) -> AsyncIterator[Page]:
        while True:
            page = await self.page(since)
            yield page
            if not page.has_more or page.next_since == since:
                return
            since = page.next_since


class FileTransport:
    """Pushed files (one page each, .xml or .xml.gz): the same pipeline without an upstream.
    They do not move the upstream checkpoint."""

    checkpointed = False

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.retried = 0

    async def pages(self, since: str) -> AsyncIterator[Page]:
        from pathlib import Path

        for i, path in enumerate(self.paths):
            body = gunzip(Path(path).read_bytes())
            yield Page(since, since, i + 1 < len(self.paths), body)

    async def close(self) -> None:
        return None
