"""Storage: the narrow interface every interaction talks to, and its MongoDB implementation.

Interactions never see MongoDB documents; they get :class:`Stored` versions and write through a
:class:`UnitOfWork`, which commits atomically (a MongoDB multi-document transaction) or not at all.
"""

from fhir_server.storage.base import (
    Conflict,
    HistoryPage,
    Stored,
    Store,
    UnitOfWork,
    Write,
)

__all__ = ["Conflict", "HistoryPage", "Stored", "Store", "UnitOfWork", "Write"]
