"""Small helpers shared by the test modules."""

from __future__ import annotations

import uuid


def uid() -> str:
    """A fresh identifier value, so tests sharing one database never see each other's data."""
    return uuid.uuid4().hex
