"""Keyset paging: next and previous links walk a result exactly once, in the order asked for,
including sorts on parameters with several values per resource and searches across types."""

from __future__ import annotations

import random

import httpx
import pytest

from tests.helpers import uid


async def _walk(client: httpx.AsyncClient, url: str, relation: str = "next") -> list[list[str]]:
    pages = []
    while url:
        r = await client.get(url.replace("http://testserver/fhir", ""))
        assert r.status_code == 200, r.text
        b = r.json()
        pages.append([e["resource"]["id"] for e in b.get("entry", []) if e["search"]["mode"] == "match"])
        url = next((l["url"] for l in b["link"] if l["relation"] == relation), "")
    return pages


def _links(bundle: dict) -> dict[str, str]:
    return {l["relation"]: l["url"] for l in bundle["link"]}


@pytest.fixture(scope="module")
async def named(client: httpx.AsyncClient) -> tuple[str, dict[str, list[str]]]:
    """30 patients sharing a tag, with one to three names each (lower-case ASCII: the expected
    order is then plain string order)."""
    rnd = random.Random(7)
    tag = uid()
    names: dict[str, list[str]] = {}
    for _ in range(30):
        parts = ["".join(rnd.choice("abcdef") for _ in range(3)) for _ in range(rnd.randint(1, 3))]
        body = {
            "resourceType": "Patient",
            "meta": {"tag": [{"system": "urn:test", "code": tag}]},
            "name": [{"family": p} for p in parts],
        }
        r = await client.post("/Patient", json=body)
        assert r.status_code == 201
        names[r.json()["id"]] = parts
    return tag, names


@pytest.mark.parametrize("direction", ["name", "-name"])
async def test_sort_on_a_list_valued_parameter_pages_exactly(client, named, direction) -> None:
    tag, names = named
    desc = direction.startswith("-")
    # MongoDB's order, which FHIR leaves to the server: ascending by a resource's smallest
    # value, descending by its largest, ties by id.
    if desc:
        expected = sorted(sorted(names), key=lambda i: max(names[i]), reverse=True)  # stable: ties by id
    else:
        expected = sorted(names, key=lambda i: (min(names[i]), i))
    pages = await _walk(client, f"/Patient?_tag=urn:test|{tag}&_sort={direction}&_count=7")
    assert [len(p) for p in pages] == [7, 7, 7, 7, 2]
    assert [i for p in pages for i in p] == expected


async def test_previous_links_walk_back_the_same_pages(client, named) -> None:
    tag, _ = named
    for sort in ("name", "-name", "_lastUpdated", "-_id"):
        forward = await _walk(client, f"/Patient?_tag=urn:test|{tag}&_sort={sort}&_count=7")
        # Go to the last page, then follow "previous" back to the first.
        url = f"/Patient?_tag=urn:test|{tag}&_sort={sort}&_count=7"
        while True:
            b = (await client.get(url.replace("http://testserver/fhir", ""))).json()
            nxt = _links(b).get("next")
            if not nxt:
                break
            url = nxt
        backward = await _walk(client, url, "previous")
        assert backward[::-1] == forward, sort


async def test_search_across_types_pages_every_resource_once(client) -> None:
    tag = uid()
    made = set()
    for i in range(12):
        type_ = ("Patient", "Organization", "Practitioner")[i % 3]
        r = await client.post(f"/{type_}", json={"resourceType": type_, "meta": {"tag": [{"system": "urn:test", "code": tag}]}})
        made.add(f"{type_}/{r.json()['id']}")
    first = (await client.get(f"/?_type=Patient,Organization,Practitioner&_tag=urn:test|{tag}&_count=5")).json()
    assert first["total"] == 12
    seen = []
    url = f"/?_type=Patient,Organization,Practitioner&_tag=urn:test|{tag}&_count=5&_sort=-_lastUpdated"
    while url:
        b = (await client.get(url.replace("http://testserver/fhir", ""))).json()
        seen += [f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in b.get("entry", [])]
        url = _links(b).get("next", "")
    assert len(seen) == 12 and set(seen) == made


async def test_a_cursor_that_was_not_made_by_the_server_is_a_400(client) -> None:
    for bad in ("abc", "W10", "eyJhIjoxfQ", "%00"):
        r = await client.get(f"/Patient?_cursor={bad}")
        assert r.status_code == 400
        assert r.json()["resourceType"] == "OperationOutcome"
