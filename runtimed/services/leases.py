"""Leases service: thin conversion over the metadata lease store."""

from __future__ import annotations

from google.protobuf import empty_pb2

from runtimed import gc
from runtimed.api.containerd.services.leases.v1 import leases_pb2 as pb
from runtimed.api.containerd.services.leases.v1 import leases_pb2_grpc as pb_grpc
from runtimed.metadata.leases import LeaseStore
from runtimed.plugin import PluginSet, PluginType
from runtimed.server.interceptors import current_namespace
from runtimed.services import convert
from runtimed.services.base import grpc_plugin
from runtimed.types import Lease, LeaseResource


def lease_to_pb(lease: Lease) -> pb.Lease:
    return pb.Lease(id=lease.id, created_at=convert.timestamp(lease.created_at), labels=lease.labels)


def resource_to_core(message: pb.Resource) -> LeaseResource:
    return LeaseResource(id=message.id, type=message.type)


class LeasesServicer(pb_grpc.LeasesServicer):
    def __init__(self, store: LeaseStore, plugins: PluginSet | None = None) -> None:
        self._store = store
        self._plugins = plugins  # the GC scheduler is looked up per call (it inits later)

    async def Create(self, request, context):
        # An empty id asks the server to generate one (`ctr leases create` sends none).
        lease = await self._store.create(current_namespace(), request.id, dict(request.labels))
        return pb.CreateResponse(lease=lease_to_pb(lease))

    async def Delete(self, request, context):
        await self._store.delete(current_namespace(), request.id)
        if self._plugins is not None:
            # What only the lease held is garbage now; leases publish no event to trigger on.
            if request.sync:
                await gc.collect(self._plugins)
            else:
                gc.notify_deletion(self._plugins)
        return empty_pb2.Empty()

    async def List(self, request, context):
        found = await self._store.list(current_namespace(), list(request.filters))
        return pb.ListResponse(leases=[lease_to_pb(lease) for lease in found])

    async def AddResource(self, request, context):
        await self._store.add_resource(current_namespace(), request.id, resource_to_core(request.resource))
        return empty_pb2.Empty()

    async def DeleteResource(self, request, context):
        await self._store.delete_resource(current_namespace(), request.id, resource_to_core(request.resource))
        if self._plugins is not None:
            gc.notify_deletion(self._plugins)
        return empty_pb2.Empty()

    async def ListResources(self, request, context):
        found = await self._store.list_resources(current_namespace(), request.id)
        return pb.ListResourcesResponse(resources=[pb.Resource(id=r.id, type=r.type) for r in found])


PLUGINS = [
    grpc_plugin(
        "leases",
        "containerd.services.leases.v1.Leases",
        lambda ctx: LeasesServicer(ctx.plugins.get_single(PluginType.METADATA).leases, ctx.plugins),
        pb_grpc.add_LeasesServicer_to_server,
        requires=[PluginType.METADATA],
    )
]
