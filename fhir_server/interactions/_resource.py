"""Helpers shared by the interactions: ids, meta, ETags, the write path into a unit of work."""

from __future__ import annotations

import os
import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson

from fhir_server.definitions import RESOURCE_TYPES
from fhir_server.interactions.context import FhirResponse, Tx
from fhir_server.outcome import FhirError, bad_request
from fhir_server.search.extract import index_resource
from fhir_server.storage.base import Stored, Write

ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_ETAG_RE = re.compile(r'^\s*(?:W/)?"?([^"\s]+)"?\s*$')


def new_id() -> str:
    """A server-assigned id: time-ordered (index-friendly) and unguessable."""
    return f"{time.time_ns() // 1_000_000:011x}{os.urandom(8).hex()}"


def instant(dt: datetime) -> str:
    """A FHIR instant in UTC with milliseconds (``2026-11-22T06:50:00.123Z``)."""
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


def http_date(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%a, %d %b %Y %H:%M:%S GMT")


def etag(version: int) -> str:
    return f'W/"{version}"'


def parse_etag(value: str) -> int:
    m = _ETAG_RE.match(value)
    if not m or not m.group(1).isdigit():
        raise bad_request(f"Malformed ETag {value!r}: expected W/\"<version>\"", code="invalid")
    return int(m.group(1))


def check_type(type_: str) -> None:
    if type_ not in RESOURCE_TYPES:
        raise FhirError.of(404, "not-supported", f"Unknown resource type '{type_}'")


def check_id(id_: str) -> None:
    if not ID_RE.match(id_):
        raise bad_request(f"Invalid resource id '{id_[:80]}': must match [A-Za-z0-9-.]{{1,64}}")


def require_resource(body: Any, type_: str | None) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a FHIR resource (a JSON object)", code="structure")
    rt = body.get("resourceType")
    if not isinstance(rt, str):
        raise bad_request("The resource has no resourceType", expression=["resourceType"], code="structure")
    if type_ is not None and rt != type_:
        raise bad_request(
            f"resourceType '{rt}' does not match the URL's type '{type_}'", expression=["resourceType"]
        )
    return body


def stored_headers(stored: Stored, base_url: str, *, location: bool = False) -> dict[str, str]:
    headers = {"ETag": etag(stored.version), "Last-Modified": http_date(stored.last_updated)}
    if location:
        headers["Location"] = f"{base_url}/{stored.type}/{stored.id}/_history/{stored.version}"
    return headers


def stamped(resource: dict[str, Any], id_: str, version: int, when: datetime) -> dict[str, Any]:
    """A copy of ``resource`` with the server's id and meta; other meta (profile, tag) is kept."""
    out = dict(resource)
    out["id"] = id_
    meta = dict(out.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = instant(when)
    # Keep resourceType, id, meta first: readers expect it and it costs nothing.
    ordered = {"resourceType": out.pop("resourceType"), "id": out.pop("id"), "meta": meta}
    out.pop("meta", None)
    ordered.update(out)
    return ordered


def _next_time(previous: Stored | None) -> datetime:
    """Now, to the millisecond (what BSON dates hold), and after the previous version."""
    now = datetime.now(timezone.utc)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    if previous is not None and now <= previous.last_updated:
        now = previous.last_updated + timedelta(milliseconds=1)
    return now


async def store_resource(
    tx: Tx, resource: dict[str, Any], id_: str, current: Stored | None, method: str, *, base_url: str = "", trusted: bool = False
) -> tuple[Stored, dict[str, Any]]:
    """Run the pre-store interceptors, then stage the new version in ``tx``.

    ``base_url`` is this server's base as the client sees it: an absolute reference under it is a
    local reference (references.html#literal), held to referential integrity like a relative one.
    ``trusted``: the server built this resource itself from a fixed template (a connector's
    Provenance and raw-payload Binary), so the interceptors that judge input are skipped; tests
    validate what those templates produce against their profiles instead."""
    type_ = resource["resourceType"]
    version = current.version + 1 if current else 1
    when = _next_time(current)
    final = stamped(resource, id_, version, when)
    if not trusted:
        for hook in tx.server.pre_store:
            await hook(tx, final, current)
    raw = orjson.dumps(final)
    index = index_resource(final, raw, base_url)
    tx.references.update(index.get("_refs", ()))
    tx.write(
        Write(
            type=type_,
            id=id_,
            version=version,
            last_updated=when,
            raw=raw,
            index=index,
            method=method,
            expected_version=current.version if current else None,
        )
    )
    return Stored(type_, id_, version, when, False, raw, method), final


def stage_deletion(tx: Tx, current: Stored) -> Stored:
    when = _next_time(current)
    version = current.version + 1
    tx.write(
        Write(
            type=current.type,
            id=current.id,
            version=version,
            last_updated=when,
            raw=None,
            index={},
            method="DELETE",
            expected_version=current.version,
        )
    )
    tx.deleted.add(f"{current.type}/{current.id}")
    return Stored(current.type, current.id, version, when, True, None, "DELETE")


def prefer(headers: Any, name: str) -> str | None:
    """The value of ``name`` in the Prefer header (``return``, ``handling``), or None."""
    for part in (headers.get("prefer") or "").split(","):
        key, _, value = part.strip().partition("=")
        if key.strip() == name:
            return value.strip().strip('"')
    return None


def write_response(status: int, stored: Stored, resource: dict[str, Any] | None, base_url: str) -> FhirResponse:
    return FhirResponse(
        status,
        raw=stored.raw,
        resource=resource,
        headers=stored_headers(stored, base_url, location=True),
        stored=stored,
    )
