"""The HTTP side every simulated upstream shares: bearer token, paging by ``since``/``limit``,
the planted faults (hard failures, 503s, slow pages), and the ``X-Next-Since`` / ``X-Has-More`` /
``X-Total`` headers the connectors' transport follows."""

from __future__ import annotations

import threading
from contextlib import contextmanager
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Protocol
from urllib.parse import parse_qs, urlsplit

__all__ = ["Pages", "serve", "start"]


class Pages(Protocol):
    faults: Any  # fhir_server.simulators.immunization.Faults

    def page(self, since: int, limit: int) -> tuple[bytes, int, bool, int]:
        """(body, next since, more to come, records left from ``since``)."""
        ...


def serve(upstream: Pages, path: str | None, content_type: str, host: str, port: int, token: str) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) answering GET ``path`` (any path when None) with pages."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet: the CLI prints its own line
            return

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            parts = urlsplit(self.path)
            if parts.path == "/health":
                return self._send(200, b"ok")
            if path is not None and parts.path != path:
                return self._send(404, b"not found")
            if token and self.headers.get("Authorization") != f"Bearer {token}":
                return self._send(401, "未授权 / unauthorized".encode(), {"WWW-Authenticate": "Bearer"})
            faults = upstream.faults
            n, broken = faults.next()
            if broken:
                return self._send(500, "上游故障 / upstream failure".encode())
            if faults.transient_every and n % faults.transient_every == 0:
                return self._send(503, "服务暂不可用 / try again".encode())
            if getattr(faults, "slow_every", 0) and n % faults.slow_every == 0:
                time.sleep(faults.delay)
            q = parse_qs(parts.query)
            try:
                since = int(q.get("since", ["0"])[0] or 0)
                limit = max(1, min(int(q.get("limit", ["100"])[0]), 1000))
            except ValueError:
                return self._send(400, b"since and limit are integers")
            body, nxt, more, left = upstream.page(since, limit)
            with faults._lock:
                faults.pages_served += 1
            headers = {"X-Next-Since": str(nxt), "X-Has-More": "true" if more else "false", "X-Total": str(left)}
            self._send(200, body, headers, content_type)

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    return httpd


def start(httpd: ThreadingHTTPServer, name: str) -> ThreadingHTTPServer:
    """Serve in a background daemon thread; ``shutdown()`` stops it."""
    threading.Thread(target=httpd.serve_forever, name=name, daemon=True).start()
    return httpd


@contextmanager
def serving(upstream: Any, token: str = "demo-token") -> Iterator[str]:
    """``upstream.start(token=…)`` for the duration of a ``with``: yields the URL of its pages and
    stops the server afterwards (tests and benchmarks)."""
    httpd, url = upstream.start(token=token)
    try:
        yield url
    finally:
        httpd.shutdown()
        httpd.server_close()
