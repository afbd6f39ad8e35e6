"""asyncio helpers shared across the daemon."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
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
