"""read, vread, create, update (and update-as-create), delete, patch and capabilities over HTTP
against the real mongod (http.html#read ... #patch, #capabilities).

Every expected value is written here by hand from the request the test sent and from the spec.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from tests.helpers import uid as _uid

SYSTEM = "urn:test:crud"
FHIR_JSON = "application/fhir+json"



def _patient(ident: str, family: str = "Zhang") -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": SYSTEM, "value": ident}],
        "name": [{"family": family, "given": ["San"]}],
        "gender": "male",
        "birthDate": "1980-02-03",
    }


def _without_meta(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("meta", "id")}


async def _create(client: httpx.AsyncClient, resource: dict[str, Any]) -> httpx.Response:
    r = await client.post(f"/{resource['resourceType']}", json=resource)
    assert r.status_code == 201, r.text
    return r


# -- create / read / vread -------------------------------------------------------------------


async def test_create_assigns_id_and_meta(client: httpx.AsyncClient) -> None:
    ident = _uid()
    sent = _patient(ident)
    r = await client.post("/Patient", json=sent, headers={"Content-Type": FHIR_JSON})
    assert r.status_code == 201
    assert r.headers["content-type"].startswith(FHIR_JSON)
    body = r.json()
    assert body["resourceType"] == "Patient"
    assert re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", body["id"])
    assert body["meta"]["versionId"] == "1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", body["meta"]["lastUpdated"])
    assert _without_meta(body) == sent
    assert r.headers["ETag"] == 'W/"1"'
    assert r.headers["Location"] == f"http://testserver/fhir/Patient/{body['id']}/_history/1"
    assert r.headers["Last-Modified"].endswith(" GMT")


async def test_create_ignores_client_id(client: httpx.AsyncClient) -> None:
    client_id = "client-" + _uid()[:20]
    sent = {**_patient(_uid()), "id": client_id}
    r = await client.post("/Patient", json=sent)
    assert r.status_code == 201
    server_id = r.json()["id"]
    assert server_id != client_id
    assert (await client.get(f"/Patient/{client_id}")).status_code == 404
    assert (await client.get(f"/Patient/{server_id}")).status_code == 200


async def test_create_two_gets_two_ids(client: httpx.AsyncClient) -> None:
    a = (await _create(client, _patient(_uid()))).json()["id"]
    b = (await _create(client, _patient(_uid()))).json()["id"]
    assert a != b


async def test_read_returns_what_was_created(client: httpx.AsyncClient) -> None:
    sent = _patient(_uid(), family="李")
    created = (await _create(client, sent)).json()
    r = await client.get(f"/Patient/{created['id']}")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(FHIR_JSON)
    body = r.json()
    assert body["id"] == created["id"]
    assert body["meta"]["versionId"] == "1"
    assert _without_meta(body) == sent
    assert r.headers["ETag"] == 'W/"1"'
    assert "Last-Modified" in r.headers


async def test_read_unknown_is_404(client: httpx.AsyncClient) -> None:
    r = await client.get(f"/Patient/nope-{_uid()}")
    assert r.status_code == 404
    assert r.json()["resourceType"] == "OperationOutcome"


async def test_read_invalid_id_is_400(client: httpx.AsyncClient) -> None:
    r = await client.get("/Patient/" + "x" * 65)
    assert r.status_code in (400, 404)
    assert r.json()["resourceType"] == "OperationOutcome"


async def test_vread_each_version(client: httpx.AsyncClient) -> None:
    sent = _patient(_uid(), family="One")
    pid = (await _create(client, sent)).json()["id"]
    second = {**_patient(sent["identifier"][0]["value"], family="Two"), "id": pid}
    r = await client.put(f"/Patient/{pid}", json=second)
    assert r.status_code == 200
    v1 = await client.get(f"/Patient/{pid}/_history/1")
    v2 = await client.get(f"/Patient/{pid}/_history/2")
    assert v1.status_code == 200 and v2.status_code == 200
    assert v1.json()["name"][0]["family"] == "One"
    assert v1.json()["meta"]["versionId"] == "1"
    assert v1.headers["ETag"] == 'W/"1"'
    assert v2.json()["name"][0]["family"] == "Two"
    assert v2.json()["meta"]["versionId"] == "2"
    assert v2.headers["ETag"] == 'W/"2"'
    assert (await client.get(f"/Patient/{pid}/_history/3")).status_code == 404
    assert (await client.get(f"/Patient/{pid}/_history/abc")).status_code == 404


# -- update ----------------------------------------------------------------------------------


async def test_update_increments_version(client: httpx.AsyncClient) -> None:
    ident = _uid()
    pid = (await _create(client, _patient(ident))).json()["id"]
    changed = {**_patient(ident, family="Wang"), "id": pid}
    r = await client.put(f"/Patient/{pid}", json=changed)
    assert r.status_code == 200
    body = r.json()
    assert body["meta"]["versionId"] == "2"
    assert body["name"][0]["family"] == "Wang"
    assert r.headers["ETag"] == 'W/"2"'
    assert r.headers["Location"].endswith(f"/Patient/{pid}/_history/2")
    read = (await client.get(f"/Patient/{pid}")).json()
    assert read["name"][0]["family"] == "Wang"
    assert _without_meta(read) == _without_meta(changed)


async def test_update_replaces_whole_resource(client: httpx.AsyncClient) -> None:
    ident = _uid()
    pid = (await _create(client, {**_patient(ident), "active": True})).json()["id"]
    r = await client.put(f"/Patient/{pid}", json={"resourceType": "Patient", "id": pid, "gender": "female"})
    assert r.status_code == 200
    read = (await client.get(f"/Patient/{pid}")).json()
    assert "active" not in read and "name" not in read
    assert read["gender"] == "female"


async def test_update_as_create_with_client_id(client: httpx.AsyncClient) -> None:
    pid = "cid-" + _uid()
    sent = {**_patient(_uid()), "id": pid}
    r = await client.put(f"/Patient/{pid}", json=sent)
    assert r.status_code == 201
    assert r.json()["id"] == pid
    assert r.json()["meta"]["versionId"] == "1"
    assert r.headers["Location"].endswith(f"/Patient/{pid}/_history/1")
    read = await client.get(f"/Patient/{pid}")
    assert read.status_code == 200
    assert _without_meta(read.json()) == _without_meta(sent)


async def test_update_keeps_client_meta_but_not_version(client: httpx.AsyncClient) -> None:
    pid = "meta-" + _uid()
    tag = {"system": "urn:test:tag", "code": "t1"}
    sent = {**_patient(_uid()), "id": pid, "meta": {"versionId": "77", "tag": [tag]}}
    r = await client.put(f"/Patient/{pid}", json=sent)
    assert r.status_code == 201
    assert r.json()["meta"]["versionId"] == "1"
    assert r.json()["meta"]["tag"] == [tag]


# -- delete ----------------------------------------------------------------------------------


async def test_delete_then_read_is_gone(client: httpx.AsyncClient) -> None:
    pid = (await _create(client, _patient(_uid()))).json()["id"]
    r = await client.delete(f"/Patient/{pid}")
    assert r.status_code in (200, 204)
    gone = await client.get(f"/Patient/{pid}")
    assert gone.status_code == 410
    assert gone.json()["resourceType"] == "OperationOutcome"
    # The version before the deletion is still readable (http.html#vread).
    assert (await client.get(f"/Patient/{pid}/_history/1")).status_code == 200
    # Deleting again succeeds (http.html#delete: idempotent).
    again = await client.delete(f"/Patient/{pid}")
    assert again.status_code in (200, 204)
    # Deleting what never existed succeeds too (or is 404).
    assert (await client.delete(f"/Patient/never-{_uid()}")).status_code in (200, 204, 404)


async def test_delete_is_kept_in_history(client: httpx.AsyncClient) -> None:
    pid = (await _create(client, _patient(_uid()))).json()["id"]
    assert (await client.delete(f"/Patient/{pid}")).status_code in (200, 204)
    h = await client.get(f"/Patient/{pid}/_history")
    assert h.status_code == 200
    bundle = h.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "history"
    entries = bundle["entry"]
    assert len(entries) == 2
    newest, oldest = entries
    assert newest["request"]["method"] == "DELETE"
    assert "resource" not in newest
    assert newest["response"]["etag"] == 'W/"2"'
    assert oldest["request"]["method"] == "POST"
    assert oldest["resource"]["meta"]["versionId"] == "1"
    # The deletion is not a resource version: vread of it is 410 or 404.
    assert (await client.get(f"/Patient/{pid}/_history/2")).status_code in (404, 410)


async def test_recreate_after_delete(client: httpx.AsyncClient) -> None:
    pid = "re-" + _uid()
    assert (await client.put(f"/Patient/{pid}", json={**_patient(_uid()), "id": pid})).status_code == 201
    assert (await client.delete(f"/Patient/{pid}")).status_code in (200, 204)
    r = await client.put(f"/Patient/{pid}", json={**_patient(_uid()), "id": pid})
    assert r.status_code == 201
    assert r.json()["meta"]["versionId"] == "3"
    assert (await client.get(f"/Patient/{pid}")).status_code == 200


# -- patch -----------------------------------------------------------------------------------


async def test_json_patch(client: httpx.AsyncClient) -> None:
    ident = _uid()
    pid = (await _create(client, _patient(ident))).json()["id"]
    ops = [
        {"op": "replace", "path": "/gender", "value": "female"},
        {"op": "add", "path": "/active", "value": True},
        {"op": "add", "path": "/name/0/given/-", "value": "Feng"},
        {"op": "remove", "path": "/birthDate"},
    ]
    r = await client.patch(f"/Patient/{pid}", content=json.dumps(ops), headers={"Content-Type": "application/json-patch+json"})
    assert r.status_code == 200, r.text
    assert r.headers["ETag"] == 'W/"2"'
    read = (await client.get(f"/Patient/{pid}")).json()
    assert read["meta"]["versionId"] == "2"
    assert read["gender"] == "female"
    assert read["active"] is True
    assert read["name"][0]["given"] == ["San", "Feng"]
    assert "birthDate" not in read
    assert read["identifier"] == [{"system": SYSTEM, "value": ident}]


async def test_json_patch_test_op_failure_changes_nothing(client: httpx.AsyncClient) -> None:
    pid = (await _create(client, _patient(_uid()))).json()["id"]
    ops = [{"op": "test", "path": "/gender", "value": "female"}, {"op": "replace", "path": "/gender", "value": "other"}]
    r = await client.patch(f"/Patient/{pid}", json=ops, headers={"Content-Type": "application/json-patch+json"})
    assert r.status_code in (409, 412, 422, 400)
    assert r.json()["resourceType"] == "OperationOutcome"
    read = (await client.get(f"/Patient/{pid}")).json()
    assert read["meta"]["versionId"] == "1" and read["gender"] == "male"


async def test_json_patch_producing_invalid_resource_is_refused(client: httpx.AsyncClient) -> None:
    pid = (await _create(client, _patient(_uid()))).json()["id"]
    ops = [{"op": "replace", "path": "/gender", "value": "not-a-gender"}]
    r = await client.patch(f"/Patient/{pid}", json=ops, headers={"Content-Type": "application/json-patch+json"})
    assert r.status_code in (400, 422)
    assert (await client.get(f"/Patient/{pid}")).json()["gender"] == "male"


async def test_fhirpath_patch(client: httpx.AsyncClient) -> None:
    pid = (await _create(client, _patient(_uid()))).json()["id"]
    params = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "operation",
                "part": [
                    {"name": "type", "valueCode": "replace"},
                    {"name": "path", "valueString": "Patient.birthDate"},
                    {"name": "value", "valueDate": "1999-09-09"},
                ],
            },
            {
                "name": "operation",
                "part": [
                    {"name": "type", "valueCode": "add"},
                    {"name": "path", "valueString": "Patient"},
                    {"name": "name", "valueString": "active"},
                    {"name": "value", "valueBoolean": False},
                ],
            },
        ],
    }
    r = await client.patch(f"/Patient/{pid}", json=params, headers={"Content-Type": FHIR_JSON})
    assert r.status_code == 200, r.text
    read = (await client.get(f"/Patient/{pid}")).json()
    assert read["birthDate"] == "1999-09-09"
    assert read["active"] is False
    assert read["meta"]["versionId"] == "2"


async def test_patch_unknown_and_deleted(client: httpx.AsyncClient) -> None:
    ops = [{"op": "add", "path": "/active", "value": True}]
    hdr = {"Content-Type": "application/json-patch+json"}
    assert (await client.patch(f"/Patient/none-{_uid()}", json=ops, headers=hdr)).status_code == 404
    pid = (await _create(client, _patient(_uid()))).json()["id"]
    assert (await client.delete(f"/Patient/{pid}")).status_code in (200, 204)
    assert (await client.patch(f"/Patient/{pid}", json=ops, headers=hdr)).status_code == 410


async def test_patch_cannot_change_id(client: httpx.AsyncClient) -> None:
    pid = (await _create(client, _patient(_uid()))).json()["id"]
    ops = [{"op": "replace", "path": "/id", "value": "other-id"}]
    r = await client.patch(f"/Patient/{pid}", json=ops, headers={"Content-Type": "application/json-patch+json"})
    assert r.status_code in (400, 422)
    assert r.json()["resourceType"] == "OperationOutcome"
    assert (await client.get(f"/Patient/{pid}")).json()["meta"]["versionId"] == "1"


# -- capabilities ----------------------------------------------------------------------------


async def test_capabilities(client: httpx.AsyncClient) -> None:
    r = await client.get("/metadata")
    assert r.status_code == 200
    cs = r.json()
    assert cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"] == "4.0.1"
    assert cs["kind"] == "instance"
    assert cs["status"] in ("draft", "active", "retired", "unknown")
    assert "date" in cs
    assert any(f in ("json", "application/fhir+json") for f in cs["format"])
    assert not any("xml" in f for f in cs["format"])
    rest = cs["rest"][0]
    assert rest["mode"] == "server"
    patient = next(res for res in rest["resource"] if res["type"] == "Patient")
    codes = {i["code"] for i in patient["interaction"]}
    assert {"read", "vread", "create", "update", "delete", "patch", "history-instance", "search-type"} <= codes
    system_codes = {i["code"] for i in rest.get("interaction", [])}
    assert {"transaction", "batch", "history-system"} <= system_codes


async def test_capabilities_parses_with_an_independent_model(client: httpx.AsyncClient) -> None:
    """The statement is accepted by an independent model of the resource (fhir.resources, R4B:
    CapabilityStatement did not change shape between R4 and R4B)."""
    from fhir.resources.R4B.capabilitystatement import CapabilityStatement

    cs = (await client.get("/metadata")).json()
    parsed = CapabilityStatement.model_validate(cs)
    assert parsed.fhirVersion == "4.0.1"
