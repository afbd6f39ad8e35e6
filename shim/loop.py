"""A minimal single-threaded event loop: fd readiness callbacks and timers, on epoll.

The shim process is one thread: a thread costs a Python shim ~270 KiB of private memory the
first time one starts (see shim.zygote), asyncio ~5 MiB. Everything that waits (requests,
launcher commands, exits, stdin copying) is a callback here. select.epoll is used directly:
the selectors module's extra layers cost each shim pages for nothing.
"""

from __future__ import annotations

import contextlib
import heapq
import select
import time
from collections.abc import Callable

Callback = Callable[[], None]
READ = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
WRITE = select.EPOLLOUT


class Loop:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._registered: dict[int, int] = {}
        self._timers: list[tuple[float, int, Callback]] = []
        self._cancelled: set[int] = set()
        self._next_handle = 0
        self.stopping = False

    def _update(self, fd: int) -> None:
        mask = (READ if fd in self._readers else 0) | (WRITE if fd in self._writers else 0)
        current = self._registered.get(fd)
        if current is None:
            if mask:
                self._epoll.register(fd, mask)
                self._registered[fd] = mask
        elif not mask:
            del self._registered[fd]
            with contextlib.suppress(OSError):  # already closed: the kernel dropped it
                self._epoll.unregister(fd)
        elif mask != current:
            self._epoll.modify(fd, mask)
            self._registered[fd] = mask

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def call_later(self, delay: float, callback: Callback) -> int:
        self._next_handle += 1
        heapq.heappush(self._timers, (time.monotonic() + delay, self._next_handle, callback))
        return self._next_handle

    def cancel(self, handle: int) -> None:
        self._cancelled.add(handle)

    def run(self) -> None:
        while not self.stopping:
            timeout = -1.0
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            for fd, events in self._epoll.poll(timeout):
                if events & READ and fd in self._readers:
                    self._readers[fd]()
                if events & WRITE and fd in self._writers:
                    self._writers[fd]()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, handle, callback = heapq.heappop(self._timers)
                if handle in self._cancelled:
                    self._cancelled.discard(handle)
                    continue
                callback()

    def stop(self) -> None:
        self.stopping = True
