"""Access-token (JWT) validation: who is calling, and what the token grants.

Tokens come from the built-in development authorization server (its key, see ``keys.py``) or from
external OpenID Connect providers configured by issuer and JWKS URL. Checks: the algorithm is on
the allowlist (RS256, RS384, ES256, ES384 — never ``none`` or HS*, so a public key can never be
used as an HMAC secret), the key is the issuer's (by ``kid``; an unknown ``kid`` refetches the
issuer's JWKS once), the signature, ``iss``, ``aud``, ``exp``, ``nbf`` and ``iat`` (with a leeway
for clock skew). The result is a :class:`Principal`; every failure is a :class:`TokenError` with
a reason code the HTTP layer turns into a 401.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal, Mapping, Protocol, Sequence

import httpx
import jwt
from jwt import PyJWK

from fhir_server.auth.scopes import Grant
from fhir_server.outcome import FhirError

ALLOWED_ALGORITHMS: tuple[str, ...] = ("RS256", "RS384", "ES256", "ES384")
_CURVES = {"ES256": "P-256", "ES384": "P-384"}

Reason = Literal["expired", "not-yet-valid", "bad-signature", "wrong-audience", "wrong-issuer", "alg-not-allowed", "malformed"]
Kind = Literal["system", "user", "patient"]


class TokenError(Exception):
    """An access token that cannot be trusted; ``reason`` says why (a short code, safe to log)."""

    def __init__(self, reason: Reason, description: str) -> None:
        super().__init__(f"{reason}: {description}")
        self.reason: Reason = reason
        self.description = description

    def www_authenticate(self, realm: str = "fhir") -> str:
        text = self.description.replace('"', "'")[:200]
        return f'Bearer realm="{realm}", error="invalid_token", error_description="{text}"'

    def to_fhir_error(self) -> FhirError:
        """401 with an OperationOutcome and ``WWW-Authenticate: Bearer error="invalid_token"``."""
        return FhirError.of(
            401,
            "login",
            f"Invalid access token ({self.reason}): {self.description}",
            details_zh=f"访问令牌无效（{self.reason}），请重新获取令牌",
            headers={"WWW-Authenticate": self.www_authenticate()},
        )


def unauthenticated(realm: str = "fhir") -> FhirError:
    """401 for a request without a token (RFC 6750 §3.1: no error code then)."""
    return FhirError.of(
        401,
        "login",
        "This server requires an access token (Authorization: Bearer …)",
        details_zh="需要访问令牌",
        headers={"WWW-Authenticate": f'Bearer realm="{realm}"'},
    )


def insufficient_scope(what: str, scope: str | None = None, realm: str = "fhir") -> FhirError:
    """403 for a valid token that does not grant ``what``."""
    header = f'Bearer realm="{realm}", error="insufficient_scope"'
    if scope:
        header += f', scope="{scope}"'
    return FhirError.of(
        403, "forbidden", f"The access token does not grant {what}", details_zh="访问令牌的授权范围不包括此操作", headers={"WWW-Authenticate": header}
    )


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer …`` header; None without a header, TokenError for another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenError("malformed", "the Authorization header is not 'Bearer <token>'")
    return token.strip()


@dataclass(frozen=True)
class Principal:
    """The caller behind a valid token."""

    subject: str
    client_id: str
    kind: Kind
    grant: Grant
    patient: str | None
    fhir_user: str | None
    token_id: str | None
    issuer: str
    # The meta.source system prefix this client may write (hospitals); enforced by the HTTP layer.
    source_restriction: str | None = None
    expires_at: int | None = None
    # The push sources (mappings/fhir-push/sources.yaml codes) this client may ``$ingest`` as.
    push_sources: tuple[str, ...] = ()
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False)


class KeySource(Protocol):
    """The public keys of one issuer."""

    async def key(self, kid: str | None, alg: str) -> dict[str, Any] | None:
        """The JWK for ``kid`` (None: the only key fit for ``alg``), or None when there is none."""
        ...


def key_fits(jwk: Mapping[str, Any], alg: str) -> bool:
    """Whether a JWK may verify ``alg`` signatures (key type, curve, and its own ``alg``/``use`` if given)."""
    if jwk.get("use", "sig") != "sig" or jwk.get("alg", alg) != alg:
        return False
    if alg.startswith("RS"):
        return jwk.get("kty") == "RSA"
    return jwk.get("kty") == "EC" and jwk.get("crv") == _CURVES.get(alg)


def pick_key(keys: Sequence[Mapping[str, Any]], kid: str | None, alg: str) -> dict[str, Any] | None:
    """The key with ``kid``; without a kid, the only key fit for ``alg`` (None when several or none)."""
    if kid is not None:
        return next((dict(k) for k in keys if k.get("kid") == kid), None)
    fit = [k for k in keys if key_fits(k, alg)]
    return dict(fit[0]) if len(fit) == 1 else None


class StaticKeys:
    """A fixed JWKS (tests; a provider whose keys are configured by hand)."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        self._keys = list(jwks.get("keys") or ())

    async def key(self, kid: str | None, alg: str) -> dict[str, Any] | None:
        return pick_key(self._keys, kid, alg)


class CachedJwks:
    """A JWKS loaded on demand and kept ``ttl`` seconds; an unknown ``kid`` reloads it (at most every
    ``min_refetch`` seconds, so random kids cannot make the server hammer the provider)."""

    def __init__(self, load: Callable[[], Awaitable[Mapping[str, Any]]], *, ttl: float = 300, min_refetch: float = 10) -> None:
        self._load = load
        self._ttl = ttl
        self._min_refetch = min_refetch
        self._keys: list[Mapping[str, Any]] = []
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()

    async def _refresh(self, *, unless_newer_than: float) -> None:
        async with self._lock:
            if self._loaded_at > unless_newer_than:  # another task just did it
                return
            try:
                jwks = await self._load()
            except Exception:
                if not self._keys:
                    raise
                # Keep the keys we have while the provider is unreachable; try again after min_refetch.
                self._loaded_at = time.monotonic() - self._ttl + self._min_refetch
                return
            self._keys = list(jwks.get("keys") or ())
            self._loaded_at = time.monotonic()

    async def key(self, kid: str | None, alg: str) -> dict[str, Any] | None:
        now = time.monotonic()
        if now - self._loaded_at > self._ttl:
            await self._refresh(unless_newer_than=now - self._ttl)
        found = pick_key(self._keys, kid, alg)
        if found is None and kid is not None and time.monotonic() - self._loaded_at >= self._min_refetch:
            await self._refresh(unless_newer_than=time.monotonic() - self._min_refetch)
            found = pick_key(self._keys, kid, alg)
        return found


def remote_jwks(url: str, http: httpx.AsyncClient | None = None, *, ttl: float = 300, min_refetch: float = 10) -> CachedJwks:
    """The JWKS of an external OpenID Connect provider, fetched over HTTP(S) with ``http`` (or a
    short-lived client per fetch: fetches are rare)."""

    async def get() -> httpx.Response:
        if http is not None:
            return await http.get(url, headers={"Accept": "application/json"})
        async with httpx.AsyncClient(timeout=10, follow_redirects=True) as own:
            return await own.get(url, headers={"Accept": "application/json"})

    async def load() -> Mapping[str, Any]:
        try:
            resp = await get()
            resp.raise_for_status()
            data = resp.json()
        except (httpx.HTTPError, ValueError) as e:
            raise TokenError("bad-signature", f"cannot fetch the issuer's keys from {url}: {type(e).__name__}") from None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise TokenError("bad-signature", f"{url} is not a JWKS")
        return data

    return CachedJwks(load, ttl=ttl, min_refetch=min_refetch)


_MAP: list[tuple[type[Exception], Reason]] = [
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not-yet-valid"),
    (jwt.InvalidAudienceError, "wrong-audience"),
    (jwt.InvalidIssuerError, "wrong-issuer"),
    (jwt.InvalidSignatureError, "bad-signature"),
    (jwt.InvalidAlgorithmError, "alg-not-allowed"),
]


def _normal_issuer(iss: str) -> str:
    return iss.rstrip("/")


class TokenValidator:
    """Validates access tokens of the configured issuers for this server's audience(s)."""

    def __init__(
        self,
        issuers: Mapping[str, KeySource],
        audience: str | Sequence[str],
        *,
        leeway: float = 60,
        algorithms: Sequence[str] = ALLOWED_ALGORITHMS,
    ) -> None:
        bad = set(algorithms) - set(ALLOWED_ALGORITHMS)
        if bad:
            raise ValueError(f"algorithms not allowed: {sorted(bad)}")
        self._issuers = {_normal_issuer(k): v for k, v in issuers.items()}
        self._audience = [audience] if isinstance(audience, str) else list(audience)
        self._leeway = leeway
        self._algorithms = tuple(algorithms)

    @property
    def issuers(self) -> list[str]:
        return list(self._issuers)

    async def validate(self, token: str) -> Principal:
        """The Principal of a valid token; :class:`TokenError` otherwise."""
        claims, issuer = await self.verify(token)
        return principal(claims, issuer)

    async def verify(self, token: str) -> tuple[dict[str, Any], str]:
        """The verified claims and the (configured) issuer they came from."""
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as e:
            raise TokenError("malformed", f"not a JWS compact token ({e})") from None
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise TokenError("alg-not-allowed", f"algorithm {str(alg)[:20]!r} is not allowed; use one of {', '.join(self._algorithms)}")
        iss = unverified.get("iss")
        if not isinstance(iss, str):
            raise TokenError("malformed", "the token has no 'iss'")
        source = self._issuers.get(_normal_issuer(iss))
        if source is None:
            raise TokenError("wrong-issuer", f"issuer {iss[:120]!r} is not trusted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("malformed", "'kid' is not a string")
        jwk = await source.key(kid, alg)
        if jwk is None:
            raise TokenError("bad-signature", f"the issuer has no key {'with kid ' + repr(kid[:60]) if kid else 'fit for ' + alg}")
        if not key_fits(jwk, alg):
            raise TokenError("alg-not-allowed", f"key {str(kid)[:60]!r} is not a {alg} key")
        try:
            key = PyJWK(jwk, algorithm=alg).key
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self._audience,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "iss", "aud", "sub"], "verify_iss": False},
            )
        except jwt.MissingRequiredClaimError as e:
            raise TokenError("wrong-audience" if e.claim == "aud" else "malformed", str(e)) from None
        except jwt.PyJWTError as e:
            reason: Reason = next((r for t, r in _MAP if isinstance(e, t)), "malformed")
            raise TokenError(reason, str(e) or type(e).__name__) from None
        return claims, _normal_issuer(iss)


def _reference_id(reference: str | None, type_: str) -> str | None:
    """``Patient/123`` or ``https://…/Patient/123`` → ``123`` when the type matches."""
    if not reference:
        return None
    parts = reference.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == type_ and parts[-1]:
        return parts[-1]
    return None


def principal(claims: Mapping[str, Any], issuer: str) -> Principal:
    """Build the Principal of verified claims (SMART: ``scope`` or ``scp``, ``patient``, ``fhirUser``)."""
    scope = claims.get("scope")
    if scope is None:
        scope = claims.get("scp")
    if scope is not None and not isinstance(scope, (str, list)):
        raise TokenError("malformed", "'scope' is neither a string nor a list")
    fhir_user = claims.get("fhirUser") if isinstance(claims.get("fhirUser"), str) else None
    patient = claims.get("patient") if isinstance(claims.get("patient"), str) else None
    patient = patient or _reference_id(fhir_user, "Patient")
    grant = Grant.of(scope, patient)
    contexts = {s.context for s in grant.scopes.resources}
    kind: Kind
    resident = fhir_user and (_reference_id(fhir_user, "Patient") or _reference_id(fhir_user, "RelatedPerson"))
    if resident or (contexts == {"patient"} and not fhir_user):
        kind = "patient"
    elif fhir_user or "user" in contexts or "patient" in contexts:
        kind = "user"
    else:
        kind = "system"
    subject = str(claims.get("sub"))
    client_id = claims.get("client_id") or claims.get("azp") or subject
    source = claims.get("source_restriction")
    pushes = claims.get("push_sources")
    return Principal(
        subject=subject,
        client_id=str(client_id),
        kind=kind,
        grant=grant,
        patient=patient,
        fhir_user=fhir_user,
        token_id=claims.get("jti") if isinstance(claims.get("jti"), str) else None,
        issuer=issuer,
        source_restriction=source if isinstance(source, str) else None,
        expires_at=claims.get("exp") if isinstance(claims.get("exp"), int) else None,
        push_sources=tuple(p for p in pushes if isinstance(p, str)) if isinstance(pushes, list) else (),
        claims=dict(claims),
    )
