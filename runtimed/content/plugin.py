"""The content plugin: the blob store under the plugin's root, indexed in the metadata database."""

from __future__ import annotations

from runtimed.content.store import ContentStore
from runtimed.plugin import InitContext, PluginType, Registration


async def _init(ctx: InitContext) -> ContentStore:
    ctx.ensure_dirs()
    metadata = ctx.plugins.get_single(PluginType.METADATA)
    store = ContentStore(ctx.root, metadata.db, ctx.plugins.get_single(PluginType.EVENT))
    await store.open()
    ctx.exports["root"] = str(ctx.root)
    return store


PLUGINS = [
    Registration(
        type=PluginType.CONTENT,
        id="content",
        init=_init,
        requires=(PluginType.METADATA,),
    ),
]
