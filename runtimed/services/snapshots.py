"""Snapshots service: every loaded snapshotter behind containerd's Snapshots API, events published.

Each request names its snapshotter: empty → InvalidArgument "snapshotter argument missing",
unknown → InvalidArgument "snapshotter not loaded: <name>" (containerd's words). Prepare, Commit
and Remove publish /snapshot/prepare, /snapshot/commit and /snapshot/remove (View does not, as in
containerd). Writes create the namespace implicitly in the metadata store, as containerd does.

Under a lease (the `containerd-lease` header), Prepare and View add the new key, and Commit the
committed name, to the lease as a `snapshots/<snapshotter>` resource *before* the snapshotter
creates it, so no garbage collection can see the snapshot unheld; Commit and Remove then drop
the key that no longer exists (containerd does both in its one metadata transaction).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from google.protobuf import empty_pb2

from plugins.snapshotters.base import Snapshotter
from plugins.snapshotters.types import Info
from runtimed.api.containerd.events import snapshot_pb2 as events_pb2
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from runtimed.api.containerd.types import mount_pb2
from runtimed.errors import InvalidArgument, NotFound, q
from runtimed.events.exchange import Exchange
from runtimed.metadata import namespaces
from runtimed.metadata.db import Database
from runtimed.metadata.leases import SNAPSHOT_RESOURCE_PREFIX, LeaseStore
from runtimed.metadata.namespaces import InUseCheck
from runtimed.plugin import InitContext, PluginType
from runtimed.server.interceptors import current_lease, current_namespace
from runtimed.services.base import field_paths, grpc_plugin
from runtimed.services.convert import timestamp
from runtimed.types import LeaseResource, Mount

LIST_BATCH = 100  # infos per ListSnapshotsResponse, as containerd sends them


def mounts_to_pb(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options) for m in mounts]


def info_to_pb(info: Info) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=int(info.kind),
        created_at=timestamp(info.created_at),
        updated_at=timestamp(info.updated_at),
        labels=info.labels,
    )


def info_to_core(message: pb.Info) -> Info:
    # Only name and labels are updatable; kind and parent are the store's.
    return Info(name=message.name, labels=dict(message.labels))


class SnapshotsServicer(pb_grpc.SnapshotsServicer):
    def __init__(
        self,
        snapshotters: Mapping[str, Snapshotter],
        events: Exchange,
        metadata_db: Database | None = None,
        leases: LeaseStore | None = None,
    ) -> None:
        self._snapshotters = dict(snapshotters)
        self._events = events
        self._metadata_db = metadata_db
        self._leases = leases

    def _get(self, name: str) -> Snapshotter:
        if not name:
            raise InvalidArgument("snapshotter argument missing")
        snapshotter = self._snapshotters.get(name)
        if snapshotter is None:
            raise InvalidArgument(f"snapshotter not loaded: {name}")
        return snapshotter

    async def _ensure_namespace(self, namespace: str) -> None:
        # containerd creates the namespace on a snapshot write; `ctr namespaces ls` then shows it.
        if self._metadata_db is not None:
            await self._metadata_db.write(namespaces.ensure, namespace)

    async def _lease(
        self, namespace: str, snapshotter: str, key: str, *, add: bool, ensure_namespace: bool = False
    ) -> None:
        lease = current_lease()
        if lease and key and self._leases is not None:  # an empty key: the snapshotter's error
            resource = LeaseResource(id=key, type=SNAPSHOT_RESOURCE_PREFIX + snapshotter)
            if add:
                # A failed create leaves this resource naming nothing: harmless, gone with the lease.
                # The namespace, when asked for, is ensured in the same transaction.
                await self._leases.add_resource(
                    namespace,
                    lease,
                    resource,
                    ensure_namespace=ensure_namespace and self._metadata_db is not None,
                )
                return
            with contextlib.suppress(NotFound):  # the lease went meanwhile: nothing to drop
                await self._leases.delete_resource(namespace, lease, resource)
        elif ensure_namespace:
            await self._ensure_namespace(namespace)

    async def Prepare(self, request, context):
        snapshotter = self._get(request.snapshotter)
        namespace = current_namespace()
        await self._lease(namespace, request.snapshotter, request.key, add=True, ensure_namespace=True)
        mounts = await snapshotter.prepare(namespace, request.key, request.parent, dict(request.labels))
        self._events.publish(
            namespace,
            "/snapshot/prepare",
            events_pb2.SnapshotPrepare(
                key=request.key, parent=request.parent, snapshotter=request.snapshotter
            ),
        )
        return pb.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    async def View(self, request, context):
        snapshotter = self._get(request.snapshotter)
        namespace = current_namespace()
        await self._lease(namespace, request.snapshotter, request.key, add=True, ensure_namespace=True)
        mounts = await snapshotter.view(namespace, request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    async def Mounts(self, request, context):
        mounts = await self._get(request.snapshotter).mounts(current_namespace(), request.key)
        return pb.MountsResponse(mounts=mounts_to_pb(mounts))

    async def Commit(self, request, context):
        snapshotter = self._get(request.snapshotter)
        namespace = current_namespace()
        await self._lease(namespace, request.snapshotter, request.name, add=True)
        await snapshotter.commit(namespace, request.name, request.key, dict(request.labels))
        await self._lease(namespace, request.snapshotter, request.key, add=False)
        self._events.publish(
            namespace,
            "/snapshot/commit",
            events_pb2.SnapshotCommit(key=request.key, name=request.name, snapshotter=request.snapshotter),
        )
        return empty_pb2.Empty()

    async def Remove(self, request, context):
        snapshotter = self._get(request.snapshotter)
        namespace = current_namespace()
        await snapshotter.remove(namespace, request.key)
        await self._lease(namespace, request.snapshotter, request.key, add=False)
        self._events.publish(
            namespace,
            "/snapshot/remove",
            events_pb2.SnapshotRemove(key=request.key, snapshotter=request.snapshotter),
        )
        return empty_pb2.Empty()

    async def Stat(self, request, context):
        info = await self._get(request.snapshotter).stat(current_namespace(), request.key)
        return pb.StatSnapshotResponse(info=info_to_pb(info))

    async def Update(self, request, context):
        snapshotter = self._get(request.snapshotter)
        info = await snapshotter.update(
            current_namespace(), info_to_core(request.info), field_paths(request.update_mask)
        )
        return pb.UpdateSnapshotResponse(info=info_to_pb(info))

    async def List(self, request, context):
        snapshotter = self._get(request.snapshotter)
        batch: list[pb.Info] = []
        async for info in snapshotter.walk(current_namespace(), list(request.filters)):
            batch.append(info_to_pb(info))
            if len(batch) >= LIST_BATCH:
                yield pb.ListSnapshotsResponse(info=batch)
                batch = []
        if batch:
            yield pb.ListSnapshotsResponse(info=batch)

    async def Usage(self, request, context):
        usage = await self._get(request.snapshotter).usage(current_namespace(), request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    async def Cleanup(self, request, context):
        await self._get(request.snapshotter).cleanup()
        return empty_pb2.Empty()


def _in_use_check(name: str, snapshotter: Snapshotter) -> InUseCheck:
    async def check(namespace: str) -> list[str]:
        # containerd's words: `namespace "x" must be empty, but it still has snapshots on ...`
        return [f"snapshots on {q(name)} snapshotter"] if await snapshotter.has_snapshots(namespace) else []

    return check


def _make(ctx: InitContext) -> SnapshotsServicer:
    metadata = ctx.plugins.get_single(PluginType.METADATA)
    snapshotters = ctx.plugins.get_by_type(PluginType.SNAPSHOTTER)
    for name, snapshotter in snapshotters.items():
        metadata.namespaces.add_in_use_check(_in_use_check(name, snapshotter))
    return SnapshotsServicer(
        snapshotters, ctx.plugins.get_single(PluginType.EVENT), metadata.db, metadata.leases
    )


PLUGINS = [
    grpc_plugin(
        "snapshots",
        "containerd.services.snapshots.v1.Snapshots",
        _make,
        pb_grpc.add_SnapshotsServicer_to_server,
        requires=[PluginType.SNAPSHOTTER, PluginType.EVENT, PluginType.METADATA],
    )
]
