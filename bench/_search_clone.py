"""Grow a Synthea set: copies of each patient bundle with new ids, for the search benchmark's scaling.

Every id a bundle mints (its ``urn:uuid`` fullUrls, which Synthea also uses as resource ids and in
identifiers) is replaced by a new UUID wherever it occurs, so references inside the copy stay
consistent. Conditional references to the shared Organization/Practitioner/Location records are
left alone so that copies point at the same shared records. The copy's Patient gets new SSN,
licence and passport numbers and a suffixed given name: a distinct person for any matching rule.
The family name is kept, so a search by family finds the copies too and grows with the data.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import orjson

_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_NAMESPACE = uuid.UUID("6f1c2a9e-2b53-4c62-9a43-0d1f4f2b7c11")
_SUFFIXED_IDENTIFIERS = ("http://hl7.org/fhir/sid/us-ssn", "urn:oid:2.16.840.1.113883.4.3.25",
                         "http://standardhealthrecord.org/fhir/StructureDefinition/passportNumber")


def _minted_ids(bundle: dict[str, Any]) -> set[bytes]:
    ids: set[bytes] = set()
    for entry in bundle.get("entry") or []:
        full_url = entry.get("fullUrl") or ""
        if full_url.startswith("urn:uuid:"):
            ids.add(full_url[9:].lower().encode())
        rid = (entry.get("resource") or {}).get("id")
        if isinstance(rid, str) and _UUID.fullmatch(rid.encode()):
            ids.add(rid.encode())
    return ids


def _vary_patient(patient: dict[str, Any], copy: int) -> None:
    for ident in patient.get("identifier") or []:
        if ident.get("system") in _SUFFIXED_IDENTIFIERS and isinstance(ident.get("value"), str):
            ident["value"] = f"{ident['value']}-{copy}"
    for name in patient.get("name") or []:
        if isinstance(name.get("given"), list):
            name["given"] = [f"{g}c{copy}" if isinstance(g, str) else g for g in name["given"]]


def clone_bundle(data: bytes, copy: int) -> bytes:
    """Copy number ``copy`` (1, 2, …) of a patient transaction bundle, with fresh ids throughout."""
    ids = _minted_ids(orjson.loads(data))
    # Deterministic: the same copy of the same bundle gets the same ids on every run.
    mapping = {old: str(uuid.uuid5(_NAMESPACE, f"{copy}:{old.decode()}")).encode() for old in ids}
    renamed = _UUID.sub(lambda m: mapping.get(m.group(0), m.group(0)), data)
    bundle = orjson.loads(renamed)
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "Patient":
            _vary_patient(resource, copy)
    return orjson.dumps(bundle)


def write_clones(files: list[Path], copies: int, into: Path) -> tuple[list[Path], int]:
    """``copies`` clones of each patient file (``0-…`` shared files are not cloned) in ``into``;
    the written files and their entry count."""
    into.mkdir(parents=True, exist_ok=True)
    out, entries = [], 0
    for path in files:
        if path.name.startswith("0-"):
            continue
        data = path.read_bytes()
        per_copy = len(orjson.loads(data).get("entry") or [])
        for copy in range(1, copies + 1):
            target = into / f"c{copy}-{path.name}"
            target.write_bytes(clone_bundle(data, copy))
            entries += per_copy
            out.append(target)
    return out, entries
