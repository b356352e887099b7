"""A real FHIR client against the real server: SMART's ``fhirclient`` (synchronous, over
``requests``) talking to ``fhir-server serve`` started as a subprocess on the session's mongod,
used the way a new user would: create, read, update, search, history, delete."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import requests

fhirclient = pytest.importorskip("fhirclient")

from fhirclient import client as fhir_client  # noqa: E402
from fhirclient.models import bundle as fm_bundle  # noqa: E402
from fhirclient.models import humanname, identifier  # noqa: E402
from fhirclient.models import patient as fm_patient  # noqa: E402
from fhirclient.models.fhirdate import FHIRDate  # noqa: E402
from fhirclient.server import FHIRNotFoundException, FHIRServer  # noqa: E402

SYSTEM = "urn:test:fhirclient"
CLI = Path(sys.executable).with_name("fhir-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(mongo_uri: str) -> Iterator[str]:
    port = _free_port()
    env = {
        **os.environ,
        "MONGODB_URI": mongo_uri,
        "FHIR_DATABASE": f"test_fhirclient_{uuid.uuid4().hex[:8]}",
        "FHIR_AUTH_ENABLED": "0",  # the client library's own test; access control: test_auth_matrix.py
    }
    env.pop("FHIR_SERVER_CONFIG", None)
    proc = subprocess.Popen(
        [str(CLI), "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/fhir"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                pytest.fail(f"fhir-server serve exited with {proc.returncode}:\n{out[-3000:]}")
            try:
                if requests.get(url + "/metadata", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("fhir-server serve did not answer /fhir/metadata within 60 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


@pytest.fixture(scope="module")
def smart(base_url: str) -> fhir_client.FHIRClient:
    client = fhir_client.FHIRClient(settings={"app_id": "fhir-server-tests", "api_base": base_url})
    # prepare() reads /metadata into fhirclient's own CapabilityStatement model: this fails if the
    # statement does not parse as R4.
    assert client.prepare() is True
    return client


def _new_patient(ident: str, family: str) -> fm_patient.Patient:
    p = fm_patient.Patient()
    ident_ = identifier.Identifier()
    ident_.system = SYSTEM
    ident_.value = ident
    p.identifier = [ident_]
    name = humanname.HumanName()
    name.family = family
    name.given = ["Lei"]
    p.name = [name]
    p.gender = "female"
    p.birthDate = FHIRDate("1985-06-15")
    return p


def test_capability_statement(smart: fhir_client.FHIRClient) -> None:
    cs = smart.server.capabilityStatement
    assert cs.fhirVersion == "4.0.1"
    patient = next(r for r in cs.rest[0].resource if r.type == "Patient")
    assert {"read", "create", "update", "delete", "search-type"} <= {i.code for i in patient.interaction}


def test_create_read_update_search_history_delete(smart: fhir_client.FHIRClient) -> None:
    server: FHIRServer = smart.server
    ident = uuid.uuid4().hex

    # create
    created = _new_patient(ident, "Han").create(server)
    assert created is not None and created["resourceType"] == "Patient"
    pid = created["id"]
    assert created["meta"]["versionId"] == "1"

    # read
    read = fm_patient.Patient.read(pid, server)
    assert read.id == pid
    assert read.name[0].family == "Han"
    assert read.name[0].given == ["Lei"]
    assert read.gender == "female"
    assert read.birthDate.isostring == "1985-06-15"
    assert read.identifier[0].value == ident
    assert read.meta.versionId == "1"

    # update
    read.name[0].family = "Han-Li"
    read.active = True
    updated = read.update(server)
    assert updated is not None and updated["meta"]["versionId"] == "2"
    again = fm_patient.Patient.read(pid, server)
    assert again.name[0].family == "Han-Li"
    assert again.active is True
    assert again.meta.versionId == "2"

    # search by _id
    found = list(fm_patient.Patient.where(struct={"_id": pid}).perform_resources_iter(server))
    assert [p.id for p in found] == [pid]
    assert found[0].name[0].family == "Han-Li"

    # search by identifier
    by_ident = list(fm_patient.Patient.where(struct={"identifier": f"{SYSTEM}|{ident}"}).perform_resources_iter(server))
    assert [p.id for p in by_ident] == [pid]

    # history, parsed by fhirclient's Bundle model
    history = fm_bundle.Bundle(server.request_json(f"Patient/{pid}/_history"))
    assert history.type == "history"
    assert history.total == 2
    assert [e.response.etag for e in history.entry] == ['W/"2"', 'W/"1"']
    assert [e.request.method for e in history.entry] == ["PUT", "POST"]
    assert history.entry[1].resource.name[0].family == "Han"

    # vread of the first version
    v1 = fm_patient.Patient.read_from(f"Patient/{pid}/_history/1", server)
    assert v1.name[0].family == "Han" and v1.meta.versionId == "1"

    # delete, then read is 410 Gone
    again.delete(server)
    with pytest.raises(Exception) as gone:
        fm_patient.Patient.read(pid, server)
    response = getattr(gone.value, "response", None)
    assert response is not None and response.status_code == 410


def test_search_paging(smart: fhir_client.FHIRClient) -> None:
    server = smart.server
    ident = uuid.uuid4().hex
    ids = {_new_patient(ident, f"P{i}").create(server)["id"] for i in range(5)}
    search = fm_patient.Patient.where(struct={"identifier": f"{SYSTEM}|{ident}", "_count": "2"})
    bundles = list(search.perform_iter(server))
    assert len(bundles) == 3
    found = [e.resource.id for b in bundles for e in (b.entry or [])]
    assert sorted(found) == sorted(ids)


def test_read_unknown(smart: fhir_client.FHIRClient) -> None:
    with pytest.raises(FHIRNotFoundException):
        fm_patient.Patient.read("does-not-exist-" + uuid.uuid4().hex[:8], smart.server)


def test_server_refuses_invalid_resource(smart: fhir_client.FHIRClient) -> None:
    server = smart.server
    response = server.session.post(
        server.base_uri + "Patient",
        json={"resourceType": "Patient", "birthDate": "1990-13-45"},
        headers={"Content-Type": "application/fhir+json"},
    )
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"
