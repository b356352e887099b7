"""Loading the shipped profiles and terminology into the database at startup (``load_conformance``).

What is loaded: every JSON resource under the repository's ``terminology/`` (CodeSystem, ValueSet,
ConceptMap, ...) and the top-level files of ``profiles/`` (StructureDefinitions, the
ImplementationGuide; ``profiles/examples/`` is not loaded, and the guide's entries for the
examples are left out), each under its file's ``id``. Bundles
and files without ``resourceType``/``id`` are skipped. The shipped canonical base
``https://fhir.cn-ehr.org`` is rewritten to ``settings.canonical_base`` when that differs.

Every seeded resource carries the tag ``{system: SEED_TAG_SYSTEM, code: <digest>}``: the digest of
the content the seed wrote (canonical JSON without ``meta.versionId``, ``meta.lastUpdated`` and the
tag itself). At each startup, for each file:

- absent from the database: created;
- present, tagged, and still exactly what the seed wrote (its digest equals its tag's code) but
  the file's digest differs (a newer product version): replaced;
- present and tagged with the file's digest: nothing to do;
- present without the tag, or changed since the seed wrote it (digest differs from the tag's
  code), or deleted: an operator's decision, left alone (logged).

Writes go through the normal write path (``server.transact`` + ``store_resource``: validation,
search indexes, after-commit hooks), one unit per type, falling back to one unit per resource
when some resource is refused. The decision is taken again inside the unit on the current
versions, and the unit writes with version checks, so workers starting together are safe: the
loser of a race re-runs its unit and finds nothing left to do. With nothing to do the cost is one
query per type.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import orjson

import fhir_server
from fhir_server.interactions._resource import store_resource
from fhir_server.interactions.context import Server, Tx
from fhir_server.outcome import FhirError
from fhir_server.storage.base import Stored

log = logging.getLogger("fhir_server.conformance.seed")

SHIPPED_BASE = "https://fhir.cn-ehr.org"
#: meta.tag system of seeded resources; the tag's code is the digest of the seeded content.
SEED_TAG_SYSTEM = "https://fhir.cn-ehr.org/CodeSystem/seed"
_SEED_DISPLAY = "产品内置内容 (shipped with the server)"
# Code systems before the value sets that include them, profiles before the guide that lists them.
_ORDER = ("CodeSystem", "ValueSet", "ConceptMap", "NamingSystem", "SearchParameter", "StructureDefinition", "ImplementationGuide")
_SKIPPED_TYPES = ("Bundle",)


@dataclass(slots=True)
class SeedFile:
    path: Path
    type: str
    id: str
    resource: dict[str, Any]  # rebased, without the seed tag
    digest: str


@dataclass
class SeedReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: int = 0
    kept: list[str] = field(default_factory=list)  # operator-owned, left alone
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        return (
            f"{len(self.created)} created, {len(self.updated)} upgraded, {self.unchanged} unchanged, "
            f"{len(self.kept)} left to the operator, {len(self.failed)} failed, in {self.seconds:.2f} s"
        )


def default_dirs() -> list[tuple[Path, bool]]:
    """(directory, recursive) of the shipped content, relative to the repository (editable install)."""
    root = Path(fhir_server.__file__).resolve().parents[1]
    return [(root / "terminology", True), (root / "profiles", False)]


def rebase(value: Any, old: str, new: str) -> Any:
    """``value`` with every string mentioning the canonical base ``old`` rewritten to ``new``."""
    if isinstance(value, str):
        if value == old:
            return new
        return value.replace(old + "/", new + "/") if old + "/" in value else value
    if isinstance(value, list):
        return [rebase(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: rebase(v, old, new) for k, v in value.items()}
    return value


def _without_seed_tag(resource: dict[str, Any]) -> dict[str, Any]:
    """The content that is compared: no server-assigned meta, no seed tag."""
    out = dict(resource)
    meta = dict(out.get("meta") or {})
    meta.pop("versionId", None)
    meta.pop("lastUpdated", None)
    tags = [t for t in meta.get("tag") or () if not (isinstance(t, dict) and t.get("system") == SEED_TAG_SYSTEM)]
    if tags:
        meta["tag"] = tags
    else:
        meta.pop("tag", None)
    if meta:
        out["meta"] = meta
    else:
        out.pop("meta", None)
    return out


def digest(resource: dict[str, Any]) -> str:
    """The digest of a resource's content as the seed compares it."""
    canonical = orjson.dumps(_without_seed_tag(resource), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:32]


def seed_tag(resource: dict[str, Any]) -> str | None:
    """The code of the seed tag of a stored resource (the digest the seed wrote), or None."""
    for t in (resource.get("meta") or {}).get("tag") or ():
        if isinstance(t, dict) and t.get("system") == SEED_TAG_SYSTEM and isinstance(t.get("code"), str):
            return str(t["code"])
    return None


def _tagged(f: SeedFile) -> dict[str, Any]:
    out = dict(f.resource)
    meta = dict(out.get("meta") or {})
    meta["tag"] = [*(meta.get("tag") or ()), {"system": SEED_TAG_SYSTEM, "code": f.digest, "display": _SEED_DISPLAY}]
    out["meta"] = meta
    return out


def shipped_files(dirs: Iterable[tuple[Path, bool]], canonical_base: str = SHIPPED_BASE) -> list[SeedFile]:
    """The resources to seed, in load order; unreadable files are logged and skipped."""
    base = canonical_base.rstrip("/")
    files: list[SeedFile] = []
    seen: dict[tuple[str, str], Path] = {}
    for directory, recursive in dirs:
        if not directory.is_dir():
            log.info("no shipped conformance content in %s", directory)
            continue
        for path in sorted(directory.rglob("*.json") if recursive else directory.glob("*.json")):
            try:
                resource = orjson.loads(path.read_bytes())
            except (OSError, orjson.JSONDecodeError) as e:
                log.warning("skipping %s: %s", path, e)
                continue
            if not isinstance(resource, dict):
                continue
            type_, id_ = resource.get("resourceType"), resource.get("id")
            if not isinstance(type_, str) or not isinstance(id_, str) or type_ in _SKIPPED_TYPES:
                log.debug("skipping %s: not a resource with an id", path)
                continue
            if (type_, id_) in seen:
                log.warning("skipping %s: %s/%s is also in %s", path, type_, id_, seen[(type_, id_)])
                continue
            seen[(type_, id_)] = path
            if base != SHIPPED_BASE:
                resource = rebase(resource, SHIPPED_BASE, base)
            resource = _without_seed_tag(resource)
            files.append(SeedFile(path, type_, id_, resource, digest(resource)))
    keys = {f"{f.type}/{f.id}" for f in files}
    for f in files:
        if f.type == "ImplementationGuide":
            _drop_unseeded(f, keys)
    rank = {t: i for i, t in enumerate(_ORDER)}
    files.sort(key=lambda f: rank.get(f.type, len(_ORDER)))
    return files


def _drop_unseeded(f: SeedFile, keys: set[str]) -> None:
    """An implementation guide lists its examples too; they are not seeded (profiles/examples/),
    and referential integrity would refuse the guide: its entries for them are left out."""
    definition = f.resource.get("definition")
    if not isinstance(definition, dict) or not isinstance(definition.get("resource"), list):
        return
    kept = []
    for entry in definition["resource"]:
        ref = (entry.get("reference") or {}).get("reference") if isinstance(entry, dict) else None
        if isinstance(ref, str) and ref.count("/") == 1 and "://" not in ref and ref not in keys:
            continue
        kept.append(entry)
    if len(kept) != len(definition["resource"]):
        log.debug("%s: %d resources it lists are not seeded and are left out", f.path.name, len(definition["resource"]) - len(kept))
        f.resource = {**f.resource, "definition": {**definition, "resource": kept}}
        f.digest = digest(f.resource)


def _decide(f: SeedFile, current: Stored | None) -> str:
    """create | update | same | operator (see the module doc)."""
    if current is None:
        return "create"
    if current.deleted or not current.raw:
        return "operator"
    stored = orjson.loads(current.raw)
    tag = seed_tag(stored)
    if tag is None or digest(stored) != tag:
        return "operator"
    return "same" if tag == f.digest else "update"


async def seed(server: Server, dirs: Iterable[tuple[Path, bool]] | None = None) -> SeedReport:
    """Create or upgrade the shipped resources (see the module doc)."""
    started = time.perf_counter()
    report = SeedReport()
    files = shipped_files(default_dirs() if dirs is None else dirs, server.settings.canonical_base)
    by_type: dict[str, list[SeedFile]] = {}
    for f in files:
        by_type.setdefault(f.type, []).append(f)
    existing = await server.store.types()
    for type_, group in by_type.items():  # in load order (files are sorted)
        todo = await _candidates(server, type_, group, report, type_ in existing)
        if todo:
            await _write(server, type_, todo, report)
    report.seconds = time.perf_counter() - started
    if report.created or report.updated or report.failed:
        log.info("conformance seed: %s", report)
    else:
        log.debug("conformance seed: %s", report)
    return report


Candidate = tuple[SeedFile, Stored | None]  # a file, and its current version as last read


async def _candidates(
    server: Server, type_: str, group: list[SeedFile], report: SeedReport, collection_exists: bool
) -> list[Candidate]:
    """The files that may need a write; those in the database as seeded, or owned by an operator, are counted."""
    if not collection_exists:
        return [(f, None) for f in group]
    found = {s.id: s for s in await server.store.find(type_, {"_id": {"$in": [f.id for f in group]}}, limit=0)}
    todo: list[Candidate] = []
    for f in group:
        current = found.get(f.id)
        if current is None:
            current = await server.store.current(type_, f.id)  # deleted by an operator?
        decision = _decide(f, current)
        if decision == "same":
            report.unchanged += 1
        elif decision == "operator":
            report.kept.append(f"{type_}/{f.id}")
            log.info("%s/%s differs from %s but was changed by an operator: left alone", type_, f.id, f.path.name)
        else:
            todo.append((f, current))
    return todo


async def _write(server: Server, type_: str, todo: list[Candidate], report: SeedReport) -> None:
    """One unit for all of ``todo``; one unit each when some file is refused."""
    attempts = 0

    async def work(tx: Tx) -> list[tuple[str, str]]:
        nonlocal attempts
        attempts += 1
        # The first attempt writes on the versions read just before, without reading again: the
        # writes are version-checked, so a concurrent writer makes the unit conflict and run again,
        # and then it reads.
        return await _write_in(tx, todo, reread=attempts > 1)

    try:
        done = await server.transact(work, {type_})
    except FhirError:
        if len(todo) == 1:
            f = todo[0][0]
            report.failed.append(f"{type_}/{f.id}")
            log.warning("shipped %s (%s/%s) was refused and not loaded", f.path.name, type_, f.id, exc_info=True)
            return
        for item in todo:
            await _write(server, type_, [item], report)
        return
    for key, decision in done:
        if decision == "create":
            report.created.append(key)
        elif decision == "update":
            report.updated.append(key)
        elif decision == "same":
            report.unchanged += 1
        else:
            report.kept.append(key)


async def _write_in(tx: Tx, todo: list[Candidate], *, reread: bool) -> list[tuple[str, str]]:
    """Decide (again, on the versions this unit reads when ``reread``) and write what is needed."""
    base_url = tx.settings.public_base_url or ""
    currents = [await tx.unit.current(f.type, f.id) for f, _ in todo] if reread else [c for _, c in todo]
    done = []
    for (f, _), current in zip(todo, currents):
        decision = _decide(f, current)
        if decision in ("create", "update"):
            await store_resource(tx, _tagged(f), f.id, current, "PUT", base_url=base_url)
        done.append((f"{f.type}/{f.id}", decision))
    return done
