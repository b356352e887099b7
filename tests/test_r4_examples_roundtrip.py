"""The official R4 examples as a regression corpus for the whole write path.

Each example is PUT to its own URL (validation on; referential integrity off, because the
examples point at resources the package does not contain) and read back: it must come back
unchanged apart from meta.versionId and meta.lastUpdated. The expected value is the example file
itself. Examples that are really invalid are listed, with the reason, in the structural
validator's test (tests/test_r4_examples_valid.py) and must be refused with a 400 here.
"""

from __future__ import annotations

import json
import tarfile
from typing import Any

import httpx
import pytest

from fhir_server.http.app import create_app
from tests.conftest import make_settings, shared_path

# Definition bundles of several MB each are not examples of data; the largest body the server
# takes by default is 16 MB and these would only test the size limit.
_MAX_EXAMPLE_BYTES = 2 * 1024 * 1024


def _examples() -> list[tuple[str, dict[str, Any]]]:
    tgz = shared_path("fhir-r4", "hl7.fhir.r4.examples-4.0.1.tgz")
    out = []
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix("package/")
            if "/" in name or not name.endswith(".json") or name in ("package.json", ".index.json"):
                continue
            if member.size > _MAX_EXAMPLE_BYTES:
                continue
            data = json.load(tar.extractfile(member))  # type: ignore[arg-type]
            if isinstance(data, dict) and "resourceType" in data:
                out.append((name, data))
    return out


def _known_invalid() -> dict[str, str]:
    try:
        from tests.test_r4_examples_valid import KNOWN_INVALID
    except ImportError:
        return {}
    return dict(KNOWN_INVALID)


def _without_server_meta(resource: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    out = dict(resource)
    meta = dict(out.get("meta", {}))
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    if "versionId" in original.get("meta", {}):
        meta["versionId"] = original["meta"]["versionId"]
    if "lastUpdated" in original.get("meta", {}):
        meta["lastUpdated"] = original["meta"]["lastUpdated"]
    if meta:
        out["meta"] = meta
    else:
        out.pop("meta", None)
    return out


@pytest.fixture(scope="module")
async def examples_client(mongo_uri: str):
    app = create_app(make_settings(mongo_uri, referential_integrity=False))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver/fhir", timeout=120
        ) as c:
            yield c


async def test_every_r4_example_round_trips(examples_client: httpx.AsyncClient) -> None:
    examples = _examples()
    known_invalid = _known_invalid()
    assert len(examples) > 1000, "the R4 package holds about 1,500 examples"
    failures: list[str] = []
    accepted = 0
    for name, example in examples:
        type_ = example["resourceType"]
        id_ = example.get("id")
        if id_:
            resp = await examples_client.put(f"/{type_}/{id_}", json=example)
        else:
            resp = await examples_client.post(f"/{type_}", json=example)
        if name in known_invalid:
            if resp.status_code != 400:
                failures.append(f"{name}: known invalid ({known_invalid[name]}) but got {resp.status_code}")
            continue
        if resp.status_code not in (200, 201):
            failures.append(f"{name}: {resp.status_code} {resp.text[:300]}")
            continue
        location_id = resp.json()["id"]
        read = await examples_client.get(f"/{type_}/{location_id}")
        assert read.status_code == 200
        got = _without_server_meta(read.json(), example)
        expected = dict(example)
        if not id_:
            expected["id"] = location_id
        if got != expected:
            failures.append(f"{name}: read back differs from the example")
        accepted += 1
    assert not failures, f"{len(failures)} of {len(examples)} examples failed:\n" + "\n".join(failures[:40])
    assert accepted >= len(examples) - len(known_invalid)
