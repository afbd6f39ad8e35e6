"""ShimClient: a connection to one shim process (shim.server), over asyncio.

Requests carry ids and may be answered out of order (a `wait` blocks until its process exits
while other calls go on). Events (exits) are handed to `on_event`; when the connection ends,
every pending call fails with Unavailable and `on_close` runs, which is how the task manager
learns that a shim died.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from typing import Any, TypeVar

import structlog

from runtimed import errors
from shim import api, protocol

log = structlog.get_logger("runtimed.tasks")

V = TypeVar("V", bound=api.Value)

CONNECT_TIMEOUT = 5.0

_ERRORS: dict[str, type[errors.RuntimedError]] = {
    "not_found": errors.NotFound,
    "already_exists": errors.AlreadyExists,
    "invalid_argument": errors.InvalidArgument,
    "failed_precondition": errors.FailedPrecondition,
    "unavailable": errors.Unavailable,
    "not_implemented": errors.NotImplementedYet,
    "internal": errors.Internal,
    "unknown": errors.RuntimedError,  # a command the shim ran failed: the workload's problem
}


def runtimed_error(exc: api.ShimError) -> errors.RuntimedError:
    """The daemon's error for a shim's (same class, same message)."""
    return _ERRORS.get(exc.code, errors.Internal)(exc.message)


class ShimClient:
    def __init__(self, address: str, name: str) -> None:
        self.address = address
        self.name = name  # for messages: "namespace/id"
        self.on_event: Callable[[api.Event], None] = lambda event: None
        self.on_close: Callable[[], None] = lambda: None
        self.closing = False  # set before a shutdown we asked for: the end is expected
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def connect(self, timeout: float = CONNECT_TIMEOUT) -> api.ShimInfo:
        """Connect, subscribe to events, and return what the shim holds."""
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.address, limit=protocol.MAX_FRAME + 16), timeout
            )
        except (OSError, TimeoutError) as exc:
            self._closed.set()
            raise errors.Unavailable(f"shim of task {self.name} at {self.address}: {exc}") from None
        self._task = asyncio.create_task(self._read(), name=f"shim-{self.name}")
        return await self.call("connect", api.Empty(), api.ShimInfo, timeout=timeout)

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while True:
                header = await self._reader.readexactly(protocol.HEADER.size)
                body = await self._reader.readexactly(protocol.decode_length(header))
                message = protocol.decode_body(body)
                if "event" in message:
                    try:
                        self.on_event(api.Event.from_wire(message["event"]))
                    except Exception:
                        log.exception("shim event handler failed", shim=self.name)
                    continue
                future = self._pending.pop(message.get("id", -1), None)
                if future is None or future.done():
                    continue
                if "error" in message:
                    future.set_exception(runtimed_error(api.error_from_wire(message["error"])))
                else:
                    future.set_result(message.get("result") or {})
        except (asyncio.IncompleteReadError, ConnectionError, protocol.ProtocolError, OSError) as exc:
            if not self.closing:
                log.debug("shim connection ended", shim=self.name, error=str(exc) or type(exc).__name__)
        finally:
            self._shut(f"shim of task {self.name} is gone")

    def _shut(self, reason: str) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(errors.Unavailable(reason))
        self._pending.clear()
        if self._writer is not None:
            self._writer.close()
        try:
            self.on_close()
        except Exception:
            log.exception("shim close handler failed", shim=self.name)

    async def call(
        self, method: str, request: api.Value, result: type[V], *, timeout: float | None = None
    ) -> V:
        if self._closed.is_set() or self._writer is None:
            raise errors.Unavailable(f"shim of task {self.name} is gone")
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            message = {"id": request_id, "method": method, "params": request.to_wire()}
            self._writer.write(protocol.encode(message))
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._pending.pop(request_id, None)
            raise errors.Unavailable(f"shim of task {self.name}: {exc}") from None
        try:
            data = await asyncio.wait_for(future, timeout) if timeout is not None else await future
        finally:
            self._pending.pop(request_id, None)
        return result.from_wire(data)

    async def shutdown(self, now: bool = False) -> None:
        """Ask the shim to exit (it does once it holds nothing, or at once with `now`)."""
        self.closing = True
        with contextlib.suppress(errors.Unavailable):
            await self.call("shutdown", api.ShutdownRequest(now=now), api.Empty, timeout=CONNECT_TIMEOUT)

    async def close(self) -> None:
        """Drop the connection; the shim carries on (a daemon shutting down)."""
        self.closing = True
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()
