"""Search requests over HTTP, one at a time from one keep-alive connection: latency and paging.

Latency is from sending the request to the last byte of the body; parsing the Bundle (to check
the answer and find the ``next`` link) happens after the clock stops.
"""

from __future__ import annotations

import http.client
import statistics
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

_HEADERS = {"Accept": "application/fhir+json"}


class Client:
    """A keep-alive HTTP/1.1 connection to the server; reconnects once when the server closed it."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._conn = http.client.HTTPConnection(host, port, timeout=600)

    def get(self, path: str) -> tuple[int, bytes, float]:
        """(status, body, seconds)."""
        for attempt in (0, 1):
            t0 = time.perf_counter()
            try:
                self._conn.request("GET", path, headers=_HEADERS)
                response = self._conn.getresponse()
                body = response.read()
                return response.status, body, time.perf_counter() - t0
            except (http.client.HTTPException, OSError):
                self._conn.close()
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=600)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._conn.close()


@dataclass
class Answer:
    """What one searchset Bundle held."""

    matches: list[str]  # Type/id of the entries with search.mode match, in order
    included: list[str]  # Type/id of the entries with search.mode include
    total: int | None
    next_path: str | None


def parse_bundle(body: bytes) -> Answer:
    bundle = orjson.loads(body)
    matches, included = [], []
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") or {}
        key = f"{resource.get('resourceType')}/{resource.get('id')}"
        mode = (entry.get("search") or {}).get("mode", "match")
        if mode == "match":
            matches.append(key)
        elif mode == "include":
            included.append(key)
    next_url = next((link.get("url") for link in bundle.get("link") or [] if link.get("relation") == "next"), None)
    return Answer(matches, included, bundle.get("total"), _path_of(next_url) if next_url else None)


def _path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def refusal(status: int, body: bytes) -> str:
    """A short text for a non-2xx answer: the first OperationOutcome diagnostics when there is one."""
    detail = ""
    try:
        outcome = orjson.loads(body)
        issue = (outcome.get("issue") or [{}])[0]
        detail = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code") or ""
    except (orjson.JSONDecodeError, AttributeError, IndexError, TypeError):
        detail = body[:200].decode(errors="replace")
    kind = "not supported" if 400 <= status < 500 else "error"
    return f"{kind} ({status}): {detail}"[:300]


def stats_ms(seconds: list[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of latencies, in milliseconds."""
    if not seconds:
        return {}
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99), "max_ms": round(ordered[-1] * 1000, 2),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 2)}


def latency(client: Client, paths: list[str], *, requests: int, budget: float) -> tuple[dict[str, Any], Answer | None]:
    """Send ``paths`` round-robin, one at a time, up to ``requests`` or ``budget`` seconds, after one
    unmeasured pass over them (at most 20); and the answer to the first path, for the checks.
    Counting speed (matches/s) is reported for answers without entries (``_summary=count``)."""
    first: dict[str, Answer] = {}
    warm_until = time.perf_counter() + budget
    for path in paths[:20]:
        status, body, _ = client.get(path)
        if not 200 <= status < 300:
            return {"status": refusal(status, body), "path": path}, None
        first[path] = parse_bundle(body)
        if time.perf_counter() > warm_until:  # a slow search: do not spend the budget twice over
            break
    times: list[float] = []
    totals: list[tuple[int, float]] = []
    errors, first_error = 0, ""
    deadline = time.perf_counter() + budget
    i = 0
    while len(times) + errors < requests and (time.perf_counter() < deadline or not times):
        path = paths[i % len(paths)]
        i += 1
        status, body, seconds = client.get(path)
        if not 200 <= status < 300:
            errors += 1
            first_error = first_error or refusal(status, body)
            continue
        times.append(seconds)
        answer = first[path] if path in first else parse_bundle(body)
        if answer.total is not None and not answer.matches:
            totals.append((answer.total, seconds))
    sample = first[paths[0]]
    out: dict[str, Any] = {
        "status": "ok" if not errors else f"ok with {errors} errors; first: {first_error}",
        "requests": len(times), "errors": errors, "distinct_queries": len(paths), **stats_ms(times),
        "first": {"path": paths[0], "matches": len(sample.matches), "included": len(sample.included),
                  "total": sample.total, "has_next": sample.next_path is not None},
    }
    if totals:
        out["matches_per_s"] = round(statistics.median(t / s for t, s in totals))
    return out, sample


def walk(client: Client, path: str, target: int) -> dict[str, Any]:
    """Follow ``next`` links from ``path`` until ``target`` matches were returned (or no next page).
    The rate counts only time spent waiting for the server, not the client's parsing."""
    pages: list[float] = []
    resources, waited = 0, 0.0
    started = time.perf_counter()
    current: str | None = path
    while current and resources < target:
        status, body, seconds = client.get(current)
        if not 200 <= status < 300:
            return {"status": refusal(status, body), "pages": len(pages), "resources": resources}
        answer = parse_bundle(body)
        pages.append(seconds)
        waited += seconds
        resources += len(answer.matches)
        current = answer.next_path
    return {
        "status": "ok", "pages": len(pages), "resources": resources, "seconds": round(waited, 3),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "resources_per_s": round(resources / waited) if waited else 0,
        "first_page_ms": round(pages[0] * 1000, 2) if pages else None,
        "last_page_ms": round(pages[-1] * 1000, 2) if pages else None,
        **{f"page_{k}": v for k, v in stats_ms(pages).items()},
    }
