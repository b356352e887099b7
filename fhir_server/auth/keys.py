"""Key pairs as JWKs, and the development authorization server's signing key kept in MongoDB.

The signing key lives in the ``_auth_keys`` collection, not in a file: every worker process and
every host of a deployment shares the database (there is no data folder when ``MONGODB_URI``
points at an external cluster), and an insert with a fixed ``_id`` lets exactly one of several
workers starting at once create it. Whoever can read the database can mint development tokens —
the same people who can read every record there; production uses an external OpenID Connect
provider instead.

RS256: verifying an RS256 signature costs a few tens of microseconds, less than ES256, and every
FHIR request verifies one; signing (once per token) is the slow side.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from datetime import datetime, timezone
from typing import Any, Mapping

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt import PyJWK
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

KEYS = "_auth_keys"
SIGNING_ALG = "RS256"
_PRIVATE = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (base64url SHA-256), used as ``kid``."""
    members = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}[jwk["kty"]]
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def generate(alg: str = SIGNING_ALG) -> dict[str, Any]:
    """A new private JWK for ``alg`` (RS256/RS384: RSA 2048; ES256: P-256; ES384: P-384) with kid and alg."""
    if alg.startswith("RS"):
        jwk = dict(RSAAlgorithm.to_jwk(rsa.generate_private_key(public_exponent=65537, key_size=2048), as_dict=True))
    elif alg == "ES256":
        jwk = dict(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()), as_dict=True))
    elif alg == "ES384":
        jwk = dict(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()), as_dict=True))
    else:
        raise ValueError(f"unsupported algorithm {alg}")
    jwk.update(kid=thumbprint(jwk), alg=alg, use="sig")
    return jwk


def public(jwk: Mapping[str, Any]) -> dict[str, Any]:
    """The public part of a JWK."""
    return {k: v for k, v in jwk.items() if k not in _PRIVATE}


def sign(claims: Mapping[str, Any], private_jwk: Mapping[str, Any], *, typ: str = "JWT") -> str:
    """A compact JWS of ``claims`` with the key's ``alg`` and ``kid``."""
    alg = private_jwk["alg"]
    key = PyJWK(dict(private_jwk), algorithm=alg).key
    return jwt.encode(dict(claims), key, algorithm=alg, headers={"kid": private_jwk["kid"], "typ": typ})


class SigningKeys:
    """The development server's signing key: created at first use, shared through MongoDB."""

    def __init__(self, db: AsyncDatabase) -> None:
        self._db = db
        self._private: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    async def private_jwk(self) -> dict[str, Any]:
        if self._private is None:
            async with self._lock:
                if self._private is None:
                    self._private = await self._load_or_create()
        return self._private

    async def _load_or_create(self) -> dict[str, Any]:
        doc = await self._db[KEYS].find_one({"_id": "signing"})
        if doc is None:
            jwk = generate(SIGNING_ALG)
            try:
                await self._db[KEYS].insert_one({"_id": "signing", "jwk": jwk, "created": datetime.now(timezone.utc)})
                return jwk
            except DuplicateKeyError:  # another worker was first: use its key
                doc = await self._db[KEYS].find_one({"_id": "signing"})
        assert doc is not None
        return dict(doc["jwk"])

    async def jwks(self) -> dict[str, Any]:
        """The public JWKS (what ``/auth/jwks`` serves and the token validator trusts)."""
        return {"keys": [public(await self.private_jwk())]}

    async def sign(self, claims: Mapping[str, Any], *, typ: str = "JWT") -> str:
        return sign(claims, await self.private_jwk(), typ=typ)
