"""``$validate`` (resource-operation-validate): is this resource valid, against which profiles?

    POST [base]/[type]/$validate            body: the resource, or Parameters(resource, mode, profile)
    POST|GET [base]/[type]/[id]/$validate   without a resource: the stored current version

``profile`` (query or Parameters) adds a profile to those the resource claims and those the server
requires; ``mode`` is create | update | delete | profile. The answer is always 200 with an
OperationOutcome listing every issue (an invalid resource is a successful validation); a request
that cannot be understood (unknown mode, wrong type, no resource) is a 400.
"""

from __future__ import annotations

from typing import Any

import orjson

from fhir_server.interactions._resource import check_id
from fhir_server.interactions.context import FhirRequest, FhirResponse, Server, Tx
from fhir_server.interactions.operation import register
from fhir_server.outcome import Issue, bad_request, not_found, operation_outcome
from fhir_server.validation.registry_definitions import validator_for

_MODES = ("create", "update", "delete", "profile")
_URI_VALUES = ("valueUri", "valueCanonical", "valueUrl", "valueString")


def _arguments(req: FhirRequest) -> tuple[dict[str, Any] | None, str | None, list[str]]:
    """(resource, mode, profiles) from the query and the body."""
    mode = req.param("mode")
    profiles = [v for k, v in req.query if k == "profile"]
    body = req.body
    resource: dict[str, Any] | None = None
    if body is not None:
        if not isinstance(body, dict):
            raise bad_request("The body of $validate must be a resource or a Parameters resource", code="structure")
        is_parameters = body.get("resourceType") == "Parameters" and (
            req.type != "Parameters" or any(isinstance(p, dict) and p.get("name") == "resource" for p in body.get("parameter") or ())
        )
        if is_parameters:
            for i, p in enumerate(body.get("parameter") or ()):
                if not isinstance(p, dict):
                    continue
                name = p.get("name")
                if name == "resource":
                    if not isinstance(p.get("resource"), dict):
                        raise bad_request("Parameter resource must hold a resource", expression=[f"Parameters.parameter[{i}]"])
                    resource = p["resource"]
                elif name == "mode":
                    mode = p.get("valueCode") if isinstance(p.get("valueCode"), str) else mode
                elif name == "profile":
                    value = next((p[k] for k in _URI_VALUES if isinstance(p.get(k), str)), None)
                    if value is None:
                        raise bad_request("Parameter profile must be a uri", expression=[f"Parameters.parameter[{i}]"])
                    profiles.append(value)
        else:
            resource = body
    if mode is not None and mode not in _MODES:
        raise bad_request(f"Unknown $validate mode {mode[:40]!r}; use one of {', '.join(_MODES)}", expression=["mode"])
    return resource, mode, profiles


async def validate(server: Server, req: FhirRequest) -> FhirResponse:
    assert req.type is not None
    resource, mode, profiles = _arguments(req)
    issues: list[Issue] = []
    if req.id is not None:
        check_id(req.id)
    if mode == "delete":
        if req.id is None:
            raise bad_request("$validate with mode=delete needs an instance: [type]/[id]/$validate", expression=["mode"])
        return FhirResponse(200, resource=operation_outcome(await _delete_issues(server, req.type, req.id)))
    if resource is None:
        if req.id is None:
            raise bad_request("$validate needs a resource: in the body, or as the Parameters parameter resource")
        stored = await server.store.current(req.type, req.id)
        if stored is None or stored.raw is None:
            raise not_found(f"{req.type}/{req.id} is not known")
        resource = orjson.loads(stored.raw)
    if resource.get("resourceType") != req.type:
        raise bad_request(
            f"The resource is a {str(resource.get('resourceType'))[:40]}, not a {req.type}", expression=["resourceType"]
        )
    if mode == "update":
        if not resource.get("id"):
            issues.append(Issue("required", "An update needs the resource id", "error", (f"{req.type}.id",), "更新时资源必须有 id"))
        elif req.id is not None and resource.get("id") != req.id:
            issues.append(
                Issue("invalid", f"The resource id {resource.get('id')!r} differs from {req.id!r} in the URL", "error", (f"{req.type}.id",), "资源 id 与请求地址中的 id 不一致")
            )
    validator = validator_for(server.conformance, server.settings.required_profiles)
    issues += validator.validate(resource, profiles=profiles, max_depth=server.settings.max_json_depth)
    return FhirResponse(200, resource=operation_outcome(issues))


async def _delete_issues(server: Server, type_: str, id_: str) -> list[Issue]:
    if await server.store.current(type_, id_) is None:
        raise not_found(f"{type_}/{id_} is not known")
    if not server.settings.referential_integrity:
        return []

    async def referrer(tx: Tx) -> str | None:
        return await tx.unit.referenced_by(f"{type_}/{id_}", set())

    source = await server.transact(referrer)
    if source is None:
        return []
    return [
        Issue(
            "conflict",
            f"{type_}/{id_} cannot be deleted: {source} refers to it (referential integrity)",
            "error",
            (),
            f"无法删除 {type_}/{id_}：{source} 仍引用该资源",
        )
    ]


register("validate", validate, levels={"type", "instance"})
