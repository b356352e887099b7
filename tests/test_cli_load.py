"""``fhir-server`` as a user runs it: the help, ``mongod start|stop``, and ``load`` against a real
server (``fhir-server serve`` in a subprocess on a throwaway mongod).

Expected counts come from what the tests wrote (or, for Synthea, from scanning the raw files),
never from the loader's own summary.
"""

from __future__ import annotations

import bz2
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

import httpx
import pytest

from fhir_server.storage import mongod as embedded
from tests.helpers import stop_process_group

_BIN = Path(sys.executable).parent / "fhir-server"
_SYNTHEA = Path(__file__).resolve().parents[2] / "shared" / "data" / "synthea-120"
_ENV = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(_BIN), *args], capture_output=True, text=True, timeout=timeout, env=_ENV)


@pytest.fixture(scope="module")
def mongo() -> Iterator[str]:
    dbpath = Path(tempfile.mkdtemp(prefix="fhir-load-mongod-"))
    try:
        yield embedded.start(embedded.free_port(), dbpath)
    finally:
        embedded.stop(dbpath)
        shutil.rmtree(dbpath, ignore_errors=True)


@contextmanager
def _serving(mongo: str, log: Path, **env_extra: str) -> Iterator[str]:
    """``fhir-server serve`` on a free port and a fresh database; its base URL."""
    port = embedded.free_port()
    env = {**os.environ, "MONGODB_URI": mongo, "FHIR_DATABASE": f"load_{uuid.uuid4().hex[:10]}", **env_extra}
    if "FHIR_AUTH_ENABLED" not in env_extra:  # the server's own default, whatever this shell says
        env.pop("FHIR_AUTH_ENABLED", None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(_BIN), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/fhir"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"fhir-server serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/metadata", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /metadata within 60 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="module")
def base_url(mongo: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The loader's own behaviour, on a server without access control (with it: test_load_with_a_token)."""
    with _serving(mongo, tmp_path_factory.mktemp("server") / "server.log", FHIR_AUTH_ENABLED="0") as url:
        yield url


def _get(url: str, path: str, **params: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/{path}", params=params, timeout=30, trust_env=False)
    assert r.status_code == 200, r.text
    return r.json()


def _count(url: str, type_: str, **params: str) -> int:
    return _get(url, type_, _summary="count", **params)["total"]


def _load(url: str, *paths: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return _cli("load", "--url", url, "--quiet", *extra, *map(str, paths))


def _patient(system: str, value: str, **more: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": system, "value": value}], "name": [{"family": "Li"}], **more}


# -- help and mongod ---------------------------------------------------------------------------


def test_help_lists_the_commands() -> None:
    top = _cli("--help")
    assert top.returncode == 0, top.stderr
    for word in ("run", "serve", "mongod", "load"):
        assert word in top.stdout
    load = _cli("load", "--help")
    assert load.returncode == 0, load.stderr
    assert "--concurrency" in load.stdout and "并发请求数" in load.stdout
    assert "--url" in load.stdout and "--order" in load.stdout


def test_mongod_start_prints_uri_and_stop_stops(tmp_path: Path) -> None:
    from pymongo import MongoClient

    port, dbpath = embedded.free_port(), tmp_path / "db"
    try:
        started = _cli("mongod", "start", "--port", str(port), "--dbpath", str(dbpath), timeout=120)
        assert started.returncode == 0, started.stderr
        uri = started.stdout.strip().splitlines()[-1]
        assert uri.startswith(f"mongodb://127.0.0.1:{port}")
        with MongoClient(uri, serverSelectionTimeoutMS=10_000) as client:
            assert client.admin.command("ping")["ok"] == 1
        stopped = _cli("mongod", "stop", "--dbpath", str(dbpath), timeout=60)
        assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped"
        assert embedded.running_pid(dbpath) is None
        again = _cli("mongod", "stop", "--dbpath", str(dbpath), timeout=60)
        assert again.stdout.strip() == "not running"
    finally:
        embedded.stop(dbpath)


# -- load --------------------------------------------------------------------------------------


def test_load_transaction_bundles(base_url: str, tmp_path: Path) -> None:
    system = f"urn:test:load:{uuid.uuid4().hex}"

    def bundle(values: list[str]) -> dict[str, Any]:
        entries = []
        for value in values:
            full = f"urn:uuid:{uuid.uuid4()}"
            entries.append({"fullUrl": full, "resource": _patient(system, value), "request": {"method": "POST", "url": "Patient"}})
            observation = {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "weight"},
                "subject": {"reference": full},
                "valueQuantity": {"value": 60, "unit": "kg"},
            }
            entries.append({"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": observation, "request": {"method": "POST", "url": "Observation"}})
        return {"resourceType": "Bundle", "type": "transaction", "entry": entries}

    plain, packed = ["a1", "a2", "a3"], ["b1", "b2"]
    (tmp_path / "plain.json").write_text(json.dumps(bundle(plain)))
    (tmp_path / "packed.json.bz2").write_bytes(bz2.compress(json.dumps(bundle(packed)).encode()))
    patients, observations = _count(base_url, "Patient"), _count(base_url, "Observation")

    done = _load(base_url, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _count(base_url, "Patient") - patients == len(plain) + len(packed)
    assert _count(base_url, "Observation") - observations == len(plain) + len(packed)
    for value in plain + packed:
        found = _get(base_url, "Patient", identifier=f"{system}|{value}")
        assert found["total"] == 1, value
        patient_id = found["entry"][0]["resource"]["id"]
        assert _count(base_url, "Observation", subject=f"Patient/{patient_id}") == 1


def test_load_ndjson_in_batches_after_prerequisites(base_url: str, tmp_path: Path) -> None:
    """Organization.ndjson goes first, so the patients' references to it resolve."""
    system = f"urn:test:ndjson:{uuid.uuid4().hex}"
    org_ids = [f"org-{uuid.uuid4().hex[:12]}" for _ in range(3)]
    orgs = [{"resourceType": "Organization", "id": i, "name": f"Hospital {n}"} for n, i in enumerate(org_ids)]
    with_id = [
        _patient(system, f"p{n}", id=f"pat-{uuid.uuid4().hex[:12]}", managingOrganization={"reference": f"Organization/{org_ids[n % 3]}"})
        for n in range(7)
    ]
    without_id = [_patient(system, f"q{n}") for n in range(5)]
    (tmp_path / "Organization.ndjson").write_text("\n".join(json.dumps(o) for o in orgs) + "\n")
    lines = [json.dumps(p) for p in with_id + without_id]
    (tmp_path / "A-patients.ndjson").write_text("\n".join(lines[:9]) + "\n\n")
    (tmp_path / "B-patients.ndjson.bz2").write_bytes(bz2.compress("\n".join(lines[9:]).encode()))
    patients, organizations = _count(base_url, "Patient"), _count(base_url, "Organization")

    done = _load(base_url, tmp_path, extra=("--batch-size", "4", "--concurrency", "3"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert _count(base_url, "Organization") - organizations == len(orgs)
    assert _count(base_url, "Patient") - patients == len(with_id) + len(without_id)
    for patient in with_id:
        r = httpx.get(f"{base_url}/Patient/{patient['id']}", timeout=30, trust_env=False)
        assert r.status_code == 200 and r.json()["identifier"] == patient["identifier"]
    for patient in without_id:
        assert _count(base_url, "Patient", identifier=f"{system}|{patient['identifier'][0]['value']}") == 1


def test_load_single_resources(base_url: str, tmp_path: Path) -> None:
    system = f"urn:test:single:{uuid.uuid4().hex}"
    pid = f"single-{uuid.uuid4().hex[:12]}"
    (tmp_path / "with-id.json").write_text(json.dumps(_patient(system, "s1", id=pid)))
    (tmp_path / "without-id.json").write_text(json.dumps(_patient(system, "s2")))
    patients = _count(base_url, "Patient")
    done = _load(base_url, tmp_path / "with-id.json", tmp_path / "without-id.json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert _count(base_url, "Patient") - patients == 2
    assert httpx.get(f"{base_url}/Patient/{pid}", timeout=30, trust_env=False).status_code == 200
    assert _count(base_url, "Patient", identifier=f"{system}|s2") == 1


def test_malformed_file_fails_readably(base_url: str, tmp_path: Path) -> None:
    system = f"urn:test:bad:{uuid.uuid4().hex}"
    (tmp_path / "broken.json").write_text('{"resourceType": "Bundle", "type": "transaction", "entry": [')
    (tmp_path / "lines.ndjson").write_text(json.dumps(_patient(system, "ok")) + "\n{oops\n")
    (tmp_path / "good.json").write_text(json.dumps(_patient(system, "good")))
    done = _load(base_url, tmp_path)
    assert done.returncode != 0
    assert "broken.json" in done.stdout and "not valid JSON" in done.stdout
    assert "lines.ndjson" in done.stdout and "line 2" in done.stdout
    assert "2 of 3 file(s) failed" in done.stderr
    assert _count(base_url, "Patient", identifier=f"{system}|good") == 1
    assert _count(base_url, "Patient", identifier=f"{system}|ok") == 0  # a malformed file sends nothing


def test_server_refusal_is_reported(base_url: str, tmp_path: Path) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": {"resourceType": "NotAType"}, "request": {"method": "POST", "url": "NotAType"}}],
    }
    (tmp_path / "refused.json").write_text(json.dumps(bundle))
    done = _load(base_url, tmp_path)
    assert done.returncode != 0
    assert "refused.json" in done.stdout and "HTTP 4" in done.stdout


def test_no_loadable_files(base_url: str, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing to load")
    done = _load(base_url, tmp_path)
    assert done.returncode != 0 and "no .json" in done.stderr


# -- Synthea -----------------------------------------------------------------------------------


def _patient_entries(path: Path) -> int:
    with bz2.open(path) as fh:
        bundle = json.load(fh)
    return sum(1 for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")


def test_load_synthea_sample(base_url: str) -> None:
    if not _SYNTHEA.is_dir():
        pytest.skip(f"{_SYNTHEA} is not here (../shared is only beside the project's own checkouts)")
    shared = sorted(_SYNTHEA.glob("0-*.json.bz2"))
    patients_files = sorted(p for p in _SYNTHEA.glob("*.json.bz2") if not p.name.startswith("0-"))[:3]
    assert len(shared) == 2 and len(patients_files) == 3
    expected = sum(_patient_entries(p) for p in patients_files)
    before = _count(base_url, "Patient")
    done = _load(base_url, *patients_files, *shared)  # given last on purpose: the loader orders them
    assert done.returncode == 0, done.stdout + done.stderr
    assert _count(base_url, "Patient") - before == expected


def test_load_with_a_token(mongo: str, tmp_path: Path) -> None:
    """A server as `fhir-server serve` starts it (access control on): the loader without a token is
    refused and says so; with a development token from `fhir-server auth dev-token` it loads."""
    with _serving(mongo, tmp_path / "server.log") as url:
        value = uuid.uuid4().hex
        path = tmp_path / "p.json"
        path.write_text(json.dumps(_patient("urn:test:token", value)), encoding="utf-8")
        refused = _load(url, path)
        assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr
        token = _cli("auth", "dev-token", "--kind", "clinician", "--url", url)
        assert token.returncode == 0, token.stderr
        loaded = _load(url, path, extra=("--token", token.stdout.strip()))
        assert loaded.returncode == 0, loaded.stdout + loaded.stderr
        search = {"identifier": f"urn:test:token|{value}"}
        assert httpx.get(f"{url}/Patient", params=search, timeout=30, trust_env=False).status_code == 401
        found = httpx.get(f"{url}/Patient", params=search, headers={"Authorization": f"Bearer {token.stdout.strip()}"}, timeout=30, trust_env=False)
        assert found.status_code == 200 and found.json()["total"] == 1
