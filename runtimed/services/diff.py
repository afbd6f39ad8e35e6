"""Diff service: containerd's Diff API over the walking differ (runtimed.diff) and the content store.

Apply (unpack): the layer blob is read from the content store, decompressed, hashed and applied to
the mounts (an overlay upperdir or a bind source directly, no mount needed); the response is the
uncompressed layer's descriptor, whose digest the client compares with the image's diff_id.

Diff: the change set from `left` to `right` is written straight into a content-store ingest
(`ref`, or a generated one) under the call's lease, with `containerd.io/uncompressed=<diffID>`
on compressed blobs, as containerd's walking differ does. Media types: the OCI layer tar or
tar+gzip (the default); anything else is Unimplemented, as in containerd.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import BinaryIO

from runtimed.api.containerd.services.diff.v1 import diff_pb2 as pb
from runtimed.api.containerd.services.diff.v1 import diff_pb2_grpc as pb_grpc
from runtimed.content import ContentStore, Writer
from runtimed.diff.mediatypes import LAYER_TAR, LAYER_TAR_GZIP
from runtimed.diff.plugin import WalkingDiffer
from runtimed.errors import AlreadyExists, NotImplementedYet
from runtimed.plugin import PluginType
from runtimed.server.interceptors import current_lease, current_namespace
from runtimed.services import convert
from runtimed.services.base import grpc_plugin
from runtimed.types import Descriptor, Mount

UNCOMPRESSED_LABEL = "containerd.io/uncompressed"
DIFF_MEDIA_TYPES = (LAYER_TAR, LAYER_TAR_GZIP)


def mount_to_core(message) -> Mount:
    return Mount(
        type=message.type, source=message.source, target=message.target, options=list(message.options)
    )


class _IngestIO:
    """A write-only file for the differ's worker thread that feeds an async content writer.

    Each write waits for the event loop to store the data: backpressure without a temp file.
    """

    def __init__(self, writer: Writer, loop: asyncio.AbstractEventLoop) -> None:
        self._writer = writer
        self._loop = loop

    def write(self, data: bytes) -> int:
        asyncio.run_coroutine_threadsafe(self._writer.write(bytes(data)), self._loop).result()
        return len(data)

    def flush(self) -> None:
        pass


class DiffServicer(pb_grpc.DiffServicer):
    def __init__(self, differ: WalkingDiffer, store: ContentStore) -> None:
        self._differ = differ
        self._store = store

    async def Apply(self, request, context):
        namespace = current_namespace()
        layer = convert.descriptor_to_core(request.diff)
        blob = await self._store.blob_path(namespace, layer.digest)
        mounts = [mount_to_core(m) for m in request.mounts]
        applied = await self._differ.apply(blob, layer.media_type, mounts)
        return pb.ApplyResponse(applied=convert.descriptor_to_pb(applied.descriptor()))

    async def Diff(self, request, context):
        namespace, lease = current_namespace(), current_lease()
        media_type = request.media_type or LAYER_TAR_GZIP
        if media_type not in DIFF_MEDIA_TYPES:
            raise NotImplementedYet(f"unsupported diff media type: {media_type}")
        ref = request.ref or f"diff-{time.time_ns()}-{secrets.token_hex(4)}"
        labels = dict(request.labels)
        left = [mount_to_core(m) for m in request.left]
        right = [mount_to_core(m) for m in request.right]
        store = self._store
        async with store.writer(namespace, ref, lease=lease) as writer:
            sink: BinaryIO = _IngestIO(writer, asyncio.get_running_loop())  # type: ignore[assignment]
            try:
                written = await self._differ.diff(left, right, sink, media_type)
            except BaseException:
                await writer.abort()
                raise
            if media_type != LAYER_TAR:
                labels[UNCOMPRESSED_LABEL] = written.diff_id
            with contextlib.suppress(AlreadyExists):  # the same layer was written before
                await writer.commit(written.size, written.digest, labels)
        info = await store.info(namespace, written.digest)
        if media_type != LAYER_TAR and UNCOMPRESSED_LABEL not in info.labels:
            info.labels[UNCOMPRESSED_LABEL] = written.diff_id
            await store.update(namespace, info, [f"labels.{UNCOMPRESSED_LABEL}"])
        result = Descriptor(media_type=media_type, digest=written.digest, size=info.size)
        return pb.DiffResponse(diff=convert.descriptor_to_pb(result))


PLUGINS = [
    grpc_plugin(
        "diff",
        "containerd.services.diff.v1.Diff",
        lambda ctx: DiffServicer(
            ctx.plugins.get_single(PluginType.DIFFER), ctx.plugins.get_single(PluginType.CONTENT)
        ),
        pb_grpc.add_DiffServicer_to_server,
        requires=[PluginType.DIFFER, PluginType.CONTENT, PluginType.SNAPSHOTTER],
    )
]
