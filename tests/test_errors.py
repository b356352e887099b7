"""Every error is an OperationOutcome with the right status and no internals (http.html#errors):
bad bodies, bad URLs, limits, hostile input, referential integrity."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import httpx
import pytest

from fhir_server.http.app import create_app
from tests.conftest import make_settings
from tests.helpers import uid as _uid

SYSTEM = "urn:test:errors"
FHIR_JSON = "application/fhir+json"



def _patient(ident: str | None = None) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": ident or _uid()}], "name": [{"family": "Wu"}]}


def assert_outcome(r: httpx.Response, status: int | tuple[int, ...]) -> dict[str, Any]:
    """``r`` is an error with status ``status``, a well-formed OperationOutcome, no stack trace."""
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, f"{r.status_code}: {r.text[:500]}"
    assert r.headers["content-type"].startswith(FHIR_JSON)
    assert "Traceback" not in r.text
    assert 'File "' not in r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"], "an OperationOutcome needs at least one issue"
    for issue in body["issue"]:
        assert issue["severity"] in ("fatal", "error", "warning", "information")
        assert isinstance(issue["code"], str) and issue["code"]
    assert any(i["severity"] in ("fatal", "error") for i in body["issue"])
    return body


async def _total(client: httpx.AsyncClient, type_: str, ident: str) -> int:
    r = await client.get(f"/{type_}", params={"identifier": f"{SYSTEM}|{ident}", "_summary": "count"})
    assert r.status_code == 200
    return r.json()["total"]


def _post_raw(client: httpx.AsyncClient, path: str, content: bytes, content_type: str = FHIR_JSON):
    return client.post(path, content=content, headers={"Content-Type": content_type})


# -- malformed bodies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b'{"resourceType": "Patient", ',
        b'{"resourceType": "Patient",}',
        b"{'resourceType': 'Patient'}",
        b'{"resourceType": "Patient", "active": NaN}',
        b'{"resourceType": "Patient", "active": true} trailing',
        b"",
        b"   ",
        b"null",
        b"[]",
        b'"Patient"',
    ],
)
async def test_malformed_json_is_400(client: httpx.AsyncClient, content: bytes) -> None:
    assert_outcome(await _post_raw(client, "/Patient", content), 400)


async def test_invalid_utf8_is_400(client: httpx.AsyncClient) -> None:
    content = b'{"resourceType": "Patient", "name": [{"family": "\xff\xfe\xc3"}]}'
    assert_outcome(await _post_raw(client, "/Patient", content), 400)


async def test_duplicate_keys_are_400(client: httpx.AsyncClient) -> None:
    ident = _uid()
    content = json.dumps(_patient(ident))[:-1].encode() + b', "gender": "male", "gender": "female"}'
    assert_outcome(await _post_raw(client, "/Patient", content), 400)
    nested = b'{"resourceType": "Patient", "name": [{"family": "A", "family": "B"}]}'
    assert_outcome(await _post_raw(client, "/Patient", nested), 400)
    assert await _total(client, "Patient", ident) == 0


async def test_resource_type_mismatch_is_400(client: httpx.AsyncClient) -> None:
    obs = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    assert_outcome(await client.post("/Patient", json=obs), 400)
    pid = "mm-" + _uid()[:20]
    assert_outcome(await client.put(f"/Patient/{pid}", json={**obs, "id": pid}), 400)
    assert (await client.get(f"/Patient/{pid}")).status_code == 404
    assert (await client.get(f"/Observation/{pid}")).status_code == 404


async def test_missing_resource_type_is_400(client: httpx.AsyncClient) -> None:
    assert_outcome(await client.post("/Patient", json={"name": [{"family": "x"}]}), 400)


async def test_id_mismatch_on_put_is_400(client: httpx.AsyncClient) -> None:
    pid = (await client.post("/Patient", json=_patient())).json()["id"]
    assert_outcome(await client.put(f"/Patient/{pid}", json={**_patient(), "id": "other-id"}), 400)
    assert_outcome(await client.put(f"/Patient/{pid}", json=_patient()), 400)  # no id at all
    assert (await client.get(f"/Patient/{pid}")).json()["meta"]["versionId"] == "1"


async def test_invalid_id_in_url_is_400(client: httpx.AsyncClient) -> None:
    bad = "bad_id!"
    assert_outcome(await client.put(f"/Patient/{bad}", json={**_patient(), "id": bad}), 400)


async def test_unknown_element_is_400_with_its_path(client: httpx.AsyncClient) -> None:
    ident = _uid()
    body = assert_outcome(await client.post("/Patient", json={**_patient(ident), "favouriteColour": "blue"}), 400)
    expressions = [e for i in body["issue"] for e in i.get("expression", [])]
    assert any("favouriteColour" in e for e in expressions), body
    nested = {**_patient(ident), "name": [{"family": "Wu", "nickname": "x"}]}
    body = assert_outcome(await client.post("/Patient", json=nested), 400)
    expressions = [e for i in body["issue"] for e in i.get("expression", [])]
    assert any("name" in e and "nickname" in e for e in expressions), body
    assert await _total(client, "Patient", ident) == 0


@pytest.mark.parametrize(
    "element",
    [
        {"birthDate": "1990-13-45"},
        {"birthDate": "1990-02-30"},
        {"birthDate": "yesterday"},
        {"active": "true"},
        {"gender": "unknown-gender"},
        {"gender": None},
        {"gender": ""},
        {"multipleBirthInteger": 1.5},
        {"name": {"family": "not-an-array"}},
        {"deceasedBoolean": True, "deceasedDateTime": "2020-01-01"},
    ],
)
async def test_wrong_primitive_or_shape_is_400(client: httpx.AsyncClient, element: dict[str, Any]) -> None:
    ident = _uid()
    assert_outcome(await client.post("/Patient", json={**_patient(ident), **element}), 400)
    assert await _total(client, "Patient", ident) == 0


async def test_dollar_keys_are_refused_and_not_stored(client: httpx.AsyncClient) -> None:
    ident = _uid()
    assert_outcome(await client.post("/Patient", json={**_patient(ident), "$where": "1"}), 400)
    assert_outcome(await client.post("/Patient", json={**_patient(ident), "name": [{"$set": {"family": "x"}}]}), 400)
    assert_outcome(await client.post("/Patient", json={**_patient(ident), "name": [{"family": "x", "a.b": 1}]}), 400)
    pid = "dollar-" + _uid()[:20]
    assert_outcome(await client.put(f"/Patient/{pid}", json={**_patient(ident), "id": pid, "$inc": {"v": 1}}), 400)
    assert await _total(client, "Patient", ident) == 0
    assert (await client.get(f"/Patient/{pid}")).status_code == 404


@pytest.mark.parametrize("depth", [200, 900, 5000, 100_000])
async def test_deep_nesting_is_400(client: httpx.AsyncClient, depth: int) -> None:
    arrays = b'{"resourceType": "Patient", "extension": ' + b"[" * depth + b"]" * depth + b"}"
    assert_outcome(await _post_raw(client, "/Patient", arrays), 400)
    objects = b'{"resourceType": "Patient", "x": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"
    assert_outcome(await _post_raw(client, "/Patient", objects), 400)


async def test_deep_valid_extensions_are_refused(client: httpx.AsyncClient) -> None:
    """Extensions may nest, but not without end: 200 levels is refused, not a crash."""
    ident = _uid()
    node: dict[str, Any] = {"url": "http://example.org/leaf", "valueString": "x"}
    for _ in range(200):
        node = {"url": "http://example.org/ext", "extension": [node]}
    assert_outcome(await client.post("/Patient", json={**_patient(ident), "extension": [node]}), 400)
    assert await _total(client, "Patient", ident) == 0


async def test_huge_string_is_refused_cleanly(client: httpx.AsyncClient) -> None:
    ident = _uid()
    resource = {**_patient(ident), "name": [{"family": "x" * (5 * 1024 * 1024)}]}
    assert_outcome(await client.post("/Patient", json=resource), (400, 413))
    assert await _total(client, "Patient", ident) == 0


async def test_many_large_strings_do_not_break_storage(client: httpx.AsyncClient) -> None:
    """Each string is under the per-string limit, but together (with their search index values) they
    exceed MongoDB's 16 MB document limit: a clean 413 (or 400), never a 500."""
    ident = _uid()
    big = "y" * (1000 * 1000)
    resource = {**_patient(ident), "name": [{"family": big + str(i), "given": [big]} for i in range(7)]}
    r = await client.post("/Patient", json=resource)
    if r.status_code == 201:
        # Stored after all: then it must read back intact.
        read = await client.get(f"/Patient/{r.json()['id']}")
        assert read.status_code == 200 and len(read.json()["name"]) == 7
    else:
        assert_outcome(r, (400, 413))
        assert await _total(client, "Patient", ident) == 0


# -- URLs and methods ------------------------------------------------------------------------


async def test_unknown_resource_type_is_404(client: httpx.AsyncClient) -> None:
    assert_outcome(await client.get("/NotAType/123"), 404)
    assert_outcome(await client.get("/NotAType"), 404)
    assert_outcome(await client.post("/NotAType", json={"resourceType": "NotAType"}), 404)
    assert_outcome(await client.get("/patient/123"), 404)  # types are case-sensitive


async def test_unknown_route_is_404(client: httpx.AsyncClient) -> None:
    assert_outcome(await client.get("/Patient/1/_history/1/more"), 404)
    assert_outcome(await client.get("/Patient/1/something/else/entirely"), 404)
    async with httpx.AsyncClient(transport=client._transport, base_url="http://testserver") as raw:
        assert_outcome(await raw.get("/not-fhir"), 404)


async def test_wrong_method_is_405(client: httpx.AsyncClient) -> None:
    assert_outcome(await client.post("/Patient/123", json=_patient()), 405)
    assert_outcome(await client.delete("/Patient/123/_history"), 405)
    assert_outcome(await client.delete("/metadata"), 405)
    assert_outcome(await client.put("", json=_patient()), 405)
    assert_outcome(await client.post("/Patient/123/_history/1", json=_patient()), 405)
    assert_outcome(await client.put("/Patient/123/_history/1", json=_patient()), 405)


async def test_put_without_id_or_criteria_is_refused(client: httpx.AsyncClient) -> None:
    assert_outcome(await client.put("/Patient", json=_patient()), (400, 405))


# -- limits and content types ----------------------------------------------------------------


@pytest.fixture(scope="module")
async def small_body(mongo_uri: str) -> AsyncIterator[httpx.AsyncClient]:
    application = create_app(make_settings(mongo_uri, max_body_bytes=1000))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver/fhir", timeout=60) as c:
            yield c


async def test_oversized_body_is_413(small_body: httpx.AsyncClient) -> None:
    ident = _uid()
    resource = {**_patient(ident), "name": [{"family": "x" * 2000}]}
    assert_outcome(await small_body.post("/Patient", json=resource), 413)

    async def chunks():  # no Content-Length: the limit must hold for a streamed body too
        data = json.dumps(resource).encode()
        for i in range(0, len(data), 100):
            yield data[i : i + 100]

    assert_outcome(await small_body.post("/Patient", content=chunks(), headers={"Content-Type": FHIR_JSON}), 413)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": resource, "request": {"method": "POST", "url": "Patient"}}]}
    assert_outcome(await small_body.post("", json=bundle), 413)
    assert await _total(small_body, "Patient", ident) == 0
    ok = await small_body.post("/Patient", json=_patient(ident))
    assert ok.status_code == 201


async def test_unsupported_content_type_is_415(client: httpx.AsyncClient) -> None:
    xml = b'<Patient xmlns="http://hl7.org/fhir"><active value="true"/></Patient>'
    assert_outcome(await _post_raw(client, "/Patient", xml, "application/xml"), 415)
    assert_outcome(await _post_raw(client, "/Patient", xml, "application/fhir+xml"), 415)
    assert_outcome(await _post_raw(client, "/Patient", json.dumps(_patient()).encode(), "text/plain"), 415)


async def test_xml_accept_is_406(client: httpx.AsyncClient) -> None:
    pid = (await client.post("/Patient", json=_patient())).json()["id"]
    assert_outcome(await client.get(f"/Patient/{pid}", headers={"Accept": "application/fhir+xml"}), 406)
    assert_outcome(await client.get("/metadata", headers={"Accept": "application/xml"}), 406)
    ok = await client.get(f"/Patient/{pid}", headers={"Accept": "application/fhir+xml;q=0.9, application/fhir+json"})
    assert ok.status_code == 200


# -- search ----------------------------------------------------------------------------------


async def test_unknown_search_parameter_is_400(client: httpx.AsyncClient) -> None:
    body = assert_outcome(await client.get("/Patient", params={"favourite-colour": "blue"}), 400)
    assert any("favourite-colour" in json.dumps(i) for i in body["issue"])


@pytest.mark.parametrize(
    "params",
    [
        {"name[$ne]": "x"},
        {"_id": '{"$gt":""}'},
        {"identifier": "$where"},
        {"identifier": '{"$ne": null}'},
        {"name": ".*"},
        {"name": "^(a+)+$"},
        {"name:$regex": ".*"},
        {"_sort": "$natural"},
        {"_count": "1e9"},
        {"_count": "-5"},
        {"birthdate": "ge$now"},
        {"_lastUpdated": "gt2020-01-01T00:00:00Z; DROP"},
        {"family": "\x00"},
        {"gender": "male\u0000"},
        {"identifier": "a|b|c"},
        {"general-practitioner": "Patient/$where"},
        {"_has:Observation:subject:code": "x"},
        {"address.$where": "1"},
    ],
)
async def test_hostile_search_values_never_500(client: httpx.AsyncClient, params: dict[str, str]) -> None:
    # There is at least one Patient, so that every query reaches MongoDB.
    assert (await client.post("/Patient", json=_patient())).status_code == 201
    r = await client.get("/Patient", params=params)
    assert r.status_code in (200, 400), r.text[:300]
    assert "Traceback" not in r.text
    body = r.json()
    if r.status_code == 400:
        assert body["resourceType"] == "OperationOutcome"
    else:
        assert body["resourceType"] == "Bundle"
        # None of these values can match a real patient: an operator injected would match many.
        assert not [e for e in body.get("entry", []) if e["search"]["mode"] == "match"], params


async def test_regex_characters_are_literal(client: httpx.AsyncClient) -> None:
    ident = _uid()
    family = "Zz" + _uid()[:8]
    assert (await client.post("/Patient", json={**_patient(ident), "name": [{"family": family}]})).status_code == 201
    r = await client.get("/Patient", params={"family": family[:4] + ".*"})
    assert r.status_code == 200
    assert r.json()["total"] == 0
    r = await client.get("/Patient", params={"family": family})
    assert r.json()["total"] == 1


# -- referential integrity -------------------------------------------------------------------


def _observation(ident: str, subject: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": SYSTEM, "value": ident}],
        "status": "final",
        "code": {"text": "weight"},
        "subject": {"reference": subject},
    }


async def test_reference_to_missing_resource_is_400(client: httpx.AsyncClient) -> None:
    ident = _uid()
    body = assert_outcome(await client.post("/Observation", json=_observation(ident, "Patient/does-not-exist")), 400)
    assert "Patient/does-not-exist" in json.dumps(body)
    assert await _total(client, "Observation", ident) == 0
    # A deleted target is missing too.
    pid = (await client.post("/Patient", json=_patient())).json()["id"]
    assert (await client.delete(f"/Patient/{pid}")).status_code in (200, 204)
    assert_outcome(await client.post("/Observation", json=_observation(ident, f"Patient/{pid}")), 400)
    assert await _total(client, "Observation", ident) == 0


@pytest.fixture(scope="module")
async def lax(mongo_uri: str) -> AsyncIterator[httpx.AsyncClient]:
    application = create_app(make_settings(mongo_uri, referential_integrity=False))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver/fhir", timeout=60) as c:
            yield c


async def test_reference_to_missing_resource_without_integrity_is_201(lax: httpx.AsyncClient) -> None:
    ident = _uid()
    r = await lax.post("/Observation", json=_observation(ident, "Patient/does-not-exist"))
    assert r.status_code == 201
    assert r.json()["subject"] == {"reference": "Patient/does-not-exist"}


async def test_deleting_a_referenced_resource_is_409(client: httpx.AsyncClient) -> None:
    pid = (await client.post("/Patient", json=_patient())).json()["id"]
    oid = (await client.post("/Observation", json=_observation(_uid(), f"Patient/{pid}"))).json()["id"]
    body = assert_outcome(await client.delete(f"/Patient/{pid}"), 409)
    assert f"Observation/{oid}" in json.dumps(body)
    assert (await client.get(f"/Patient/{pid}")).status_code == 200
    # Once the referrer is gone, the delete succeeds.
    assert (await client.delete(f"/Observation/{oid}")).status_code in (200, 204)
    assert (await client.delete(f"/Patient/{pid}")).status_code in (200, 204)
    assert (await client.get(f"/Patient/{pid}")).status_code == 410


async def test_conditional_delete_of_referenced_resource_is_409(client: httpx.AsyncClient) -> None:
    ident = _uid()
    pid = (await client.post("/Patient", json=_patient(ident))).json()["id"]
    assert (await client.post("/Observation", json=_observation(_uid(), f"Patient/{pid}"))).status_code == 201
    assert_outcome(await client.delete(f"/Patient?identifier={SYSTEM}|{ident}"), 409)
    assert (await client.get(f"/Patient/{pid}")).status_code == 200


async def test_deleting_both_in_one_transaction_is_allowed(client: httpx.AsyncClient) -> None:
    pid = (await client.post("/Patient", json=_patient())).json()["id"]
    oid = (await client.post("/Observation", json=_observation(_uid(), f"Patient/{pid}"))).json()["id"]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "DELETE", "url": f"Patient/{pid}"}},
            {"request": {"method": "DELETE", "url": f"Observation/{oid}"}},
        ],
    }
    r = await client.post("", json=bundle)
    assert r.status_code == 200, r.text
    assert (await client.get(f"/Patient/{pid}")).status_code == 410
    assert (await client.get(f"/Observation/{oid}")).status_code == 410


async def test_error_body_honours_pretty(client: httpx.AsyncClient) -> None:
    r = await client.get("/Patient/nope-" + _uid(), params={"_pretty": "true"})
    assert r.status_code == 404
    assert "\n  " in r.text
    assert r.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    "make_ref, ok",
    [
        (lambda pid: f"Patient/{pid}/_history/1", True),  # versioned reference to an existing version
        (lambda pid: f"http://testserver/fhir/Patient/{pid}", True),  # absolute, on this server
        (lambda pid: "http://testserver/fhir/Patient/not-there-at-all", False),
        (lambda pid: "http://elsewhere.example.org/fhir/Patient/123", True),  # another server: not checked
        (lambda pid: "#contained-one", True),
    ],
)
async def test_reference_forms(client: httpx.AsyncClient, make_ref, ok: bool) -> None:
    pid = (await client.post("/Patient", json=_patient())).json()["id"]
    ident = _uid()
    obs = _observation(ident, make_ref(pid))
    if make_ref(pid).startswith("#"):
        obs["contained"] = [{"resourceType": "Patient", "id": "contained-one"}]
    r = await client.post("/Observation", json=obs)
    if ok:
        assert r.status_code == 201, r.text
    else:
        assert_outcome(r, 400)
        assert await _total(client, "Observation", ident) == 0


async def test_only_current_versions_hold_references(client: httpx.AsyncClient) -> None:
    """An Observation that no longer points at a Patient (in its current version) does not block the delete."""
    pid = (await client.post("/Patient", json=_patient())).json()["id"]
    other = (await client.post("/Patient", json=_patient())).json()["id"]
    obs = (await client.post("/Observation", json=_observation(_uid(), f"Patient/{pid}"))).json()
    moved = {**obs, "subject": {"reference": f"Patient/{other}"}}
    assert (await client.put(f"/Observation/{obs['id']}", json=moved)).status_code == 200
    assert (await client.delete(f"/Patient/{pid}")).status_code in (200, 204)
    assert_outcome(await client.delete(f"/Patient/{other}"), 409)


async def test_patch_errors(client: httpx.AsyncClient) -> None:
    pid = (await client.post("/Patient", json=_patient())).json()["id"]
    # A body that is no patch at all.
    assert_outcome(await client.patch(f"/Patient/{pid}", json=_patient(), headers={"Content-Type": FHIR_JSON}), (400, 415, 422))
    # A JSON Patch that is not an array of operations.
    assert_outcome(
        await client.patch(f"/Patient/{pid}", json={"op": "add"}, headers={"Content-Type": "application/json-patch+json"}), (400, 422)
    )
    # An unknown operation, and a path that does not exist.
    assert_outcome(
        await client.patch(
            f"/Patient/{pid}", json=[{"op": "frobnicate", "path": "/x"}], headers={"Content-Type": "application/json-patch+json"}
        ),
        (400, 422),
    )
    assert_outcome(
        await client.patch(
            f"/Patient/{pid}", json=[{"op": "remove", "path": "/telecom/5"}], headers={"Content-Type": "application/json-patch+json"}
        ),
        (400, 422),
    )
    # A patch in a content type the server does not take.
    r = await client.patch(f"/Patient/{pid}", content=b"active=true", headers={"Content-Type": "text/plain"})
    assert_outcome(r, 415)
    assert (await client.get(f"/Patient/{pid}")).json()["meta"]["versionId"] == "1"


async def test_absolute_reference_to_this_server_blocks_delete(client: httpx.AsyncClient) -> None:
    pid = (await client.post("/Patient", json=_patient())).json()["id"]
    obs = _observation(_uid(), f"http://testserver/fhir/Patient/{pid}")
    assert (await client.post("/Observation", json=obs)).status_code == 201
    assert_outcome(await client.delete(f"/Patient/{pid}"), 409)
