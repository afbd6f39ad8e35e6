"""Transfer service (runtimed.services.transfer.v1): pull, push, import and export in the daemon.

Each RPC runs its operation as a task and streams the operation's Progress records as they come.
When the client goes away the stream is cancelled, and with it the operation, which cleans up
after itself (lease deleted, unfinished snapshot removed, partial downloads kept for a resume).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from runtimed.api.runtimed.services.transfer.v1 import transfer_pb2 as pb
from runtimed.api.runtimed.services.transfer.v1 import transfer_pb2_grpc as pb_grpc
from runtimed.errors import InvalidArgument
from runtimed.images.archive import ExportOptions, ImportOptions
from runtimed.images.archive_export import export_archive
from runtimed.images.archive_import import import_archive
from runtimed.images.pull import PullOptions, pull
from runtimed.images.push import PushOptions, push
from runtimed.images.service import ImageService, Progress, RegistryOptions, Report
from runtimed.platforms import Platform
from runtimed.plugin import PluginType
from runtimed.server.interceptors import current_namespace
from runtimed.services import convert
from runtimed.services.base import grpc_plugin

_END = object()


def platforms_to_core(messages: Any) -> list[Platform]:
    return [Platform(p.os or "linux", p.architecture, p.variant).normalized() for p in messages]


def registry_to_core(message: pb.RegistryOptions) -> RegistryOptions:
    return RegistryOptions(
        plain_http=message.plain_http,
        username=message.username,
        secret=message.secret,
        skip_verify=message.skip_verify,
    )


def progress_to_pb(progress: Progress) -> pb.Progress:
    return pb.Progress(
        event=progress.event,
        name=progress.name,
        media_type=progress.media_type,
        offset=progress.offset,
        total=progress.total,
        image=convert.image_to_pb(progress.image) if progress.image is not None else None,
        message=progress.message,
    )


async def stream_progress(operation: Callable[[Report], Awaitable[object]]) -> AsyncIterator[pb.Progress]:
    """Run operation(report) as a task and yield what it reports, then raise what it raised.

    Closing the stream early (the client went away) cancels the operation and waits for it.
    """
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def run() -> None:
        try:
            await operation(queue.put_nowait)
        finally:
            queue.put_nowait(_END)

    task = asyncio.create_task(run())
    try:
        while (item := await queue.get()) is not _END:
            yield progress_to_pb(item)
        await task  # its exception, if any, ends the stream with the matching status
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


class TransferServicer(pb_grpc.TransferServicer):
    def __init__(self, service: ImageService) -> None:
        self._service = service

    async def Pull(self, request, context):
        namespace = current_namespace()
        options = PullOptions(
            reference=request.reference,
            platforms=platforms_to_core(request.platforms),
            all_platforms=request.all_platforms,
            unpack=request.unpack,
            snapshotter=request.snapshotter,
            registry=registry_to_core(request.registry),
            labels=dict(request.labels),
        )
        async for progress in stream_progress(lambda report: pull(self._service, namespace, options, report)):
            yield progress

    async def Push(self, request, context):
        namespace = current_namespace()
        options = PushOptions(
            reference=request.reference,
            remote=request.remote,
            platforms=platforms_to_core(request.platforms),
            registry=registry_to_core(request.registry),
        )
        async for progress in stream_progress(lambda report: push(self._service, namespace, options, report)):
            yield progress

    async def Import(self, request_iterator, context):
        namespace = current_namespace()
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None:
            raise InvalidArgument("import: empty request stream (the first message carries the options)")
        message = first.options
        options = ImportOptions(
            base_name=message.base_name,
            unpack=message.unpack,
            snapshotter=message.snapshotter,
            platforms=platforms_to_core(message.platforms),
            all_platforms=message.all_platforms,
            labels=dict(message.labels),
        )

        async def chunks() -> AsyncIterator[bytes]:
            if first.data:
                yield first.data
            async for request in requests:
                if request.data:
                    yield request.data

        async for progress in stream_progress(
            lambda report: import_archive(self._service, namespace, chunks(), options, report)
        ):
            yield progress

    async def Export(self, request, context):
        namespace = current_namespace()
        options = ExportOptions(
            platforms=platforms_to_core(request.platforms), all_platforms=request.all_platforms
        )
        async for chunk in export_archive(self._service, namespace, list(request.names), options):
            yield pb.ExportResponse(data=chunk)


PLUGINS = [
    grpc_plugin(
        "transfer",
        "runtimed.services.transfer.v1.Transfer",
        lambda ctx: TransferServicer(ctx.plugins.get(PluginType.SERVICE, "images-service")),
        pb_grpc.add_TransferServicer_to_server,
        requires=[PluginType.SERVICE],
    )
]
