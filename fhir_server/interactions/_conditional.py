"""Finding the resources a conditional interaction (create, update, delete, reference) is about.

A conditional create must not create twice when fifty identical requests race. Each such search
first takes a lock document named after the query inside the transaction: concurrent transactions
on the same query conflict on that document, one commits, the others re-run and see its result.
"""

from __future__ import annotations

import hashlib
from urllib.parse import parse_qsl

from fhir_server.interactions.context import Tx
from fhir_server.outcome import FhirError, bad_request
from fhir_server.search.query import RESULT_PARAMS, compile_search
from fhir_server.storage.base import Stored
from fhir_server.terminology.service import terminology_for


def parse_criteria(criteria: str) -> list[tuple[str, str]]:
    criteria = criteria.lstrip("?")
    try:
        pairs = parse_qsl(criteria, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise bad_request(f"Malformed search criteria '{criteria[:100]}'") from None
    return pairs


async def find_matches(
    tx: Tx, type_: str, criteria: list[tuple[str, str]], *, limit: int, lock: bool = True
) -> list[Stored]:
    """Current resources of ``type_`` matching ``criteria`` (at most ``limit``).

    With ``lock`` (conditional create, update, delete: the caller writes depending on the answer)
    concurrent units asking the same question are serialised. A conditional reference only reads,
    and must not make every bundle that cites one practitioner conflict with all the others."""
    selecting = [(k, v) for k, v in criteria if k.partition(":")[0] not in RESULT_PARAMS]
    if not selecting:
        raise bad_request("Conditional criteria must contain at least one search parameter", code="invalid")
    compiled = await compile_search(
        type_,
        selecting,
        lookup=tx.unit,
        terminology=terminology_for(tx.server.conformance),
        default_count=limit,
        max_count=limit,
        max_matches=tx.settings.max_chain_matches,
        base_url="",
    )
    from fhir_server.interceptors.access import current

    caller = current()  # a patient-confined caller matches only within its compartment
    confined = caller.confine_filter(type_) if caller is not None else None
    if confined is not None:
        compiled.filter = {"$and": [compiled.filter, confined]} if compiled.filter else confined
    key = type_ + "?" + "&".join(f"{k}={v}" for k, v in sorted(selecting))
    if lock:
        await tx.unit.lock("cond:" + hashlib.sha256(key.encode()).hexdigest())
    return await tx.unit.find(type_, compiled.filter, limit)


def too_many(type_: str, criteria: str) -> FhirError:
    return FhirError.of(412, "multiple-matches", f"The criteria '{type_}?{criteria[:200]}' match more than one resource")
