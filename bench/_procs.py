"""The processes a bench run starts: a throwaway mongod, ``fhir-server serve``, and an RSS sampler."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

from fhir_server.storage import mongod as embedded

FHIR_SERVER = Path(sys.executable).parent / "fhir-server"


class Mongod:
    """An embedded mongod on a free loopback port in ``dbpath``; ``stop()`` is idempotent."""

    def __init__(self, dbpath: Path) -> None:
        self.dbpath = dbpath
        self.uri = embedded.start(embedded.free_port(), dbpath)

    def stop(self) -> None:
        embedded.stop(self.dbpath)


class Server:
    """``fhir-server serve`` as a user starts it, in its own process group; log in ``log``."""

    def __init__(self, mongo_uri: str, database: str, workers: int, log: Path) -> None:
        self.port = embedded.free_port()
        self.url = f"http://127.0.0.1:{self.port}/fhir"
        self.log = log
        # The REST benchmarks measure the FHIR work without access control and audit (the load
        # generator has no token); ID and phone numbers are encrypted as deployed, with a key made
        # for the run.
        env = {
            **os.environ,
            "MONGODB_URI": mongo_uri,
            "FHIR_DATABASE": database,
            "FHIR_AUTH_ENABLED": "0",
            "FHIR_AUDIT_ENABLED": "0",
            "FHIR_FIELD_KEY": os.environ.get("FHIR_FIELD_KEY") or base64.b64encode(os.urandom(32)).decode(),
        }
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(FHIR_SERVER), "serve", "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until ``/metadata`` answers 200 (every worker is up once the port answers steadily)."""
        deadline, ok = time.monotonic() + timeout, 0
        while ok < 5:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer within {timeout} s:\n{self.log.read_text()[-3000:]}")
            try:
                ok = ok + 1 if httpx.get(f"{self.url}/metadata", timeout=2, trust_env=False).status_code == 200 else 0
            except httpx.HTTPError:
                ok = 0
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass

    def error_lines(self, limit: int = 20) -> list[str]:
        """The distinct exception lines of the server log (the last line of each traceback)."""
        seen: dict[str, None] = {}
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        for line in lines:
            if line and not line.startswith((" ", "Traceback", "ERROR:", "INFO:", "WARNING:", "FHIR R4 server", "The above")):
                if ":" in line and ("Error" in line or "Exception" in line or "Invalid" in line):
                    seen.setdefault(line.strip()[:400], None)
        return list(seen)[:limit]


def _tree_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


class CpuMeter:
    """CPU seconds the server and mongod spend during a phase, to see which one is the bottleneck."""

    def __init__(self, server_pid: int, mongod_dbpath: Path) -> None:
        self._server = server_pid
        self._mongod = embedded.running_pid(mongod_dbpath) or 0

    def snapshot(self) -> tuple[float, float, float]:
        return time.perf_counter(), _tree_cpu(self._server), _tree_cpu(self._mongod) if self._mongod else 0.0

    def since(self, start: tuple[float, float, float]) -> dict[str, float]:
        end = self.snapshot()
        wall = end[0] - start[0]
        return {
            "wall_s": round(wall, 2),
            "server_cpu_s": round(end[1] - start[1], 2),
            "mongod_cpu_s": round(end[2] - start[2], 2),
            "server_cores": round((end[1] - start[1]) / wall, 2) if wall else 0.0,
            "mongod_cores": round((end[2] - start[2]) / wall, 2) if wall else 0.0,
        }


class RssSampler(threading.Thread):
    """Samples the summed RSS of a process and its descendants; peak overall and per phase."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self._root = psutil.Process(pid)
        self._interval = interval
        self._halt = threading.Event()
        self.phase = "startup"
        self.peak = 0
        self.peaks: dict[str, int] = {}

    def sample(self) -> int:
        total = 0
        try:
            procs = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def run(self) -> None:
        while not self._halt.wait(self._interval):
            rss = self.sample()
            self.peak = max(self.peak, rss)
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
