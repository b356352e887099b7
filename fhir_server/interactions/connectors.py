"""The connectors' API: a hospital pushes a Bundle; operators list and replay dead letters.

- ``POST [base]/$ingest?source=CODE`` — a FHIR Bundle (transaction, batch or collection) from a
  registered hospital (mappings/fhir-push/sources.yaml), stored entry by entry under the identity
  and provenance rules of every connector (fhir_server/connectors/fhir_push.py). The answer is a
  Parameters with the counts and each refused entry with its reason.
- ``GET [base]/$dead-letters?source=CODE&status=open|resolved|all&_count=N`` — the records a
  connector could not store, with their reasons in Chinese and English.
- ``POST [base]/$dead-letters-replay?source=NAME|CODE[&key=K...]`` — run a pulled source's open
  dead letters through its current mapping again (after the mapping or the data was fixed).

Dead letters are not FHIR resources (they are what could not become one), so they are answered as
Parameters, like the other operations' reports.
"""

from __future__ import annotations

from typing import Any

from fhir_server.connectors import deadletter, pulled_connector, runner
from fhir_server.interactions.context import FhirRequest, FhirResponse, Server
from fhir_server.interactions.operation import register
from fhir_server.outcome import FhirError

_STATUSES = ("open", "resolved", "all")
_MAX_LETTERS = 1000


def _required(req: FhirRequest, name: str) -> str:
    value = req.param(name)
    if not value:
        raise FhirError.of(400, "required", f"Parameter {name} is required", details_zh=f"缺少参数 {name}", expression=[name])
    return value


def _count(name: str, value: int) -> dict[str, Any]:
    return {"name": name, "valueInteger": value}


def report_parameters(report: runner.SyncReport, letters: list[dict[str, Any]] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    """A sync or push report as Parameters: the counts, then one part per refused record."""
    params: list[dict[str, Any]] = [{"name": "source", "valueString": report.source}, {"name": "run", "valueString": report.run_id}]
    params += [_count(n, getattr(report, n)) for n in ("received", "created", "updated", "unchanged", "rejected", "linked")]
    params += [_letter(d) for d in letters]
    return {"resourceType": "Parameters", "parameter": params}


def _letter(d: dict[str, Any]) -> dict[str, Any]:
    parts = [
        {"name": "key", "valueString": d["_id"]},
        {"name": "source", "valueString": d["source"]},
        {"name": "kind", "valueString": d["kind"]},
        {"name": "record", "valueString": d["record_id"]},
        {"name": "code", "valueCode": d["code"]},
        {"name": "reason", "valueString": d["reason_zh"]},
        {"name": "reason-en", "valueString": d["reason_en"]},
        {"name": "status", "valueCode": d["status"]},
        {"name": "seen", "valueInteger": d.get("seen", 1)},
        {"name": "sha256", "valueString": d["sha256"]},
    ]
    for name in ("first_seen", "last_seen"):
        if d.get(name):
            parts.append({"name": name.replace("_", "-"), "valueInstant": d[name].isoformat().replace("+00:00", "Z")})
    return {"name": "letter", "part": parts}


async def ingest(server: Server, req: FhirRequest) -> FhirResponse:
    from fhir_server.connectors import fhir_push

    source = _required(req, "source")
    if req.raw_body is None:
        raise FhirError.of(400, "required", "$ingest takes a Bundle as its body", details_zh="$ingest 的请求体必须是 Bundle")
    report = await fhir_push.ingest(server, req.raw_body, source)
    letters = await deadletter.of_run(server, report.run_id) if report.rejected else []
    return FhirResponse(200, report_parameters(report, letters))


async def dead_letters(server: Server, req: FhirRequest) -> FhirResponse:
    status = req.param("status") or "open"
    if status not in _STATUSES:
        raise FhirError.of(400, "value", f"status must be one of {', '.join(_STATUSES)}", details_zh="status 只能是 open、resolved 或 all", expression=["status"])
    source = req.param("source")
    if source and (connector := pulled_connector(source)) is not None:
        source = connector.code
    raw_count = req.param("_count") or "100"
    if not raw_count.isdigit():
        raise FhirError.of(400, "value", "_count must be a whole number", details_zh="_count 必须是非负整数", expression=["_count"])
    letters = await deadletter.list_open(server, source, status=status, limit=min(int(raw_count), _MAX_LETTERS))
    total = await deadletter.count(server, source, status)
    body = {"resourceType": "Parameters", "parameter": [_count("total", total)] + [_letter(d) for d in letters]}
    return FhirResponse(200, body)


async def replay(server: Server, req: FhirRequest) -> FhirResponse:
    source = _required(req, "source")
    connector = pulled_connector(source)
    if connector is None:
        raise FhirError.of(
            400, "not-supported", f"{source[:60]} is not a pulled source; a pushing hospital sends the corrected entry again",
            details_zh=f"{source[:60]} 不是拉取式数据源；推送方请重新推送更正后的条目", expression=["source"],
        )
    keys = [v for k, v in req.query if k == "key"] or None
    report = await runner.replay_dead_letters(server, connector, keys=keys)
    letters = await deadletter.of_run(server, report.run_id) if report.rejected else []
    return FhirResponse(200, report_parameters(report, letters))


register("ingest", ingest, levels={"system"}, methods={"POST"})
register("dead-letters", dead_letters, levels={"system"}, methods={"GET"})
register("dead-letters-replay", replay, levels={"system"}, methods={"POST"})
