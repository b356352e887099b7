"""The storage contract: what a FHIR server needs from a database, and nothing more."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, AsyncGenerator, Awaitable, Callable, Protocol, Sequence, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class Stored:
    """One version of a resource as stored. ``raw`` is its JSON (with meta), None when deleted;
    always in clear: a store encrypts protected fields at rest itself (fhir_server/storage/field_crypto.py)."""

    type: str
    id: str
    version: int
    last_updated: datetime
    deleted: bool
    raw: bytes | None
    method: str = "PUT"
    # Search index values asked for by a search (``index_fields``), by parameter code.
    index: dict[str, Any] | None = None


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
        self,
        type_: str,
        query: dict[str, Any],
        limit: int,
        *,
        sort: Sequence[tuple[str, int]] = (),
        skip: int = 0,
        index_fields: Sequence[str] = (),
    ) -> list[Stored]: ...

    async def count(self, type_: str, query: dict[str, Any]) -> int: ...

    async def find_ids(self, type_: str, query: dict[str, Any], limit: int) -> list[str]: ...

    async def distinct(self, type_: str, query: dict[str, Any], field: str, limit: int) -> list[Any]: ...

    async def types(self) -> set[str]: ...

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
        index_fields: Sequence[str] = (),
    ) -> list[Stored]:
        """Live resources matching ``query`` (a filter on the search index ``s``, ``_id`` and ``t``),
        with the index values of ``index_fields`` when asked."""
        ...

    async def count(self, type_: str, query: dict[str, Any]) -> int: ...

    async def find_ids(self, type_: str, query: dict[str, Any], limit: int) -> list[str]:
        """Ids of live resources matching ``query`` (at most ``limit``)."""
        ...

    async def distinct(self, type_: str, query: dict[str, Any], field: str, limit: int) -> list[Any]:
        """The distinct values of index ``field`` over live resources matching ``query``."""
        ...

    async def types(self) -> set[str]:
        """The resource types that have a collection (that may hold resources)."""
        ...

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

    # -- re-indexing (search parameters registered at run time; fhir_server/search/reindex.py)

    async def ensure_search_indexes(self, types: set[str]) -> None:
        """Build the search indexes now wanted on the existing collections of ``types``."""
        ...

    async def drop_search_indexes(self, type_: str, names: Sequence[str]) -> None: ...

    async def scan_for_reindex(
        self, type_: str, *, after: str | None = None, ids: Sequence[str] | None = None, limit: int = 0
    ) -> list[tuple[str, int, bytes, list[str] | None]]:
        """(id, version, JSON, stored ``_refs``) of live resources in id order after ``after``, or among ``ids``."""
        ...

    async def set_search_values(self, type_: str, values: Sequence[tuple[str, int, dict[str, Any]]]) -> list[str]:
        """Store search values where the version is unchanged; the ids whose version moved."""
        ...

    async def insert_job(self, job: dict[str, Any]) -> None: ...

    async def job(self, job_id: str) -> dict[str, Any] | None: ...

    async def update_job(self, job_id: str, fields: dict[str, Any], *, owner: str | None = None) -> bool: ...

    async def claim_job(self, owner: str, stale_before: datetime, now: datetime) -> dict[str, Any] | None:
        """Take over one unfinished job whose runner has not reported since ``stale_before``."""
        ...

    def watch(self, type_: str) -> AsyncGenerator[Stored | None, None]:
        """None once watching, then each committed version of a ``type_`` resource."""
        ...
