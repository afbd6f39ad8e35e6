"""The io.containerd.gc.v1.scheduler plugin: the collector over metadata, content and snapshotters.

Config (`[plugins."io.containerd.gc.v1.scheduler"]`), see runtimed.gc.scheduler:

    pause_threshold = 0.02      # max share of time collections may hold the metadata database
    deletion_threshold = 0      # deletions that trigger a collection without that wait (0: off)
    schedule_delay = "100ms"    # debounce between a deletion and its collection
    startup_delay = "0s"        # 0: collect during init, before serving; else in the background
"""

from __future__ import annotations

from runtimed.gc.collector import Collector
from runtimed.gc.scheduler import DEFAULT_CONFIG, Scheduler, SchedulerConfig
from runtimed.plugin import InitContext, PluginType, Registration


async def _init(ctx: InitContext) -> Scheduler:
    config = SchedulerConfig.parse(ctx.config)
    events = ctx.plugins.get_single(PluginType.EVENT)
    collector = Collector(
        ctx.plugins.get_single(PluginType.METADATA).db,
        ctx.plugins.get_single(PluginType.CONTENT),
        ctx.plugins.get_by_type(PluginType.SNAPSHOTTER),
        events,
    )
    scheduler = Scheduler(collector, config)
    ctx.exports.update(
        {
            "PauseThreshold": str(config.pause_threshold),
            "DeletionThreshold": str(config.deletion_threshold),
            "ScheduleDelay": f"{config.schedule_delay:g}s",
            "StartupDelay": f"{config.startup_delay:g}s",
        }
    )
    await scheduler.start(events)
    return scheduler


PLUGINS = [
    Registration(
        type=PluginType.GC,
        id="scheduler",
        init=_init,
        requires=(PluginType.EVENT, PluginType.METADATA, PluginType.CONTENT, PluginType.SNAPSHOTTER),
        config=DEFAULT_CONFIG,
    ),
]
