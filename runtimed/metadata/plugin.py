"""The metadata plugin: opens the SQLite store and exposes the per-object stores."""

from __future__ import annotations

from dataclasses import dataclass

from runtimed.errors import ConfigError, q
from runtimed.events.exchange import Exchange
from runtimed.metadata.containers import ContainerStore
from runtimed.metadata.db import SYNC_MODES, Database
from runtimed.metadata.images import ImageStore
from runtimed.metadata.leases import LeaseStore
from runtimed.metadata.namespaces import NamespaceStore
from runtimed.plugin import InitContext, PluginType, Registration


@dataclass
class Metadata:
    db: Database
    namespaces: NamespaceStore
    containers: ContainerStore
    images: ImageStore
    leases: LeaseStore

    async def close(self) -> None:
        await self.db.close()


async def open_metadata(path, events: Exchange, *, sync: str = "full") -> Metadata:
    db = Database(path, sync=sync)
    await db.open()
    return Metadata(
        db=db,
        namespaces=NamespaceStore(db, events),
        containers=ContainerStore(db, events),
        images=ImageStore(db, events),
        leases=LeaseStore(db),
    )


async def _init(ctx: InitContext) -> Metadata:
    sync = ctx.config["sync"]
    if sync not in SYNC_MODES:
        raise ConfigError(f"sync must be one of {', '.join(SYNC_MODES)}, got {q(sync)}")
    ctx.ensure_dirs()
    path = ctx.root / "meta.db"
    ctx.exports["path"] = str(path)
    return await open_metadata(path, ctx.plugins.get_single(PluginType.EVENT), sync=sync)


PLUGINS = [
    Registration(
        type=PluginType.METADATA,
        id="sqlite",
        init=_init,
        requires=(PluginType.EVENT,),
        # "full" survives power loss; "normal" is faster and survives a daemon crash.
        config={"sync": "full"},
    ),
]
