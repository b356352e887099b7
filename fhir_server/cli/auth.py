"""``fhir-server auth dev-token``: get an access token from the running development authorization
server, through the real flows — private_key_jwt client credentials for the demo hospital (its
private key is read from MongoDB, ``_auth_demo_keys``), authorization code + PKCE with the
password-less demo login for the clinician, resident and auditor."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import click
import httpx

from fhir_server.auth import clients, keys

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_KINDS = {
    # kind: (client, login_hint, default scope)
    "hospital": (clients.DEMO_HOSPITAL, None, "system/*.rs system/Observation.cu system/Patient.cu"),
    "clinician": (clients.DEMO_CLINICIAN_APP, "clinician", "user/*.cruds openid fhirUser"),
    "resident": (clients.DEMO_RESIDENT_APP, "resident", "launch/patient patient/*.rs patient/Observation.c openid fhirUser"),
    "auditor": (clients.DEMO_CLINICIAN_APP, "auditor", "user/AuditEvent.rs openid fhirUser"),
}


def _fail(resp: httpx.Response) -> click.ClickException:
    try:
        body = resp.json()
        text = f"{body.get('error')}: {body.get('error_description')}"
    except ValueError:
        text = resp.text[:300]
    return click.ClickException(f"HTTP {resp.status_code} from {resp.request.url}: {text}")


def _demo_key() -> dict:
    from pymongo import MongoClient

    from fhir_server.config import load_settings

    uri = os.environ.get("MONGODB_URI")
    if not uri:
        raise click.ClickException("MONGODB_URI is not set: the demo hospital's private key is read from the database")
    mongo: MongoClient = MongoClient(uri, serverSelectionTimeoutMS=5000)
    with mongo:
        doc = mongo[load_settings().database][clients.DEMO_KEYS].find_one({"_id": clients.DEMO_HOSPITAL})
    if not doc:
        raise click.ClickException("no demo hospital key yet: fetch /auth/jwks once (the server seeds the demo clients)")
    return dict(doc["jwk"])


@click.group(context_settings=_CONTEXT)
def auth_group() -> None:
    """访问控制（开发用）/ Access control helpers for development."""


@auth_group.command("dev-token", context_settings=_CONTEXT)
@click.option("--kind", type=click.Choice(sorted(_KINDS)), required=True, help="demo client / user")
@click.option("--url", default="http://127.0.0.1:8080/fhir", show_default=True, help="FHIR 服务基础地址 / FHIR base URL")
@click.option("--scope", default=None, help="requested scopes (default: the demo's usual ones)")
@click.option("--json", "as_json", is_flag=True, help="print the whole token response")
def dev_token(kind: str, url: str, scope: str | None, as_json: bool) -> None:
    """打印演示访问令牌 / Print an access token of a demo client or user."""
    client_id, login_hint, default_scope = _KINDS[kind]
    scope = scope or default_scope
    base = url.rstrip("/")
    with httpx.Client(timeout=30) as http:
        try:
            conf_resp = http.get(base + "/.well-known/smart-configuration")
        except httpx.HTTPError as e:
            raise click.ClickException(f"cannot reach {base}: {e}") from None
        if conf_resp.status_code != 200:
            raise _fail(conf_resp)
        conf = conf_resp.json()
        token_url = conf["token_endpoint"]
        if kind == "hospital":
            http.get(conf["jwks_uri"])  # makes sure the demo clients are seeded
            now = int(time.time())
            claims = {"iss": client_id, "sub": client_id, "aud": token_url, "iat": now, "exp": now + 240, "jti": uuid.uuid4().hex}
            form = {
                "grant_type": "client_credentials",
                "scope": scope,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": keys.sign(claims, _demo_key()),
            }
        else:
            verifier = secrets.token_urlsafe(48)
            challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            params = {
                "response_type": "code",
                "client_id": client_id,
                "redirect_uri": clients.DEMO_REDIRECT_URI,
                "scope": scope,
                "state": secrets.token_urlsafe(8),
                "aud": base,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
                "login_hint": login_hint,
            }
            resp = http.get(conf["authorization_endpoint"], params=params)
            if resp.status_code != 302:
                raise _fail(resp)
            got = {k: v[0] for k, v in parse_qs(urlsplit(resp.headers["location"]).query).items()}
            if "code" not in got:
                raise click.ClickException(f"authorize refused: {got.get('error')}: {got.get('error_description')}")
            form = {
                "grant_type": "authorization_code",
                "code": got["code"],
                "redirect_uri": clients.DEMO_REDIRECT_URI,
                "client_id": client_id,
                "code_verifier": verifier,
            }
        resp = http.post(token_url, data=form)
        if resp.status_code != 200:
            raise _fail(resp)
    if as_json:
        import json

        click.echo(json.dumps(resp.json(), ensure_ascii=False, indent=2))
    else:
        click.echo(resp.json()["access_token"])
