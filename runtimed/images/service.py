"""The images service (io.containerd.service.v1.images-service): what image operations share.

Pull, push, unpack (and archive import/export) need the same handful of stores: content, image
records, leases, the snapshotters and a differ. This plugin bundles them, with the few helpers
every one of those operations repeats (a GC lease around the work, reading a small document from
content, merging labels, creating-or-updating an image record), and the progress record they
stream to clients.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from plugins.snapshotters.base import Snapshotter
from runtimed import reference
from runtimed.aio import KeyedLocks
from runtimed.content import ContentStore
from runtimed.errors import AlreadyExists, ConfigError, InvalidArgument, NotFound, q
from runtimed.images.manifest import MAX_DOCUMENT_SIZE
from runtimed.metadata.images import ImageStore
from runtimed.metadata.leases import LeaseStore
from runtimed.plugin import InitContext, PluginSet, PluginType, Registration
from runtimed.remotes import DockerConfig, RegistryClient, static_credentials
from runtimed.types import Descriptor, Image, LeaseResource, Mount

log = structlog.get_logger("runtimed.images")

GC_EXPIRE_LABEL = "containerd.io/gc.expire"
DISTRIBUTION_SOURCE_PREFIX = "containerd.io/distribution.source."
# Leases of the daemon's own image operations carry this label (value: the operation), so that
# what an interrupted pull left behind can be told apart from a client's leases.
LEASE_OWNER_LABEL = "runtimed.io/lease.owner"
LEASE_LIFETIME = timedelta(hours=24)  # what containerd's clients ask for


@dataclass
class Progress:
    """One step of a pull, push, unpack or import, as the Transfer service streams it.

    event: resolving, resolved, fetching, exists, fetched, unpacking, unpacked, pushing, pushed,
    reading, saved, done. name: a reference or a blob digest.
    """

    event: str
    name: str = ""
    media_type: str = ""
    offset: int = 0
    total: int = 0
    image: Image | None = None
    message: str = ""


Report = Callable[[Progress], None]


def ignore_progress(_: Progress) -> None:
    pass


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def append_source(value: str, repository: str) -> str:
    """A distribution.source label value with `repository` added (containerd keeps a sorted list)."""
    repositories = {r for r in value.split(",") if r}
    repositories.add(repository)
    return ",".join(sorted(repositories))


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach a registry (the Transfer API's RegistryOptions)."""

    plain_http: bool = False  # force HTTP; loopback hosts use it anyway
    username: str = ""
    secret: str = field(default="", repr=False)
    skip_verify: bool = False


@dataclass
class ImageService:
    content: ContentStore
    images: ImageStore
    leases: LeaseStore
    snapshotters: Mapping[str, Snapshotter]
    plugins: PluginSet
    default_snapshotter: str = "overlayfs"
    max_concurrent_downloads: int = 4
    max_concurrent_uploads: int = 4
    # The daemon's docker-style config.json for registry credentials ("" = $DOCKER_CONFIG or ~/.docker).
    docker_config: str = ""
    connect_timeout: float = 10.0
    read_timeout: float = 60.0  # how long a registry may stay silent mid-response
    _differ: Any = field(default=None, repr=False)
    _locks: KeyedLocks = field(default_factory=KeyedLocks, repr=False)

    def snapshotter(self, name: str = "") -> tuple[str, Snapshotter]:
        name = name or self.default_snapshotter
        snapshotter = self.snapshotters.get(name)
        if snapshotter is None:
            loaded = ", ".join(sorted(self.snapshotters)) or "none"
            raise InvalidArgument(f"snapshotter {q(name)} not loaded (loaded: {loaded})")
        return name, snapshotter

    @property
    def differ(self) -> Any:
        """The differ plugin (looked up on first use: it may be initialised after this plugin);
        the walking differ itself when no differ plugin is loaded."""
        if self._differ is None:
            differs = self.plugins.get_by_type(PluginType.DIFFER)
            differ = differs.get("walking") or next(iter(differs.values()), None)
            if differ is None:
                from runtimed.diff.plugin import WalkingDiffer

                differ = WalkingDiffer()
            self._differ = differ
        return self._differ

    def registry(self, host: str, options: RegistryOptions) -> RegistryClient:
        """A registry client for one operation: the given credentials for `host`, else the
        daemon's docker config.json."""
        if options.username:
            credentials = static_credentials({host: (options.username, options.secret)})
        else:
            credentials = DockerConfig(self.docker_config or None)
        return RegistryClient(
            credentials=credentials,
            plain_http=True if options.plain_http else None,
            verify_tls=not options.skip_verify,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
        )

    async def apply(self, blob: Any, media_type: str, mounts: list[Mount]) -> Any:
        """Apply a layer blob onto snapshot mounts in a worker thread; returns diff.Applied."""
        return await self.differ.apply(blob, media_type, mounts)

    @contextlib.asynccontextmanager
    async def exclusive(self, *key: str) -> AsyncIterator[None]:
        """One holder at a time per key in this daemon (e.g. one unpack per snapshot)."""
        async with self._locks.hold(key):
            yield

    @contextlib.asynccontextmanager
    async def lease(self, namespace: str, owner: str) -> AsyncIterator[str]:
        """A lease (expiring in 24 h, like containerd's clients take) around an operation.

        Everything written under it survives a concurrent GC; it is deleted when the operation
        ends, successfully or not. A daemon killed meanwhile leaves it to expire.
        """
        lease_id = f"{owner}-{secrets.token_hex(6)}"
        expire = rfc3339(datetime.now(UTC) + LEASE_LIFETIME)
        await self.leases.create(namespace, lease_id, {GC_EXPIRE_LABEL: expire, LEASE_OWNER_LABEL: owner})
        failed = False
        try:
            yield lease_id
        except BaseException:
            failed = True
            raise
        finally:
            try:
                await self.leases.delete(namespace, lease_id)
            except NotFound:
                pass
            except Exception as exc:  # never hide the operation's own outcome behind this
                log.warning("deleting lease failed", namespace=namespace, lease=lease_id, error=str(exc))
            if failed:
                # What the failed operation fetched or unpacked was held only by the lease, and
                # a lease deletion publishes no event: tell the collector (as Leases.Delete does).
                from runtimed import gc

                gc.notify_deletion(self.plugins)

    async def lease_snapshot(self, namespace: str, lease: str, snapshotter: str, key: str) -> None:
        if lease:
            await self.leases.add_resource(
                namespace, lease, LeaseResource(id=key, type=f"snapshots/{snapshotter}")
            )

    async def read_document(self, namespace: str, desc: Descriptor, what: str = "") -> bytes:
        """A small blob (index, manifest, config) from the content store (which verified it)."""
        what = what or f"content {desc.digest}"
        if desc.size > MAX_DOCUMENT_SIZE:
            raise InvalidArgument(f"{what}: {desc.size} bytes is larger than a manifest or config may be")
        try:
            data = b"".join([chunk async for chunk in self.content.read(namespace, desc.digest)])
        except NotFound:
            raise NotFound(f"{what}: content {desc.digest}") from None
        return data

    async def set_labels(self, namespace: str, digest: str, labels: Mapping[str, str]) -> None:
        """Set labels on a blob, leaving its others alone; distribution.source values are merged."""
        if not labels:
            return
        info = await self.content.info(namespace, digest)
        wanted = {}
        for key, value in labels.items():
            if key.startswith(DISTRIBUTION_SOURCE_PREFIX) and info.labels.get(key):
                value = append_source(info.labels[key], value)
            if info.labels.get(key) != value:
                wanted[key] = value
        if wanted:
            info.labels = wanted
            await self.content.update(namespace, info, [f"labels.{key}" for key in wanted])

    async def get_image(self, namespace: str, name: str) -> Image:
        """An image by its record name, else by its normalised reference ("busybox" finds
        "docker.io/library/busybox:latest")."""
        try:
            return await self.images.get(namespace, name)
        except NotFound:
            try:
                normalised = str(reference.parse(name))
            except InvalidArgument:
                raise NotFound(f"image {q(name)}") from None
            if normalised == name:
                raise
            try:
                return await self.images.get(namespace, normalised)
            except NotFound:
                raise NotFound(f"image {q(name)}") from None

    async def save_image(self, namespace: str, image: Image) -> Image:
        """Create the image record, or point an existing one at the new target (docker's tag/pull)."""
        try:
            return await self.images.create(namespace, image)
        except AlreadyExists:
            paths = ["target"] + [f"labels.{key}" for key in image.labels]
            return await self.images.update(namespace, image, paths)


async def _init(ctx: InitContext) -> ImageService:
    config = ctx.config
    for key in ("max_concurrent_downloads", "max_concurrent_uploads"):
        if not isinstance(config[key], int) or config[key] < 1:
            raise ConfigError(f"images-service: {key} must be a positive integer, got {config[key]!r}")
    for key in ("connect_timeout", "read_timeout"):
        if not isinstance(config[key], int | float) or config[key] <= 0:
            raise ConfigError(f"images-service: {key} must be a positive number of seconds: {config[key]!r}")
    metadata = ctx.plugins.get_single(PluginType.METADATA)
    return ImageService(
        content=ctx.plugins.get_single(PluginType.CONTENT),
        images=metadata.images,
        leases=metadata.leases,
        snapshotters=ctx.plugins.get_by_type(PluginType.SNAPSHOTTER),
        plugins=ctx.plugins,
        default_snapshotter=config["default_snapshotter"],
        max_concurrent_downloads=config["max_concurrent_downloads"],
        max_concurrent_uploads=config["max_concurrent_uploads"],
        docker_config=config["docker_config"],
        connect_timeout=float(config["connect_timeout"]),
        read_timeout=float(config["read_timeout"]),
    )


PLUGINS = [
    Registration(
        type=PluginType.SERVICE,
        id="images-service",
        init=_init,
        requires=(PluginType.METADATA, PluginType.CONTENT, PluginType.SNAPSHOTTER),
        config={
            "default_snapshotter": "overlayfs",
            "max_concurrent_downloads": 4,
            "max_concurrent_uploads": 4,
            "docker_config": "",
            "connect_timeout": 10.0,
            "read_timeout": 60.0,
        },
    ),
]
