"""Where the development authorization server lives, and who tokens are for, from the settings."""

from __future__ import annotations

from urllib.parse import urlsplit

from fhir_server.config import Settings

_DEFAULT_ORIGIN = "http://127.0.0.1:8080"  # `make run`


def origin(settings: Settings, request_origin: str | None = None) -> str:
    """scheme://host[:port] of the server: from ``public_base_url``, else the request's, else the default."""
    if settings.public_base_url:
        u = urlsplit(settings.public_base_url)
        return f"{u.scheme}://{u.netloc}"
    return (request_origin or _DEFAULT_ORIGIN).rstrip("/")


def fhir_base(settings: Settings, request_origin: str | None = None) -> str:
    if settings.public_base_url:
        return settings.public_base_url.rstrip("/")
    return origin(settings, request_origin) + settings.base_path


def issuer(settings: Settings) -> str:
    """``iss`` of the development server's tokens: fixed, never taken from a request's Host header."""
    return (settings.auth_issuer or origin(settings) + "/auth").rstrip("/")


def audiences(settings: Settings) -> list[str]:
    """Every ``aud`` value an access token may carry for this server (``auth_audience`` is comma-separated)."""
    configured = [a.strip().rstrip("/") for a in settings.auth_audience.split(",") if a.strip()]
    return configured or [fhir_base(settings)]


def external_issuers(text: str) -> dict[str, str]:
    """``"issuer=jwks_url,issuer2=jwks_url2"`` → ``{issuer: jwks_url}``; ValueError when malformed."""
    out: dict[str, str] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        iss, sep, url = item.partition("=")
        if not sep or not iss.strip() or not url.strip().startswith(("https://", "http://")):
            raise ValueError(f"auth_external_issuers: {item[:120]!r} is not issuer=https://…/jwks")
        out[iss.strip().rstrip("/")] = url.strip()
    return out
