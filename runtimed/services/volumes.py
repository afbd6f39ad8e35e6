"""Volumes service (runtimed.services.volumes.v1): thin conversion over the volume store."""

from __future__ import annotations

from google.protobuf import empty_pb2

from runtimed.api.runtimed.services.volumes.v1 import volumes_pb2 as pb
from runtimed.api.runtimed.services.volumes.v1 import volumes_pb2_grpc as pb_grpc
from runtimed.server.interceptors import current_namespace
from runtimed.services import convert
from runtimed.services.base import grpc_plugin
from runtimed.types import Mount
from runtimed.volumes.plugin import VOLUME_PLUGIN_TYPE
from runtimed.volumes.store import Volume, VolumeStore


def volume_to_pb(volume: Volume) -> pb.Volume:
    return pb.Volume(
        name=volume.name,
        labels=volume.labels,
        mountpoint=volume.mountpoint,
        created_at=convert.timestamp(volume.created_at),
        used_by=volume.used_by,
    )


class VolumesServicer(pb_grpc.VolumesServicer):
    def __init__(self, store: VolumeStore) -> None:
        self._store = store

    async def Create(self, request, context):
        created = await self._store.create(current_namespace(), request.name, dict(request.labels))
        return pb.CreateVolumeResponse(volume=volume_to_pb(created))

    async def Get(self, request, context):
        volume = await self._store.get(current_namespace(), request.name)
        return pb.GetVolumeResponse(volume=volume_to_pb(volume))

    async def List(self, request, context):
        found = await self._store.list(current_namespace(), list(request.filters))
        return pb.ListVolumesResponse(volumes=[volume_to_pb(v) for v in found])

    async def Remove(self, request, context):
        await self._store.remove(current_namespace(), request.name)
        return empty_pb2.Empty()

    async def Prune(self, request, context):
        removed, reclaimed = await self._store.prune(current_namespace(), list(request.filters))
        return pb.PruneVolumesResponse(removed=removed, reclaimed_bytes=reclaimed)

    async def Seed(self, request, context):
        rootfs = [Mount(m.type, m.source, m.target, list(m.options)) for m in request.rootfs]
        copied = await self._store.seed(current_namespace(), request.name, rootfs, request.path)
        return pb.SeedVolumeResponse(copied=copied)


PLUGINS = [
    grpc_plugin(
        "volumes",
        "runtimed.services.volumes.v1.Volumes",
        lambda ctx: VolumesServicer(ctx.plugins.get(VOLUME_PLUGIN_TYPE, "local")),
        pb_grpc.add_VolumesServicer_to_server,
        requires=[VOLUME_PLUGIN_TYPE],
    )
]
