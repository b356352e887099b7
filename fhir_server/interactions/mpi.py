"""The master patient index's FHIR operations (fhir_server/mpi).

    POST [base]/Patient/$match           Parameters(resource, onlyCertainMatches, count) → searchset of
                                         golden Patients with search.score and the match-grade extension
    POST [base]/Patient/$mpi-resolve     Parameters(task, golden?) → close a review Task: link its source
                                         to ``golden``, or to a new golden when absent
    POST [base]/Patient/$merge           Parameters(source-patient, target-patient) → merge two goldens
    POST [base]/Patient/$unmerge         Parameters(merge | source-patient + target-patient) → undo a merge
    GET  [base]/Patient/[id]/$everything the golden, its sources and every resource in their
                                         compartments (``_type``, ``_count``, ``_offset``)

The review queue itself is ordinary Task search: ``Task?code=<mpi>|mpi-review&status=requested``.
"""

from __future__ import annotations

from typing import Any

import orjson

from fhir_server.interactions._resource import check_id
from fhir_server.interactions.context import FhirRequest, FhirResponse, Server, Tx
from fhir_server.interactions.operation import register
from fhir_server.mpi import golden as g
from fhir_server.mpi.candidates import candidates, sources_of
from fhir_server.mpi.linker import TYPES, not_found, resolve_in
from fhir_server.mpi.match import demographics, grade
from fhir_server.mpi.merge import find_merge, merge_in, unmerge_in
from fhir_server.outcome import FhirError, Issue, operation_outcome
from fhir_server.search.compartments import DEF, compartment_members, compartment_params

MATCH_GRADE = "http://hl7.org/fhir/StructureDefinition/match-grade"
_EVERYTHING_MAX = 10_000
_GRADE_ZH = {"certain": "确定匹配", "probable": "很可能匹配", "possible": "可能匹配", "certainly-not": "确定不匹配"}


def _error(status: int, code: str, diagnostics: str, zh: str, expression: str | None = None) -> FhirError:
    return FhirError.of(status, code, diagnostics, details_zh=zh, expression=[expression] if expression else [])


def _params(req: FhirRequest) -> dict[str, list[dict[str, Any]]]:
    """Parameters by name, from a Parameters body and from the query (as valueString)."""
    out: dict[str, list[dict[str, Any]]] = {}
    body = req.body
    if body is not None:
        if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
            raise _error(400, "structure", "The body must be a Parameters resource", "请求体必须是 Parameters 资源")
        for p in body.get("parameter") or ():
            if isinstance(p, dict) and isinstance(p.get("name"), str):
                out.setdefault(p["name"], []).append(p)
    for k, v in req.query:
        if not k.startswith("_"):
            out.setdefault(k, []).append({"name": k, "valueString": v})
    return out


def _one(params: dict[str, list[dict[str, Any]]], name: str) -> dict[str, Any] | None:
    values = params.get(name) or []
    if len(values) > 1:
        raise _error(400, "invalid", f"Parameter {name} may appear once", f"参数 {name} 只能出现一次", name)
    return values[0] if values else None


def _ref(params: dict[str, list[dict[str, Any]]], name: str, type_: str, required: bool = True) -> str | None:
    """The id of a ``type_`` reference parameter (valueReference, or a string ``Type/id`` / ``id``)."""
    p = _one(params, name)
    if p is None:
        if required:
            raise _error(400, "required", f"Parameter {name} is required", f"缺少参数 {name}", name)
        return None
    value = (p.get("valueReference") or {}).get("reference") if isinstance(p.get("valueReference"), dict) else None
    value = value or p.get("valueString") or p.get("valueId")
    if not isinstance(value, str) or not value:
        raise _error(400, "invalid", f"Parameter {name} must be a reference to a {type_}", f"参数 {name} 必须引用 {type_} 资源", name)
    parts = value.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] != type_:
        raise _error(400, "invalid", f"Parameter {name} must be a reference to a {type_}", f"参数 {name} 必须引用 {type_} 资源", name)
    check_id(parts[-1])
    return parts[-1]


def _bool(params: dict[str, list[dict[str, Any]]], name: str) -> bool:
    p = _one(params, name)
    if p is None:
        return False
    value = p.get("valueBoolean", p.get("valueString"))
    if value in (True, "true"):
        return True
    if value in (False, "false"):
        return False
    raise _error(400, "invalid", f"Parameter {name} must be a boolean", f"参数 {name} 必须为布尔值", name)


def _int(params: dict[str, list[dict[str, Any]]], name: str, default: int, high: int) -> int:
    p = _one(params, name)
    if p is None:
        return default
    value = p.get("valueInteger", p.get("valuePositiveInt", p.get("valueString")))
    try:
        n = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _error(400, "invalid", f"Parameter {name} must be an integer", f"参数 {name} 必须为整数", name) from None
    if n < 1:
        raise _error(400, "invalid", f"Parameter {name} must be at least 1", f"参数 {name} 必须大于 0", name)
    return min(n, high)


# -- $match ------------------------------------------------------------------------------------


async def match(server: Server, req: FhirRequest) -> FhirResponse:
    params = _params(req)
    p = _one(params, "resource")
    resource = p.get("resource") if p else None
    if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
        raise _error(400, "required", "Parameter resource must hold a Patient", "参数 resource 必须是 Patient 资源", "resource")
    only_certain = _bool(params, "onlyCertainMatches")
    count = _int(params, "count", server.settings.default_count, server.settings.max_count)
    s = server.settings
    demo = demographics(resource)
    exclude = {resource["id"]} if isinstance(resource.get("id"), str) else set()
    found, _ = await candidates(server.store, demo, exclude)  # type: ignore[arg-type]
    graded = [(c, grade(c.comparison, s.mpi_auto_link, s.mpi_review)) for c in found]
    graded = [(c, gr) for c, gr in graded if gr != "certainly-not" and (gr == "certain" or not only_certain)]
    graded = graded[:count]
    rows = await server.store.find("Patient", {"_id": {"$in": [c.golden for c, _ in graded]}}, limit=len(graded) + 1) if graded else []
    by_id = {r.id: r for r in rows if r.raw}
    entries = []
    for c, gr in graded:
        row = by_id.get(c.golden)
        if row is None:
            continue
        entries.append(
            {
                "fullUrl": f"{req.base_url}/Patient/{c.golden}",
                "resource": orjson.Fragment(row.raw),  # type: ignore[arg-type]
                "search": {
                    "extension": [{"url": MATCH_GRADE, "valueCode": gr}],
                    "mode": "match",
                    "score": c.score,
                },
            }
        )
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(entries)}
    if entries:
        bundle["entry"] = entries
    return FhirResponse(200, resource=bundle)


# -- review, merge, unmerge -----------------------------------------------------------------------


def _parameters(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(parts)}


async def resolve(server: Server, req: FhirRequest) -> FhirResponse:
    params = _params(req)
    task_id = _ref(params, "task", "Task")
    golden_id = _ref(params, "golden", "Patient", required=False)
    assert task_id is not None
    _, result = await server.transact(lambda tx: resolve_in(tx, task_id, golden_id), set(TYPES))
    assert result.golden is not None
    zh = f"源记录已关联到主索引 Patient/{result.golden}" if golden_id else f"已为源记录新建主索引 Patient/{result.golden}"
    return FhirResponse(
        200,
        resource=_parameters(
            {"name": "golden", "valueReference": {"reference": f"Patient/{result.golden}"}},
            {"name": "decision", "valueCode": result.decision},
            {"name": "score", "valueDecimal": result.score},
            {"name": "task", "valueReference": {"reference": f"Task/{task_id}"}},
            {"name": "outcome", "resource": operation_outcome([Issue("informational", "Review task resolved", "information", (), zh)])},
        ),
    )


async def merge(server: Server, req: FhirRequest) -> FhirResponse:
    params = _params(req)
    source_id = _ref(params, "source-patient", "Patient")
    target_id = _ref(params, "target-patient", "Patient")
    assert source_id and target_id

    async def work(tx: Tx) -> tuple[dict[str, Any], dict[str, Any] | None]:
        task = await merge_in(tx, source_id, target_id)
        stored = await tx.unit.current("Patient", target_id)
        return task, orjson.loads(stored.raw) if stored and stored.raw else None

    task, target = await server.transact(work, set(TYPES))
    zh = f"主索引 Patient/{source_id} 已合并到 Patient/{target_id}"
    return FhirResponse(
        200,
        resource=_parameters(
            {"name": "outcome", "resource": operation_outcome([Issue("informational", "Merged", "information", (), zh)])},
            {"name": "result", "resource": target},
            {"name": "merge", "valueReference": {"reference": f"Task/{task['id']}"}},
        ),
    )


async def unmerge(server: Server, req: FhirRequest) -> FhirResponse:
    params = _params(req)
    task_id = _ref(params, "merge", "Task", required=False)
    source_id = target_id = None
    if task_id is None:
        source_id = _ref(params, "source-patient", "Patient")
        target_id = _ref(params, "target-patient", "Patient")

    async def work(tx: Tx) -> dict[str, Any]:
        tid = task_id or await find_merge(tx, source_id, target_id)  # type: ignore[arg-type]
        return await unmerge_in(tx, tid)

    task = await server.transact(work, set(TYPES))
    zh = f"已撤销合并记录 Task/{task['id']}"
    return FhirResponse(
        200,
        resource=_parameters(
            {"name": "outcome", "resource": operation_outcome([Issue("informational", "Merge undone", "information", (), zh)])},
            {"name": "merge", "valueReference": {"reference": f"Task/{task['id']}"}},
        ),
    )


# -- $everything -------------------------------------------------------------------------------


def _query_int(query: list[tuple[str, str]], name: str, default: int) -> int:
    value = next((v for k, v in query if k == name), None)
    if value is None:
        return default
    if not value.isdigit() or (name == "_count" and int(value) == 0):
        raise _error(400, "invalid", f"{name} must be a positive integer", f"{name} 必须为正整数", name)
    return int(value)


async def everything(server: Server, req: FhirRequest) -> FhirResponse:
    assert req.id is not None
    check_id(req.id)
    store = server.store
    stored = await store.current("Patient", req.id)
    if stored is None or stored.raw is None:
        raise not_found(f"Patient/{req.id}")
    patient = orjson.loads(stored.raw)
    golden_id = req.id
    if not g.is_golden(patient):
        # A source record: the whole record is its golden's (a source not yet linked stands alone).
        golden_id = g.golden_of(patient) or req.id
    golden_row = await store.current("Patient", golden_id) if golden_id != req.id else stored
    golden = orjson.loads(golden_row.raw) if golden_row and golden_row.raw else patient
    linked = (await sources_of(store, [golden_id])).get(golden_id, []) if g.is_golden(golden) else []  # type: ignore[arg-type]
    members = [golden_id] + [row.id for row, _ in linked if row.id != golden_id]
    targets = [f"Patient/{m}" for m in members]
    query = [(k, v) for k, v in req.query if k not in ("_format", "_pretty")]
    wanted = {t.strip() for k, v in query if k == "_type" for t in v.split(",") if t.strip()}
    count = min(_query_int(query, "_count", server.settings.default_count), server.settings.max_count)
    offset = _query_int(query, "_offset", 0)
    keys: list[tuple[str, str]] = [("Patient", m) for m in members] if not wanted or "Patient" in wanted else []
    existing = await store.types()
    truncated = False
    for type_ in compartment_members("Patient"):
        if type_ == "Patient" or type_ not in existing or (wanted and type_ not in wanted):
            continue
        ors = [{"s." + p: {"$in": targets}} for p in compartment_params("Patient", type_) if p != DEF]
        if not ors:
            continue
        flt = ors[0] if len(ors) == 1 else {"$or": ors}
        allowed = req.access.filter(type_) if req.access is not None else None  # the caller's rights
        if allowed is not None:
            flt = {"$and": [flt, allowed]}
        ids = await store.find_ids(type_, flt, _EVERYTHING_MAX + 1)
        truncated = truncated or len(ids) > _EVERYTHING_MAX
        keys += [(type_, i) for i in sorted(ids[:_EVERYTHING_MAX])]
        if len(keys) > _EVERYTHING_MAX:
            truncated, keys = True, keys[:_EVERYTHING_MAX]
    page = keys[offset : offset + count]
    by_type: dict[str, list[str]] = {}
    for t, i in page:
        by_type.setdefault(t, []).append(i)
    rows = {}
    for t, ids in by_type.items():
        allowed = req.access.filter(t) if req.access is not None else None
        flt = {"_id": {"$in": ids}} if allowed is None else {"$and": [{"_id": {"$in": ids}}, allowed]}
        for r in await store.find(t, flt, limit=len(ids) + 1):
            rows[(t, r.id)] = r
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": f"{req.base_url}/{t}/{i}",
            "resource": orjson.Fragment(rows[(t, i)].raw),  # type: ignore[arg-type]
            "search": {"mode": "match"},
        }
        for t, i in page
        if (t, i) in rows and rows[(t, i)].raw
    ]
    if truncated:
        entries.append(
            {
                "resource": operation_outcome(
                    [Issue("too-costly", f"Only the first {_EVERYTHING_MAX} resources are listed", "warning", (), f"仅列出前 {_EVERYTHING_MAX} 条资源")]
                ),
                "search": {"mode": "outcome"},
            }
        )
    base = f"{req.base_url}/Patient/{req.id}/$everything"
    extra = [f"{k}={v}" for k, v in query if k == "_type"]

    def url(off: int) -> str:
        return base + "?" + "&".join(extra + [f"_count={count}", f"_offset={off}"])

    links = [{"relation": "self", "url": url(offset)}, {"relation": "first", "url": url(0)}]
    if offset + count < len(keys):
        links.append({"relation": "next", "url": url(offset + count)})
    if offset > 0:
        links.append({"relation": "previous", "url": url(max(0, offset - count))})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(keys), "link": links}
    if entries:
        bundle["entry"] = entries
    return FhirResponse(200, resource=bundle)


register("match", match, levels={"type"}, types={"Patient"}, methods={"POST"})
register("mpi-resolve", resolve, levels={"type"}, types={"Patient"}, methods={"POST"})
register("merge", merge, levels={"type"}, types={"Patient"}, methods={"POST"})
register("unmerge", unmerge, levels={"type"}, types={"Patient"}, methods={"POST"})
register("everything", everything, levels={"instance"}, types={"Patient"}, methods={"GET", "POST"})
