"""The shim zygote, daemon side: start it once, ask it for one shim process per task.

shim.zygote explains the why (memory) and the protocol: three pipes, spawn parameters as a
frame on one, a trigger byte on another, the shim's report as a frame on the third. Spawns are
serialised here. A zygote that died is started again on the next spawn; when the daemon exits,
the zygote sees EOF on its trigger pipe and exits too, while the shims it started run on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import structlog

import shim
from runtimed.errors import Internal, Unavailable
from shim import protocol

log = structlog.get_logger("runtimed.tasks")

# Where the `shim` package is: the zygote runs with -I -S (no site-packages, no environment),
# so it imports nothing but the standard library and this directory's packages.
CODE_ROOT = str(Path(shim.__file__).resolve().parent.parent)
SPAWN_TIMEOUT = 30.0


class ShimLauncher:
    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        self._lock = asyncio.Lock()
        self._process: asyncio.subprocess.Process | None = None
        self._trigger = -1
        self._params = -1
        self._ready: asyncio.StreamReader | None = None
        self._ready_transport: asyncio.BaseTransport | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def _start(self) -> None:
        trigger_r, trigger_w = os.pipe()
        params_r, params_w = os.pipe()
        ready_r, ready_w = os.pipe()
        code = f"import sys; sys.path[:0] = [{CODE_ROOT!r}]; from shim.zygote import main; main()"
        try:
            self._process = await asyncio.create_subprocess_exec(
                self.python, "-I", "-S", "-c", code, str(trigger_r), str(params_r), str(ready_w),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(trigger_r, params_r, ready_w),
            )  # fmt: skip
        except BaseException:
            for fd in (trigger_r, trigger_w, params_r, params_w, ready_r, ready_w):
                os.close(fd)
            raise
        finally:
            for fd in (trigger_r, params_r, ready_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._trigger, self._params = trigger_w, params_w
        loop = asyncio.get_running_loop()
        self._ready = asyncio.StreamReader(limit=protocol.MAX_FRAME + 16)
        self._ready_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(self._ready),  # type: ignore[arg-type]
            os.fdopen(ready_r, "rb", buffering=0),
        )
        log.info("shim zygote started", pid=self._process.pid)

    def _alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def spawn(self, params: dict[str, Any]) -> tuple[int, str]:
        """Start a shim process; returns (pid, socket address). See shim.server for params."""
        async with self._lock:
            if not self._alive():
                await self._stop_pipes()
                await self._start()
            assert self._ready is not None
            try:
                protocol.write_all_fd(self._params, protocol.encode(params))
                os.write(self._trigger, b"x")
                header = await asyncio.wait_for(self._ready.readexactly(protocol.HEADER.size), SPAWN_TIMEOUT)
                body = await self._ready.readexactly(protocol.decode_length(header))
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                await self._kill()
                raise Unavailable(f"shim zygote failed: {exc or type(exc).__name__}") from None
            report = protocol.decode_body(body)
        if "error" in report:
            raise Internal(f"cannot start a shim: {report['error']}")
        return int(report["pid"]), str(report["address"])

    async def _kill(self) -> None:
        if self._alive():
            assert self._process is not None
            self._process.kill()
            await self._process.wait()
        await self._stop_pipes()

    async def _stop_pipes(self) -> None:
        for fd in (self._trigger, self._params):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._trigger = self._params = -1
        if self._ready_transport is not None:
            self._ready_transport.close()
            self._ready_transport = None
        self._ready = None

    async def close(self) -> None:
        """EOF on the trigger pipe ends the zygote; shims it started are not affected."""
        await self._stop_pipes()
        if self._process is not None and self._process.returncode is None:
            try:
                await asyncio.wait_for(self._process.wait(), 5)
            except TimeoutError:
                await self._kill()
