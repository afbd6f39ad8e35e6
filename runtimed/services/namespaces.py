"""Namespaces service: thin conversion over the metadata namespace store."""

from __future__ import annotations

from google.protobuf import empty_pb2

from runtimed.api.containerd.services.namespaces.v1 import namespace_pb2 as pb
from runtimed.api.containerd.services.namespaces.v1 import namespace_pb2_grpc as pb_grpc
from runtimed.metadata.namespaces import NamespaceStore
from runtimed.plugin import PluginType
from runtimed.services import convert
from runtimed.services.base import field_paths, grpc_plugin


class NamespacesServicer(pb_grpc.NamespacesServicer):
    def __init__(self, store: NamespaceStore) -> None:
        self._store = store

    async def Get(self, request, context):
        namespace = await self._store.get(request.name)
        return pb.GetNamespaceResponse(namespace=convert.namespace_to_pb(namespace))

    async def List(self, request, context):
        found = await self._store.list([request.filter] if request.filter else [])
        return pb.ListNamespacesResponse(namespaces=[convert.namespace_to_pb(n) for n in found])

    async def Create(self, request, context):
        created = await self._store.create(convert.namespace_to_core(request.namespace))
        return pb.CreateNamespaceResponse(namespace=convert.namespace_to_pb(created))

    async def Update(self, request, context):
        updated = await self._store.update(
            convert.namespace_to_core(request.namespace), field_paths(request.update_mask)
        )
        return pb.UpdateNamespaceResponse(namespace=convert.namespace_to_pb(updated))

    async def Delete(self, request, context):
        await self._store.delete(request.name)
        return empty_pb2.Empty()


PLUGINS = [
    grpc_plugin(
        "namespaces",
        "containerd.services.namespaces.v1.Namespaces",
        lambda ctx: NamespacesServicer(ctx.plugins.get_single(PluginType.METADATA).namespaces),
        pb_grpc.add_NamespacesServicer_to_server,
        requires=[PluginType.METADATA],
    )
]
