"""Small helpers shared by the test modules."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid


def uid() -> str:
    """A fresh identifier value, so tests sharing one database never see each other's data."""
    return uuid.uuid4().hex


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop a server started in its own process group: SIGTERM, then SIGKILL after 20 s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
