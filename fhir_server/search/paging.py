"""Keyset paging: a page starts after (or ends before) the sort key of a known resource.

A ``next`` link carries the sort key of the last resource of its page, so walking the links
yields every match exactly once even while resources are created or deleted, and page N costs
the same as page 1 (no skipping over N pages of results).

Sort keys are parameters' index values, which may be lists: MongoDB orders ascending by a list's
smallest element and descending by its largest, and resources without a value first when
ascending (last when descending). The conditions below follow exactly that order.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

import orjson

from fhir_server.outcome import bad_request
from fhir_server.storage.base import Stored

Condition = dict[str, Any]
_NEVER: Condition = {"_id": {"$in": []}}


@dataclass(frozen=True, slots=True)
class SortKey:
    field: str  # "_id", "t", or "s.<code>[.<part>]"
    direction: int  # 1 ascending, -1 descending

    @property
    def scalar(self) -> bool:
        """One value per resource (so MongoDB can walk it backwards exactly)."""
        return self.field in ("_id", "t")

    @property
    def index_code(self) -> str | None:
        return self.field.split(".")[1] if self.field.startswith("s.") else None


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page starts: after (``forward``) or before the resource with ``values``/``type``/``id``."""

    forward: bool
    values: tuple[Any, ...]
    type: str
    id: str


def key_of(stored: Stored, keys: Sequence[SortKey]) -> tuple[Any, ...]:
    """The sort key values of a resource, as MongoDB compares them."""
    out: list[Any] = []
    for key in keys:
        if key.field == "_id":
            out.append(stored.id)
        elif key.field == "t":
            out.append(stored.last_updated)
        else:
            parts = key.field.split(".")[1:]
            values = (stored.index or {}).get(parts[0])
            flat: list[Any] = []
            for v in values or ():
                if len(parts) > 1:
                    if isinstance(v, dict) and parts[1] in v:
                        flat.append(v[parts[1]])
                else:
                    flat.append(v)
            flat = [_as_utc(v) for v in flat]
            out.append((min(flat) if key.direction == 1 else max(flat)) if flat else None)
    return tuple(out)


def _as_utc(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _strictly_after(key: SortKey, value: Any) -> Condition:
    """Resources whose sort key comes strictly after ``value`` in ``key``'s order."""
    f = key.field
    if key.scalar:
        return {f: {"$gt" if key.direction == 1 else "$lt": value}}
    if key.direction == 1:
        if value is None:
            return {f: {"$exists": True}}
        return {f: {"$exists": True, "$not": {"$lte": value}}}  # smallest element > value
    if value is None:
        return _NEVER
    return {f: {"$not": {"$gte": value}}}  # largest element < value, or no value at all


def _strictly_before(key: SortKey, value: Any) -> Condition:
    f = key.field
    if key.scalar:
        return {f: {"$lt" if key.direction == 1 else "$gt": value}}
    if key.direction == 1:
        if value is None:
            return _NEVER
        return {"$or": [{f: {"$lt": value}}, {f: {"$exists": False}}]}  # smallest element < value
    if value is None:
        return {f: {"$exists": True}}
    return {f: {"$gt": value}}  # largest element > value


def _equal(key: SortKey, value: Any) -> Condition:
    f = key.field
    if key.scalar:
        return {f: value}
    if value is None:
        return {f: {"$exists": False}}
    # The smallest (largest) element equals value: it is there and none is below (above) it.
    return {"$and": [{f: value}, {f: {"$not": {"$lt" if key.direction == 1 else "$gt": value}}}]}


def keyset(keys: Sequence[SortKey], cursor: Cursor, type_: str) -> Condition:
    """The condition for resources of ``type_`` on the far side of ``cursor``.

    The order is the sort keys, then the resource type (for searches over several types), then
    ``_id`` ascending, which makes it total."""
    compare = _strictly_after if cursor.forward else _strictly_before
    ors: list[Condition] = []
    prefix: list[Condition] = []
    for key, value in zip(keys, cursor.values):
        ors.append(_and(prefix + [compare(key, value)]))
        prefix.append(_equal(key, value))
    if (type_ > cursor.type) == cursor.forward and type_ != cursor.type:
        ors.append(_and(prefix))
    elif type_ == cursor.type:
        ors.append(_and(prefix + [{"_id": {"$gt" if cursor.forward else "$lt": cursor.id}}]))
    return ors[0] if len(ors) == 1 else {"$or": ors}


def _and(conds: list[Condition]) -> Condition:
    conds = [c for c in conds if c]
    if not conds:
        return {}
    return conds[0] if len(conds) == 1 else {"$and": conds}


def encode(cursor: Cursor) -> str:
    values = [{"d": v.isoformat()} if isinstance(v, datetime) else v for v in cursor.values]
    raw = orjson.dumps([1 if cursor.forward else 0, values, cursor.type, cursor.id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, arity: int) -> Cursor:
    """The cursor in a ``_cursor`` parameter; a 400 when it was not made by :func:`encode`."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        forward, values, type_, id_ = orjson.loads(raw)
        decoded: list[Any] = []
        for v in values:
            if isinstance(v, dict):
                decoded.append(datetime.fromisoformat(v["d"]))
            elif v is None or isinstance(v, (str, int, float)) and not isinstance(v, bool):
                decoded.append(v)
            else:
                raise ValueError(v)
        if len(decoded) != arity or not isinstance(type_, str) or not isinstance(id_, str) or forward not in (0, 1):
            raise ValueError("shape")
    except (ValueError, TypeError, KeyError, orjson.JSONDecodeError):
        raise bad_request("Invalid _cursor: use the paging links of a search Bundle as they are", expression=["_cursor"]) from None
    return Cursor(bool(forward), tuple(decoded), type_, id_)
