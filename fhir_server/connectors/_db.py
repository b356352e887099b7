"""The connector collections live beside the FHIR collections, in the server's database."""

from __future__ import annotations

from typing import Any

from fhir_server.interactions.context import Server

CHECKPOINTS = "_connector_checkpoints"
LEDGER = "_connector_ledger"
DEAD_LETTERS = "_connector_dead_letters"


def database(server: Server) -> Any:
    """The AsyncDatabase the server's store writes to (MongoStore only)."""
    client = getattr(server.store, "client", None)
    if client is None:
        raise RuntimeError("connectors need the MongoDB store")
    return client.get_database(server.settings.database)
