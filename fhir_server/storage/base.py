"""The storage contract: what a FHIR server needs from a database, and nothing more."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Awaitable, Callable, Protocol, Sequence, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class Stored:
    """One version of a resource as stored. ``raw`` is its JSON (with meta), None when deleted."""

    type: str
    id: str
    version: int
    last_updated: datetime
    deleted: bool
    raw: bytes | None
    method: str = "PUT"


@dataclass(slots=True)
class Write:
    """A new version to store. ``expected_version`` None means the resource must not exist yet
    (or exist only as a deletion); otherwise the current version must equal it."""

    type: str
    id: str
    version: int
    last_updated: datetime
    raw: bytes | None
    index: dict[str, Any]
    method: str
    expected_version: int | None


@dataclass(slots=True)
class HistoryPage:
    entries: list[Stored]
    total: int | None
    next_cursor: str | None


class Conflict(Exception):
    """Another writer got there first (version moved, id taken). The unit of work is retried."""


class TooLarge(Exception):
    """A resource (or a unit of work) is larger than the database can store."""


class UnitOfWork(Protocol):
    """Reads that see this unit's own writes, and writes that become visible only on commit."""

    async def current(self, type_: str, id_: str) -> Stored | None: ...

    async def find(
        self, type_: str, query: dict[str, Any], limit: int, *, sort: Sequence[tuple[str, int]] = (), skip: int = 0
    ) -> list[Stored]: ...

    async def count(self, type_: str, query: dict[str, Any]) -> int: ...

    async def existing_ids(self, type_: str, ids: set[str]) -> set[str]: ...

    async def referenced_by(self, target: str, excluding: set[str]) -> str | None: ...

    async def lock(self, key: str) -> None: ...

    def write(self, write: Write) -> None: ...


class Store(Protocol):
    async def current(self, type_: str, id_: str) -> Stored | None: ...

    async def version(self, type_: str, id_: str, version: int) -> Stored | None: ...

    async def find(
        self,
        type_: str,
        query: dict[str, Any],
        *,
        sort: Sequence[tuple[str, int]] = (),
        limit: int,
        skip: int = 0,
    ) -> list[Stored]: ...

    async def count(self, type_: str, query: dict[str, Any]) -> int: ...

    async def history(
        self,
        type_: str | None,
        id_: str | None,
        *,
        since: datetime | None,
        at: tuple[datetime, datetime] | None,
        count: int,
        cursor: str | None,
    ) -> HistoryPage: ...

    async def ensure_types(self, types: set[str]) -> None:
        """Make the collections (and indexes) for ``types`` exist before a unit writes into them."""
        ...

    async def transact(self, work: Callable[[UnitOfWork], Awaitable[T]]) -> T:
        """Run ``work`` in one atomic unit; it is re-run from the start if another writer conflicts."""
        ...
