"""Merge two golden Patients (one resident found twice) and undo it.

merge(source golden → target golden), in one transaction:
- every source Patient of the source golden moves to the target: its ``refer`` link now points at
  the target, and its golden.link entry (with the recorded decision and score) moves over;
- the source golden becomes ``active: false`` with ``link = [{other: target, type: replaced-by}]``;
  the target gains ``{other: source golden, type: replaces}`` and is rebuilt from all its sources;
- a merge record is stored: a Task (code MPI|mpi-merge, status completed, focus = target) whose
  inputs hold the before-state - the source golden, the target, and each moved source's link entry.

unmerge(merge Task) moves exactly those sources back (those still linked to the target), restores
the source golden (active, rebuilt) and the target (without the ``replaces`` link), and marks the
merge Task ``businessStatus = undone``. Every change is a new version, so each Patient's history
shows the merge and the unmerge.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import orjson

from fhir_server.interactions._resource import instant
from fhir_server.interactions.context import Tx
from fhir_server.mpi import golden as g
from fhir_server.mpi.linker import not_found, refresh, write
from fhir_server.outcome import FhirError, bad_request
from fhir_server.storage.base import Stored

MERGE_CODE = "mpi-merge"
_T_SOURCE, _T_TARGET, _T_MOVED = "source-golden", "target-golden", "moved-source"


async def _golden(tx: Tx, id_: str, role: str) -> tuple[Stored, dict[str, Any]]:
    stored = await tx.unit.current("Patient", id_)
    if stored is None or stored.raw is None:
        raise not_found(f"Patient/{id_}")
    golden = orjson.loads(stored.raw)
    if not g.is_golden(golden):
        raise FhirError.of(
            400, "business-rule", f"The {role} Patient/{id_} is not a golden Patient",
            details_zh=f"Patient/{id_} 不是主索引，只能合并主索引",
        )
    return stored, golden


def _input(code: str, ref: str, extension: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {
        "type": {"coding": [{"system": g.MPI_SYSTEM, "code": code}]},
        "valueReference": {"reference": ref},
    }
    if extension:
        item = {"extension": extension, **item}
    return item


async def merge_in(tx: Tx, source_id: str, target_id: str) -> dict[str, Any]:
    """Merge golden ``source_id`` into golden ``target_id``; returns the merge Task."""
    if source_id == target_id:
        raise bad_request("source-patient and target-patient are the same Patient")
    s_stored, source = await _golden(tx, source_id, "source")
    t_stored, target = await _golden(tx, target_id, "target")
    for golden, id_ in ((source, source_id), (target, target_id)):
        if golden.get("active") is False:
            raise FhirError.of(
                409, "business-rule", f"Patient/{id_} was already merged into another golden Patient",
                details_zh=f"主索引 Patient/{id_} 已被合并，不能再次合并",
            )
    moved = g.source_links(source)
    others = [l for l in source.get("link") or () if l not in moved]
    target_links = [l for l in target.get("link") or () if g.ref_id(l.get("other")) not in {g.ref_id(m["other"]) for m in moved}]
    target = {
        **target,
        "link": target_links + moved + [{"other": {"reference": f"Patient/{source_id}"}, "type": "replaces"}],
    }
    await refresh(tx, t_stored, target)
    retired = {k: v for k, v in source.items() if k != "link"}
    retired["active"] = False
    retired["link"] = [l for l in others if l.get("type") != "replaced-by"] + [
        {"other": {"reference": f"Patient/{target_id}"}, "type": "replaced-by"}
    ]
    await write(tx, retired, s_stored)
    task = {
        "resourceType": "Task",
        "status": "completed",
        "intent": "order",
        "code": {"coding": [{"system": g.MPI_SYSTEM, "code": MERGE_CODE, "display": "主索引合并"}], "text": "主索引合并"},
        "description": f"主索引 Patient/{source_id} 合并到 Patient/{target_id}（移动 {len(moved)} 条源记录）",
        "focus": {"reference": f"Patient/{target_id}"},
        "authoredOn": instant(datetime.now(timezone.utc)),
        "input": [
            _input(_T_SOURCE, f"Patient/{source_id}"),
            _input(_T_TARGET, f"Patient/{target_id}"),
            *[_input(_T_MOVED, m["other"]["reference"], m.get("extension")) for m in moved],
        ],
    }
    return await write(tx, task, None)


def _inputs(task: dict[str, Any], code: str) -> list[dict[str, Any]]:
    return [
        i for i in task.get("input") or () if any(c.get("code") == code for c in (i.get("type") or {}).get("coding") or ())
    ]


async def find_merge(tx: Tx, source_id: str, target_id: str) -> str:
    """The latest merge Task of ``source_id`` into ``target_id`` not yet undone."""
    from fhir_server.mpi.candidates import _filter

    flt = await _filter(tx.unit, [("code", f"{g.MPI_SYSTEM}|{MERGE_CODE}"), ("focus", f"Patient/{target_id}")], "Task")
    best: tuple[str, str] | None = None
    for row in await tx.unit.find("Task", flt, limit=200):
        task = orjson.loads(row.raw) if row.raw else {}
        src = [g.ref_id(i.get("valueReference")) for i in _inputs(task, _T_SOURCE)]
        if src == [source_id] and not _undone(task) and (best is None or task.get("authoredOn", "") > best[1]):
            best = (row.id, task.get("authoredOn", ""))
    if best is None:
        raise FhirError.of(
            404, "not-found", f"No merge of Patient/{source_id} into Patient/{target_id} to undo",
            details_zh=f"没有可撤销的合并记录（Patient/{source_id} → Patient/{target_id}）",
        )
    return best[0]


def _undone(task: dict[str, Any]) -> bool:
    return any(c.get("code") == "undone" for c in (task.get("businessStatus") or {}).get("coding") or ())


async def unmerge_in(tx: Tx, task_id: str) -> dict[str, Any]:
    """Undo the merge recorded in Task ``task_id``; returns the updated merge Task."""
    stored = await tx.unit.current("Task", task_id)
    task = orjson.loads(stored.raw) if stored and stored.raw else None
    if task is None or not any(c.get("code") == MERGE_CODE for c in (task.get("code") or {}).get("coding") or ()):
        raise not_found(f"Merge record Task/{task_id}")
    if _undone(task):
        raise FhirError.of(
            409, "business-rule", f"The merge in Task/{task_id} was already undone",
            details_zh=f"合并记录 Task/{task_id} 已撤销",
        )
    source_id = g.ref_id(_inputs(task, _T_SOURCE)[0].get("valueReference"))
    target_id = g.ref_id(_inputs(task, _T_TARGET)[0].get("valueReference"))
    assert source_id and target_id
    s_stored, source = await _golden(tx, source_id, "source")
    t_stored, target = await _golden(tx, target_id, "target")
    target_sources = set(g.source_ids(target))
    back = []
    for item in _inputs(task, _T_MOVED):
        sid = g.ref_id(item.get("valueReference"))
        if sid in target_sources:
            entry: dict[str, Any] = {"other": {"reference": f"Patient/{sid}"}, "type": "seealso"}
            if item.get("extension"):
                entry = {"extension": item["extension"], **entry}
            back.append(entry)
    back_ids = {g.ref_id(b["other"]) for b in back}
    target = {
        **target,
        "link": [
            l
            for l in target.get("link") or ()
            if g.ref_id(l.get("other")) not in back_ids and not (l.get("type") == "replaces" and g.ref_id(l.get("other")) == source_id)
        ],
    }
    restored = {k: v for k, v in source.items() if k != "link"}
    restored["active"] = True
    restored["link"] = [
        l for l in source.get("link") or () if not (l.get("type") == "replaced-by" and g.ref_id(l.get("other")) == target_id)
    ] + back
    # Sources first: their refer links move back when the source golden is rebuilt.
    await refresh(tx, s_stored, restored)
    if target.get("link"):
        await refresh(tx, t_stored, target)
    else:
        await refresh(tx, t_stored, {k: v for k, v in target.items() if k != "link"})
    done = dict(task)
    done["businessStatus"] = {"coding": [{"system": g.MPI_SYSTEM, "code": "undone"}], "text": "已撤销合并"}
    done["lastModified"] = instant(datetime.now(timezone.utc))
    return await write(tx, done, stored)
