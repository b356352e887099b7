"""Terminology operations (terminology-service.html), over the server's conformance registry:

    CodeSystem/$lookup          [base]/CodeSystem/$lookup?system=..&code=..   and CodeSystem/{id}/$lookup?code=..
    ValueSet/$expand            [base]/ValueSet/$expand?url=..&filter=..&count=..&offset=..   and ValueSet/{id}/$expand
    ValueSet/$validate-code     url/valueSet + code&system(&display) | coding | codeableConcept
    CodeSystem/$validate-code   url + code(&display) | coding | codeableConcept
    ConceptMap/$translate       url/conceptMap or source/target + system&code | coding | codeableConcept

GET takes the parameters from the query (a ``coding`` as ``system|code``); POST from a Parameters
body or a form. Results are Parameters (ValueSet for $expand). An unknown value set, code system,
concept map or code is a 404 and a missing parameter a 400, each an OperationOutcome with a
Chinese ``details.text``.
"""

from __future__ import annotations

from typing import Any, NoReturn

import orjson

from fhir_server.interactions.context import FhirRequest, FhirResponse, Server
from fhir_server.interactions.operation import register
from fhir_server.outcome import FhirError
from fhir_server.terminology.service import (
    CodeValidation,
    LookupResult,
    TerminologyError,
    terminology_for,
)

Coding = tuple[str | None, str, str | None]  # system, code, display


class _Params:
    """The operation's input parameters by name, from the query, a form or a Parameters body."""

    def __init__(self, req: FhirRequest, op: str) -> None:
        self.op = op
        self.values: dict[str, list[Any]] = {}
        for k, v in req.query:
            if not k.startswith("_"):
                self.values.setdefault(k, []).append(v)
        body = req.body
        if body is None:
            return
        if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
            _bad(f"The body of POST ${op} must be a Parameters resource", f"${op} 的请求体必须是 Parameters 资源", "structure")
        for i, p in enumerate(body.get("parameter") or ()):
            if not isinstance(p, dict) or not isinstance(p.get("name"), str):
                _bad(f"Parameters.parameter[{i}] has no name", f"第 {i + 1} 个参数缺少 name", "structure")
            value = p.get("resource") if "resource" in p else next((p[k] for k in p if k.startswith("value")), None)
            if value is not None:
                self.values.setdefault(p["name"], []).append(value)

    def all(self, name: str) -> list[Any]:
        return self.values.get(name, [])

    def text(self, name: str) -> str | None:
        values = self.values.get(name)
        if not values:
            return None
        if isinstance(values[0], (dict, list)):
            _bad(f"The parameter {name} of ${self.op} must be a simple value", f"参数 {name} 必须是简单值", expression=name)
        return str(values[0]).lower() if isinstance(values[0], bool) else str(values[0])

    def integer(self, name: str) -> int | None:
        raw = self.text(name)
        if raw is None:
            return None
        try:
            value = int(raw) if len(raw) <= 12 else -1
        except ValueError:
            value = -1
        if not 0 <= value <= _MAX_INTEGER:
            _bad(
                f"The parameter {name} must be an integer from 0 to {_MAX_INTEGER}, got {raw[:40]!r}",
                f"参数 {name} 必须是 0 到 {_MAX_INTEGER} 之间的整数",
                expression=name,
            )
        return value

    def boolean(self, name: str) -> bool:
        return (self.text(name) or "").strip().lower() == "true"

    def resource(self, name: str, type_: str) -> dict[str, Any] | None:
        values = self.values.get(name)
        if not values:
            return None
        value = values[0]
        if not isinstance(value, dict) or value.get("resourceType") != type_:
            _bad(f"The parameter {name} must hold a {type_} resource", f"参数 {name} 必须是 {type_} 资源", expression=name)
        return value

    def coding(self, name: str) -> Coding | None:
        values = self.values.get(name)
        if not values:
            return None
        return _coding(values[0], name)

    def codeable(self, name: str) -> list[Coding] | None:
        values = self.values.get(name)
        if not values:
            return None
        cc = values[0]
        if not isinstance(cc, dict):
            _bad(f"The parameter {name} must be a CodeableConcept (POST a Parameters body)", f"参数 {name} 必须是 CodeableConcept", expression=name)
        codings = [_coding(c, name) for c in cc.get("coding") or ()]
        if not codings:
            _bad(f"The CodeableConcept in {name} has no coding with a code", f"参数 {name} 中没有带代码的 coding", expression=name)
        return codings


def _coding(value: Any, name: str) -> Coding:
    if isinstance(value, str):  # GET: system|code
        system, bar, code = value.rpartition("|")
        if code:
            return (system or None) if bar else None, code, None
    elif isinstance(value, dict) and isinstance(value.get("code"), str) and value["code"]:
        coding_system, display = value.get("system"), value.get("display")
        return (
            coding_system if isinstance(coding_system, str) else None,
            value["code"],
            display if isinstance(display, str) else None,
        )
    _bad(f"The parameter {name} must be a Coding with a code", f"参数 {name} 必须是含 code 的 Coding", expression=name)


# count / offset beyond this are nonsense (and would not fit the 32-bit FHIR integer).
_MAX_INTEGER = 2**31 - 1


def _bad(en: str, zh: str, code: str = "required", *, expression: str | None = None) -> NoReturn:
    raise FhirError.of(400, code, en, details_zh=zh, expression=[expression] if expression else ())


def _fail(e: TerminologyError) -> NoReturn:
    raise FhirError.of(e.status, e.code, e.en, details_zh=e.zh) from None


async def _instance(server: Server, req: FhirRequest) -> dict[str, Any] | None:
    """The resource an instance-level call names (read from the database: always its current version)."""
    if not req.id or not req.type:
        return None
    stored = await server.store.current(req.type, req.id)
    if stored is None or stored.deleted or not stored.raw:
        raise FhirError.of(
            404, "not-found", f"{req.type}/{req.id[:64]} is not known", details_zh=f"资源 {req.type}/{req.id[:64]} 不存在"
        )
    resource: dict[str, Any] = orjson.loads(stored.raw)
    return resource


def _parameters(*items: dict[str, Any] | None) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": [i for i in items if i]}


# -- $lookup -----------------------------------------------------------------------------------


async def lookup(server: Server, req: FhirRequest) -> FhirResponse:
    params = _Params(req, "lookup")
    code_system = await _instance(server, req)
    coding = params.coding("coding")
    system, code = (coding[0], coding[1]) if coding else (params.text("system"), params.text("code"))
    if code_system is not None:
        system = system or code_system.get("url")
    if not code:
        _bad("$lookup needs code (with system) or coding", "$lookup 需要参数 code（及 system）或 coding", expression="code")
    if not system and code_system is None:
        _bad("$lookup needs the system of the code", "$lookup 需要参数 system（代码系统）", expression="system")
    service = terminology_for(server.conformance)
    try:
        result = service.lookup(system or "", code, params.text("version"), code_system=code_system)
    except TerminologyError as e:
        _fail(e)
    wanted = {str(p) for p in params.all("property")}
    return FhirResponse(200, resource=_lookup_parameters(result, wanted, params.text("displayLanguage")))


def _lookup_parameters(r: LookupResult, wanted: set[str], language: str | None) -> dict[str, Any]:
    display = r.display
    if language:
        for d in r.designations:
            lang = str(d.get("language") or "").lower()
            if lang and lang.split("-")[0] == language.lower().split("-")[0] and d.get("value"):
                display = str(d["value"])
                break
    out: list[dict[str, Any]] = [{"name": "name", "valueString": r.name}]
    if r.version:
        out.append({"name": "version", "valueString": r.version})
    out.append({"name": "display", "valueString": display or r.code})
    if r.definition and (not wanted or "definition" in wanted):
        out.append({"name": "definition", "valueString": r.definition})
    if r.abstract:
        out.append({"name": "abstract", "valueBoolean": True})
    if not wanted or "designation" in wanted:
        for d in r.designations:
            part: list[dict[str, Any]] = []
            if d.get("language"):
                part.append({"name": "language", "valueCode": d["language"]})
            if isinstance(d.get("use"), dict):
                part.append({"name": "use", "valueCoding": d["use"]})
            part.append({"name": "value", "valueString": str(d.get("value", ""))})
            out.append({"name": "designation", "part": part})
    for code, key, value in r.properties:
        if wanted and code not in wanted:
            continue
        out.append({"name": "property", "part": [{"name": "code", "valueCode": code}, {"name": "value", key: value}]})
    return {"resourceType": "Parameters", "parameter": out}


# -- $expand -----------------------------------------------------------------------------------


def _value_set(params: "_Params", instance: dict[str, Any] | None, op: str, instance_form: str) -> str | dict[str, Any]:
    """The value set an operation works on: the instance, a valueSet resource, or url(+version)."""
    value_set: str | dict[str, Any] | None = instance or params.resource("valueSet", "ValueSet")
    if value_set is not None:
        return value_set
    url = params.text("url")
    if not url:
        _bad(
            f"{op} needs the value set: url, a valueSet resource, or {instance_form}",
            f"{op} 需要指定值集：参数 url、valueSet，或使用 {instance_form}",
            expression="url",
        )
    version = params.text("valueSetVersion")
    return f"{url}|{version}" if version and "|" not in url else url


async def expand(server: Server, req: FhirRequest) -> FhirResponse:
    params = _Params(req, "expand")
    value_set = _value_set(params, await _instance(server, req), "$expand", "ValueSet/{id}/$expand")
    service = terminology_for(server.conformance)
    try:
        result = service.expand(
            value_set,
            filter=params.text("filter"),
            offset=params.integer("offset") or 0,
            count=params.integer("count"),
            display_language=params.text("displayLanguage"),
            include_designations=params.boolean("includeDesignations"),
            active_only=params.boolean("activeOnly"),
        )
    except TerminologyError as e:
        _fail(e)
    return FhirResponse(200, resource=result)


# -- $validate-code ----------------------------------------------------------------------------


def _codings(params: _Params, op_target: str) -> list[Coding]:
    cc = params.codeable("codeableConcept")
    if cc:
        return cc
    coding = params.coding("coding")
    if coding:
        return [coding]
    code = params.text("code")
    if not code:
        _bad(
            f"$validate-code on {op_target} needs code, coding or codeableConcept",
            "$validate-code 需要参数 code、coding 或 codeableConcept",
            expression="code",
        )
    return [(params.text("system"), code, params.text("display"))]


async def validate_code(server: Server, req: FhirRequest) -> FhirResponse:
    params = _Params(req, "validate-code")
    service = terminology_for(server.conformance)
    instance = await _instance(server, req)
    try:
        if req.type == "CodeSystem":
            result = _validate_in_code_system(service, params, instance)
        else:
            value_set = _value_set(params, instance, "ValueSet/$validate-code", "ValueSet/{id}/$validate-code")
            codings = _codings(params, "ValueSet")
            display = params.text("display")
            if display and len(codings) == 1 and codings[0][2] is None:
                codings = [(codings[0][0], codings[0][1], display)]
            result = service.validate_code(value_set, codings)
    except TerminologyError as e:
        _fail(e)
    return FhirResponse(200, resource=_validation_parameters(result))


def _validate_in_code_system(service: Any, params: _Params, instance: dict[str, Any] | None) -> CodeValidation:
    url = (instance or {}).get("url") or params.text("url") or params.text("system")
    codings = _codings(params, "CodeSystem")
    if instance is None and not url:
        system = codings[0][0]
        if not system:
            _bad(
                "CodeSystem/$validate-code needs url (the code system)",
                "CodeSystem/$validate-code 需要参数 url（代码系统）",
                expression="url",
            )
        url = system
    display = params.text("display")
    failures: list[CodeValidation] = []
    for system, code, coding_display in codings:
        if system and url and system != url:
            failures.append(
                CodeValidation(
                    False,
                    f"代码 {code} 的代码系统 {system} 不是 {url}。The coding's system {system} is not {url}",
                    None,
                    system,
                    code,
                )
            )
            continue
        result = service.validate_code_in_system(
            str(url), code, coding_display or display, params.text("version"), code_system=instance
        )
        if result.result:
            return result  # type: ignore[no-any-return]
        failures.append(result)
    return failures[0]


def _validation_parameters(result: CodeValidation) -> dict[str, Any]:
    return _parameters(
        {"name": "result", "valueBoolean": result.result},
        {"name": "message", "valueString": result.message} if result.message else None,
        {"name": "display", "valueString": result.display} if result.display else None,
    )


# -- $translate --------------------------------------------------------------------------------


async def translate(server: Server, req: FhirRequest) -> FhirResponse:
    params = _Params(req, "translate")
    concept_map = await _instance(server, req) or params.resource("conceptMap", "ConceptMap")
    cc = params.codeable("codeableConcept")
    coding = params.coding("coding")
    if cc:
        codings = cc
    elif coding:
        codings = [coding]
    else:
        code = params.text("code")
        if not code:
            _bad("$translate needs code (with system), coding or codeableConcept", "$translate 需要参数 code（及 system）、coding 或 codeableConcept", expression="code")
        system = params.text("system")
        if not system:
            _bad("$translate needs the system of the code", "$translate 需要参数 system（源代码系统）", expression="system")
        codings = [(system, code, None)]
    map_url = params.text("url")
    version = params.text("conceptMapVersion")
    if map_url and version and "|" not in map_url:
        map_url = f"{map_url}|{version}"
    service = terminology_for(server.conformance)
    try:
        results = [
            service.translate(
                system,
                code,
                concept_map=concept_map,
                map_url=map_url,
                source_vs=params.text("source"),
                target_vs=params.text("target"),
                target_system=params.text("targetsystem"),
                reverse=params.boolean("reverse"),
            )
            for system, code, _ in codings
        ]
    except TerminologyError as e:
        _fail(e)
    best = next((r for r in results if r.result), results[0])
    out: list[dict[str, Any]] = [
        {"name": "result", "valueBoolean": best.result},
        {"name": "message", "valueString": best.message},
    ]
    for r in results:
        for m in r.matches:
            part: list[dict[str, Any]] = [{"name": "equivalence", "valueCode": m.equivalence}]
            if m.code:
                concept = {k: v for k, v in (("system", m.system), ("code", m.code), ("display", m.display)) if v}
                part.append({"name": "concept", "valueCoding": concept})
            if m.source:
                part.append({"name": "source", "valueUri": m.source})
            out.append({"name": "match", "part": part})
    return FhirResponse(200, resource={"resourceType": "Parameters", "parameter": out})


register("lookup", lookup, levels={"type", "instance"}, types={"CodeSystem"})
register("expand", expand, levels={"type", "instance"}, types={"ValueSet"})
register("validate-code", validate_code, levels={"type", "instance"}, types={"ValueSet", "CodeSystem"})
register("translate", translate, levels={"type", "instance"}, types={"ConceptMap"})
