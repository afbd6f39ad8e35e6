"""Images service: thin conversion over the metadata image store."""

from __future__ import annotations

from google.protobuf import empty_pb2

from runtimed import gc
from runtimed.api.containerd.services.images.v1 import images_pb2 as pb
from runtimed.api.containerd.services.images.v1 import images_pb2_grpc as pb_grpc
from runtimed.metadata.images import ImageStore
from runtimed.plugin import PluginSet, PluginType
from runtimed.server.interceptors import current_namespace
from runtimed.services import convert
from runtimed.services.base import field_paths, grpc_plugin


class ImagesServicer(pb_grpc.ImagesServicer):
    def __init__(self, store: ImageStore, plugins: PluginSet | None = None) -> None:
        self._store = store
        self._plugins = plugins  # the GC scheduler is looked up per call (it inits later)

    async def Get(self, request, context):
        image = await self._store.get(current_namespace(), request.name)
        return pb.GetImageResponse(image=convert.image_to_pb(image))

    async def List(self, request, context):
        found = await self._store.list(current_namespace(), list(request.filters))
        return pb.ListImagesResponse(images=[convert.image_to_pb(i) for i in found])

    async def Create(self, request, context):
        created = await self._store.create(current_namespace(), convert.image_to_core(request.image))
        return pb.CreateImageResponse(image=convert.image_to_pb(created))

    async def Update(self, request, context):
        updated = await self._store.update(
            current_namespace(), convert.image_to_core(request.image), field_paths(request.update_mask)
        )
        return pb.UpdateImageResponse(image=convert.image_to_pb(updated))

    async def Delete(self, request, context):
        await self._store.delete(current_namespace(), request.name)
        if request.sync and self._plugins is not None:
            # `ctr images rm --sync`: return once the content and snapshots are collected.
            await gc.collect(self._plugins)
        return empty_pb2.Empty()


PLUGINS = [
    grpc_plugin(
        "images",
        "containerd.services.images.v1.Images",
        lambda ctx: ImagesServicer(ctx.plugins.get_single(PluginType.METADATA).images, ctx.plugins),
        pb_grpc.add_ImagesServicer_to_server,
        requires=[PluginType.METADATA],
    )
]
