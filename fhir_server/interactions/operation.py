"""Extended operations (operations.html): ``$name`` at system, type or instance level.

Modules that define an operation register it here; the router sends every ``$`` segment to
:func:`invoke`. Which levels and types an operation accepts is part of its registration, so an
unknown or misplaced operation is a clear 404/400 before any handler runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Literal

from fhir_server.interactions._resource import check_type
from fhir_server.interactions.context import FhirRequest, FhirResponse, Server
from fhir_server.outcome import FhirError

Level = Literal["system", "type", "instance"]
Handler = Callable[[Server, FhirRequest], Awaitable[FhirResponse]]


@dataclass(frozen=True, slots=True)
class Operation:
    name: str
    handler: Handler
    levels: frozenset[str]
    types: frozenset[str] | None  # None: any resource type
    methods: frozenset[str] = frozenset({"GET", "POST"})


_REGISTRY: dict[str, Operation] = {}


def register(
    name: str,
    handler: Handler,
    *,
    levels: set[Level],
    types: set[str] | None = None,
    methods: set[str] | None = None,
) -> None:
    """Make ``$name`` available; registering a name again replaces it."""
    _REGISTRY[name] = Operation(
        name, handler, frozenset(levels), frozenset(types) if types else None, frozenset(methods or {"GET", "POST"})
    )


def registered() -> list[Operation]:
    return sorted(_REGISTRY.values(), key=lambda op: op.name)


def find(name: str, level: Level, type_: str | None, method: str) -> Operation:
    op = _REGISTRY.get(name)
    if op is None or level not in op.levels or (type_ is not None and op.types is not None and type_ not in op.types):
        where = {"system": "the server", "type": f"type {type_}", "instance": f"instances of {type_}"}[level]
        raise FhirError.of(404, "not-supported", f"Operation ${name[:60]} is not defined on {where}")
    if method not in op.methods:
        raise FhirError.of(405, "not-supported", f"Operation ${name} does not accept {method}")
    return op


async def invoke(server: Server, req: FhirRequest, name: str) -> FhirResponse:
    if req.type is not None:
        check_type(req.type)
    level: Level = "instance" if req.id else "type" if req.type else "system"
    op = find(name, level, req.type, req.method)
    return await op.handler(server, req)
