"""When collections run: at start-up, shortly after deletions, and on demand.

* Start-up: with `startup_delay = "0s"` (the default) one collection runs during the plugin's
  init, before the daemon serves, so what a crash left behind is reclaimed and no client write
  races it; a positive delay runs it in the background that long after init (containerd's way).
* Deletions: image, container and content deletions (seen as their events) and lease deletions
  (the Leases service calls notify_deletion) schedule a collection `schedule_delay` after the
  first of them, so a burst (`ctr images rm a b c`, an unpack's clean-up) costs one collection.
  `pause_threshold` bounds the share of time collections hold the metadata database: the next
  one waits at least avg_pause / pause_threshold - avg_pause after the last (containerd's rule,
  at most 0.5), with avg_pause counted as at least 5 ms as containerd does (minimumGCTime): at
  the default 0.02 that is >= 245 ms, so a stream of `ctr run --rm` (a lease and a container
  deleted per run) costs a collection every few runs, not two per run. `deletion_threshold` > 0
  deletions since the last collection skip that wait.
* On demand: `await scheduler.collect()` (Images.Delete and Leases.Delete with sync=true) runs a
  collection that starts after the call, as soon as the one running (if any) is done, and
  returns what it removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from runtimed.errors import ConfigError, Internal, ResourceExhausted, RuntimedError, Unavailable, q
from runtimed.events.exchange import Exchange
from runtimed.gc.collector import Collector, Stats

log = structlog.get_logger("runtimed.gc")

# Deletions that can leave garbage; lease deletions have no event (as in containerd).
TRIGGER_TOPICS = ("/images/delete", "/containers/delete", "/content/delete")
MAX_PAUSE_THRESHOLD = 0.5
MAX_RETRY_DELAY = 60.0
# containerd's minimumGCTime: the average pause the spacing is computed from is at least this, so
# a store whose collections are quick is not collected after every deletion.
MINIMUM_PAUSE = 0.005

DEFAULT_CONFIG: dict[str, Any] = {
    "pause_threshold": 0.02,
    "deletion_threshold": 0,
    "schedule_delay": "100ms",
    "startup_delay": "0s",
}

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, name: str) -> float:
    """Seconds from a Go-style duration ("100ms", "1m30s", "0") or a number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"gc scheduler: {name} must be a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text == "0":
            return 0.0
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(number + unit for number, unit in parts) != text:
            raise ConfigError(f'gc scheduler: {name} {q(value)} is not a duration like "100ms" or "1s"')
        seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    else:
        raise ConfigError(f"gc scheduler: {name} must be a duration, got {value!r}")
    if seconds < 0:
        raise ConfigError(f"gc scheduler: {name} must not be negative")
    return seconds


@dataclass(frozen=True)
class SchedulerConfig:
    pause_threshold: float = 0.02
    deletion_threshold: int = 0
    schedule_delay: float = 0.1  # seconds
    startup_delay: float = 0.0  # seconds; 0: during init, before the daemon serves

    @classmethod
    def parse(cls, config: Mapping[str, Any]) -> SchedulerConfig:
        merged = {**DEFAULT_CONFIG, **config}
        pause = merged["pause_threshold"]
        if isinstance(pause, bool) or not isinstance(pause, int | float) or pause < 0:
            raise ConfigError(f"gc scheduler: pause_threshold must be a number >= 0, got {pause!r}")
        deletions = merged["deletion_threshold"]
        if isinstance(deletions, bool) or not isinstance(deletions, int) or deletions < 0:
            raise ConfigError(f"gc scheduler: deletion_threshold must be an integer >= 0, got {deletions!r}")
        return cls(
            pause_threshold=min(float(pause), MAX_PAUSE_THRESHOLD),
            deletion_threshold=deletions,
            schedule_delay=parse_duration(merged["schedule_delay"], "schedule_delay"),
            startup_delay=parse_duration(merged["startup_delay"], "startup_delay"),
        )


class Scheduler:
    """Runs the collector's collections; the instance of the io.containerd.gc.v1.scheduler plugin."""

    def __init__(self, collector: Collector, config: SchedulerConfig | None = None) -> None:
        self.collector = collector
        self.config = config or SchedulerConfig()
        self.last: Stats | None = None
        self._wake = asyncio.Event()
        self._waiters: list[asyncio.Future[Stats]] = []
        self._deletions = 0
        self._first_deletion = 0.0  # monotonic time of the first uncollected deletion
        self._startup_at: float | None = None
        self._next_allowed = 0.0  # monotonic: pause_threshold's earliest next collection
        self._pause_total = 0.0
        self._collections = 0
        self._failures = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    async def start(self, events: Exchange | None = None) -> None:
        if events is not None:
            # Subscribed before anything else runs: no deletion can slip past.
            self._tasks.append(asyncio.create_task(self._listen(events), name="gc-events"))
        if self.config.startup_delay <= 0:
            await self._run_collection(reason="startup")
        else:
            self._startup_at = time.monotonic() + self.config.startup_delay
        self._tasks.append(asyncio.create_task(self._loop(), name="gc-scheduler"))

    def notify_deletion(self, count: int = 1) -> None:
        """Something was deleted: schedule a collection (debounced)."""
        if self._deletions == 0:
            self._first_deletion = time.monotonic()
        self._deletions += count
        self._wake.set()

    async def collect(self) -> Stats:
        """Run a collection that starts after this call and wait for it."""
        if self._closed:
            raise Unavailable("garbage collector is stopped")
        waiter: asyncio.Future[Stats] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        return await waiter

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._settle(self._take_waiters(), error=Unavailable("garbage collector is stopped"))

    # -- the loop

    def _due(self) -> float | None:
        """Monotonic time of the next collection, or None when nothing asks for one."""
        if self._waiters:
            return 0.0
        due: float | None = self._startup_at
        if self._deletions:
            at = self._first_deletion + self.config.schedule_delay
            threshold = self.config.deletion_threshold
            if not (threshold and self._deletions >= threshold):
                at = max(at, self._next_allowed)
            due = at if due is None else min(due, at)
        return due

    async def _loop(self) -> None:
        while True:
            due = self._due()
            if due is None:
                await self._wake.wait()
                self._wake.clear()
                continue
            delay = due - time.monotonic()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue  # re-evaluate: a waiter may want it sooner
            await self._run_collection(reason="requested" if self._waiters else "deletions")

    def _take_waiters(self) -> list[asyncio.Future[Stats]]:
        waiters, self._waiters = self._waiters, []
        return waiters

    @staticmethod
    def _settle(
        waiters: list[asyncio.Future[Stats]], stats: Stats | None = None, error: BaseException | None = None
    ) -> None:
        for waiter in waiters:
            if waiter.done():  # its caller went away
                continue
            if error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(stats)  # type: ignore[arg-type]

    async def _run_collection(self, *, reason: str) -> None:
        waiters = self._take_waiters()
        deletions, self._deletions = self._deletions, 0
        self._startup_at = None
        try:
            stats = await self.collector.collect()
        except Exception as exc:
            self._failures += 1
            retry = min(2.0**self._failures, MAX_RETRY_DELAY)
            log.error(
                "garbage collection failed", reason=reason, retry_in_s=retry, error=str(exc), exc_info=True
            )
            self._next_allowed = time.monotonic() + retry
            if deletions or reason == "startup":
                self.notify_deletion(max(deletions, 1))  # what it was for is still to do
            error = exc if isinstance(exc, RuntimedError) else Internal(f"garbage collection failed: {exc}")
            self._settle(waiters, error=error)
            return
        self._failures = 0
        self.last = stats
        self._collections += 1
        self._pause_total += stats.pause
        interval = 0.0
        if self.config.pause_threshold > 0:
            average = max(self._pause_total / self._collections, MINIMUM_PAUSE)
            interval = average / self.config.pause_threshold - average
        self._next_allowed = time.monotonic() + interval
        log.debug("gc scheduled", reason=reason, deletions=deletions, next_in_ms=round(interval * 1000, 2))
        self._settle(waiters, stats)

    async def _listen(self, events: Exchange) -> None:
        selectors = [f'topic=="{topic}"' for topic in TRIGGER_TOPICS]
        while True:
            try:
                async for envelope in events.subscribe(selectors):
                    if not self.collector.claim(envelope):
                        self.notify_deletion()
            except ResourceExhausted:
                self.notify_deletion()  # events were dropped; some may have been deletions
