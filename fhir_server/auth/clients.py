"""Registered clients (``_auth_clients``), development users (``_auth_users``) and the demo seed.

A client document::

    {_id: client_id, name, grant_types: ["client_credentials"] | ["authorization_code"],
     token_endpoint_auth_method: "private_key_jwt" | "none", jwks: {keys: [...]} (public keys),
     scope: "system/*.rs …" (the most it may be granted), redirect_uris: [...],
     source_restriction: meta.source system prefix it may write (hospitals),
     push_sources: [codes of mappings/fhir-push/sources.yaml it may POST $ingest as], default_user: user id}

A development user (the password-less logins of the development server)::

    {_id: "clinician", name, fhirUser: "Practitioner/…", scope: "user/*.cruds …", patient: id | None}

The demo hospital's private key is generated at the first seed and kept in ``_auth_demo_keys`` so
that ``fhir-server auth dev-token --kind hospital`` (or ``demo_private_key``) can sign its client
assertions; a real hospital keeps its private key and registers only the public JWKS.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from pymongo.asynchronous.database import AsyncDatabase

from fhir_server.auth import keys

CLIENTS = "_auth_clients"
USERS = "_auth_users"
DEMO_KEYS = "_auth_demo_keys"

DEMO_HOSPITAL = "demo-hospital"
DEMO_CLINICIAN_APP = "demo-clinician-app"
DEMO_RESIDENT_APP = "demo-resident-app"
DEMO_REDIRECT_URI = "http://127.0.0.1:8765/callback"
DEMO_SOURCE = "http://demo-hospital.example.cn/emr"
DEMO_PUSH_SOURCES = ["sh-demo-hosp-a"]  # mappings/fhir-push/sources.yaml

_HOSPITAL_WRITES = ("Patient", "Encounter", "Observation", "Condition", "Procedure", "DiagnosticReport", "DocumentReference", "MedicationRequest")

_DEMO_CLIENTS: list[dict[str, Any]] = [
    {
        "_id": DEMO_CLINICIAN_APP,
        "name": "演示医生工作站 / demo clinician app",
        "grant_types": ["authorization_code"],
        "token_endpoint_auth_method": "none",
        "redirect_uris": [DEMO_REDIRECT_URI],
        "scope": "user/*.cruds launch/patient openid fhirUser",
        "default_user": "clinician",
    },
    {
        "_id": DEMO_RESIDENT_APP,
        "name": "演示居民健康应用 / demo resident app",
        "grant_types": ["authorization_code"],
        "token_endpoint_auth_method": "none",
        "redirect_uris": [DEMO_REDIRECT_URI],
        "scope": "patient/*.rs patient/Observation.c launch/patient openid fhirUser offline_access",
        "default_user": "resident",
    },
]

_DEMO_USERS: list[dict[str, Any]] = [
    {
        "_id": "clinician",
        "name": "演示医生 / demo clinician",
        "fhirUser": "Practitioner/demo-clinician",
        "scope": "user/*.cruds launch/patient openid fhirUser",
        "patient": None,
    },
    {
        "_id": "resident",
        "name": "演示居民 / demo resident",
        "fhirUser": "Patient/demo-resident",
        "scope": "patient/*.rs patient/Observation.c launch/patient openid fhirUser offline_access",
        "patient": "demo-resident",
    },
    {
        "_id": "auditor",
        "name": "演示审计员 / demo auditor",
        "fhirUser": "Practitioner/demo-auditor",
        "scope": "user/AuditEvent.rs openid fhirUser",
        "patient": None,
    },
]


async def get_client(db: AsyncDatabase, client_id: str) -> dict[str, Any] | None:
    return await db[CLIENTS].find_one({"_id": client_id})


async def get_user(db: AsyncDatabase, user_id: str) -> dict[str, Any] | None:
    return await db[USERS].find_one({"_id": user_id})


async def register_client(
    db: AsyncDatabase,
    client_id: str,
    *,
    scope: str,
    grant_types: Iterable[str] = ("client_credentials",),
    jwks: Mapping[str, Any] | None = None,
    redirect_uris: Iterable[str] = (),
    source_restriction: str | None = None,
    push_sources: Iterable[str] = (),
    default_user: str | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """Create or replace a client. With ``jwks`` it authenticates by private_key_jwt, else it is public."""
    if jwks is not None and any(set(k) & {"d", "p", "q", "k"} for k in jwks.get("keys", ())):
        raise ValueError("register the client's public keys only")
    doc = {
        "_id": client_id,
        "name": name or client_id,
        "grant_types": list(grant_types),
        "token_endpoint_auth_method": "private_key_jwt" if jwks else "none",
        "jwks": dict(jwks) if jwks else None,
        "redirect_uris": list(redirect_uris),
        "scope": scope,
        "source_restriction": source_restriction,
        "push_sources": list(push_sources),
        "default_user": default_user,
        "updated": datetime.now(timezone.utc),
    }
    await db[CLIENTS].replace_one({"_id": client_id}, doc, upsert=True)
    return doc


async def demo_private_key(db: AsyncDatabase) -> dict[str, Any] | None:
    """The demo hospital's private JWK (development only)."""
    doc = await db[DEMO_KEYS].find_one({"_id": DEMO_HOSPITAL})
    return dict(doc["jwk"]) if doc else None


async def seed_demo(db: AsyncDatabase) -> None:
    """Add the demo clients and users when absent; an operator's changes to them are kept."""
    now = datetime.now(timezone.utc)
    # ES384: one of the two algorithms SMART Backend Services servers must accept.
    await db[DEMO_KEYS].update_one(
        {"_id": DEMO_HOSPITAL}, {"$setOnInsert": {"jwk": keys.generate("ES384"), "created": now}}, upsert=True
    )
    private = await demo_private_key(db)  # the winner's key when several workers seed at once
    assert private is not None
    hospital = {
        "_id": DEMO_HOSPITAL,
        "name": "演示医院 EMR / demo hospital EMR",
        "grant_types": ["client_credentials"],
        "token_endpoint_auth_method": "private_key_jwt",
        "jwks": {"keys": [keys.public(private)]},
        "redirect_uris": [],
        "scope": "system/*.rs " + " ".join(f"system/{t}.cu" for t in _HOSPITAL_WRITES),
        "source_restriction": DEMO_SOURCE,
        "push_sources": DEMO_PUSH_SOURCES,
        "default_user": None,
    }
    for doc in [hospital, *_DEMO_CLIENTS]:
        await db[CLIENTS].update_one({"_id": doc["_id"]}, {"$setOnInsert": {**doc, "updated": now}}, upsert=True)
    # A database seeded before push sources existed: give the demo hospital its push source once.
    await db[CLIENTS].update_one({"_id": DEMO_HOSPITAL, "push_sources": {"$exists": False}}, {"$set": {"push_sources": DEMO_PUSH_SOURCES}})
    for doc in _DEMO_USERS:
        await db[USERS].update_one({"_id": doc["_id"]}, {"$setOnInsert": doc}, upsert=True)
