"""``$reindex`` at system level: recompute stored search values in the background, with progress.

    POST [base]/$reindex[?url=<SearchParameter url>]   202 + Parameters naming the job
    GET  [base]/$reindex?job=<id>                       200 + Parameters: status, total, done, percent

``url`` (repeatable; also as form parameters or in a Parameters body) limits the job to the base
types of those parameters (built-in or custom); without it every type with data is re-indexed.
The 202 carries ``Content-Location`` with the status URL.
"""

from __future__ import annotations

from typing import Any

from fhir_server.interactions._resource import instant
from fhir_server.interactions.context import FhirRequest, FhirResponse, Server
from fhir_server.interactions.operation import register
from fhir_server.outcome import FhirError, bad_request
from fhir_server.search.parameters import parameter_by_url
from fhir_server.search.reindex import Job, percent

_ANY_TYPE = frozenset({"Resource", "DomainResource"})
_URL_VALUES = ("valueUri", "valueCanonical", "valueUrl", "valueString")


async def reindex(server: Server, req: FhirRequest) -> FhirResponse:
    reindexer = server.reindexer
    if reindexer is None:
        raise FhirError.of(501, "not-supported", "This server does not run re-index jobs")
    if req.method == "GET":
        job_id = req.param("job")
        if not job_id:
            raise bad_request("GET $reindex needs the job parameter (the id a POST $reindex answered)", expression=["job"])
        job = await reindexer.job(job_id)
        if job is None:
            raise FhirError.of(404, "not-found", f"No re-index job {job_id[:80]!r}")
        return FhirResponse(200, resource=parameters(job))
    urls = [v for k, v in req.query if k == "url"] + _body_urls(req.body)
    existing = await server.store.types()
    types: set[str] = set()
    for url in urls:
        sp = parameter_by_url(url)
        if sp is None:
            raise bad_request(f"No search parameter has the url {url[:200]!r}", expression=["url"], code="not-found")
        types |= existing if _ANY_TYPE & set(sp.base) else existing & set(sp.base)
    job = await reindexer.start(params=urls, types=sorted(types) if urls else None)
    location = f"{req.base_url}/$reindex?job={job['_id']}"
    return FhirResponse(202, resource=parameters(job), headers={"Content-Location": location})


def _body_urls(body: Any) -> list[str]:
    if body is None:
        return []
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise bad_request("The body of POST $reindex must be a Parameters resource", code="structure")
    urls = []
    for i, p in enumerate(body.get("parameter") or []):
        if isinstance(p, dict) and p.get("name") == "url":
            value = next((p[k] for k in _URL_VALUES if isinstance(p.get(k), str)), None)
            if value is None:
                raise bad_request("The url parameter needs a valueUri", expression=[f"Parameters.parameter[{i}]"])
            urls.append(value)
    return urls


def parameters(job: Job) -> dict[str, Any]:
    """A job as a Parameters resource."""
    out: list[dict[str, Any]] = [
        {"name": "job", "valueString": job["_id"]},
        {"name": "status", "valueCode": job["status"]},
    ]
    if job.get("total") is not None:
        out.append({"name": "total", "valueInteger": job["total"]})
    out.append({"name": "done", "valueInteger": job.get("done") or 0})
    out.append({"name": "percent", "valueDecimal": percent(job)})
    out += [{"name": "url", "valueUri": u} for u in job.get("params") or ()]
    out += [{"name": "type", "valueCode": t} for t in job.get("types") or ()]
    for name in ("started", "finished"):
        if job.get(name) is not None:
            out.append({"name": name, "valueInstant": instant(job[name])})
    if job.get("error"):
        out.append({"name": "error", "valueString": job["error"]})
    return {"resourceType": "Parameters", "parameter": out}


register("reindex", reindex, levels={"system"})
