"""The volumes plugin (io.runtimed.volume.v1.local): volume directories under the plugin's root,
their records in the metadata database."""

from __future__ import annotations

from runtimed.plugin import InitContext, PluginType, Registration
from runtimed.volumes.store import VolumeStore

VOLUME_PLUGIN_TYPE = "io.runtimed.volume.v1"


async def _init(ctx: InitContext) -> VolumeStore:
    ctx.ensure_dirs()
    metadata = ctx.plugins.get_single(PluginType.METADATA)
    store = VolumeStore(ctx.root, ctx.state, metadata.db, ctx.plugins.get_single(PluginType.EVENT))
    await store.open()
    ctx.exports["root"] = str(store.root)
    return store


PLUGINS = [
    Registration(
        type=VOLUME_PLUGIN_TYPE,
        id="local",
        init=_init,
        requires=(PluginType.METADATA, PluginType.EVENT),
    ),
]
