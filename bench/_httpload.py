"""Load generators, meant to run in their own process so they do not share the bench's GIL.

HTTP: a minimal HTTP/1.1 keep-alive client on uvloop (pre-built request bytes, Content-Length or
chunked bodies), far cheaper per request than a general client. MongoDB: ``find_one`` by ``_id``
through pymongo's AsyncMongoClient. Both are bounded by a duration and a request count, skip a
warm-up window, and report the client's own CPU use so a saturated client shows.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

_Op = Callable[[], Awaitable[tuple[bool, str]]]


@dataclass
class _Tally:
    measure_from: float
    stop_at: float
    limit: int
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    error_kinds: dict[str, int] = field(default_factory=dict)
    last_end: float = 0.0

    def done(self, now: float) -> bool:
        return now >= self.stop_at or len(self.latencies) + self.errors >= self.limit


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _summary(tally: _Tally, clients: int, cpu: float, wall: float) -> dict[str, Any]:
    lat = sorted(tally.latencies)
    window = max(tally.last_end - tally.measure_from, 1e-9)
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": tally.errors,
        "first_error": tally.first_error,
        "error_kinds": tally.error_kinds,
        "seconds": round(window, 3),
        "rps": round(len(lat) / window, 1),
        "p50_ms": round(_percentile(lat, 0.50) * 1000, 2),
        "p90_ms": round(_percentile(lat, 0.90) * 1000, 2),
        "p99_ms": round(_percentile(lat, 0.99) * 1000, 2),
        "max_ms": round((lat[-1] if lat else 0.0) * 1000, 2),
        "client_cpu_pct": round(100 * cpu / wall, 1) if wall else 0.0,
    }


async def _drive(make_op: Callable[[], Awaitable[_Op]], clients: int, warmup: float, duration: float, limit: int) -> dict[str, Any]:
    start = time.perf_counter()
    tally = _Tally(start + warmup, start + warmup + duration, limit)
    cpu0 = time.process_time()

    async def client() -> None:
        op = await make_op()
        while not tally.done(t0 := time.perf_counter()):
            ok, error = await op()
            t1 = time.perf_counter()
            if t0 < tally.measure_from:
                continue
            tally.last_end = max(tally.last_end, t1)
            if ok:
                tally.latencies.append(t1 - t0)
            else:
                tally.errors += 1
                tally.first_error = tally.first_error or error
                kind = error.split(":", 1)[0] if error.startswith(("HTTP", "connection")) else "other"
                tally.error_kinds[kind] = tally.error_kinds.get(kind, 0) + 1

    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    return _summary(tally, clients, time.process_time() - cpu0, wall)


# -- HTTP --------------------------------------------------------------------------------------


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        end = lower.index(b"\r\n", at + 2)
        return status, await reader.readexactly(int(lower[at + 17 : end]))
    if b"\r\ntransfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, body
            body += chunk[:-2]
    return status, b""


def _http_op_factory(host: str, port: int, requests: list[bytes]) -> Callable[[], Awaitable[_Op]]:
    async def make() -> _Op:
        conn: list[Any] = list(await asyncio.open_connection(host, port))

        async def op() -> tuple[bool, str]:
            try:
                conn[1].write(random.choice(requests))
                status, body = await _read_response(conn[0])
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                conn[1].close()
                conn[:] = await asyncio.open_connection(host, port)
                return False, f"connection: {type(e).__name__}: {e}"
            if 200 <= status < 300:
                return True, ""
            return False, f"HTTP {status}: {body[:300].decode(errors='replace')}"

        return op

    return make


def http_phase(host: str, port: int, requests: list[bytes], clients: int, warmup: float, duration: float, limit: int) -> dict[str, Any]:
    """Send random picks of ``requests`` (raw HTTP/1.1 bytes) from ``clients`` keep-alive connections."""
    import uvloop

    return uvloop.run(_drive(_http_op_factory(host, port, requests), clients, warmup, duration, limit))


def http_get(host: str, port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/fhir+json\r\n\r\n".encode()


def http_post(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/fhir+json\r\n"
        f"Content-Type: application/fhir+json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


# -- MongoDB -----------------------------------------------------------------------------------


def mongo_phase(uri: str, database: str, keys: list[tuple[str, Any]], clients: int, warmup: float, duration: float, limit: int) -> dict[str, Any]:
    """``find_one({"_id": id})`` on random (collection, id) picks from ``clients`` coroutines."""
    from pymongo import AsyncMongoClient

    async def main() -> dict[str, Any]:
        client: AsyncMongoClient = AsyncMongoClient(uri, maxPoolSize=clients + 4)
        db = client[database]

        async def make() -> _Op:
            async def op() -> tuple[bool, str]:
                coll, id_ = random.choice(keys)
                doc = await db[coll].find_one({"_id": id_})
                return (True, "") if doc is not None else (False, f"{coll}/{id_} not found")

            return op

        try:
            await db.command("ping")
            return await _drive(make, clients, warmup, duration, limit)
        finally:
            await client.close()

    import uvloop  # the server's event loop too

    return uvloop.run(main())
