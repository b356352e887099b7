"""Server settings: defaults, overridden by a TOML file, overridden by environment variables.

Environment variables are the upper-case field names prefixed with ``FHIR_`` (``FHIR_MAX_BUNDLE_ENTRIES``);
``MONGODB_URI`` is read as it is, because operators already know that name. A TOML file named by
``FHIR_SERVER_CONFIG`` (or ``--config``) holds the same keys in lower case.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Settings:
    mongodb_uri: str | None = None
    database: str = "fhir"
    base_path: str = "/fhir"
    # Absolute base URL used in Location headers and bundle links; derived from the request when unset.
    public_base_url: str | None = None

    max_body_bytes: int = 16 * 1024 * 1024
    max_bundle_entries: int = 10_000
    max_json_depth: int = 64

    validate_on_write: bool = True
    referential_integrity: bool = True
    # 'single' refuses a conditional delete that matches several; 'multiple' deletes them all.
    conditional_delete: str = "multiple"
    max_conditional_delete: int = 1000

    default_count: int = 50
    max_count: int = 1000
    # Bundle.total when a search does not ask (_total): accurate | estimate | none.
    search_default_total: str = "accurate"
    # Most resources a page may add through _include/_revinclude (beyond, a warning says so).
    max_include: int = 1000
    # Most intermediate matches a chained or _has criterion may resolve to (beyond, 400 too-costly).
    max_chain_matches: int = 100_000
    history_default_count: int = 100

    # Canonical base of the CN profiles and code systems (profiles/, terminology/); the shipped
    # files use https://fhir.cn-ehr.org, rewritten to this base when they are loaded.
    canonical_base: str = "https://fhir.cn-ehr.org"
    # Load (create or upgrade) the shipped profiles and terminology into the database at startup.
    load_conformance: bool = True
    # Profiles every resource of a type must conform to on write: "Patient=url,Observation=url".
    required_profiles: str = ""

    # Master patient index (fhir_server/mpi): match probabilities (0..1) at or above which a source
    # Patient is linked to a golden Patient automatically, or queued for review (a Task). 0.95 needs
    # name + birth date + sex and one more agreeing field (phone, district, guardian), or a
    # three-character name; 0.60 takes a two-character name + birth date + sex alone, which a clerk
    # should confirm (same-name, same-day residents exist in a city). Scores: fhir_server/mpi/match.py.
    mpi_auto_link: float = 0.95
    mpi_review: float = 0.60

    # Access control (fhir_server/auth, issue #6). Require a valid bearer token on the FHIR routes.
    auth_enabled: bool = True
    # Issuer (iss) of the built-in development authorization server's tokens; default: the origin
    # of public_base_url (else http://127.0.0.1:8080) + "/auth". Never taken from a request.
    auth_issuer: str = ""
    # Accepted token audiences (aud), comma-separated; default: public_base_url (else
    # http://127.0.0.1:8080/fhir). Tokens the development server issues carry the first.
    auth_audience: str = ""
    # Trusted external OpenID Connect providers: "issuer=jwks_url,issuer2=jwks_url2".
    auth_external_issuers: str = ""
    # Clock skew tolerated on exp, nbf and iat of tokens and client assertions.
    auth_leeway_seconds: int = 60
    # Lifetime of the access tokens the development server issues.
    auth_token_lifetime_seconds: int = 3600
    # How long an external provider's JWKS is cached (an unknown kid refetches it sooner).
    auth_jwks_cache_seconds: int = 300
    # Serve the development authorization server (/auth/*, smart-configuration) and seed its demo
    # clients. Turn off in production, where an external provider issues tokens.
    auth_dev_server: bool = True
    # The development server's password-less demo logins (authorize auto-approves the login_hint
    # user): "loopback" (only for clients on this machine), "any", or "off".
    auth_dev_logins: str = "loopback"

    # Audit (fhir_server/audit). AuditEvent.source: the observer's name and the site (机构/平台名称).
    audit_enabled: bool = True
    audit_observer: str = "fhir-server-cn"
    audit_site: str = ""
    # Most events appended in one transaction; seconds a data-changing request waits for its events
    # to be durable (then the audit is reported unavailable); seconds between chain anchors (0: none).
    audit_batch_max: int = 500
    audit_wait_seconds: float = 10.0
    audit_anchor_seconds: float = 300.0

    # Protection (fhir_server/http/protection.py)
    # Requests per second and burst per client, as a token bucket per worker process (each worker
    # counts alone: N workers allow N times the rate). Keyed by the bearer token's client (azp,
    # client_id or sub), else by the remote address; 0 turns the limit off.
    rate_limit_per_second: float = 50.0
    rate_limit_burst: int = 100
    # Remote addresses never limited, comma-separated: the machine's own tools (load, sync). Behind a
    # proxy on this host, have it send X-Forwarded-For (uvicorn trusts it from 127.0.0.1) or clear this.
    rate_limit_exempt: str = "127.0.0.1,::1"
    # Origins of residents' web apps allowed to call the API from a browser (CORS): exact origins,
    # comma-separated ("https://jkda.sh.example,https://app.example"); empty: no CORS.
    cors_origins: str = ""
    # Seconds a request may run before it is answered 503 (the work is cancelled; 0: no limit).
    request_timeout_seconds: float = 60.0
    # Send Strict-Transport-Security on every response, not only on https requests (set it when TLS
    # ends at a proxy that does not pass X-Forwarded-Proto).
    hsts_always: bool = False

    # Field encryption (fhir_server/storage/field_crypto.py): ID-document and phone numbers are
    # stored encrypted (AES-256-GCM) and searched through a keyed blind index (HMAC-SHA256). On by
    # default: the server refuses to start without a key; `fhir-server run` makes one beside its
    # embedded mongod's data folder. Setting it false stores them in clear (logged loudly).
    field_encryption: bool = True
    # The master key: base64 of 32 random bytes (FHIR_FIELD_KEY), or a file holding it (mode 600).
    # Keep it out of the database's backups, and back it up apart: without it the numbers are lost.
    field_key: str = ""
    field_key_file: str = ""
    # Earlier master keys, comma-separated base64: their tokens still decrypt after a key change.
    field_previous_keys: str = ""
    # Identifier systems protected besides the 身份证 system (comma-separated URIs).
    field_protected_systems: str = ""


def _coerce(value: str, kind: type) -> Any:
    if kind is bool:
        return value.strip().lower() in ("1", "true", "yes", "on")
    if kind is int:
        return int(value)
    if kind is float:
        return float(value)
    return value


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Build settings from defaults, an optional TOML file, the environment, then ``overrides``."""
    settings = Settings()
    path = config_file or os.environ.get("FHIR_SERVER_CONFIG")
    values: dict[str, Any] = {}
    if path:
        try:
            values.update(tomllib.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"cannot read settings file {path}: {e}") from None
    kinds = {
        f.name: (int if f.type == "int" else float if f.type == "float" else bool if f.type == "bool" else str)
        for f in fields(Settings)
    }
    for name, kind in kinds.items():
        env = os.environ.get("FHIR_" + name.upper())
        if env is not None:
            try:
                values[name] = _coerce(env, kind)
            except ValueError:
                raise ValueError(f"FHIR_{name.upper()}={env!r} is not a valid {kind.__name__}") from None
    if os.environ.get("MONGODB_URI"):
        values["mongodb_uri"] = os.environ["MONGODB_URI"]
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - set(kinds)
    if unknown:
        raise ValueError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    return replace(settings, **values)
