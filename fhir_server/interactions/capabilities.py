"""capabilities (http.html#capabilities): a CapabilityStatement generated from what the server does."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from fhir_server import __version__
from fhir_server.definitions import RESOURCE_TYPES
from fhir_server.interactions.context import FhirRequest, FhirResponse, Server
from fhir_server.interactions.operation import registered
from fhir_server.search.parameters import SPECIAL, on_change, params_for
from fhir_server.validation.validator import parse_required_profiles

# The search parameter types the query compiler answers today (search/query.py).
_SEARCHABLE_TYPES = {"token", "string", "reference", "date", "uri", "number", "quantity", "composite"}
_TYPE_INTERACTIONS = ["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create", "search-type"]


@lru_cache(maxsize=4)
def _statement(base_url: str, conditional_delete: str) -> dict[str, Any]:
    resources = []
    for type_ in sorted(RESOURCE_TYPES):
        params = [{"name": "_id", "type": "token"}, {"name": "_lastUpdated", "type": "date"}]
        for code, sp in sorted(params_for(type_).items()):
            if code in SPECIAL or sp.type not in _SEARCHABLE_TYPES:
                continue
            params.append({"name": code, "definition": sp.url, "type": sp.type})
        resources.append(
            {
                "type": type_,
                "interaction": [{"code": c} for c in _TYPE_INTERACTIONS],
                "versioning": "versioned-update",
                "readHistory": True,
                "updateCreate": True,
                "conditionalCreate": True,
                "conditionalRead": "full-support",
                "conditionalUpdate": True,
                "conditionalDelete": conditional_delete,
                "referencePolicy": ["literal", "logical", "enforced", "local"],
                "searchParam": params,
                "searchInclude": ["*"] + [f"{type_}:{c}" for c, sp in sorted(params_for(type_).items()) if sp.type == "reference"],
                "searchRevInclude": sorted(_revincludes().get(type_, ())),
            }
        )
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-22",
        "publisher": "fhir-server-cn",
        "kind": "instance",
        "software": {"name": "fhir-server-cn", "version": __version__},
        "implementation": {"description": "FHIR R4 server for China's regional health-information exchange", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json", "application/fhir+json"],
        "rest": [
            {
                "mode": "server",
                "resource": resources,
                "interaction": [
                    {"code": "transaction"},
                    {"code": "batch"},
                    {"code": "search-system"},
                    {"code": "history-system"},
                ],
                "compartment": [f"http://hl7.org/fhir/CompartmentDefinition/{c[0].lower() + c[1:]}" for c in _compartments()],
                "operation": [
                    {"name": op.name, "definition": _HL7_OPERATIONS.get(op.name, f"{base_url}/OperationDefinition/{op.name}")}
                    for op in registered()
                ],
            }
        ],
    }


# Operations the specification defines: their official definitions (the others are this server's).
_HL7_OPERATIONS = {
    name: f"http://hl7.org/fhir/OperationDefinition/{definition}"
    for name, definition in {
        "validate": "Resource-validate",
        "expand": "ValueSet-expand",
        "lookup": "CodeSystem-lookup",
        "validate-code": "ValueSet-validate-code",
        "translate": "ConceptMap-translate",
        "match": "Patient-match",
        "everything": "Patient-everything",
    }.items()
}


@lru_cache(maxsize=1)
def _revincludes() -> dict[str, list[str]]:
    """For each type, the ``Source:param`` references that can point at it."""
    out: dict[str, list[str]] = {}
    for source in sorted(RESOURCE_TYPES):
        for code, sp in params_for(source).items():
            if sp.type == "reference":
                for target in sp.targets:
                    out.setdefault(target, []).append(f"{source}:{code}")
    return out


def _compartments() -> tuple[str, ...]:
    from fhir_server.search.compartments import compartment_types

    return compartment_types()


# Custom SearchParameters registered at run time must show up in the next statement.
on_change(_statement.cache_clear)
on_change(_revincludes.cache_clear)


async def capabilities(server: Server, req: FhirRequest) -> FhirResponse:
    statement = _statement(req.base_url, "multiple" if server.settings.conditional_delete == "multiple" else "single")
    return FhirResponse(200, resource=_with_security(_with_profiles(statement, server), server, req.base_url))


_SECURITY_SERVICE = "http://terminology.hl7.org/CodeSystem/restful-security-service"
_OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"


def _with_security(statement: dict[str, Any], server: Server, base_url: str) -> dict[str, Any]:
    """rest.security when access control is on: SMART on FHIR, and where to get tokens (the
    development authorization server's endpoints; an external provider's are in its own discovery)."""
    settings = server.settings
    if not settings.auth_enabled:
        return statement
    from urllib.parse import urlsplit

    from fhir_server.auth import _urls

    security: dict[str, Any] = {
        "cors": True,
        "service": [
            {
                "coding": [{"system": _SECURITY_SERVICE, "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}],
                "text": "OAuth2 bearer tokens with SMART on FHIR scopes (v1 and v2): system/ (hospitals), user/ (staff), patient/ (residents)",
            }
        ],
        "description": "访问需要 Bearer 令牌（SMART on FHIR）/ Every request except /metadata needs a bearer token; see .well-known/smart-configuration",
    }
    if settings.auth_dev_server:
        u = urlsplit(base_url)
        auth = _urls.origin(settings, f"{u.scheme}://{u.netloc}" if u.netloc else None) + "/auth"
        security["extension"] = [
            {
                "url": _OAUTH_URIS,
                "extension": [
                    {"url": "token", "valueUri": auth + "/token"},
                    {"url": "authorize", "valueUri": auth + "/authorize"},
                ],
            }
        ]
    rest = {**statement["rest"][0], "security": security}
    return {**statement, "rest": [rest, *statement["rest"][1:]]}


def _with_profiles(statement: dict[str, Any], server: Server) -> dict[str, Any]:
    """The statement with the profiles and implementation guides the server holds now (stored
    StructureDefinitions change at run time; the cached statement is not modified)."""
    registry = server.conformance
    by_type: dict[str, list[str]] = {}
    for sd in registry.all("StructureDefinition"):
        if sd.get("derivation") == "constraint" and sd.get("kind") == "resource" and sd.get("url") and sd.get("status") != "retired":
            by_type.setdefault(str(sd.get("type")), []).append(sd["url"])
    for type_, required in parse_required_profiles(server.settings.required_profiles).items():
        by_type.setdefault(type_, []).extend(u for u in required if u not in by_type.get(type_, []))
    guides = sorted(ig["url"] for ig in registry.all("ImplementationGuide") if ig.get("url"))
    if not by_type and not guides:
        return statement
    rest = dict(statement["rest"][0])
    rest["resource"] = [
        {**r, "supportedProfile": sorted(by_type[r["type"]])} if r["type"] in by_type else r for r in rest["resource"]
    ]
    out = {**statement, "rest": [rest, *statement["rest"][1:]]}
    if guides:
        out["implementationGuide"] = guides
    return out
