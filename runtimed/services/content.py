"""Content service: thin conversion over the content store, plus Content.Write's lockstep protocol.

Write is containerd 1.6's (services/content/contentserver): the client sends one request and
reads one response. The first request names the ref and opens (locks) the writer; then:

  STAT   -> {offset, total, digest of the data so far, started_at, updated_at}
  WRITE  -> {offset after the data, running digest}; offset > 0 must be the current offset
            (OUT_OF_RANGE otherwise), offset 0 with data present truncates
  COMMIT -> the same, then size/digest verification and {offset, final digest}; stream ends

A request carrying `expected` for content the namespace already has ends the stream with
ALREADY_EXISTS (which clients count as success) after dropping the ingest.
"""

from __future__ import annotations

from google.protobuf import empty_pb2

from runtimed.api.containerd.services.content.v1 import content_pb2 as pb
from runtimed.api.containerd.services.content.v1 import content_pb2_grpc as pb_grpc
from runtimed.content import ContentInfo, ContentStore, IngestStatus
from runtimed.errors import AlreadyExists, InvalidArgument
from runtimed.plugin import PluginType
from runtimed.server.interceptors import current_lease, current_namespace
from runtimed.services import convert
from runtimed.services.base import field_paths, grpc_plugin

LIST_BATCH = 100  # Info messages per List response, as containerd sends them


def info_to_pb(info: ContentInfo, *, updated: bool = True) -> pb.Info:
    return pb.Info(
        digest=info.digest,
        size=info.size,
        created_at=convert.timestamp(info.created_at),
        updated_at=convert.timestamp(info.updated_at) if updated else None,
        labels=info.labels,
    )


def info_to_core(message: pb.Info) -> ContentInfo:
    return ContentInfo(digest=message.digest, size=message.size, labels=dict(message.labels))


def status_to_pb(status: IngestStatus) -> pb.Status:
    return pb.Status(
        ref=status.ref,
        offset=status.offset,
        total=status.total,
        expected=status.expected,
        started_at=convert.timestamp(status.started_at),
        updated_at=convert.timestamp(status.updated_at),
    )


class ContentServicer(pb_grpc.ContentServicer):
    def __init__(self, store: ContentStore) -> None:
        self._store = store

    async def Info(self, request, context):
        info = await self._store.info(current_namespace(), request.digest)
        return pb.InfoResponse(info=info_to_pb(info))

    async def Update(self, request, context):
        updated = await self._store.update(
            current_namespace(), info_to_core(request.info), field_paths(request.update_mask)
        )
        return pb.UpdateResponse(info=info_to_pb(updated))

    async def List(self, request, context):
        found = await self._store.list(current_namespace(), list(request.filters))
        for start in range(0, len(found), LIST_BATCH):
            # containerd leaves updated_at out of List.
            batch = [info_to_pb(info, updated=False) for info in found[start : start + LIST_BATCH]]
            yield pb.ListContentResponse(info=batch)

    async def Delete(self, request, context):
        await self._store.delete(current_namespace(), request.digest, lease=current_lease())
        return empty_pb2.Empty()

    async def Read(self, request, context):
        namespace, offset = current_namespace(), max(request.offset, 0)
        async for chunk in self._store.read(namespace, request.digest, request.offset, request.size):
            yield pb.ReadContentResponse(offset=offset, data=chunk)
            offset += len(chunk)

    async def Status(self, request, context):
        status = await self._store.status(current_namespace(), request.ref)
        return pb.StatusResponse(status=status_to_pb(status))

    async def ListStatuses(self, request, context):
        found = await self._store.list_statuses(current_namespace(), list(request.filters))
        return pb.ListStatusesResponse(statuses=[status_to_pb(s) for s in found])

    async def Abort(self, request, context):
        await self._store.abort(current_namespace(), request.ref)
        return empty_pb2.Empty()

    async def Write(self, request_iterator, context):
        namespace, lease = current_namespace(), current_lease()
        requests = aiter(request_iterator)
        request = await anext(requests, None)
        if request is None:
            return
        if not request.ref:
            raise InvalidArgument("first message must have a reference")
        total, expected = request.total, request.expected
        store = self._store
        async with store.writer(namespace, request.ref, total, expected, lease=lease) as writer:
            while True:
                response = pb.WriteContentResponse(action=request.action, offset=writer.status().offset)
                if request.expected:
                    expected = request.expected
                    if await store.exists(namespace, expected):
                        await writer.abort()
                        raise AlreadyExists(f"blob with expected digest {expected} exists")
                if request.total > 0:
                    total = request.total
                if request.action == pb.STAT:
                    status = writer.status()
                    response.digest = writer.digest()
                    response.total = total
                    if status.started_at:
                        response.started_at.FromNanoseconds(status.started_at)
                    if status.updated_at:
                        response.updated_at.FromNanoseconds(status.updated_at)
                elif request.action in (pb.WRITE, pb.COMMIT):
                    response.offset = await writer.write(request.data, request.offset)
                    if request.action == pb.COMMIT:
                        await writer.commit(total, expected, dict(request.labels))
                    response.digest = writer.digest()
                else:
                    raise InvalidArgument(f"unknown write action {request.action}")
                yield response
                if request.action == pb.COMMIT:
                    return
                request = await anext(requests, None)
                if request is None:
                    return


PLUGINS = [
    grpc_plugin(
        "content",
        "containerd.services.content.v1.Content",
        lambda ctx: ContentServicer(ctx.plugins.get_single(PluginType.CONTENT)),
        pb_grpc.add_ContentServicer_to_server,
        requires=[PluginType.CONTENT],
    )
]
