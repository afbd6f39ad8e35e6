"""OOM kills of a container's cgroup, for /tasks/oom.

The kernel counts OOM kills per memory cgroup: `oom_kill N` in memory.oom_control (cgroup v1)
or memory.events (cgroup v2). A watch remembers the count and reports every increase. It learns
of one at once on cgroup v1 (an eventfd registered through cgroup.event_control, read by the
event loop), by a cheap periodic read on cgroup v2, and whenever its owner asks (`check()`:
when the init process exits and before the container is deleted, so an OOM that killed the
init is reported before its exit even when the cgroup goes away right after).

Nothing here starts a process: one file descriptor pair per running container on v1, one small
asyncio task on v2.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("runtimed.tasks.oom")

CGROUP_ROOT = Path("/sys/fs/cgroup")
V2_POLL_INTERVAL = 1.0


def memory_cgroup(pid: int, root: Path = CGROUP_ROOT) -> tuple[Path, int] | None:
    """(the memory cgroup directory of a process, cgroup version), or None if none is found."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    unified = None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "memory" in controllers.split(","):
            directory = root / "memory" / path.lstrip("/")
            if directory.is_dir():
                return directory, 1
        if hierarchy == "0" and not controllers:
            unified = path.lstrip("/")
    if unified is not None and (root / "cgroup.controllers").exists():  # pure v2
        directory = root / unified
        if (directory / "memory.events").exists():
            return directory, 2
    return None


def oom_kills(directory: Path, version: int) -> int | None:
    """The cgroup's OOM kill count; None when the cgroup is gone."""
    name = "memory.oom_control" if version == 1 else "memory.events"
    try:
        text = (directory / name).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            with contextlib.suppress(ValueError):
                return int(value)
    return 0


class OomWatch:
    """Reports (calls `on_oom`) once per OOM kill counted in one memory cgroup."""

    def __init__(self, directory: Path, version: int, on_oom: Callable[[], None]) -> None:
        self.directory = directory
        self.version = version
        self.on_oom = on_oom
        self.count = oom_kills(directory, version) or 0
        self._eventfd = -1
        self._poller: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def start(cls, pid: int, on_oom: Callable[[], None]) -> OomWatch | None:
        found = memory_cgroup(pid)
        if found is None:
            log.debug("no memory cgroup to watch for OOM kills", pid=pid)
            return None
        watch = cls(*found, on_oom)
        watch._loop = asyncio.get_running_loop()
        if watch.version == 1:
            watch._register_eventfd()
        else:
            watch._poller = asyncio.ensure_future(watch._poll())
        return watch

    def _register_eventfd(self) -> None:
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            control = os.open(self.directory / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            try:
                with open(self.directory / "cgroup.event_control", "w") as handle:
                    handle.write(f"{efd} {control}")
            finally:
                os.close(control)  # the kernel holds its own reference
        except OSError as exc:
            os.close(efd)
            log.debug("cannot register for OOM notifications; polling", error=str(exc))
            self._poller = asyncio.ensure_future(self._poll())
            return
        self._eventfd = efd
        assert self._loop is not None
        self._loop.add_reader(efd, self._notified)

    def _notified(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_read(self._eventfd)
        if not self.check():  # the cgroup was removed (which notifies too)
            self.stop()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(V2_POLL_INTERVAL)
            if not self.check():
                return

    def check(self) -> bool:
        """Report OOM kills counted since the last check; False when the cgroup is gone."""
        count = oom_kills(self.directory, self.version)
        if count is None:
            return False
        if count > self.count:
            self.count = count
            try:
                self.on_oom()
            except Exception as exc:
                log.error("OOM event handler failed", error=str(exc))
        return True

    def stop(self) -> None:
        if self._eventfd >= 0:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._eventfd)
            os.close(self._eventfd)
            self._eventfd = -1
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
