"""Referential integrity for local references, checked once per unit of work before it commits:
every ``Type/id`` a written resource points to must exist, and a deleted resource must not be
the target of a live one. Checking at commit lets a transaction create resources that refer to
each other in any order."""

from __future__ import annotations

from fhir_server.interactions.context import Tx
from fhir_server.outcome import FhirError, Issue


async def check_references(tx: Tx) -> None:
    missing: list[str] = []
    by_type: dict[str, set[str]] = {}
    for ref in tx.references:
        type_, _, id_ = ref.partition("/")
        by_type.setdefault(type_, set()).add(id_)
    for type_, ids in sorted(by_type.items()):
        found = await tx.unit.existing_ids(type_, ids)
        missing.extend(f"{type_}/{i}" for i in sorted(ids - found))
    if missing:
        raise FhirError(
            400,
            [
                Issue(
                    "not-found",
                    f"Reference to {ref} cannot be resolved: no such resource on this server",
                    expression=(),
                    details_zh=f"引用的资源 {ref} 不存在",
                )
                for ref in missing[:50]
            ],
        )
    for target in sorted(tx.deleted):
        source = await tx.unit.referenced_by(target, tx.deleted)
        if source:
            raise FhirError.of(
                409,
                "conflict",
                f"Cannot delete {target}: {source} refers to it (referential integrity)",
                details_zh=f"无法删除 {target}：{source} 仍引用该资源",
            )
