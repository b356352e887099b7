"""SMART on FHIR scopes (v1 and v2) and the :class:`Grant` they add up to.

A resource scope is ``context/Type.permissions[?query]``:

* v2: ``patient/Observation.rs``, ``user/*.cruds``, ``system/Patient.r?category=laboratory``;
  permissions are a subset of ``cruds`` written in that order.
* v1: ``patient/*.read`` (= ``rs``), ``user/Observation.write`` (= ``cud``), ``system/*.*`` (= ``cruds``).

Other scopes are kept as they are: ``openid``, ``fhirUser``, ``profile``, ``launch``,
``launch/patient``, ``launch/encounter``, ``offline_access``, ``online_access``.

What a permission letter covers (SMART App Launch 2.x, scopes-and-launch-context.html):
``c`` create; ``r`` read, vread and instance history; ``u`` update and patch; ``d`` delete;
``s`` search and type or system history. Query-restricted scopes (``?category=…``) are parsed and
kept, but never grant anything yet (:attr:`Grant.unsupported` lists them): granting them without
the restriction would grant too much.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Literal
from urllib.parse import parse_qsl

Context = Literal["patient", "user", "system"]
Interaction = Literal["read", "vread", "search", "history", "create", "update", "patch", "delete", "operation"]

INTERACTIONS: tuple[str, ...] = ("read", "vread", "search", "history", "create", "update", "patch", "delete", "operation")
PERMISSIONS = "cruds"
# Scopes that are not about resources; anything else that does not parse as a resource scope is invalid.
OTHER_SCOPES = frozenset(
    {"openid", "fhirUser", "profile", "launch", "launch/patient", "launch/encounter", "offline_access", "online_access"}
)

_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_V1_BACK = {v: k for k, v in _V1.items()}
_RESOURCE_SCOPE = re.compile(r"^(patient|user|system)/(\*|[A-Z][A-Za-z]{0,63})\.([a-z*]+)(?:\?(.+))?$")

_LETTER = {
    "read": "r",
    "vread": "r",
    "create": "c",
    "update": "u",
    "patch": "u",
    "delete": "d",
    "search": "s",
}
# Operations the server defines, by the interaction they amount to; an unknown one needs "update".
_OPERATION_AS: dict[str, str] = {
    "validate": "read",
    "lookup": "read",
    "expand": "read",
    "validate-code": "read",
    "translate": "read",
    "match": "search",
    "everything": "search",
    "merge": "update",
    "unmerge": "update",
    "mpi-resolve": "update",
    "reindex": "update",
}


class ScopeError(ValueError):
    """A scope string that is neither a known scope nor a well-formed resource scope."""


@dataclass(frozen=True, slots=True)
class Scope:
    """One resource scope: context, resource type (``*`` for all), permission letters, v2 query."""

    context: Context
    type: str
    permissions: frozenset[str]
    query: tuple[tuple[str, str], ...] = ()
    version: Literal[1, 2] = 2

    @property
    def restricted(self) -> bool:
        """True when the scope carries a ``?param=value`` restriction (not supported for decisions)."""
        return bool(self.query)

    def covers(self, type_: str | None) -> bool:
        """Whether this scope's type covers ``type_`` (None: every type, which only ``*`` covers)."""
        return self.type == "*" or (type_ is not None and self.type == type_)

    def text(self) -> str:
        """The scope as a string, in v1 syntax when it was v1 and its permissions still read as v1."""
        letters = "".join(p for p in PERMISSIONS if p in self.permissions)
        if self.version == 1 and letters in _V1_BACK and not self.query:
            return f"{self.context}/{self.type}.{_V1_BACK[letters]}"
        out = f"{self.context}/{self.type}.{letters}"
        if self.query:
            out += "?" + "&".join(f"{k}={v}" for k, v in self.query)
        return out

    def __str__(self) -> str:
        return self.text()


def parse_scope(text: str) -> Scope:
    """Parse one resource scope; :class:`ScopeError` when it is malformed."""
    m = _RESOURCE_SCOPE.match(text)
    if not m:
        raise ScopeError(f"malformed scope {text[:80]!r}")
    context, type_, perms, query = m.groups()
    if perms in _V1:
        if query:
            raise ScopeError(f"a v1 scope cannot carry a query: {text[:80]!r}")
        return Scope(context, type_, frozenset(_V1[perms]), (), 1)  # type: ignore[arg-type]
    if not _ordered_subset(perms):
        raise ScopeError(f"permissions must be a subset of 'cruds' in that order: {text[:80]!r}")
    pairs: tuple[tuple[str, str], ...] = ()
    if query:
        try:
            pairs = tuple(parse_qsl(query, keep_blank_values=False, strict_parsing=True))
        except ValueError:
            raise ScopeError(f"malformed scope query {text[:80]!r}") from None
    return Scope(context, type_, frozenset(perms), pairs, 2)  # type: ignore[arg-type]


def _ordered_subset(perms: str) -> bool:
    at = 0
    for ch in perms:
        found = PERMISSIONS.find(ch, at)
        if found < 0:
            return False
        at = found + 1
    return bool(perms)


@dataclass(frozen=True, slots=True)
class ScopeSet:
    """A parsed ``scope`` string: resource scopes, other known scopes, and what did not parse."""

    resources: tuple[Scope, ...] = ()
    other: frozenset[str] = frozenset()
    invalid: tuple[str, ...] = ()

    def text(self) -> str:
        """The space-separated scope string (resource scopes first, each once)."""
        seen: list[str] = []
        for s in self.resources:
            t = s.text()
            if t not in seen:
                seen.append(t)
        return " ".join(seen + sorted(self.other))

    def intersect(self, allowed: "ScopeSet") -> "ScopeSet":
        """What of this (requested) set ``allowed`` permits: scope by scope, type by type, letter by letter."""
        out: list[Scope] = []
        for want in self.resources:
            for may in allowed.resources:
                s = _intersect(want, may)
                if s is not None and s not in out:
                    out.append(s)
        return ScopeSet(tuple(_drop_subsumed(out)), self.other & allowed.other)


def _intersect(want: Scope, may: Scope) -> Scope | None:
    if want.context != may.context:
        return None
    if want.type == "*":
        type_ = may.type
    elif may.type in ("*", want.type):
        type_ = want.type
    else:
        return None
    perms = want.permissions & may.permissions
    if not perms:
        return None
    if want.query and may.query and want.query != may.query:
        return None
    return Scope(want.context, type_, perms, want.query or may.query, want.version)


def _drop_subsumed(scopes: list[Scope]) -> list[Scope]:
    """Leave out scopes another one of the list already covers (user/Patient.rs beside user/*.cruds)."""

    def within(a: Scope, b: Scope) -> bool:
        return (
            a is not b
            and a.context == b.context
            and b.covers(a.type)
            and a.permissions <= b.permissions
            and (not b.query or a.query == b.query)
            and (a.type != b.type or a.permissions != b.permissions or a.query != b.query)
        )

    return [a for a in scopes if not any(within(a, b) for b in scopes)]


def parse_scopes(text: str | Iterable[str] | None, *, strict: bool = False) -> ScopeSet:
    """Parse a space-separated scope string (or a list, as in an ``scp`` claim).

    Unknown or malformed scopes go to :attr:`ScopeSet.invalid`, or raise :class:`ScopeError`
    when ``strict``.
    """
    items = (text or "").split() if isinstance(text, str) or text is None else [str(t) for t in text]
    resources: list[Scope] = []
    other: set[str] = set()
    invalid: list[str] = []
    for item in items:
        if item in OTHER_SCOPES:
            other.add(item)
            continue
        try:
            resources.append(parse_scope(item))
        except ScopeError:
            if strict:
                raise
            invalid.append(item)
    return ScopeSet(tuple(resources), frozenset(other), tuple(invalid))


def operation_interaction(name: str) -> str:
    """The interaction an operation (without its ``$``) amounts to; unknown operations count as ``update``."""
    return _OPERATION_AS.get(name.lstrip("$"), "update")


def permission_for(interaction: str, *, instance: bool = False, operation: str | None = None) -> str:
    """The permission letter an interaction needs (``history`` needs ``r`` on an instance, ``s`` otherwise)."""
    if interaction == "history":
        return "r" if instance else "s"
    if interaction == "operation":
        return permission_for(operation_interaction(operation or ""), instance=instance)
    try:
        return _LETTER[interaction]
    except KeyError:
        raise ValueError(f"unknown interaction {interaction!r}") from None


@dataclass(frozen=True, slots=True)
class Decision:
    """A permitted interaction; ``patient`` set means: only within ``Patient/<patient>``'s compartment."""

    scope: Scope
    patient: str | None = None

    @property
    def confined(self) -> bool:
        return self.patient is not None


@dataclass(frozen=True)
class Grant:
    """What a token may do: its scopes, and the patient its ``patient/`` scopes are confined to.

    ``patient/`` scopes grant only within the compartment of :attr:`patient` (none without a
    patient context); ``user/`` scopes grant what the user may do (no further confinement here);
    ``system/`` scopes grant to the client itself.
    """

    scopes: ScopeSet = field(default_factory=ScopeSet)
    patient: str | None = None

    @classmethod
    def of(cls, scope: str | Iterable[str] | None, patient: str | None = None) -> "Grant":
        return cls(parse_scopes(scope), patient or None)

    def decide(
        self, interaction: str, type_: str | None, *, instance: bool = False, operation: str | None = None
    ) -> Decision | None:
        """May this token do ``interaction`` on ``type_``? None when not; else the scope that allows it.

        ``type_`` None means every type (system-level search or history), which only a ``*`` scope
        grants. An unconfined (user/system) scope wins over a patient-confined one.
        """
        letter = permission_for(interaction, instance=instance, operation=operation)
        confined: Decision | None = None
        for s in self.scopes.resources:
            if s.restricted or letter not in s.permissions or not s.covers(type_):
                continue
            if s.context != "patient":
                return Decision(s)
            if self.patient and confined is None:
                confined = Decision(s, self.patient)
        return confined

    def allows(self, interaction: str, type_: str | None, *, instance: bool = False, operation: str | None = None) -> bool:
        return self.decide(interaction, type_, instance=instance, operation=operation) is not None

    def permissions(self, type_: str) -> frozenset[str]:
        """Every permission letter some usable scope grants on ``type_`` (confined or not)."""
        out: set[str] = set()
        for s in self.scopes.resources:
            if not s.restricted and s.covers(type_) and (s.context != "patient" or self.patient):
                out |= s.permissions
        return frozenset(out)

    @property
    def confined_to(self) -> str | None:
        """The patient id when every usable resource scope is a ``patient/`` scope (a resident's app)."""
        usable = [s for s in self.scopes.resources if not s.restricted]
        if self.patient and usable and all(s.context == "patient" for s in usable):
            return self.patient
        return None

    @property
    def auditor(self) -> bool:
        """True for an explicit, unconfined read and search grant on AuditEvent (``user/AuditEvent.rs``,
        ``system/AuditEvent.rs``); a ``*`` scope does not make an auditor."""
        perms: set[str] = set()
        for s in self.scopes.resources:
            if s.type == "AuditEvent" and s.context != "patient" and not s.restricted:
                perms |= s.permissions
        return {"r", "s"} <= perms

    @property
    def unsupported(self) -> tuple[Scope, ...]:
        """Query-restricted scopes: kept, reported, granting nothing."""
        return tuple(s for s in self.scopes.resources if s.restricted)

    def has(self, scope: str) -> bool:
        """Whether a non-resource scope (``openid``, ``launch/patient`` …) was granted."""
        return scope in self.scopes.other

    def text(self) -> str:
        return self.scopes.text()

    def narrowed(self, allowed: ScopeSet) -> "Grant":
        return replace(self, scopes=self.scopes.intersect(allowed))
