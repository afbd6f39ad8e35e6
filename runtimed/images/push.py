"""Pushing a local image to a registry: blobs first, then manifests, then the index, then the tag.

The whole tree is read from the content store before anything is uploaded, so an image whose
content is incomplete (an index pulled for one platform only) fails up front, naming what is
missing. Blobs go up in parallel (max_concurrent_uploads); one the registry already has is
skipped, and one whose `containerd.io/distribution.source.<host>` label names another repository
on the same registry is mounted from there instead of uploaded. Manifests are pushed by digest,
children before their index, and the root last under the remote's tag. Pushed content gets the
distribution.source label of the remote repository, as containerd does, so later pushes elsewhere
on that registry can mount it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from runtimed import reference
from runtimed.errors import InvalidArgument, NotFound, q
from runtimed.images.manifest import INDEX_TYPES, MANIFEST_TYPES, parse_index, parse_manifest
from runtimed.images.pull import Throttle, first_error
from runtimed.images.service import (
    DISTRIBUTION_SOURCE_PREFIX,
    ImageService,
    Progress,
    RegistryOptions,
    Report,
    ignore_progress,
)
from runtimed.images.unpack import manifests_for
from runtimed.platforms import Platform
from runtimed.reference import Reference
from runtimed.remotes import PushResult, RegistryClient, file_source
from runtimed.types import Descriptor

log = structlog.get_logger("runtimed.images")


@dataclass
class PushOptions:
    reference: str  # the local image
    remote: str = ""  # where to push it; empty: the image's own name
    platforms: Sequence[Platform] = ()  # at most one: push only that platform's manifest
    registry: RegistryOptions = field(default_factory=RegistryOptions)


async def push(
    service: ImageService, namespace: str, options: PushOptions, report: Report = ignore_progress
) -> Descriptor:
    """Push a local image; returns the descriptor the remote tag now points at."""
    image = await service.get_image(namespace, options.reference)
    remote = reference.parse(options.remote or image.name)
    what = f"image {q(image.name)}"
    target = image.target
    if len(options.platforms) > 1:
        raise InvalidArgument(f"push {what}: at most one platform may be given, not {len(options.platforms)}")
    if options.platforms:
        target = (await manifests_for(service, namespace, target, options.platforms, what))[0]
    started = time.monotonic()
    job = _Push(service, namespace, image.name, remote, report)
    await job.plan(target)
    async with service.registry(remote.host, options.registry) as registry:
        await job.run(registry)
    log.info(
        "image pushed",
        namespace=namespace,
        image=image.name,
        remote=str(remote),
        digest=target.digest,
        blobs=len(job.blobs),
        seconds=round(time.monotonic() - started, 3),
    )
    report(Progress("done", str(remote), target.media_type, total=target.size, message=target.digest))
    return target


class _Push:
    def __init__(
        self, service: ImageService, namespace: str, image: str, remote: Reference, report: Report
    ) -> None:
        self.service = service
        self.namespace = namespace
        self.image = image
        self.remote = remote
        self.report = report
        self.source = {DISTRIBUTION_SOURCE_PREFIX + remote.host: remote.repository}
        # What to upload: blobs (config, layers) by digest, then documents children first.
        self.blobs: dict[str, Descriptor] = {}
        self.documents: list[tuple[Descriptor, bytes]] = []
        self._log = log.bind(namespace=namespace, image=image, remote=str(remote))

    async def plan(self, desc: Descriptor) -> None:
        """Read the tree under desc from the content store; NotFound names what is missing."""
        if any(d.digest == desc.digest for d, _ in self.documents):
            return
        kind = "index" if desc.media_type in INDEX_TYPES else "manifest"
        what = f"{kind} {desc.digest} of image {q(self.image)}"
        if desc.media_type not in INDEX_TYPES + MANIFEST_TYPES:
            raise InvalidArgument(f"{what}: cannot push media type {q(desc.media_type)}")
        try:
            data = await self.service.read_document(self.namespace, desc, what)
        except NotFound:
            platform = f" ({desc.platform})" if desc.platform else ""
            raise NotFound(
                f"{what}{platform} is not in the content store: pull the image with all its platforms, "
                "or push one platform"
            ) from None
        if desc.media_type in INDEX_TYPES:
            for child in parse_index(data, what):
                await self.plan(child)
        else:
            manifest = parse_manifest(data, what)
            for blob in (manifest.config, *manifest.layers):
                if not await self.service.content.exists(self.namespace, blob.digest):
                    raise NotFound(f"blob {blob.digest} of {what} is not in the content store")
                self.blobs.setdefault(blob.digest, blob)
        self.documents.append((desc, data))

    async def run(self, registry: RegistryClient) -> None:
        uploads = asyncio.Semaphore(self.service.max_concurrent_uploads)
        try:
            async with asyncio.TaskGroup() as tasks:
                for desc in self.blobs.values():
                    tasks.create_task(self.blob(registry, desc, uploads))
        except BaseExceptionGroup as group:
            raise first_error(group) from None
        root = self.documents[-1][0]
        for desc, data in self.documents:
            top = desc is root
            self.report(Progress("pushing", desc.digest, desc.media_type, 0, desc.size))
            # Children by digest in the bare repository (the remote may pin the root's digest).
            target = self.remote if top else Reference(self.remote.host, self.remote.repository)
            await registry.push_manifest(target, desc, data, by_digest=not top)
            self.report(Progress("pushed", desc.digest, desc.media_type, desc.size, desc.size))
            await self.service.set_labels(self.namespace, desc.digest, self.source)

    def mount_source(self, labels: dict[str, str]) -> Reference | None:
        """Another repository of the remote's registry that has the blob, by its source label."""
        for repository in labels.get(DISTRIBUTION_SOURCE_PREFIX + self.remote.host, "").split(","):
            if repository and repository != self.remote.repository:
                try:
                    return Reference(self.remote.host, repository)
                except InvalidArgument:
                    continue  # a label someone else wrote: not worth failing over
        return None

    async def blob(self, registry: RegistryClient, desc: Descriptor, uploads: asyncio.Semaphore) -> None:
        async with uploads:
            info = await self.service.content.info(self.namespace, desc.digest)
            path = await self.service.content.blob_path(self.namespace, desc.digest)
            throttle = Throttle()

            def progress(sent: int) -> None:
                if throttle.due():
                    self.report(Progress("pushing", desc.digest, desc.media_type, sent, desc.size))

            result = await registry.push_blob(
                self.remote,
                desc,
                file_source(path),
                mount_from=self.mount_source(info.labels),
                progress=progress,
            )
            if result is PushResult.UPLOADED:
                self.report(Progress("pushed", desc.digest, desc.media_type, desc.size, desc.size))
            else:
                self.report(
                    Progress("exists", desc.digest, desc.media_type, desc.size, desc.size, message=result)
                )
        await self.service.set_labels(self.namespace, desc.digest, self.source)
