"""Access control around every FHIR interaction (issue #6): who is calling, and what they may do.

Where each part happens:

- **Authentication** in the HTTP layer (fhir_server/http/routes.py calls :func:`authenticate`):
  the bearer token is validated by the validator ``fhir_server.auth.install`` put on
  ``app.state.auth``; the :class:`~fhir_server.auth.Principal` (or None) goes on
  ``request.state.principal`` (the audit trail reads it there) and, wrapped in an :class:`Access`,
  on ``FhirRequest.access``. ``GET /metadata`` and ``.well-known`` are exempt; ``/auth/*`` and the
  smart-configuration are the development server's own routes and never reach the FHIR router.
  With ``auth_enabled`` off every request has ``access`` None and nothing below restricts it
  (except that AuditEvents are never written over REST while an audit trail is kept).
- **Authorization** around the interaction (:func:`guard`, for a standalone request and for
  each batch entry; :func:`authorize_entry` for each transaction entry before the transaction
  runs): the token's SMART scopes must grant the interaction on the type (403
  ``insufficient_scope`` otherwise); AuditEvents are read only by auditors and never written over
  REST; ``$ingest`` only for a client registered for that push source.
- **Confinement** of patient-scoped tokens (a resident's app): the interactions call narrow hooks
  where it must go into a query — :meth:`Access.filter` (search, compartment search, chains,
  ``_has``, ``_list``, ``_include``/``_revinclude``, ``$everything``), :meth:`Access.visible`
  (history entries) and :func:`current` + :meth:`Access.confine_filter` (conditional
  create/update/delete and conditional references). Reads are checked on the answer (the resource
  must be in the compartment, else 404). The compartment is the R4 Patient compartment of the
  *confinement set*: the context patient, its golden Patient and every source Patient linked
  both ways to that golden (fhir_server/mpi/golden.py), since clinical data references sources.
- **Writes** are checked on what is really stored, whatever the path (create, update, patch,
  transaction entries, conditional ones): a ``pre_store`` interceptor (:func:`before_store`)
  refuses AuditEvents, keeps a confined token inside its compartment (the new content, and the
  version it replaces: 404 when that is someone else's), and holds a hospital to its source
  (``meta.source`` must start with the client's ``source_restriction``; stamped with it when
  absent; the version replaced must be the hospital's too). An ``on_commit`` interceptor
  (:func:`before_commit`) does the same for deletions. They find the caller in a context
  variable the guard sets (:func:`current`): the storage interceptors have no request.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable

import orjson
from starlette.requests import Request

from fhir_server.auth import Principal, TokenError, bearer_token, insufficient_scope, unauthenticated
from fhir_server.auth.scopes import Decision, Grant, ScopeSet
from fhir_server.interactions.context import FhirRequest, FhirResponse, Server, Tx
from fhir_server.outcome import FhirError, not_found
from fhir_server.search.compartments import in_patient_compartment, patient_filter
from fhir_server.storage.base import Stored

log = logging.getLogger("fhir_server.access")

Condition = dict[str, Any]
Handler = Callable[[Server, FhirRequest], Awaitable[FhirResponse]]

NEVER: Condition = {"_id": {"$in": []}}
AUDIT = "AuditEvent"
WRITES = frozenset({"create", "update", "patch", "delete"})
# Operations a patient-confined token may call (they read within the compartment or no patient data).
_CONFINED_OPERATIONS = frozenset({"everything", "validate", "expand", "lookup", "validate-code", "translate"})

_CURRENT: contextvars.ContextVar["Access | None"] = contextvars.ContextVar("fhir_access", default=None)


def current() -> "Access | None":
    """The caller of the request being served (for interceptors that have no request)."""
    return _CURRENT.get()


# -- the caller -------------------------------------------------------------------------------


@dataclass
class Access:
    """A principal and what its grant amounts to on this server, for one request."""

    principal: Principal
    # The confinement set (patient ids) of a token with patient/ scopes and a patient context.
    patients: frozenset[str] | None = None
    # The grant as enforced (a resident's user/ or system/ scopes are confined like patient/ ones).
    grant: Grant = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.grant is None:
            self.grant = self.principal.grant

    @property
    def auditor(self) -> bool:
        return self.grant.auditor

    def decide(self, interaction: str, type_: str | None, *, instance: bool = False, operation: str | None = None) -> Decision | None:
        d = self.grant.decide(interaction, type_, instance=instance, operation=operation)
        if d is not None and type_ == AUDIT and d.patient is None and not self.auditor:
            return None  # a wildcard scope does not read the audit trail
        return d

    def filter(self, type_: str, interaction: str = "search") -> Condition | None:
        """What this caller may see of ``type_`` in a query: None (everything), NEVER, or a condition."""
        d = self.decide(interaction, type_)
        if d is None:
            return NEVER
        if d.patient is None:
            return None
        return patient_filter(type_, self.patients or frozenset({d.patient})) or NEVER

    def confine_filter(self, type_: str) -> Condition | None:
        """The compartment condition when every usable scope on ``type_`` is patient-confined (the
        matches of conditional interactions and references); None otherwise."""
        if self.patients is None:
            return None
        for s in self.grant.scopes.resources:
            if not s.restricted and s.context != "patient" and s.covers(type_):
                return None
        return patient_filter(type_, self.patients) or NEVER

    def member(self, type_: str, resource: dict[str, Any] | None) -> bool:
        """Whether ``resource`` (a version's content) is in the confinement set's compartment."""
        if not isinstance(resource, dict) or self.patients is None:
            return False
        return in_patient_compartment(type_, resource, self.patients)

    def visible(self, stored: Stored, *, instance: bool = False, interaction: str = "history") -> bool:
        """Whether a stored version may be shown (history entries)."""
        d = self.decide(interaction, stored.type, instance=instance)
        if d is None:
            return False
        if d.patient is None:
            return True
        return stored.raw is not None and self.member(stored.type, orjson.loads(stored.raw))


async def confinement_set(store: Any, patient_id: str) -> frozenset[str]:
    """{the context patient} ∪ its golden ∪ the golden's sources (linked both ways)."""
    from fhir_server.mpi import golden as g

    ids = {patient_id}
    row = await store.current("Patient", patient_id)
    if row is None or row.raw is None:
        return frozenset(ids)
    patient = orjson.loads(row.raw)
    if g.is_golden(patient):
        golden_id, golden = patient_id, patient
    else:
        golden_id = g.golden_of(patient)
        if not golden_id:
            return frozenset(ids)
        grow = await store.current("Patient", golden_id)
        golden = orjson.loads(grow.raw) if grow is not None and grow.raw else None
        # The golden must list this source too: a Patient cannot join a record by claiming it.
        if golden is None or not g.is_golden(golden) or patient_id not in g.source_ids(golden):
            return frozenset(ids)
    ids.add(golden_id)
    sources = [s for s in g.source_ids(golden) if s not in ids]
    if sources:
        for s in await store.find("Patient", {"_id": {"$in": sources}}, limit=len(sources) + 1):
            if s.raw is not None and g.golden_of(orjson.loads(s.raw)) == golden_id:
                ids.add(s.id)
    return frozenset(ids)


# -- authentication (HTTP layer) --------------------------------------------------------------


async def authenticate(request: Request, server: Server, *, exempt: bool = False) -> Access | None:
    """The caller of an HTTP request: None when auth is off or the endpoint is exempt; 401 when the
    token is missing or invalid. Sets ``request.state.principal`` (Principal or None)."""
    request.state.principal = None
    if exempt or not server.settings.auth_enabled:
        return None
    validator = getattr(request.app.state, "auth", None)
    try:
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            raise unauthenticated()
        if validator is None:  # auth on but no issuer configured: nothing can be trusted
            raise TokenError("wrong-issuer", "this server trusts no token issuer (auth_dev_server off, no auth_external_issuers)")
        principal = await validator.validate(token)
    except TokenError as e:
        raise e.to_fhir_error() from None
    request.state.principal = principal
    return await access_for(server, principal)


def _as_resident(grant: Grant) -> Grant:
    """A resident (fhirUser Patient/…) may do only what a resident may: whatever the scopes say,
    within their own record. user/ and system/ scopes become patient/ ones."""
    scopes = grant.scopes
    confined = tuple(replace(s, context="patient") for s in scopes.resources)
    return replace(grant, scopes=ScopeSet(confined, scopes.other, scopes.invalid))


async def access_for(server: Server, principal: Principal) -> Access:
    grant = principal.grant
    if principal.kind == "patient":
        grant = _as_resident(grant)
    patients = None
    if grant.patient and any(s.context == "patient" and not s.restricted for s in grant.scopes.resources):
        patients = await confinement_set(server.store, grant.patient)
    return Access(principal, patients, grant)


# -- authorization around an interaction ------------------------------------------------------


def _need(a: Access, interaction: str, type_: str | None, *, instance: bool = False, operation: str | None = None) -> Decision:
    d = a.decide(interaction, type_, instance=instance, operation=operation)
    if d is None:
        what = f"${operation}" if operation else interaction
        if type_ == AUDIT and interaction not in WRITES and a.grant.allows(interaction, type_, instance=instance):
            raise FhirError.of(
                403, "forbidden", "Reading the audit trail needs an auditor's grant (user/AuditEvent.rs or system/AuditEvent.rs)",
                details_zh="查阅审计记录需要审计员授权", headers={"WWW-Authenticate": 'Bearer realm="fhir", error="insufficient_scope", scope="user/AuditEvent.rs"'},
            )
        raise insufficient_scope(f"{what} on {type_ or 'all resource types'}")
    return d


def refuse_audit_write(server: Server, access: Access | None, interaction: str, type_: str | None) -> None:
    """AuditEvents are written by the audit trail only (while there is one, or auth is on)."""
    if type_ == AUDIT and interaction in WRITES and (access is not None or server.settings.audit_enabled or server.settings.auth_enabled):
        raise FhirError.of(
            405, "not-supported", "AuditEvents are written by the server's audit trail only; they cannot be created, changed or deleted over REST",
            details_zh="审计事件只能由服务器的审计记录写入，不能通过接口新建、修改或删除",
        )


def _outside(what: str) -> FhirError:
    return not_found(f"{what} is not known")


async def authorize(server: Server, req: FhirRequest, interaction: str, operation: str | None = None) -> None:
    """Refuse what the caller may not do at all (before the interaction runs)."""
    a = req.access
    refuse_audit_write(server, a, interaction, req.type)
    if a is None or interaction in ("capabilities", "bundle"):
        return  # a bundle's entries are authorized one by one
    t = req.type
    if interaction in ("read", "vread"):
        _need(a, "read", t, instance=True)
    elif interaction == "history":
        d = _need(a, "history", t, instance=bool(req.id))
        if d.patient is not None and req.id and t:
            if not await _member_now(server, a, t, req.id):
                raise _outside(f"{t}/{req.id}")
    elif interaction == "search":
        if req.compartment is not None:
            ctype, cid = req.compartment
            d = _need(a, "search", t)
            if ctype == "Patient" and a.patients is not None and cid not in a.patients and d.patient is not None:
                raise _outside(f"Patient/{cid}")
        elif t is not None:
            _need(a, "search", t)
        else:
            named = [x.strip() for k, v in req.query if k == "_type" for x in v.split(",") if x.strip()]
            for x in named or [None]:  # type: ignore[list-item]
                _need(a, "search", x)
    elif interaction in WRITES:
        _need(a, interaction, t)
    elif interaction == "operation":
        await _authorize_operation(server, req, a, operation or "")


async def _authorize_operation(server: Server, req: FhirRequest, a: Access, name: str) -> None:
    if name == "ingest":
        source = req.param("source") or ""
        if source not in a.principal.push_sources:
            raise FhirError.of(
                403, "forbidden", f"This client is not registered to push as source {source[:60]!r}",
                details_zh="此客户端未被授权以该数据源推送数据",
            )
        entries = req.body.get("entry") if isinstance(req.body, dict) else None
        types = {e["resource"].get("resourceType") for e in entries or () if isinstance(e, dict) and isinstance(e.get("resource"), dict)}
        for t in sorted(x for x in types if isinstance(x, str)):
            refuse_audit_write(server, a, "create", t)
            if not (a.grant.allows("create", t) or a.grant.allows("update", t)):
                raise insufficient_scope(f"pushing {t} resources")
        return
    d = _need(a, "operation", req.type, instance=bool(req.id), operation=name)
    if d.patient is not None:
        if name not in _CONFINED_OPERATIONS:
            raise insufficient_scope(f"${name} with a patient-confined token")
        if req.id and req.type and not await _member_now(server, a, req.type, req.id):
            raise _outside(f"{req.type}/{req.id}")


async def _member_now(server: Server, a: Access, type_: str, id_: str) -> bool:
    """Whether a resource is in the caller's compartment (its last live version when deleted;
    True when it does not exist, so that the interaction answers its own 404)."""
    stored = await server.store.current(type_, id_)
    if stored is None:
        return True
    if stored.deleted or stored.raw is None:
        prev = await server.store.version(type_, id_, stored.version - 1) if stored.version > 1 else None
        return prev is not None and prev.raw is not None and a.member(type_, orjson.loads(prev.raw))
    return a.member(type_, orjson.loads(stored.raw))


async def _check_answer(server: Server, req: FhirRequest, interaction: str, resp: FhirResponse) -> FhirResponse:
    """A confined read answers only with a resource of the compartment."""
    a = req.access
    if a is None or interaction not in ("read", "vread") or req.type is None:
        return resp
    d = a.decide("read", req.type, instance=True)
    if d is None or d.patient is None:
        return resp
    raw = resp.raw if resp.raw is not None else (resp.stored.raw if resp.stored is not None else None)
    if raw is None or not a.member(req.type, orjson.loads(raw)):
        raise _outside(f"{req.type}/{req.id}")
    return resp


async def guard(server: Server, req: FhirRequest, interaction: str, handler: Handler, *, operation: str | None = None) -> FhirResponse:
    """Run one interaction (a request, or a batch entry) under the caller's rights."""
    a = req.access
    # Operations are authorized as a whole (their own writes — MPI links, pushed records — are
    # the server's); everything else has its writes checked resource by resource.
    token = _CURRENT.set(None if interaction == "operation" else a)
    try:
        try:
            await authorize(server, req, interaction, operation)
            resp = await handler(server, req)
            return await _check_answer(server, req, interaction, resp)
        except FhirError as e:
            if a is not None and e.status == 410 and interaction in ("read", "vread") and req.type and req.id:
                d = a.decide("read", req.type, instance=True)
                if d is not None and d.patient is not None and not await _member_now(server, a, req.type, req.id):
                    raise _outside(f"{req.type}/{req.id}") from None
            raise
    except FhirError as e:
        if a is not None and a.patients is not None and e.status == 404:
            raise _neutral(e) from None
        raise
    finally:
        _CURRENT.reset(token)


def _neutral(e: FhirError) -> FhirError:
    """A confined caller's 404 says the same whether the resource does not exist or is someone
    else's, and does not repeat the id asked for."""
    from fhir_server.outcome import Issue

    where = next((i.expression for i in e.issues if i.expression), ())
    return FhirError(
        404,
        [Issue("not-found", "Not found: no such resource in the record this token may see", expression=where,
               details_zh="未找到：此令牌可访问的健康档案中没有该资源")],
    )  # fmt: skip


def entry_interaction(method: str, type_: str | None, id_: str | None, version: str | None, url: str) -> str:
    """The interaction a batch or transaction entry amounts to."""
    path = url.split("?")[0].rstrip("/")
    if method == "POST":
        return "search" if path.endswith("_search") else "create"
    if method == "PUT":
        return "update"
    if method == "PATCH":
        return "patch"
    if method == "DELETE":
        return "delete"
    if version is not None:
        return "vread"
    if path.endswith("_history"):
        return "history"
    if id_ is not None:
        return "read"
    return "search" if type_ is not None else "capabilities"


async def authorize_entry(server: Server, req: FhirRequest, interaction: str) -> None:
    """A transaction entry, before the transaction runs (its resources are checked as stored)."""
    await authorize(server, req, interaction)


async def check_entry_answer(server: Server, req: FhirRequest, interaction: str, resp: FhirResponse) -> FhirResponse:
    return await _check_answer(server, req, interaction, resp)


# -- writes, as they are stored ---------------------------------------------------------------


def _source_ok(source: Any, prefix: str) -> bool:
    if not isinstance(source, str):
        return False
    if source == prefix or (prefix[-1:] in ("#", "/") and source.startswith(prefix)):
        return True
    return source.startswith(prefix) and source[len(prefix)] in "#/|?"


def _source_of(resource: dict[str, Any] | None) -> Any:
    return ((resource or {}).get("meta") or {}).get("source")


def _not_your_source(what: str, prefix: str) -> FhirError:
    return FhirError.of(
        403, "forbidden", f"{what}: this client may write only data whose meta.source starts with {prefix}",
        details_zh=f"此客户端只能写入来源（meta.source）为 {prefix} 的数据",
    )


async def before_store(tx: Tx, resource: dict[str, Any], current: Stored | None) -> None:
    """pre_store interceptor: what the caller may store (see the module's docstring)."""
    a = _CURRENT.get()
    if a is None:
        return
    type_ = resource.get("resourceType")
    live = current is not None and not current.deleted and current.raw is not None
    interaction = "update" if live else "create"
    refuse_audit_write(tx.server, a, interaction, type_)
    what = f"{type_}/{resource.get('id')}"
    d = a.decide(interaction, type_)
    if d is None:
        raise insufficient_scope(f"{interaction} on {type_}")
    before = orjson.loads(current.raw) if live else None  # type: ignore[union-attr]
    if d.patient is not None:
        if live and not a.member(type_, before):
            raise _outside(what)
        if not a.member(type_, resource):
            raise FhirError.of(
                403, "forbidden", f"{type_}: a patient-confined token may write only resources of its own record",
                details_zh="只能写入本人健康档案内的资源",
            )
    prefix = a.principal.source_restriction
    if prefix:
        if live and not _source_ok(_source_of(before), prefix):
            raise _not_your_source(what, prefix)
        if _source_of(resource) is None:
            resource.setdefault("meta", {})["source"] = prefix  # stamped: the data is the hospital's
        elif not _source_ok(_source_of(resource), prefix):
            raise _not_your_source(what, prefix)


async def before_commit(tx: Tx) -> None:
    """on_commit interceptor: deletions (which do not pass through pre_store)."""
    a = _CURRENT.get()
    if a is None:
        return
    for w in tx.written:
        if w.raw is not None or w.version < 2:
            continue
        refuse_audit_write(tx.server, a, "delete", w.type)
        d = a.decide("delete", w.type)
        if d is None:
            raise insufficient_scope(f"delete on {w.type}")
        if d.patient is None and not a.principal.source_restriction:
            continue
        prev = await tx.server.store.version(w.type, w.id, w.version - 1)
        before = orjson.loads(prev.raw) if prev is not None and prev.raw else None
        if d.patient is not None and not a.member(w.type, before):
            raise _outside(f"{w.type}/{w.id}")
        prefix = a.principal.source_restriction
        if prefix and not _source_ok(_source_of(before), prefix):
            raise _not_your_source(f"{w.type}/{w.id}", prefix)


def install(server: Server) -> None:
    """Add the write checks: first of the pre_store interceptors (a refusal before validation)."""
    server.pre_store.insert(0, before_store)
    server.on_commit.insert(0, before_commit)
