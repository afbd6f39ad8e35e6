"""Garbage collection: mark and sweep of content, snapshots, leases and ingests (see collector).

Services reach the scheduler through the plugin set at call time, so they need not require the
GC plugin type (a daemon without a working collector still serves deletes, without collecting).
"""

from __future__ import annotations

from runtimed.gc.collector import Collector, Stats
from runtimed.gc.scheduler import Scheduler, SchedulerConfig
from runtimed.plugin import PluginSet, PluginType

__all__ = ["Collector", "Scheduler", "SchedulerConfig", "Stats", "collect", "notify_deletion", "scheduler_of"]


def scheduler_of(plugins: PluginSet) -> Scheduler | None:
    scheduler = plugins.get_by_type(PluginType.GC).get("scheduler")
    return scheduler if isinstance(scheduler, Scheduler) else None


async def collect(plugins: PluginSet) -> Stats | None:
    """Run a collection and wait for it (Delete with sync=true); None without a collector."""
    scheduler = scheduler_of(plugins)
    return None if scheduler is None else await scheduler.collect()


def notify_deletion(plugins: PluginSet) -> None:
    """Tell the scheduler something was deleted that no event announces (a lease)."""
    scheduler = scheduler_of(plugins)
    if scheduler is not None:
        scheduler.notify_deletion()
