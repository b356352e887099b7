"""Which MongoDB indexes answer searches on a resource type: one sparse index per parameter.

Not a wildcard index: a wildcard index keeps shared "multikey path" entries that every insert of
a document with arrays rewrites, so concurrent transactions on one type collide on them and are
re-run (measured: 17 retries for 12 concurrent Synthea bundles). Ordinary multikey indexes record
that once, in the catalog. Sparse, because most parameters are absent from most resources.
Composite parameters are indexed on their first component (a code, in every R4 composite); the
``<code>:text`` values of tokens are not indexed at all, to keep the index count down.
"""

from __future__ import annotations

from functools import lru_cache

from fhir_server.search import parameters
from fhir_server.search.extract import indexed_parameters

IndexKeys = list[tuple[str, int]]


def _keys(code: str, kind: str) -> IndexKeys:
    field = "s." + code
    if kind == "string":
        return [(field + ".n", 1)]
    if kind == "quantity":
        return [(field + ".v", 1)]
    if kind == "composite":
        return [(field + ".c0", 1)]
    return [(field, 1)]  # token, reference, uri, number


@lru_cache(maxsize=None)
def search_indexes(resource_type: str) -> tuple[tuple[str, tuple[tuple[str, int], ...]], ...]:
    """(name, keys) of every search index a type collection needs."""
    out: list[tuple[str, tuple[tuple[str, int], ...]]] = [("s__refs", (("s._refs", 1),))]
    for code, kind in indexed_parameters(resource_type):
        if kind == "date":
            # A date range is searched by its start (lt, le, sa, eq) or by its end (gt, ge, eb):
            # one index each, since a compound (lo, hi) index cannot answer conditions on hi alone.
            out.append((f"s_{code}", ((f"s.{code}.lo", 1),)))
            out.append((f"s_{code}_hi", ((f"s.{code}.hi", 1),)))
        else:
            out.append((f"s_{code}", tuple(_keys(code, kind))))
    return tuple(out)


parameters.on_change(search_indexes.cache_clear)
