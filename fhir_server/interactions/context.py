"""What every interaction receives and returns, independent of HTTP.

The HTTP layer turns a request into a :class:`FhirRequest`; batch and transaction bundles build the
same objects from their entries, so one implementation of each interaction serves both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, TypeVar

from fhir_server.config import Settings
from fhir_server.conformance.registry import ConformanceRegistry
from fhir_server.outcome import FhirError
from fhir_server.storage.base import Conflict, Store, Stored, TooLarge, UnitOfWork, Write

if TYPE_CHECKING:
    from fhir_server.interceptors.access import Access
    from fhir_server.search.reindex import Reindexer

T = TypeVar("T")


@dataclass(slots=True)
class FhirRequest:
    method: str
    type: str | None = None
    id: str | None = None
    version: str | None = None
    query: list[tuple[str, str]] = field(default_factory=list)
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: Any = None
    raw_body: bytes | None = None  # the bytes ``body`` was parsed from (kept by the push of records)
    base_url: str = ""
    # A compartment search (``Patient/123/Observation``): the compartment's type and id.
    compartment: tuple[str, str] | None = None
    # The caller and its rights (fhir_server/interceptors/access.py); None when auth is off.
    access: Access | None = None

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def param(self, name: str) -> str | None:
        for k, v in self.query:
            if k == name:
                return v
        return None


@dataclass(slots=True)
class FhirResponse:
    status: int
    resource: dict[str, Any] | None = None
    raw: bytes | None = None  # the resource already serialised (a stored version)
    headers: dict[str, str] = field(default_factory=dict)
    stored: Stored | None = None
    outcome: dict[str, Any] | None = None  # for Prefer: return=OperationOutcome


def storage_error(exc: Conflict | TooLarge) -> FhirError:
    """The answer to a write the database refused after the unit's retries."""
    if isinstance(exc, TooLarge):
        return FhirError.of(413, "too-costly", "The resource is larger than the database can store")
    return FhirError.of(
        409, "conflict", "The resource was changed concurrently by other requests too many times; retry the request"
    )


PreStore = Callable[["Tx", dict[str, Any], Stored | None], Awaitable[None]]
OnCommit = Callable[["Tx"], Awaitable[None]]


@dataclass
class Server:
    """The wiring: settings, storage, and the interceptors that wrap every write."""

    settings: Settings
    store: Store
    # Called with each resource about to be stored (validation, profile checks, ...).
    pre_store: list[PreStore] = field(default_factory=list)
    # Called once per unit of work before it commits (referential integrity, ...).
    on_commit: list[OnCommit] = field(default_factory=list)
    # Called after a unit of work has committed (registering SearchParameters, ...).
    after_commit: list[OnCommit] = field(default_factory=list)
    # Runs re-index jobs in the background ($reindex, new SearchParameters); set by the app.
    reindexer: Reindexer | None = None
    # Profiles, code systems, value sets, concept maps by url (fhir_server/conformance/watch.py keeps it current).
    conformance: ConformanceRegistry = field(default_factory=ConformanceRegistry)

    async def transact(self, work: Callable[["Tx"], Awaitable[T]], types: set[str] = frozenset()) -> T:  # type: ignore[assignment]
        """Run ``work`` atomically, with the commit interceptors, retried on write conflicts."""
        if types:
            await self.store.ensure_types(set(types))

        committed: list[Tx] = []  # the attempt that committed is the last one started

        async def unit_work(unit: UnitOfWork) -> T:
            tx = Tx(self, unit)
            committed[:] = [tx]
            result = await work(tx)
            for hook in self.on_commit:
                await hook(tx)
            return result

        result = await self.store.transact(unit_work)
        for hook in self.after_commit:
            await hook(committed[0])
        return result


@dataclass
class Tx:
    """One unit of work as the interactions see it."""

    server: Server
    unit: UnitOfWork
    # Local references ("Type/id") that written resources point to.
    references: set[str] = field(default_factory=set)
    # Resources deleted in this unit.
    deleted: set[str] = field(default_factory=set)
    # Every version written in this unit, in order.
    written: list[Write] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return self.server.settings

    def write(self, write: Write) -> None:
        self.written.append(write)
        self.unit.write(write)
