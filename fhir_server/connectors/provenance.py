"""Traceability of every connector write (可溯).

For each resource version a connector writes:
- ``meta.source`` = ``<source system>#<source record id>`` (set by the mapping);
- a ``Binary`` holding the source record's bytes, id = their SHA-256 (content-addressed: the same
  bytes are stored once), ``securityContext`` = the resource it produced;
- a ``Provenance`` (cn-provenance) targeting that exact version, with the source organisation and
  the connector (software, with version) as agents and the source record as entity: its id, its
  SHA-256, the mapping with version (cn-transform) and ``what`` = the Binary.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timezone
from typing import Any

from fhir_server import __version__ as _server_version

BASE = "https://fhir.cn-ehr.org"
_SD = f"{BASE}/StructureDefinition"
CONNECTOR_VERSION = "0.1.0"


def provenance_id(type_: str, id_: str, version: int) -> str:
    return "prov-" + hashlib.sha256(f"{type_}/{id_}/{version}".encode()).hexdigest()[:40]


def raw_binary(raw: bytes, sha256: str, target: str, meta_source: str, content_type: str) -> dict[str, Any]:
    return {
        "resourceType": "Binary",
        "id": sha256,
        "meta": {"source": meta_source},
        "contentType": content_type,
        "securityContext": {"reference": target},
        "data": base64.b64encode(raw).decode(),
    }


def provenance(
    *,
    target: str,
    version: int,
    created: bool,
    mapping: dict[str, Any],
    connector: str,
    record_id: str,
    sha256: str,
    kind: str,
    recorded: datetime | None = None,
) -> dict[str, Any]:
    """The cn-provenance of version ``version`` of ``target`` (``Type/id``)."""
    source = mapping["source"]
    type_, id_ = target.split("/", 1)
    org = source["organisation"]
    return {
        "resourceType": "Provenance",
        "id": provenance_id(type_, id_, version),
        "meta": {"profile": [f"{_SD}/cn-provenance"], "source": f"{source['system']}#{record_id}"},
        "target": [{"reference": f"{target}/_history/{version}"}],
        "recorded": (recorded or datetime.now(timezone.utc)).isoformat(timespec="milliseconds"),
        "activity": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                    "code": "CREATE" if created else "UPDATE",
                    "display": "create" if created else "update",
                }
            ]
        },
        "agent": [
            {
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "author"}]},
                "who": {"identifier": {"system": org["system"], "value": org["value"]}, "display": org["display"]},
            },
            {
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "assembler"}]},
                "who": {
                    "identifier": {"system": f"{BASE}/identifier/software", "value": f"fhir-server-cn/connector/{connector}"},
                    "display": f"fhir-server-cn {connector} connector {CONNECTOR_VERSION} (server {_server_version})",
                },
            },
        ],
        "entity": [
            {
                "extension": [
                    {"url": f"{_SD}/cn-source-system", "valueIdentifier": {"system": f"{BASE}/identifier/source-system", "value": source["code"]}},
                    {"url": f"{_SD}/cn-source-record-id", "valueIdentifier": {"system": source["system"], "value": record_id}},
                    {"url": f"{_SD}/cn-source-hash", "valueString": sha256},
                    {"url": f"{_SD}/cn-transform", "valueCanonical": f"{mapping['url']}|{mapping['version']}"},
                ],
                "role": "source",
                "what": {
                    "reference": f"Binary/{sha256}",
                    "identifier": {"system": source["system"], "value": record_id},
                    "display": f"{source['name']} {kind} {record_id}",
                },
            }
        ],
    }
