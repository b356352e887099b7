"""The shipped CN profiles, end to end on a real server: seeded at startup, every valid example
stored through validation on write, every invalid example refused by ``$validate`` with the issue
its manifest (profiles/examples/invalid/expected.json, written with the examples) expects."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest

from fhir_server.http.app import create_app

from tests.conftest import make_settings

PROFILES = Path(__file__).resolve().parents[1] / "profiles"
EXAMPLES = sorted((PROFILES / "examples").glob("*.json"))
INVALID = PROFILES / "examples" / "invalid"
EXPECTED: dict[str, list[dict[str, Any]]] = json.loads((INVALID / "expected.json").read_text(encoding="utf-8"))
_GENERIC_KEYS = {"cardinality", "binding", "fixed", "pattern", "type", "slice", "extension", "unknown-profile"}


@pytest.fixture(scope="module")
async def cn_client(mongo_uri: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(mongo_uri, load_conformance=True))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/fhir", timeout=120) as c:
            yield c


async def test_profiles_and_terminology_are_seeded_and_listed(cn_client: httpx.AsyncClient) -> None:
    shipped = {json.loads(p.read_text(encoding="utf-8"))["url"] for p in PROFILES.glob("StructureDefinition-*.json")}
    r = await cn_client.get("/StructureDefinition", params={"_count": 500, "_elements": "url"})
    stored = {e["resource"]["url"] for e in r.json()["entry"]}
    assert shipped <= stored
    r = await cn_client.get("/metadata")
    statement = r.json()
    patient = next(res for res in statement["rest"][0]["resource"] if res["type"] == "Patient")
    assert "https://fhir.cn-ehr.org/StructureDefinition/cn-patient" in patient["supportedProfile"]
    observation = next(res for res in statement["rest"][0]["resource"] if res["type"] == "Observation")
    assert "https://fhir.cn-ehr.org/StructureDefinition/cn-blood-pressure" in observation["supportedProfile"]
    assert statement["implementationGuide"] == ["https://fhir.cn-ehr.org/ImplementationGuide/cn-ehr"]
    assert any(op["name"] == "validate" for op in statement["rest"][0]["operation"])


@pytest.fixture(scope="module")
async def stored_examples(cn_client: httpx.AsyncClient) -> httpx.Response:
    """One transaction of PUTs (references between examples resolve at commit); each example
    claims its profile, so each is validated against it before it is stored."""
    entries = []
    for path in EXAMPLES:
        res = json.loads(path.read_text(encoding="utf-8"))
        entries.append({"resource": res, "request": {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"}})
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    return await cn_client.post("", json=bundle)


async def test_every_valid_example_is_stored_through_validation_on_write(
    cn_client: httpx.AsyncClient, stored_examples: httpx.Response
) -> None:
    r = stored_examples
    assert r.status_code == 200, r.text[:3000]
    assert all(e["response"]["status"].startswith("20") for e in r.json()["entry"])
    assert len(EXAMPLES) >= 40
    for path in EXAMPLES:
        res = json.loads(path.read_text(encoding="utf-8"))
        r = await cn_client.post(f"/{res['resourceType']}/$validate", json=res)
        bad = [i for i in r.json()["issue"] if i["severity"] in ("error", "warning") and "dom-6" not in i.get("diagnostics", "")]
        assert bad == [], (path.name, bad)


def _location_matches(actual: str, expected: str) -> bool:
    """``Observation.valueQuantity`` is where ``Observation.value`` is; ``…value[x]`` too."""
    actual = actual.replace("[x]", "")
    if actual == expected:
        return True
    rest = actual[len(expected) :] if actual.startswith(expected) else None
    return rest is not None and expected.count(".") > 0 and bool(re.match(r"^(\.|\[|[A-Z])", rest))


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_each_invalid_example_fails_with_the_expected_issue(
    cn_client: httpx.AsyncClient, stored_examples: httpx.Response, name: str
) -> None:
    resource = json.loads((INVALID / name).read_text(encoding="utf-8"))
    r = await cn_client.post(f"/{resource['resourceType']}/$validate", json=resource)
    assert r.status_code == 200
    issues = r.json()["issue"]
    for want in EXPECTED[name]:
        severity = want.get("severity", "error")
        found = [
            i
            for i in issues
            if i["severity"] == severity
            and any(_location_matches(loc, want["expression"]) for loc in i.get("expression", []))
            and (want["key"] in _GENERIC_KEYS or want["key"] in i.get("diagnostics", ""))
        ]
        assert found, (want, [(i["severity"], i.get("expression"), i.get("details", {}).get("text"), i["diagnostics"][:120]) for i in issues])
        assert all(i.get("details", {}).get("text") for i in found), "every issue has a Chinese text"
    if any(w.get("severity", "error") == "error" for w in EXPECTED[name]):
        r = await cn_client.post(f"/{resource['resourceType']}", json={k: v for k, v in resource.items() if k != "id"})
        assert r.status_code == 422, r.text[:500]


async def test_another_canonical_base_is_used_throughout(mongo_uri: str) -> None:
    """FHIR_CANONICAL_BASE rewrites the shipped urls (expressions included); validation follows."""
    base = "https://ehr.example.sh.cn/fhir"
    app = create_app(make_settings(mongo_uri, load_conformance=True, canonical_base=base))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t/fhir", timeout=120) as c:
            r = await c.get("/StructureDefinition", params={"url": f"{base}/StructureDefinition/cn-patient"})
            assert r.json()["total"] == 1
            text = (PROFILES / "examples" / "Patient-cn-patient-example.json").read_text(encoding="utf-8")
            patient = json.loads(text.replace("https://fhir.cn-ehr.org", base))
            patient.pop("generalPractitioner", None)
            patient.pop("managingOrganization", None)
            r = await c.post("/Patient/$validate", json=patient)
            assert [i for i in r.json()["issue"] if i["severity"] == "error"] == []
            patient["identifier"][0]["value"] = patient["identifier"][0]["value"][:17] + ("0" if patient["identifier"][0]["value"][17] != "0" else "1")
            r = await c.post("/Patient/$validate", json=patient)
            errors = [i for i in r.json()["issue"] if i["severity"] == "error"]
            assert len(errors) == 1 and errors[0]["details"]["text"].startswith("身份证号校验位错误")
