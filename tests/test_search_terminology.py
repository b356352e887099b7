"""Search :in / :not-in / :below answered by the terminology service: value sets defined by
filters (is-a) and hierarchies of stored code systems, seen by the next request after a PUT."""

from __future__ import annotations

import httpx

from tests.helpers import uid

async def test_in_with_a_filtered_value_set_and_below(client: httpx.AsyncClient) -> None:
    tag = uid()
    cs = {
        "resourceType": "CodeSystem", "id": f"marital-{tag[:12]}", "url": f"http://example.org/cs/{tag}", "status": "active",
        "content": "complete", "hierarchyMeaning": "is-a",
        "concept": [{"code": "10", "display": "未婚"}, {"code": "20", "display": "已婚", "concept": [
            {"code": "21", "display": "初婚"}, {"code": "22", "display": "再婚"}]}, {"code": "30", "display": "丧偶"}],
    }
    system = cs["url"]
    vs = {"resourceType": "ValueSet", "id": f"married-{tag[:12]}", "url": f"http://example.org/vs/{tag}", "status": "active",
          "compose": {"include": [{"system": system, "filter": [{"property": "concept", "op": "is-a", "value": "20"}]}]}}
    for res in (cs, vs):
        r = await client.put(f"/{res['resourceType']}/{res['id']}", json=res)
        assert r.status_code == 201, r.text
    ids = {}
    for code in ("10", "21", "22", "30"):
        r = await client.post("/Observation", json={"resourceType": "Observation", "status": "final",
                                                    "identifier": [{"system": "http://example.org/t", "value": tag}],
                                                    "code": {"coding": [{"system": system, "code": code}]}})
        ids[r.json()["id"]] = code

    async def codes(query: str) -> set[str]:
        r = await client.get(f"/Observation?identifier=http://example.org/t|{tag}&{query}")
        assert r.status_code == 200, r.text
        return {ids[e["resource"]["id"]] for e in r.json().get("entry", [])}

    assert await codes(f"code:in={vs['url']}") == {"21", "22"}
    assert await codes(f"code:not-in={vs['url']}") == {"10", "30"}
    assert await codes(f"code:below={system}|20") == {"21", "22"}
    assert await codes(f"code:above={system}|21") == {"21"}
    # the value set changes: the next search follows
    vs["compose"]["include"][0]["filter"][0]["value"] = "10"
    r = await client.put(f"/ValueSet/{vs['id']}", json=vs)
    assert r.status_code == 200
    assert await codes(f"code:in={vs['url']}") == {"10"}
