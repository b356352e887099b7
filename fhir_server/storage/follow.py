"""Keeping an in-memory view of one resource type in step with the database, in every worker.

The registries of stored SearchParameters and of canonical resources follow the same way: when
the change stream opens (and each time it reopens after a failure, with backoff) the whole type
is read again, so nothing written meanwhile is missed; then each committed version is applied.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import Awaitable, Callable

from fhir_server.storage.base import Store

log = logging.getLogger("fhir_server.storage")

Reload = Callable[[], Awaitable[object]]
Apply = Callable[[str, int, "bytes | None"], object]  # id, version, raw (None: deleted)


async def follow(store: Store, type_: str, reload: Reload, apply: Apply) -> None:
    """Run until cancelled: ``reload()`` on every (re)open, ``apply(...)`` for each change."""
    delay = 1.0
    while True:
        try:
            async with aclosing(store.watch(type_)) as changes:
                async for stored in changes:
                    if stored is None:  # (re)opened: whatever happened meanwhile is read now
                        await reload()
                        delay = 1.0
                    else:
                        apply(stored.id, stored.version, None if stored.deleted else stored.raw)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("%s change stream failed; reopening in %.0f s", type_, delay, exc_info=True)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 30.0)
