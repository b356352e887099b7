"""SearchParameter resources at run time (custom search parameters of the CN profiles).

- Before a SearchParameter in force is stored, it must be usable (code, base, type, a FHIRPath
  expression that compiles) and the only active one with its url and with its code on its bases:
  otherwise 400, with the element and a Chinese text, and nothing is stored.
- After a unit commits, what it wrote is registered or unregistered in this worker; a new or
  changed definition gets its MongoDB indexes and a background re-index of the existing data
  (fhir_server/search/reindex.py); a removed one loses its indexes.
- At startup every stored SearchParameter in force is registered, and a change stream on the
  SearchParameter collection keeps every other worker (process) in step.

In force means status ``active`` and a url that is not one of the R4 built-in parameters (a
stored copy of a built-in definition changes nothing). ``draft``, ``retired`` and ``unknown``
SearchParameters are stored as they are and not used; moving one to ``retired`` (or deleting it)
unregisters it.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

import orjson

from fhir_server.interactions.context import Server, Tx
from fhir_server.outcome import FhirError, Issue
from fhir_server.search.parameters import (
    SearchParam,
    UnusableSearchParameter,
    check_custom,
    is_builtin_url,
    params_for,
    parameter_by_url,
    register_custom,
    unregister_custom,
)
from fhir_server.storage.base import Store, Stored, Write
from fhir_server.storage.follow import follow

log = logging.getLogger("fhir_server.search_parameters")

_TYPE = "SearchParameter"
# Seconds between registering a parameter and re-indexing for it: time for the other workers to
# learn it from the change stream, so that their concurrent writes index it too.
SETTLE_SECONDS = 1.0



class _Scope:
    """What one server (its store) registered: the url of each SearchParameter id, and the version
    applied (change stream events may arrive after a newer version was applied)."""

    def __init__(self) -> None:
        self.urls: dict[str, str] = {}
        self.versions: dict[str, int] = {}


# The registry is process-wide; several servers in one process (tests) each keep their scope.
_scopes: weakref.WeakKeyDictionary[Store, _Scope] = weakref.WeakKeyDictionary()


def _scope(store: Store) -> _Scope:
    return _scopes.setdefault(store, _Scope())


def _release(url: str) -> None:
    """Unregister ``url`` unless another server in this process still registers it."""
    if not any(url in scope.urls.values() for scope in _scopes.values()):
        unregister_custom(url)

Definition = tuple[str, str, str, tuple[str, ...]]  # code, type, expression, bases


def in_force(resource: dict[str, Any]) -> bool:
    """Whether a stored SearchParameter is used for search."""
    url = resource.get("url")
    return resource.get("status") == "active" and not (isinstance(url, str) and is_builtin_url(url))


# -- before store ---------------------------------------------------------------------------


async def check_search_parameter(tx: Tx, resource: dict[str, Any], previous: Stored | None) -> None:
    """Pre-store hook: refuse a SearchParameter in force that cannot be used."""
    if resource["resourceType"] != _TYPE or not in_force(resource):
        return
    before = orjson.loads(previous.raw) if previous is not None and previous.raw else {}
    replacing = before.get("url") if in_force(before) else None
    try:
        sp = check_custom(resource, replacing=replacing)
    except UnusableSearchParameter as e:
        raise FhirError(400, [Issue(e.code, str(e), expression=(e.element,), details_zh=e.zh)]) from None
    # The registry of this worker may lag behind the database; the database decides, and the
    # locks make racing units that define the same url or code run one after the other.
    await tx.unit.lock(f"{_TYPE}|url|{sp.url}")
    for base in sp.base:
        await tx.unit.lock(f"{_TYPE}|code|{base}|{sp.code}")
    others = {"_id": {"$ne": resource["id"]}, "s.status": "active"}
    if await tx.unit.count(_TYPE, {**others, "s.url": sp.url}):
        raise FhirError.of(
            400,
            "duplicate",
            f"Another active SearchParameter already has the url {sp.url}",
            expression=["SearchParameter.url"],
            details_zh=f"已存在 url 相同的生效检索参数：{sp.url}",
        )
    if await tx.unit.count(_TYPE, {**others, "s.code": sp.code, "s.base": {"$in": list(sp.base)}}):
        raise FhirError.of(
            400,
            "duplicate",
            f"Another active SearchParameter already defines the code {sp.code!r} on {', '.join(sp.base)}",
            expression=["SearchParameter.code"],
            details_zh=f"检索代码 {sp.code} 已被同一资源类型的另一个生效检索参数使用",
        )


# -- registering ------------------------------------------------------------------------------


def _apply(scope: _Scope, id_: str, version: int, raw: bytes | None) -> SearchParam | None:
    """Bring the registry in line with version ``version`` of SearchParameter ``id_`` (``raw``
    None: deleted; version 0: unknown, always applied); what ``id_`` registers afterwards."""
    if version and version <= scope.versions.get(id_, 0):
        # Already applied (by the after-commit hook or the change stream), or an older version late.
        url = scope.urls.get(id_)
        return parameter_by_url(url) if url else None
    if version:
        scope.versions[id_] = version
    resource = orjson.loads(raw) if raw else None
    old_url = scope.urls.pop(id_, None)
    new: SearchParam | None = None
    if resource is not None and in_force(resource):
        try:
            new = register_custom(resource, replacing=old_url)
            scope.urls[id_] = new.url
        except UnusableSearchParameter as e:  # stored before a conflicting one, or by an older server
            log.warning("SearchParameter/%s is not usable and is ignored: %s", id_, e)
    if old_url and (new is None or new.url != old_url):
        _release(old_url)
    return new


def _definition(raw: bytes | None) -> Definition | None:
    """What decides a stored SearchParameter's index values, when it is in force."""
    if not raw:
        return None
    resource = orjson.loads(raw)
    if not in_force(resource):
        return None
    base = resource.get("base")
    return (
        str(resource.get("code")),
        str(resource.get("type")),
        str(resource.get("expression")),
        tuple(b for b in base if isinstance(b, str)) if isinstance(base, list) else (),
    )


async def apply_search_parameters(tx: Tx) -> None:
    """After-commit hook: register what the unit wrote; index and re-index for it."""
    for write in tx.written:
        if write.type != _TYPE:
            continue
        try:
            await _after_write(tx.server, write)
        except Exception:  # the write has committed: a failure here must not turn it into an error
            log.exception("following up SearchParameter/%s failed", write.id)


async def _after_write(server: Server, write: Write) -> None:
    old = None
    if write.version > 1:
        previous = await server.store.version(_TYPE, write.id, write.version - 1)
        old = _definition(previous.raw if previous else None)
    new_sp = _apply(_scope(server.store), write.id, write.version, write.raw)
    new = _definition(write.raw) if new_sp else None
    existing = await server.store.types()
    if old is not None:
        code, _, _, bases = old
        # indexes.py names each parameter's index s_<code>; drop it where no parameter uses the code now.
        for base in bases:
            if base in existing and code not in params_for(base):
                await server.store.drop_search_indexes(base, [f"s_{code}"])
    if new_sp is None or new == old or server.reindexer is None:
        return
    types = [b for b in new_sp.base if b in existing]
    if types:
        job = await server.reindexer.start(params=[new_sp.url], types=types, delay=SETTLE_SECONDS)
        log.info("SearchParameter %s registered; re-index job %s over %s", new_sp.url, job["_id"], ", ".join(types))


# -- startup and the other workers ------------------------------------------------------------


async def _resync(store: Store) -> None:
    """Register every stored SearchParameter in force; unregister those no longer stored so."""
    scope = _scope(store)
    seen = set()
    for stored in await store.find(_TYPE, {"s.status": "active"}, limit=0):
        seen.add(stored.id)
        _apply(scope, stored.id, stored.version, stored.raw)
    for id_ in [i for i in scope.urls if i not in seen]:
        _apply(scope, id_, 0, None)


class SearchParameterWatch:
    """Loads the stored SearchParameters at startup and follows their changes (change stream)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await _resync(self._store)
        self._task = asyncio.create_task(self._follow(), name="search-parameter-watch")

    async def stop(self) -> None:
        """Stop following, and forget this server's parameters (an app started later in this
        process, as tests do, starts from what its own database holds)."""
        if self._task is not None:
            self._task.cancel()
            # As for the conformance watch: a change stream stuck in the driver must not hold shutdown.
            await asyncio.wait([self._task], timeout=5)
            self._task = None
        scope = _scopes.pop(self._store, None)
        for url in scope.urls.values() if scope else ():
            _release(url)

    async def _follow(self) -> None:
        await follow(
            self._store,
            _TYPE,
            lambda: _resync(self._store),
            lambda id_, version, raw: _apply(_scope(self._store), id_, version, raw),
        )


def install(server: Server) -> None:
    """Add the hooks to a server (the app starts a :class:`SearchParameterWatch` beside it)."""
    from fhir_server.interactions import reindex  # noqa: F401  (registers $reindex)
    from fhir_server.search.reindex import Reindexer

    server.pre_store.append(check_search_parameter)
    server.after_commit.append(apply_search_parameters)
    server.reindexer = Reindexer(server.store, base_url=server.settings.public_base_url or "")
