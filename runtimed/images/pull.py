"""Pulling an image: resolve on its registry, fetch what the platforms need, record it, unpack it.

The content lands exactly where and how `ctr images pull` puts it, so either client can finish,
reuse or remove what the other started:

* writes under refs "manifest-<digest>" (indexes too), "config-<digest>", "layer-<digest>", each
  with its expected digest, verified at commit; an ingest left by an interrupted pull is resumed
  from its offset (HTTP Range), a wrong resumed prefix is dropped and fetched again;
* labels: an index gets `containerd.io/gc.ref.content.m.<i>` for every child, a manifest
  `...gc.ref.content.config` and `...gc.ref.content.l.<i>`, every blob
  `containerd.io/distribution.source.<host>=<repository>` (merged with earlier sources);
* everything is written under a lease (gc.expire = now + 24 h) deleted at the end, so a
  concurrent GC never collects half a pull, and what a failed pull fetched becomes collectible.

Config and layers download in parallel (max_concurrent_downloads, 4 by default), lowest layers
first; unpacking starts with the first layer while later ones still download. The image record
is created (or re-pointed) only when everything is fetched and unpacked: a failed pull leaves no
image behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import structlog

from runtimed import labels as label_rules
from runtimed import reference
from runtimed.content import Writer
from runtimed.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable, q
from runtimed.images.manifest import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_DOCUMENT_SIZE,
    parse_config,
    parse_index,
    parse_manifest,
    select_manifest,
)
from runtimed.images.service import (
    DISTRIBUTION_SOURCE_PREFIX,
    ImageService,
    Progress,
    RegistryOptions,
    Report,
    ignore_progress,
)
from runtimed.images.unpack import Unpacker
from runtimed.platforms import Platform
from runtimed.reference import Reference
from runtimed.remotes import RegistryClient
from runtimed.types import Descriptor, Image

log = structlog.get_logger("runtimed.images")

GC_REF_CONTENT = "containerd.io/gc.ref.content."
PROGRESS_INTERVAL = 0.1  # seconds between two "fetching" reports of one blob
WRITE_BUFFER = 1 << 20  # gather network chunks into 1 MiB writes (one thread hop each)


@dataclass
class PullOptions:
    reference: str
    platforms: Sequence[Platform] = ()  # empty: the daemon's platform
    all_platforms: bool = False  # fetch every platform (unpack still only `platforms`)
    unpack: bool = True
    snapshotter: str = ""  # empty: the service's default
    registry: RegistryOptions = field(default_factory=RegistryOptions)
    labels: dict[str, str] = field(default_factory=dict)


class Throttle:
    """At most one report per interval (the first always passes)."""

    def __init__(self, interval: float = PROGRESS_INTERVAL) -> None:
        self.interval = interval
        self._last = float("-inf")

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval:
            return False
        self._last = now
        return True


class _VerifiedAtCommit:
    """Stands in for the hash of a resumed blob's prefix, which only the ingest holds.

    The registry client checks a resumed stream against this (which always agrees); the real
    check is the ingest's commit, which has hashed every byte, prefix included, and refuses a
    wrong digest.
    """

    def __init__(self, digest: str) -> None:
        self._hex = digest.split(":", 1)[1]

    def update(self, data: bytes, /) -> None:
        pass

    def hexdigest(self) -> str:
        return self._hex

    def copy(self) -> _VerifiedAtCommit:
        return self


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first real failure in a task group's (nested) exceptions."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]


async def pull(
    service: ImageService, namespace: str, options: PullOptions, report: Report = ignore_progress
) -> Image:
    """Pull options.reference into the namespace; returns the image record."""
    ref = reference.parse(options.reference)
    name = str(ref)
    image_labels = label_rules.validate(options.labels, f"image {q(name)}")
    if options.unpack:
        service.snapshotter(options.snapshotter)  # an unknown snapshotter fails before any download
    started = time.monotonic()
    report(Progress("resolving", name))
    async with service.registry(ref.host, options.registry) as registry:
        _, root = await registry.resolve(ref)
        report(Progress("resolved", name, root.media_type, total=root.size, message=root.digest))
        async with service.lease(namespace, "pull") as lease:
            job = _Pull(service, namespace, ref, registry, options, lease, report)
            await job.run(root)
            image = await service.save_image(namespace, Image(name=name, target=root, labels=image_labels))
    log.info(
        "image pulled",
        namespace=namespace,
        image=name,
        digest=root.digest,
        blobs=len(job.blobs),
        seconds=round(time.monotonic() - started, 3),
    )
    report(Progress("done", name, root.media_type, total=root.size, image=image, message=root.digest))
    return image


class _Pull:
    def __init__(
        self,
        service: ImageService,
        namespace: str,
        ref: Reference,
        registry: RegistryClient,
        options: PullOptions,
        lease: str,
        report: Report,
    ) -> None:
        self.service = service
        self.content = service.content
        self.namespace = namespace
        self.ref = ref
        self.name = str(ref)
        self.registry = registry
        self.options = options
        self.lease = lease
        self.report = report
        self.source = {DISTRIBUTION_SOURCE_PREFIX + ref.host: ref.repository}
        self.downloads = asyncio.Semaphore(service.max_concurrent_downloads)
        self.blobs: dict[str, asyncio.Task[None]] = {}  # digest -> its fetch, shared by every user
        self.unpacker = (
            Unpacker(
                service,
                namespace,
                snapshotter=options.snapshotter,
                lease=lease,
                image=self.name,
                report=report,
            )
            if options.unpack
            else None
        )
        self._tasks: asyncio.TaskGroup | None = None
        self._log = log.bind(namespace=namespace, image=self.name)

    async def run(self, root: Descriptor) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                # A lone manifest has no platform list to choose from: its config must match
                # the platforms asked for (containerd: "no match for platform in manifest").
                await self.handle(root, unpack=True, check_platform=bool(self.options.platforms))
        except BaseExceptionGroup as group:
            raise first_error(group) from None

    async def handle(self, desc: Descriptor, *, unpack: bool, check_platform: bool = False) -> None:
        """Fetch an index or manifest and, below it, what the wanted platforms need."""
        if desc.media_type in INDEX_TYPES:
            what = f"index {desc.digest} of {q(self.name)}"
            children = parse_index(await self.document(desc), what)
            gc_refs = {f"{GC_REF_CONTENT}m.{i}": child.digest for i, child in enumerate(children)}
            await self.service.set_labels(self.namespace, desc.digest, {**self.source, **gc_refs})
            assert self._tasks is not None
            for child, child_unpack in self.select(children, what):
                self._tasks.create_task(self.handle(child, unpack=child_unpack))
        elif desc.media_type in MANIFEST_TYPES:
            what = f"manifest {desc.digest} of {q(self.name)}"
            manifest = parse_manifest(await self.document(desc), what)
            gc_refs = {f"{GC_REF_CONTENT}config": manifest.config.digest}
            gc_refs.update(
                {f"{GC_REF_CONTENT}l.{i}": layer.digest for i, layer in enumerate(manifest.layers)}
            )
            await self.service.set_labels(self.namespace, desc.digest, {**self.source, **gc_refs})
            config_fetch = self.fetch(manifest.config, "config")
            layer_fetches = [self.fetch(layer, "layer") for layer in manifest.layers]
            if check_platform or (unpack and self.unpacker is not None):
                await config_fetch
                config = parse_config(
                    await self.service.read_document(self.namespace, manifest.config, what),
                    f"config {manifest.config.digest} of {q(self.name)}",
                )
                if check_platform and not any(p.matches(config.platform) for p in self.options.platforms):
                    wanted = ", ".join(map(str, self.options.platforms))
                    raise NotFound(f"{what}: image is for platform {config.platform}, not {wanted}")
            if unpack and self.unpacker is not None:

                async def ready(index: int) -> None:
                    await layer_fetches[index]

                await self.unpacker.unpack(manifest, manifest.config, config, ready)
        else:
            raise InvalidArgument(
                f"image {q(self.name)}: {desc.digest} has media type {q(desc.media_type)}, "
                "which is neither an image index nor a manifest"
            )

    def select(self, children: list[Descriptor], what: str) -> list[tuple[Descriptor, bool]]:
        """(child, unpack it?) for the children of an index that this pull fetches."""
        wanted = list(self.options.platforms) or [Platform.host()]
        unpack: set[str] = set()
        for platform in wanted:
            try:
                unpack.add(select_manifest(children, platform, what).digest)
            except NotFound:
                if not self.options.all_platforms:
                    raise
        fetch = [c for c in children if c.media_type in MANIFEST_TYPES + INDEX_TYPES]
        if not self.options.all_platforms:
            fetch = [c for c in fetch if c.digest in unpack]
        chosen: dict[str, tuple[Descriptor, bool]] = {}
        for child in fetch:
            chosen.setdefault(child.digest, (child, child.digest in unpack))
        return list(chosen.values())

    async def document(self, desc: Descriptor) -> bytes:
        """An index or manifest: from the content store if there, else fetched and stored."""
        if desc.size > MAX_DOCUMENT_SIZE:
            raise InvalidArgument(
                f"manifest {desc.digest} of {q(self.name)}: {desc.size} bytes is more than a manifest may be"
            )
        try:
            async with self.writer(f"manifest-{desc.digest}", desc) as writer:
                data = await self.registry.fetch_bytes(self.ref, desc)
                await writer.write(data, 0)
                await writer.commit(desc.size, desc.digest)
        except AlreadyExists:
            self.report(Progress("exists", desc.digest, desc.media_type, desc.size, desc.size))
            return await self.service.read_document(self.namespace, desc)
        self.report(Progress("fetched", desc.digest, desc.media_type, desc.size, desc.size))
        return data

    @contextlib.asynccontextmanager
    async def writer(self, ref: str, desc: Descriptor) -> AsyncIterator[Writer]:
        """The content writer for ref, waiting while another pull holds it (as containerd's client
        does); AlreadyExists once the content is there."""
        delay = 0.01
        while True:
            writer = self.content.writer(self.namespace, ref, desc.size, desc.digest, lease=self.lease)
            try:
                await writer.open()
                break
            except Unavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        try:
            yield writer
        finally:
            await writer.close()

    def fetch(self, desc: Descriptor, kind: str) -> asyncio.Task[None]:
        """The (shared) task fetching a config or layer blob into the content store."""
        task = self.blobs.get(desc.digest)
        if task is None:
            assert self._tasks is not None
            task = self._tasks.create_task(self._fetch(desc, kind))
            self.blobs[desc.digest] = task
        return task

    async def _fetch(self, desc: Descriptor, kind: str) -> None:
        async with self.downloads:
            ref = f"{kind}-{desc.digest}"
            for attempt in (1, 2):
                try:
                    async with self.writer(ref, desc) as writer:
                        resumed = await self._download(desc, writer)
                        try:
                            await writer.commit(desc.size, desc.digest)
                        except FailedPrecondition as exc:
                            if not resumed or attempt == 2:
                                raise
                            # The commit dropped the ingest: its resumed prefix was not this blob's.
                            self._log.warning(
                                "resumed download was corrupt, fetching again",
                                digest=desc.digest,
                                error=str(exc),
                            )
                            continue
                except AlreadyExists:
                    self.report(Progress("exists", desc.digest, desc.media_type, desc.size, desc.size))
                else:
                    self.report(Progress("fetched", desc.digest, desc.media_type, desc.size, desc.size))
                break
        await self.service.set_labels(self.namespace, desc.digest, self.source)

    async def _download(self, desc: Descriptor, writer: Writer) -> bool:
        """Write the blob into the ingest, from where an earlier attempt stopped; True if resumed."""
        offset = writer.status().offset
        if offset > desc.size:
            await writer.write(b"", 0)  # not this blob: truncate
            offset = 0
        if offset == desc.size:
            return offset > 0  # complete already (or adopted from another namespace): commit checks it
        if offset:
            self._log.info("resuming download", digest=desc.digest, offset=offset, size=desc.size)
        throttle = Throttle()
        buffer = bytearray()

        async def write(chunk: bytes) -> None:
            buffer.extend(chunk)
            if len(buffer) >= WRITE_BUFFER:
                data = bytes(buffer)
                buffer.clear()
                await writer.write(data)

        def progress(held: int) -> None:
            if throttle.due():
                self.report(Progress("fetching", desc.digest, desc.media_type, held, desc.size))

        progress(offset)
        try:
            await self.registry.fetch_to(
                self.ref,
                desc,
                write,
                offset=offset,
                digester=_VerifiedAtCommit(desc.digest) if offset else None,
                progress=progress,
            )
        except FailedPrecondition:
            await writer.abort()  # the registry sent other bytes: nothing here is worth resuming
            raise
        except BaseException:
            # Interrupted (registry error, cancelled): keep what arrived for a resume, unless nothing did.
            with contextlib.suppress(Exception):
                if buffer:
                    await writer.write(bytes(buffer))
                if writer.status().offset == 0:
                    await writer.abort()
            raise
        if buffer:
            await writer.write(bytes(buffer))
        return offset > 0
