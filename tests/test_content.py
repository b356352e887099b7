"""Content negotiation and the shape of answers: _format, Accept, Content-Type, _pretty, _summary,
_elements (http.html#mime-type, #parameters; search.html#summary, #elements)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.helpers import uid as _uid

SYSTEM = "urn:test:content"
FHIR_JSON = "application/fhir+json"
SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}



def _full_patient(ident: str) -> dict[str, Any]:
    """A Patient with summary and non-summary elements. Per the R4 Patient definition, the
    summary (Σ) elements are identifier, active, name, telecom, gender, birthDate, deceased[x],
    address, managingOrganization, link; text, maritalStatus, multipleBirth[x], photo, contact,
    communication, generalPractitioner are not."""
    return {
        "resourceType": "Patient",
        "meta": {"tag": [{"system": "urn:test:tag", "code": "keep-me"}]},
        "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">张三</div>'},
        "identifier": [{"system": SYSTEM, "value": ident}],
        "active": True,
        "name": [{"family": "张", "given": ["三"]}],
        "telecom": [{"system": "phone", "value": "010-1234"}],
        "gender": "male",
        "birthDate": "1970-01-01",
        "address": [{"city": "北京"}],
        "maritalStatus": {"text": "married"},
        "multipleBirthBoolean": False,
        "contact": [{"name": {"text": "李四"}}],
        "communication": [{"language": {"text": "zh"}}],
    }


SUMMARY_KEPT = {"identifier", "active", "name", "telecom", "gender", "birthDate", "address"}
SUMMARY_DROPPED = {"text", "maritalStatus", "multipleBirthBoolean", "contact", "communication"}


@pytest.fixture
async def patient(client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.post("/Patient", json=_full_patient(_uid()))
    assert r.status_code == 201
    return r.json()


# -- _format and Accept ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "application/fhir+json", "application/json", "application/fhir+json; fhirVersion=4.0"])
async def test_format_json(client: httpx.AsyncClient, patient: dict[str, Any], fmt: str) -> None:
    r = await client.get(f"/Patient/{patient['id']}", params={"_format": fmt})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(FHIR_JSON)
    assert r.json()["id"] == patient["id"]


@pytest.mark.parametrize("fmt", ["xml", "application/fhir+xml", "text/xml", "html", "turtle"])
async def test_format_not_json_is_406(client: httpx.AsyncClient, patient: dict[str, Any], fmt: str) -> None:
    r = await client.get(f"/Patient/{patient['id']}", params={"_format": fmt})
    assert r.status_code == 406
    assert r.json()["resourceType"] == "OperationOutcome"


async def test_format_overrides_accept(client: httpx.AsyncClient, patient: dict[str, Any]) -> None:
    r = await client.get(f"/Patient/{patient['id']}", params={"_format": "json"}, headers={"Accept": "application/fhir+xml"})
    assert r.status_code == 200
    assert r.json()["id"] == patient["id"]


@pytest.mark.parametrize("accept", ["application/fhir+json", "application/json", "*/*", "application/*", "application/fhir+json; charset=utf-8"])
async def test_accept_json(client: httpx.AsyncClient, patient: dict[str, Any], accept: str) -> None:
    r = await client.get(f"/Patient/{patient['id']}", headers={"Accept": accept})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(FHIR_JSON)


async def test_metadata_with_format(client: httpx.AsyncClient) -> None:
    assert (await client.get("/metadata", params={"_format": "json"})).json()["resourceType"] == "CapabilityStatement"
    assert (await client.get("/metadata", params={"_format": "xml"})).status_code == 406


# -- request content types -------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/fhir+json", "application/fhir+json; charset=utf-8", "application/json;charset=UTF-8"]
)
async def test_json_content_types_accepted(client: httpx.AsyncClient, content_type: str) -> None:
    ident = _uid()
    body = json.dumps({"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": ident}]}).encode()
    r = await client.post("/Patient", content=body, headers={"Content-Type": content_type})
    assert r.status_code == 201, r.text
    assert r.json()["identifier"][0]["value"] == ident


async def test_utf8_bom_and_chinese_round_trip(client: httpx.AsyncClient) -> None:
    resource = {"resourceType": "Patient", "name": [{"family": "欧阳", "given": ["娜娜"]}], "address": [{"city": "上海市"}]}
    body = b"\xef\xbb\xbf" + json.dumps(resource, ensure_ascii=False).encode("utf-8")
    r = await client.post("/Patient", content=body, headers={"Content-Type": FHIR_JSON})
    assert r.status_code == 201, r.text
    read = await client.get(f"/Patient/{r.json()['id']}")
    assert read.json()["name"] == resource["name"]
    assert "欧阳".encode() in read.content  # UTF-8, not \u escapes


# -- _pretty ---------------------------------------------------------------------------------


async def test_pretty(client: httpx.AsyncClient, patient: dict[str, Any]) -> None:
    pretty = await client.get(f"/Patient/{patient['id']}", params={"_pretty": "true"})
    compact = await client.get(f"/Patient/{patient['id']}", params={"_pretty": "false"})
    plain = await client.get(f"/Patient/{patient['id']}")
    assert pretty.status_code == compact.status_code == 200
    assert "\n" in pretty.text and '\n  "resourceType"' in pretty.text
    assert "\n" not in compact.text and "\n" not in plain.text
    assert pretty.json() == compact.json() == plain.json()


async def test_pretty_search(client: httpx.AsyncClient, patient: dict[str, Any]) -> None:
    r = await client.get("/Patient", params={"_id": patient["id"], "_pretty": "true"})
    assert r.status_code == 200
    assert '\n  "resourceType": "Bundle"' in r.text
    assert r.json()["entry"][0]["resource"]["id"] == patient["id"]


# -- _summary and _elements ------------------------------------------------------------------


def _has_subsetted(resource: dict[str, Any]) -> bool:
    return any(t.get("system") == SUBSETTED["system"] and t.get("code") == "SUBSETTED" for t in resource["meta"].get("tag", []))


async def test_summary_true_on_read(client: httpx.AsyncClient, patient: dict[str, Any]) -> None:
    r = await client.get(f"/Patient/{patient['id']}", params={"_summary": "true"})
    assert r.status_code == 200
    got = r.json()
    assert got["resourceType"] == "Patient" and got["id"] == patient["id"]
    assert SUMMARY_KEPT <= set(got), set(got)
    assert not (SUMMARY_DROPPED & set(got)), SUMMARY_DROPPED & set(got)
    assert _has_subsetted(got)
    assert {"system": "urn:test:tag", "code": "keep-me"} in got["meta"]["tag"]
    assert got["meta"]["versionId"] == "1"
    for key in SUMMARY_KEPT:
        assert got[key] == patient[key]
    # The stored resource is untouched.
    full = (await client.get(f"/Patient/{patient['id']}")).json()
    assert not _has_subsetted(full)
    assert "text" in full and "contact" in full


async def test_summary_on_vread(client: httpx.AsyncClient, patient: dict[str, Any]) -> None:
    r = await client.get(f"/Patient/{patient['id']}/_history/1", params={"_summary": "true"})
    assert r.status_code == 200
    assert "contact" not in r.json() and _has_subsetted(r.json())


async def test_summary_false_is_everything(client: httpx.AsyncClient, patient: dict[str, Any]) -> None:
    got = (await client.get(f"/Patient/{patient['id']}", params={"_summary": "false"})).json()
    assert got == patient


async def test_summary_text(client: httpx.AsyncClient, patient: dict[str, Any]) -> None:
    """_summary=text: text, id, meta and the top-level mandatory elements (Patient has none)."""
    got = (await client.get(f"/Patient/{patient['id']}", params={"_summary": "text"})).json()
    assert got["text"] == patient["text"]
    assert set(got) <= {"resourceType", "id", "meta", "text", "implicitRules"}
    assert _has_subsetted(got)


async def test_summary_data(client: httpx.AsyncClient, patient: dict[str, Any]) -> None:
    got = (await client.get(f"/Patient/{patient['id']}", params={"_summary": "data"})).json()
    assert "text" not in got
    assert got["contact"] == patient["contact"] and got["name"] == patient["name"]
    assert _has_subsetted(got)


async def test_summary_invalid_is_400(client: httpx.AsyncClient, patient: dict[str, Any]) -> None:
    r = await client.get("/Patient", params={"_summary": "maybe"})
    assert r.status_code == 400
    assert r.json()["resourceType"] == "OperationOutcome"


async def test_summary_count(client: httpx.AsyncClient) -> None:
    ident = _uid()
    for _ in range(3):
        assert (await client.post("/Patient", json=_full_patient(ident))).status_code == 201
    r = await client.get("/Patient", params={"identifier": f"{SYSTEM}|{ident}", "_summary": "count"})
    assert r.status_code == 200
    bundle = r.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert bundle["total"] == 3
    assert not bundle.get("entry")


async def test_summary_true_on_search(client: httpx.AsyncClient, patient: dict[str, Any]) -> None:
    r = await client.get("/Patient", params={"_id": patient["id"], "_summary": "true"})
    got = r.json()["entry"][0]["resource"]
    assert SUMMARY_KEPT <= set(got) and not (SUMMARY_DROPPED & set(got))
    assert _has_subsetted(got)


async def test_elements_name(client: httpx.AsyncClient, patient: dict[str, Any]) -> None:
    r = await client.get(f"/Patient/{patient['id']}", params={"_elements": "name"})
    assert r.status_code == 200
    got = r.json()
    assert set(got) == {"resourceType", "id", "meta", "name"}
    assert got["name"] == patient["name"]
    assert _has_subsetted(got)


async def test_elements_several_and_in_search(client: httpx.AsyncClient, patient: dict[str, Any]) -> None:
    r = await client.get("/Patient", params={"_id": patient["id"], "_elements": "gender,birthDate"})
    got = r.json()["entry"][0]["resource"]
    assert set(got) == {"resourceType", "id", "meta", "gender", "birthDate"}
    assert _has_subsetted(got)


async def test_elements_keeps_mandatory_elements(client: httpx.AsyncClient) -> None:
    """search.html#elements: servers return the mandatory elements too (Observation.status, .code)."""
    pid = (await client.post("/Patient", json={"resourceType": "Patient"})).json()["id"]
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "weight"},
        "subject": {"reference": f"Patient/{pid}"},
        "valueQuantity": {"value": 70, "unit": "kg"},
    }
    oid = (await client.post("/Observation", json=obs)).json()["id"]
    got = (await client.get(f"/Observation/{oid}", params={"_elements": "subject"})).json()
    assert set(got) == {"resourceType", "id", "meta", "status", "code", "subject"}


async def test_summary_not_applied_to_writes(client: httpx.AsyncClient) -> None:
    """_summary shapes reads; the resource a create stores is the whole one."""
    ident = _uid()
    r = await client.post("/Patient", params={"_summary": "true"}, json=_full_patient(ident))
    assert r.status_code == 201
    full = (await client.get(f"/Patient/{r.json()['id']}")).json()
    assert "contact" in full and "text" in full
