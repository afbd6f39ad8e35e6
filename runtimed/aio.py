"""asyncio helpers shared across the daemon."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Hashable
from typing import TypeVar

T = TypeVar("T")


async def finish_despite_cancel(awaitable: Awaitable[T]) -> T:
    """Await work to its end even if the caller is cancelled meanwhile, then re-raise that.

    Store transactions and clean-up run on their own threads whatever happens to the
    caller; waiting for them keeps a cancelled caller from undoing (or skipping the undo
    of) a change that was in fact committed.
    """
    task = asyncio.ensure_future(awaitable)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


class KeyedLocks:
    """One asyncio lock per key, held only while someone uses it (no unbounded growth)."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]
