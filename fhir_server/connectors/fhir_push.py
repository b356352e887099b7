"""FHIR R4 Bundles pushed by registered hospitals → the framework's source records (Units).

A hospital that already speaks FHIR pushes a Bundle (transaction, batch or collection). Each entry
is one source record: its exact bytes (sliced from the body, not re-serialised) are the raw record,
hashed and kept as a Binary; its resource gets a deterministic id in the hospital's namespace, its
references are rewritten to those ids, and ``runner.process`` writes it with ``meta.source``, a
Provenance per version, the ledger (idempotence) and dead letters - as for every other connector.

Rules (mappings/fhir-push/README.md says why):

- record id: ``Type/<hospital id>`` | ``Type?identifier=<system>|<value>`` | ``Type@<fullUrl>``;
  server id ``fp-<typ>-<sha256(source code|record id)[:40]>``: a re-push updates, and two
  hospitals never write the same resource (a pushed Patient is a SOURCE Patient of its hospital).
- references to entries of the bundle (fullUrl, ``Type/id``, ``Type?identifier=``) and to records
  the same hospital pushed before are rewritten; a reference that resolves nowhere, or to another
  entry refused, refuses the entry.
- the entries are written one group each (a bad entry costs only itself; entries referring to it
  then fail referential integrity): Patients first, then the others after what they refer to.
- not honoured, so refused: DELETE, GET/HEAD, PATCH, ``ifMatch``/``ifNoneMatch``/``ifModifiedSince``,
  conditional criteria other than ``identifier=system|value``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qsl, quote

import orjson
import yaml

from fhir_server.connectors import runner
from fhir_server.connectors._db import database
from fhir_server.connectors.deadletter import Rejection
from fhir_server.connectors.mapping import MAPPINGS, MappedSource, shipped
from fhir_server.connectors.unit import Unit
from fhir_server.definitions import RESOURCE_TYPES
from fhir_server.interactions.context import Server, Tx
from fhir_server.strict_json import reject_duplicate_keys, reject_non_finite
from fhir_server.outcome import FhirError
from fhir_server.storage import field_crypto
from fhir_server.storage.base import Stored

REGISTRY = MAPPINGS / "fhir-push" / "sources.yaml"
CONTENT_TYPE = "application/fhir+json"
_MPI_SYSTEM = "https://fhir.cn-ehr.org/CodeSystem/mpi"
_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_LOCAL_RE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")
_URL_TAIL_RE = re.compile(r"/([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")
# What may stay unencoded in a record id (it ends up in meta.source, a uri: no spaces).
_SAFE = ":/.-_~@!$&'()*+,;="
_UNHONOURED_HEADERS = ("ifMatch", "ifNoneMatch", "ifModifiedSince")


def refused(status: int, code: str, zh: str, en: str) -> FhirError:
    """The whole push is refused (the HTTP layer renders it as an OperationOutcome)."""
    return FhirError.of(status, code, en, details_zh=zh)


@lru_cache(maxsize=4)
def load_registry(path: Path = REGISTRY) -> dict[str, dict[str, Any]]:
    """The registered hospitals by source code (cached; callers must not mutate it)."""
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    out: dict[str, dict[str, Any]] = {}
    for code, entry in (data.get("sources") or {}).items():
        if not {"name", "system", "organisation"} <= set(entry):
            raise ValueError(f"{path}: source {code} needs name, system and organisation")
        out[code] = {**entry, "code": code}
    return out


# -- the body: exact bytes of each entry ---------------------------------------------------------


_DECODER = json.JSONDecoder(object_pairs_hook=reject_duplicate_keys, parse_constant=reject_non_finite)
_WS = re.compile(r"[ \t\n\r]*")


def split_bundle(text: str) -> tuple[dict[str, Any], list[tuple[Any, str]]]:
    """The Bundle without ``entry``, and each entry with its exact text.

    The entries are sliced from the body so that the hash and the Binary are of the bytes the
    hospital sent, not of a re-serialisation. Raises ValueError (json.JSONDecodeError) when the
    text is not one JSON object."""
    scan = _DECODER.scan_once  # type: ignore[attr-defined]
    i = _WS.match(text, 0).end()  # type: ignore[union-attr]
    if text[i : i + 1] != "{":
        raise ValueError("the body is not a JSON object")
    top: dict[str, Any] = {}
    entries: list[tuple[Any, str]] = []
    i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
    if text[i : i + 1] == "}":
        i += 1
    else:
        while True:
            if text[i : i + 1] != '"':
                raise json.JSONDecodeError("expected a key", text, i)
            key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
            if key in top:
                raise json.JSONDecodeError(f"duplicate key {key!r}", text, i)
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            if text[i : i + 1] != ":":
                raise json.JSONDecodeError("expected ':'", text, i)
            i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
            if key == "entry" and text[i : i + 1] == "[":
                top["entry"] = []  # the entries are returned apart, with their text
                i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
                if text[i : i + 1] == "]":
                    i += 1
                else:
                    while True:
                        start = i
                        try:
                            value, i = scan(text, i)
                        except StopIteration:
                            raise json.JSONDecodeError("expected a value", text, i) from None
                        entries.append((value, text[start:i]))
                        i = _WS.match(text, i).end()  # type: ignore[union-attr]
                        if text[i : i + 1] == ",":
                            i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
                            continue
                        if text[i : i + 1] != "]":
                            raise json.JSONDecodeError("expected ',' or ']'", text, i)
                        i += 1
                        break
            else:
                try:
                    top[key], i = scan(text, i)
                except StopIteration:
                    raise json.JSONDecodeError("expected a value", text, i) from None
            i = _WS.match(text, i).end()  # type: ignore[union-attr]
            if text[i : i + 1] == ",":
                i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
                continue
            if text[i : i + 1] != "}":
                raise json.JSONDecodeError("expected ',' or '}'", text, i)
            i += 1
            break
    i = _WS.match(text, i).end()  # type: ignore[union-attr]
    if i != len(text):
        raise json.JSONDecodeError("extra data after the Bundle", text, i)
    return top, entries


# -- entries -------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One Bundle entry on its way to a Unit (or a Rejection)."""

    index: int
    raw: bytes
    full_url: str | None = None
    resource: dict[str, Any] | None = None
    type: str = "entry"
    hospital_id: str | None = None  # the id the hospital gives the resource
    record_id: str = ""
    server_id: str = ""
    source_time: str = ""
    rejection: Rejection | None = None
    targets: dict[str, str] = field(default_factory=dict)  # reference → the rewritten reference
    depends: set[int] = field(default_factory=set)  # indexes of the entries it refers to

    @property
    def key(self) -> str:
        return f"{self.type}/{self.server_id}"

    @property
    def context(self) -> dict[str, Any]:
        return {"index": self.index, "fullUrl": self.full_url}


def _references(node: Any) -> Iterator[str]:
    """Every ``reference`` string in ``node`` (contained resources included)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                yield v
            elif isinstance(v, (dict, list)):
                yield from _references(v)
    elif isinstance(node, list):
        for v in node:
            yield from _references(v)


def _rewrite(node: Any, mapping: dict[str, str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                if v in mapping:
                    node[k] = mapping[v]
            elif k == "div" and isinstance(v, str) and "urn:" in v:
                # narrative links to bundle entries follow their targets (as the transaction does)
                for old, new in mapping.items():
                    if old.startswith("urn:") and old in v:
                        v = v.replace(old, new)
                node[k] = v
            elif isinstance(v, (dict, list)):
                _rewrite(v, mapping)
    elif isinstance(node, list):
        for v in node:
            _rewrite(v, mapping)


def _identifier_criteria(criteria: str) -> tuple[str, str] | None:
    """``identifier=system|value`` → (system, value); any other criteria → None."""
    try:
        pairs = parse_qsl(criteria.lstrip("?"), keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return None
    if len(pairs) != 1 or pairs[0][0] != "identifier":
        return None
    system, bar, value = pairs[0][1].partition("|")
    return (system, value) if bar and system and value else None


def _identifiers(resource: dict[str, Any]) -> list[Any]:
    value = resource.get("identifier")
    return value if isinstance(value, list) else []


def _utc(value: Any) -> str:
    """The hospital's meta.lastUpdated in UTC (orders snapshots of one record), or ''."""
    if not isinstance(value, str):
        return ""
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return ""
    if dt.tzinfo is None:
        return ""
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds")


class FhirPushConnector(MappedSource):
    """One registered hospital's pushes: parse, identify, resolve references, build Units."""

    source_kind = "fhir-push"

    def __init__(self, source_code: str, mapping: dict[str, Any] | None = None, registry: dict[str, dict[str, Any]] | None = None) -> None:
        base = mapping or shipped("fhir-push")
        sources = load_registry() if registry is None else registry
        if source_code not in sources:
            raise refused(
                403,
                "forbidden",
                f"推送方“{source_code}”未登记，不接受其数据（登记见 mappings/fhir-push/sources.yaml）",
                f"source '{source_code}' is not a registered pushing hospital (mappings/fhir-push/sources.yaml)",
            )
        # The Provenance, ledger and dead letters are the hospital's: its entry replaces `source`.
        super().__init__({**base, "source": sources[source_code]})
        self.bundle_types = frozenset(base["bundle_types"])
        self.types = frozenset(base["resource_types"])
        self.sensitive = frozenset(base.get("sensitive_identifier_systems") or ())
        self.pushed_source_ext: str = base["pushed_source_extension"]

    # -- ids ---------------------------------------------------------------------------------

    def server_id(self, type_: str, record_id: str) -> str:
        """Deterministic, and in this hospital's namespace: never another source's resource."""
        return f"fp-{type_[:3].lower()}-" + hashlib.sha256(f"{self.code}|{record_id}".encode()).hexdigest()[:40]

    def identifier_record_id(self, type_: str, system: str, value: str) -> str:
        if system in self.sensitive:  # an ID-card number must not travel in meta.source
            value = "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:24]
        return f"{type_}?identifier={quote(system, safe=_SAFE)}|{quote(value, safe=_SAFE)}"

    # -- parsing -----------------------------------------------------------------------------

    def parse_bundle(self, body: bytes, max_entries: int = 10_000) -> tuple[str, list[Entry]]:
        """(bundle type, entries); raises FhirError (400/413) when the push is not a usable Bundle."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise refused(400, "structure", f"推送内容不是有效的 UTF-8 编码（第 {e.start} 字节）", f"the body is not valid UTF-8 (byte {e.start})") from None
        text = text.removeprefix("\ufeff")
        try:
            top, raw_entries = split_bundle(text)
        except ValueError as e:
            where = f"（第 {e.lineno} 行第 {e.colno} 列）" if isinstance(e, json.JSONDecodeError) else ""
            msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise refused(400, "structure", f"推送内容不是合法的 JSON{where}：{msg}", f"the body is not well-formed JSON: {e}") from None
        if top.get("resourceType") != "Bundle":
            rt = top.get("resourceType")
            raise refused(400, "invalid", f"推送内容应为 FHIR Bundle，收到的是 {rt!r}", f"the body must be a FHIR Bundle, not {rt!r}")
        btype = top.get("type")
        if not isinstance(btype, str) or btype not in self.bundle_types:
            allowed = ", ".join(sorted(self.bundle_types))
            raise refused(400, "not-supported", f"不接受类型为 {btype!r} 的 Bundle（只接受 {allowed}）", f"Bundle.type {btype!r} is not accepted (only {allowed})")
        if "entry" in top and not isinstance(top["entry"], list):
            raise refused(400, "structure", "Bundle.entry 应为数组", "Bundle.entry must be an array")
        if len(raw_entries) > max_entries:
            raise refused(413, "too-costly", f"Bundle 条目过多：{len(raw_entries)} 条，上限 {max_entries}", f"the Bundle has {len(raw_entries)} entries, more than {max_entries}")
        return btype, [self._entry(i, value, span.encode("utf-8"), btype) for i, (value, span) in enumerate(raw_entries)]

    def _reject(self, e: Entry, code: str, zh: str, en: str) -> Entry:
        where = f"Bundle.entry[{e.index}]"
        e.rejection = Rejection(e.type, e.record_id or f"entry/{hashlib.sha256(e.raw).hexdigest()[:16]}", code, f"{where}：{zh}", f"{where}: {en}", e.raw, e.context)
        return e

    def _entry(self, index: int, value: Any, raw: bytes, btype: str) -> Entry:
        """Identify one entry (its type, the hospital's id, the record id) or refuse it."""
        e = Entry(index, raw)
        if not isinstance(value, dict):
            return self._reject(e, "structure", "条目不是 JSON 对象", "the entry is not a JSON object")
        full_url = value.get("fullUrl")
        e.full_url = full_url if isinstance(full_url, str) and full_url else None
        resource = value.get("resource")
        rtype = resource.get("resourceType") if isinstance(resource, dict) else None
        if isinstance(rtype, str):
            e.type = rtype
        request = value.get("request")
        if request is None and btype != "collection":
            return self._reject(e, "unsupported-request", f"{btype} 的条目缺少 request", f"an entry of a {btype} needs a request")
        if request is not None and not isinstance(request, dict):
            return self._reject(e, "unsupported-request", "request 不是 JSON 对象", "request is not a JSON object")
        request = request or {}
        method = request.get("method")
        if request and method not in ("POST", "PUT"):
            return self._reject(
                e,
                "unsupported-request",
                f"不接受 {method} 请求：推送只能新增或更新记录；撤销记录请联系区域平台（本接口不删除数据）",
                f"{method} is not accepted: a push can only create or update records; withdrawing one goes through the platform (this interface deletes nothing)",
            )
        for header in _UNHONOURED_HEADERS:
            if request.get(header):
                return self._reject(
                    e,
                    "unsupported-request",
                    f"不支持 request.{header}：推送按内容幂等写入，无法遵从该条件",
                    f"request.{header} cannot be honoured: pushes are written idempotently by content",
                )
        if not isinstance(rtype, str):
            return self._reject(e, "structure", "条目没有 resource，或 resource 缺少 resourceType", "the entry has no resource with a resourceType")
        if rtype not in RESOURCE_TYPES:
            return self._reject(e, "unknown-type", f"未知的资源类型 {rtype}", f"unknown resource type {rtype}")
        if rtype not in self.types:
            return self._reject(e, "unsupported-type", f"不接受推送 {rtype} 资源", f"{rtype} resources are not accepted from a push")
        try:
            # A private copy, and one the runner can serialise (orjson: integers of 64 bits at most).
            e.resource = resource = orjson.loads(orjson.dumps(resource))
        except (TypeError, orjson.JSONEncodeError) as err:
            return self._reject(e, "structure", f"资源无法处理：{err}", f"the resource cannot be processed: {err}")
        if rtype == "Patient":
            # The MPI owns Patient.link and the golden tag: a pushed Patient is a source record, and
            # its links (which the MPI would follow) are dropped before its references are resolved.
            resource.pop("link", None)
        # The hospital's id: request.url Type/id, resource.id, or a RESTful fullUrl.
        url = request.get("url")
        criteria: str | None = None
        ids: list[str] = []
        if isinstance(url, str) and url:
            before, question, query = url.partition("?")
            path = before.rstrip("/").split("/")[-2:]  # "Type", "Type/id", or an absolute URL's tail
            if path[0] != rtype and path[-1] != rtype:
                return self._reject(e, "unsupported-request", f"request.url“{url[:100]}”与资源类型 {rtype} 不符", f"request.url '{url[:100]}' does not match the resource type {rtype}")
            if len(path) == 2 and path[0] == rtype and not question:
                ids.append(path[1])
            if question:
                criteria = query
        if method == "POST" and isinstance(request.get("ifNoneExist"), str):
            criteria = request["ifNoneExist"]
        if isinstance(resource.get("id"), str):
            ids.append(resource["id"])
        if e.full_url and not e.full_url.startswith("urn:"):
            m = _URL_TAIL_RE.search(e.full_url)
            if m and m.group(1) == rtype and not ids:
                ids.append(m.group(2))
        if len(set(ids)) > 1:
            return self._reject(e, "id-mismatch", f"request.url 的 id 与 resource.id 不一致（{ids[0]} ≠ {ids[1]}）", f"the id in request.url differs from resource.id ({ids[0]} != {ids[1]})")
        ident: tuple[str, str] | None = None
        if criteria is not None:
            ident = _identifier_criteria(criteria)
            if ident is None:
                return self._reject(
                    e,
                    "unsupported-request",
                    f"只支持 identifier=系统|值 形式的条件（收到“{criteria[:100]}”）",
                    f"only identifier=system|value criteria can be honoured (got '{criteria[:100]}')",
                )
        if ids:
            if not _ID_RE.match(ids[0]):
                return self._reject(e, "structure", f"id“{ids[0][:80]}”不合法", f"invalid id '{ids[0][:80]}'")
            e.hospital_id = ids[0]
            e.record_id = f"{rtype}/{ids[0]}"
        else:
            if ident is None:
                for i in _identifiers(resource):
                    if isinstance(i, dict) and isinstance(i.get("system"), str) and isinstance(i.get("value"), str) and i["system"] and i["value"]:
                        ident = (i["system"], i["value"])
                        break
            if ident is not None:
                e.record_id = self.identifier_record_id(rtype, *ident)
            elif e.full_url and rtype != "Patient":
                e.record_id = f"{rtype}@{quote(e.full_url, safe=_SAFE)}"
            else:
                if rtype == "Patient":
                    zh, en = "患者须有 id 或 identifier（源患者按此确定）", "a Patient needs an id or an identifier (its source identity)"
                else:
                    zh, en = "资源没有 id、identifier 或 fullUrl", "the resource has no id, identifier or fullUrl"
                return self._reject(e, "no-identity", f"{zh}，无法幂等写入", f"{en}: it cannot be written idempotently")
        e.server_id = self.server_id(rtype, e.record_id)
        meta = resource.get("meta")
        e.source_time = _utc(meta.get("lastUpdated")) if isinstance(meta, dict) else ""
        return e

    # -- references --------------------------------------------------------------------------

    async def resolve(self, server: Server, entries: list[Entry]) -> tuple[list[Unit], list[Rejection]]:
        """Resolve every reference (bundle first, then this hospital's earlier pushes, then the
        server), refuse the entries that cannot be resolved, and build the Units in write order."""
        ok = [e for e in entries if e.rejection is None]
        by_url: dict[str, Entry] = {}
        by_local: dict[str, Entry] = {}
        by_ident: dict[tuple[str, str, str], Entry] = {}
        for e in entries:  # refused entries too: what refers to them is refused as parent-rejected
            if e.full_url:
                by_url.setdefault(e.full_url, e)
        for e in ok:
            if e.hospital_id:
                by_local.setdefault(f"{e.type}/{e.hospital_id}", e)
            for i in _identifiers(e.resource):  # type: ignore[arg-type]
                if isinstance(i, dict) and isinstance(i.get("system"), str) and isinstance(i.get("value"), str):
                    by_ident.setdefault((e.type, i["system"], i["value"]), e)

        local: dict[str, tuple[str, str]] = {}  # "Type/id" outside the bundle → (own server id, literal id)
        conditional: set[str] = set()
        problems: dict[int, tuple[str, str, str]] = {}
        for e in ok:
            for ref in set(_references(e.resource)):
                if ref.startswith("#"):
                    continue
                target = by_url.get(ref)
                m = _LOCAL_RE.match(ref) if target is None else None
                if target is None and m:
                    target = by_local.get(f"{m.group(1)}/{m.group(2)}")
                if target is None and "?" in ref and not ref.startswith(("http:", "https:", "urn:")):
                    type_, _, criteria = ref.partition("?")
                    ident = _identifier_criteria(criteria)
                    if ident:
                        target = by_ident.get((type_, *ident))
                    if target is None:
                        conditional.add(ref)
                        continue
                if target is not None:
                    e.targets[ref] = target.key
                    e.depends.add(target.index)
                elif m:
                    type_, id_ = m.group(1), m.group(2)
                    local[ref] = (self.server_id(type_, f"{type_}/{id_}"), id_)
                elif ref.startswith(("urn:uuid:", "urn:oid:")):
                    problems.setdefault(e.index, ("dangling-reference", f"引用“{ref[:100]}”不是本 Bundle 中任何条目的 fullUrl", f"reference '{ref[:100]}' is not the fullUrl of an entry of this Bundle"))
                # other absolute URLs are external references: kept as they are
        found = await self._existing(server, local)
        matches = await self._conditional(server, conditional)
        for e in ok:
            if e.index in problems:
                continue
            for ref in set(_references(e.resource)):
                if ref in e.targets or ref.startswith("#"):
                    continue
                if ref in local:
                    own, literal = local[ref]
                    type_ = ref.split("/", 1)[0]
                    if f"{type_}/{own}" in found:  # pushed earlier by the same hospital
                        e.targets[ref] = f"{type_}/{own}"
                    elif found.get(f"{type_}/{literal}") == "golden":
                        problems[e.index] = ("golden-reference", f"引用“{ref}”是主索引患者；临床数据应引用本院的源患者", f"reference '{ref}' is a golden Patient; clinical data must refer to the hospital's own source Patient")
                        break
                    elif f"{type_}/{literal}" in found:  # a resource of the server itself
                        e.targets[ref] = f"{type_}/{literal}"
                    else:
                        problems[e.index] = ("dangling-reference", f"引用“{ref[:100]}”既不在本 Bundle 中，也不在服务器上", f"reference '{ref[:100]}' is neither in this Bundle nor on the server")
                        break
                elif ref in matches:
                    result = matches[ref]
                    if isinstance(result, tuple):
                        problems[e.index] = result
                        break
                    e.targets[ref] = result
        for e in ok:
            if e.index in problems:
                self._reject(e, *problems[e.index])
        # An entry that refers to a refused entry is refused too (it would dangle).
        by_index = {e.index: e for e in entries}
        changed = True
        while changed:
            changed = False
            for e in ok:
                if e.rejection is None:
                    bad = next((by_index[d] for d in sorted(e.depends) if by_index[d].rejection is not None), None)
                    if bad is not None:
                        self._reject(e, "parent-rejected", f"所引用的条目 Bundle.entry[{bad.index}] 被拒收", f"it refers to Bundle.entry[{bad.index}], which was refused")
                        changed = True
        units = [self._unit(e) for e in _write_order([e for e in entries if e.rejection is None], by_index)]
        return units, [e.rejection for e in entries if e.rejection is not None]

    async def _existing(self, server: Server, local: dict[str, tuple[str, str]]) -> dict[str, str]:
        """Which of the candidate ids exist (value "golden" for a golden Patient)."""
        by_type: dict[str, set[str]] = {}
        for ref, (own, literal) in local.items():
            type_ = ref.split("/", 1)[0]
            if type_ in RESOURCE_TYPES:
                by_type.setdefault(type_, set()).update((own, literal))
        db, out = database(server), {}
        for type_, ids in by_type.items():
            async for doc in db[type_].find({"_id": {"$in": sorted(ids)}, "d": False}, {"r": 1} if type_ == "Patient" else {"_id": 1}):
                golden = type_ == "Patient" and _is_golden(field_crypto.decode(doc.get("r"), type_))
                out[f"{type_}/{doc['_id']}"] = "golden" if golden else "yes"
        return out

    async def _conditional(self, server: Server, refs: set[str]) -> dict[str, str | tuple[str, str, str]]:
        """Conditional references not answered by the bundle: this hospital's own records first;
        for types other than Patient, a single match on the whole server."""
        from fhir_server.interactions._conditional import find_matches, parse_criteria

        out: dict[str, str | tuple[str, str, str]] = {}
        prefix = f"{self.system}#"
        for ref in sorted(refs):
            type_, _, criteria = ref.partition("?")
            if type_ not in RESOURCE_TYPES:
                out[ref] = ("dangling-reference", f"条件引用“{ref[:100]}”的资源类型未知", f"conditional reference '{ref[:100]}' names an unknown type")
                continue

            async def work(tx: Tx, type_: str = type_, criteria: str = criteria) -> list[Stored]:
                return await find_matches(tx, type_, parse_criteria(criteria), limit=20, lock=False)

            try:
                found = await server.transact(work)
            except FhirError as err:
                out[ref] = ("dangling-reference", f"条件引用“{ref[:100]}”无法执行：{err.issues[0].details_zh or err.issues[0].diagnostics}", f"conditional reference '{ref[:100]}' cannot be run: {err.issues[0].diagnostics}")
                continue
            own = [s for s in found if s.raw and _meta_source(s.raw).startswith(prefix)]
            pool = own if own or type_ == "Patient" else [s for s in found if not (type_ == "Patient" and _is_golden(s.raw))]
            if len(pool) == 1:
                out[ref] = f"{type_}/{pool[0].id}"
            elif not pool:
                where = "本 Bundle 和本院已推送的数据" if type_ == "Patient" else "本 Bundle 和服务器"
                out[ref] = ("dangling-reference", f"条件引用“{ref[:100]}”在{where}中都找不到", f"conditional reference '{ref[:100]}' matches nothing in this Bundle" + (" or the hospital's earlier pushes" if type_ == "Patient" else " or on the server"))
            else:
                out[ref] = ("ambiguous-reference", f"条件引用“{ref[:100]}”匹配到多个资源", f"conditional reference '{ref[:100]}' matches more than one resource")
        return out

    # -- the unit ----------------------------------------------------------------------------

    def _unit(self, e: Entry) -> Unit:
        assert e.resource is not None
        resource = e.resource  # already a private copy (made in _entry)
        _rewrite(resource, e.targets)
        resource["id"] = e.server_id
        old: dict[str, Any] = resource["meta"] if isinstance(resource.get("meta"), dict) else {}
        meta: dict[str, Any] = {k: v for k, v in old.items() if k not in ("versionId", "lastUpdated", "source", "tag", "extension")}
        tags = old.get("tag")
        if isinstance(tags, list):  # never the MPI's golden tag: a pushed resource is a source record
            tags = [t for t in tags if not (isinstance(t, dict) and t.get("system") == _MPI_SYSTEM)]
        if tags:
            meta["tag"] = tags
        extensions: list[Any] = old["extension"] if isinstance(old.get("extension"), list) else []
        extensions = [x for x in extensions if not (isinstance(x, dict) and x.get("url") == self.pushed_source_ext)]
        if isinstance(old.get("source"), str):
            extensions.append({"url": self.pushed_source_ext, "valueUri": old["source"]})
        if extensions:
            meta["extension"] = extensions
        meta["source"] = f"{self.system}#{e.record_id}"
        resource["meta"] = meta
        return Unit(e.type, e.record_id, e.raw, resource, e.source_time, f"entry/{e.index}", context=e.context, content_type=CONTENT_TYPE)


def _write_order(entries: list[Entry], by_index: dict[int, Entry]) -> list[Entry]:
    """Patients first, then every entry after the entries it refers to (bundle order otherwise):
    when the runner retries entry by entry, a target is committed before what refers to it."""
    out: list[Entry] = []
    state: dict[int, int] = {}  # 1 visiting, 2 done

    def visit(e: Entry) -> None:
        if state.get(e.index):
            return  # done, or a cycle (both committed together in the first attempt)
        state[e.index] = 1
        for d in sorted(e.depends):
            if by_index[d].rejection is None:
                visit(by_index[d])
        state[e.index] = 2
        out.append(e)

    for e in sorted(entries, key=lambda e: (e.type != "Patient", e.index)):
        visit(e)
    return out


def _meta_source(raw: bytes) -> str:
    meta = orjson.loads(raw).get("meta") or {}
    return meta.get("source") or "" if isinstance(meta, dict) else ""


def _is_golden(raw: bytes | None) -> bool:
    if not raw:
        return False
    meta = orjson.loads(raw).get("meta") or {}
    return any(isinstance(t, dict) and t.get("system") == _MPI_SYSTEM and t.get("code") == "golden" for t in meta.get("tag") or ())


_DEFAULT: Any = object()


async def ingest(
    server: Server,
    bundle_bytes: bytes,
    source_code: str,
    linker: runner.Linker | None = _DEFAULT,
    *,
    run_id: str | None = None,
) -> runner.SyncReport:
    """Store a Bundle pushed by the registered hospital ``source_code``.

    Raises FhirError when the push as a whole is unusable: 403 unknown source, 413 too large or
    too many entries, 400 not UTF-8 / not JSON / not a Bundle / a Bundle type other than
    transaction, batch or collection. Otherwise every entry is counted once in the report
    (received = created + updated + unchanged + rejected); refused entries are in the dead letters
    of ``source_code`` under ``report.run_id``. ``linker`` defaults to the MPI."""
    if linker is _DEFAULT:
        linker = runner.default_linker()
    connector = FhirPushConnector(source_code)
    settings = server.settings
    if len(bundle_bytes) > settings.max_body_bytes:
        raise refused(413, "too-costly", f"推送内容过大：{len(bundle_bytes)} 字节，上限 {settings.max_body_bytes}", f"the body has {len(bundle_bytes)} bytes, more than {settings.max_body_bytes}")
    run_id = run_id or "push-" + uuid.uuid4().hex[:12]
    report = runner.SyncReport(connector.code, run_id)
    started = time.perf_counter()
    _, entries = connector.parse_bundle(bundle_bytes, settings.max_bundle_entries)
    units, rejections = await connector.resolve(server, entries)
    await runner.process(server, connector, units, rejections, report, run_id, linker)
    report.pages = 1
    report.seconds = time.perf_counter() - started
    return report
