"""The review queue: uncertain matches become ordinary Tasks a clerk can search and resolve.

    Task.status   requested (open) → completed (resolved by $mpi-resolve)
    Task.intent   proposal
    Task.code     MPI|mpi-review
    Task.focus    the source Patient waiting for a decision (it stays unlinked meanwhile)
    Task.input    one per candidate golden: type MPI|candidate, valueReference Patient/<golden>,
                  extension mpi-match-score (valueDecimal)
    Task.output   after resolution: type MPI|golden, valueReference Patient/<golden chosen or created>

List the queue with ``GET Task?code=https://fhir.cn-ehr.org/CodeSystem/mpi|mpi-review&status=requested``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Sequence

import orjson

from fhir_server.interactions._resource import instant
from fhir_server.mpi.candidates import Candidate, Reader, _filter
from fhir_server.mpi.golden import MPI_SYSTEM, SCORE_EXT, ref_id

REVIEW_CODE = "mpi-review"
OPEN = ("draft", "requested", "received", "accepted", "ready", "in-progress", "on-hold")
_MAX_CANDIDATES = 5


def review_task(source_id: str, found: Sequence[Candidate]) -> dict[str, Any]:
    best = max(c.score for c in found)
    return {
        "resourceType": "Task",
        "status": "requested",
        "intent": "proposal",
        "priority": "routine",
        "code": {
            "coding": [{"system": MPI_SYSTEM, "code": REVIEW_CODE, "display": "主索引人工审核"}],
            "text": "疑似同一居民，需人工确认",
        },
        "description": (
            f"源记录 Patient/{source_id} 与 {len(found)} 个主索引疑似为同一居民（最高得分 {best:.2f}），"
            "请确认关联到其中之一或新建主索引。"
        ),
        "focus": {"reference": f"Patient/{source_id}"},
        "authoredOn": instant(datetime.now(timezone.utc)),
        "input": [
            {
                "extension": [{"url": SCORE_EXT, "valueDecimal": c.score}],
                "type": {"coding": [{"system": MPI_SYSTEM, "code": "candidate", "display": "候选主索引"}]},
                "valueReference": {"reference": f"Patient/{c.golden}"},
            }
            for c in list(found)[:_MAX_CANDIDATES]
        ],
    }


def task_candidates(task: dict[str, Any]) -> list[tuple[str, float]]:
    """(golden id, score) of each candidate of a review Task."""
    out = []
    for item in task.get("input") or ():
        gid = ref_id(item.get("valueReference"))
        if gid is None:
            continue
        score = next((float(e["valueDecimal"]) for e in item.get("extension") or () if e.get("url") == SCORE_EXT), 0.0)
        out.append((gid, score))
    return out


def is_review(task: dict[str, Any]) -> bool:
    return any(
        c.get("system") == MPI_SYSTEM and c.get("code") == REVIEW_CODE for c in (task.get("code") or {}).get("coding") or ()
    )


async def open_review(reader: Reader, source_id: str) -> dict[str, Any] | None:
    """The open review Task of a source Patient, if any."""
    flt = await _filter(
        reader,
        [("focus", f"Patient/{source_id}"), ("code", f"{MPI_SYSTEM}|{REVIEW_CODE}"), ("status", ",".join(OPEN))],
        "Task",
    )
    rows = await reader.find("Task", flt, limit=1)
    return orjson.loads(rows[0].raw) if rows and rows[0].raw else None


def resolved(task: dict[str, Any], golden_id: str, created: bool) -> dict[str, Any]:
    out = dict(task)
    out["status"] = "completed"
    out["businessStatus"] = {
        "coding": [{"system": MPI_SYSTEM, "code": "new-golden" if created else "linked"}],
        "text": "已新建主索引" if created else "已关联到主索引",
    }
    out["lastModified"] = instant(datetime.now(timezone.utc))
    out["output"] = [
        {
            "type": {"coding": [{"system": MPI_SYSTEM, "code": "golden", "display": "主索引"}]},
            "valueReference": {"reference": f"Patient/{golden_id}"},
        }
    ]
    return out
