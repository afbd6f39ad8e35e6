"""Containers service: thin conversion over the metadata container store."""

from __future__ import annotations

from google.protobuf import empty_pb2

from runtimed.api.containerd.services.containers.v1 import containers_pb2 as pb
from runtimed.api.containerd.services.containers.v1 import containers_pb2_grpc as pb_grpc
from runtimed.metadata.containers import ContainerStore
from runtimed.plugin import PluginType
from runtimed.server.interceptors import current_namespace
from runtimed.services import convert
from runtimed.services.base import field_paths, grpc_plugin


class ContainersServicer(pb_grpc.ContainersServicer):
    def __init__(self, store: ContainerStore) -> None:
        self._store = store

    async def Get(self, request, context):
        container = await self._store.get(current_namespace(), request.id)
        return pb.GetContainerResponse(container=convert.container_to_pb(container))

    async def List(self, request, context):
        found = await self._store.list(current_namespace(), list(request.filters))
        return pb.ListContainersResponse(containers=[convert.container_to_pb(c) for c in found])

    async def ListStream(self, request, context):
        for container in await self._store.list(current_namespace(), list(request.filters)):
            yield pb.ListContainerMessage(container=convert.container_to_pb(container))

    async def Create(self, request, context):
        created = await self._store.create(current_namespace(), convert.container_to_core(request.container))
        return pb.CreateContainerResponse(container=convert.container_to_pb(created))

    async def Update(self, request, context):
        updated = await self._store.update(
            current_namespace(),
            convert.container_to_core(request.container),
            field_paths(request.update_mask),
        )
        return pb.UpdateContainerResponse(container=convert.container_to_pb(updated))

    async def Delete(self, request, context):
        await self._store.delete(current_namespace(), request.id)
        return empty_pb2.Empty()


PLUGINS = [
    grpc_plugin(
        "containers",
        "containerd.services.containers.v1.Containers",
        lambda ctx: ContainersServicer(ctx.plugins.get_single(PluginType.METADATA).containers),
        pb_grpc.add_ContainersServicer_to_server,
        requires=[PluginType.METADATA],
    )
]
