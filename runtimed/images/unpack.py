"""Unpacking an image into a snapshotter with containerd's scheme, so the work is shared with ctr.

For layer i of the manifest the committed snapshot is named chainID_i (from the config's
diff_ids). A layer whose snapshot exists is skipped, whoever unpacked it (runtimed or ctr).
Otherwise: Prepare("extract-<nanos>-<rand> <chainID_i>", parent=chainID_{i-1}) labelled with its
target chainID, apply the layer blob onto its mounts in a worker thread, check the applied digest
against diff_ids[i], Commit(chainID_i) (AlreadyExists means another unpacker won: fine), then label
the layer blob `containerd.io/uncompressed=<diffID>`. At the end the config blob gets
`containerd.io/gc.ref.snapshot.<snapshotter>=<top chainID>`, which keeps the snapshots alive for GC.

A failure removes the prepared snapshot; a cancellation first lets the extraction thread finish
(it cannot be interrupted), so nothing is ever removed under a running extraction and no
snapshot or mount is left behind.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Sequence

import structlog

from plugins.snapshotters.base import TARGET_LABEL, Kind
from runtimed.aio import finish_despite_cancel
from runtimed.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, RuntimedError, q
from runtimed.images.manifest import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    ImageConfig,
    Manifest,
    chain_ids,
    parse_config,
    parse_index,
    parse_manifest,
    select_manifest,
)
from runtimed.images.service import ImageService, Progress, Report, ignore_progress
from runtimed.platforms import Platform
from runtimed.types import Descriptor

log = structlog.get_logger("runtimed.images")

UNCOMPRESSED_LABEL = "containerd.io/uncompressed"
SNAPSHOT_GC_PREFIX = "containerd.io/gc.ref.snapshot."

# Waits until layer i's blob is in the content store (pull fetches layers while earlier ones unpack).
LayerReady = Callable[[int], Awaitable[None]]


def extract_key(chain_id: str) -> str:
    """A unique active-snapshot key in containerd's form: "extract-<nanos>-<4 chars> <chainID>"."""
    return f"extract-{time.time_ns()}-{secrets.token_urlsafe(3)} {chain_id}"


def with_context(exc: RuntimedError, context: str) -> RuntimedError:
    """The same kind of error, its message prefixed (which image, which layer)."""
    return type(exc)(f"{context}: {exc.reason}")


class Unpacker:
    """Unpacks manifests of one image in one namespace into one snapshotter."""

    def __init__(
        self,
        service: ImageService,
        namespace: str,
        *,
        snapshotter: str = "",
        lease: str = "",
        image: str = "",
        report: Report = ignore_progress,
    ) -> None:
        self.service = service
        self.namespace = namespace
        self.snapshotter_name, self.snapshotter = service.snapshotter(snapshotter)
        self.lease = lease
        self.image = image
        self.report = report
        self._log = log.bind(namespace=namespace, image=image, snapshotter=self.snapshotter_name)

    async def unpack(
        self,
        manifest: Manifest,
        config_desc: Descriptor,
        config: ImageConfig,
        ready: LayerReady | None = None,
    ) -> str:
        """Unpack the layers in order; returns the top chainID ("" for an image without layers)."""
        if len(config.diff_ids) != len(manifest.layers):
            raise InvalidArgument(
                f"image {q(self.image)}: config {config_desc.digest} has {len(config.diff_ids)} diff_ids "
                f"for {len(manifest.layers)} layers"
            )
        chains = chain_ids(config.diff_ids)
        started = time.monotonic()
        parent = ""
        applied = 0
        for index, (layer, diff_id, chain) in enumerate(
            zip(manifest.layers, config.diff_ids, chains, strict=True)
        ):
            if await self._layer(index, layer, diff_id, chain, parent, ready):
                applied += 1
            parent = chain
        if chains:
            label = SNAPSHOT_GC_PREFIX + self.snapshotter_name
            await self.service.set_labels(self.namespace, config_desc.digest, {label: chains[-1]})
        self._log.info(
            "image unpacked",
            config=config_desc.digest,
            layers=len(chains),
            applied=applied,
            seconds=round(time.monotonic() - started, 3),
        )
        return chains[-1] if chains else ""

    async def _exists(self, chain: str) -> bool:
        try:
            info = await self.snapshotter.stat(self.namespace, chain)
        except NotFound:
            return False
        if info.kind != Kind.COMMITTED:
            raise FailedPrecondition(
                f"image {q(self.image)}: snapshot {chain} is {info.kind.filter_value}, not committed"
            )
        # Under the lease: nothing references it until the config label is set.
        await self.service.lease_snapshot(self.namespace, self.lease, self.snapshotter_name, chain)
        return True

    async def _layer(
        self, index: int, layer: Descriptor, diff_id: str, chain: str, parent: str, ready: LayerReady | None
    ) -> bool:
        """Unpack one layer unless its snapshot exists; True if it was applied here."""
        # Two pulls of one image in this daemon: the second waits and finds the snapshot, instead
        # of extracting the same layer again only to lose the commit.
        async with self.service.exclusive("unpack", self.namespace, self.snapshotter_name, chain):
            return await self._apply(index, layer, diff_id, chain, parent, ready)

    async def _apply(
        self, index: int, layer: Descriptor, diff_id: str, chain: str, parent: str, ready: LayerReady | None
    ) -> bool:
        if await self._exists(chain):
            self.report(Progress("unpacked", layer.digest, layer.media_type, message="already unpacked"))
            return False
        if ready is not None:
            await ready(index)
        service, namespace, snapshotter = self.service, self.namespace, self.snapshotter
        context = f"unpacking image {q(self.image)} layer {layer.digest}"
        self.report(Progress("unpacking", layer.digest, layer.media_type, total=layer.size, message=chain))
        key = extract_key(chain)
        # Both leased before they exist: a GC never sees the new snapshot unheld.
        for name in (key, chain):
            await service.lease_snapshot(namespace, self.lease, self.snapshotter_name, name)
        started = time.monotonic()
        try:
            mounts = await snapshotter.prepare(namespace, key, parent, {TARGET_LABEL: chain})
        except AlreadyExists:
            if await self._exists(chain):  # another unpacker committed it meanwhile
                self.report(Progress("unpacked", layer.digest, layer.media_type, message="already unpacked"))
                return False
            raise
        committed = False
        try:
            blob = await service.content.blob_path(namespace, layer.digest)
            # The extraction thread cannot be interrupted: a cancelled pull waits for it, so the
            # snapshot is never removed under it.
            applied = await finish_despite_cancel(service.apply(blob, layer.media_type, mounts))
            if applied.digest != diff_id:
                raise FailedPrecondition(
                    f"wrong diff id calculated on extraction {q(applied.digest)}, expected {diff_id}"
                )
            try:
                await finish_despite_cancel(snapshotter.commit(namespace, chain, key))
            except AlreadyExists:
                self._log.debug("snapshot committed by another unpacker", chain=chain)
            else:
                committed = True
        except RuntimedError as exc:
            raise with_context(exc, context) from exc
        finally:
            if not committed:
                await self._remove(key)
        await service.set_labels(namespace, layer.digest, {UNCOMPRESSED_LABEL: diff_id})
        self._log.debug(
            "layer applied",
            digest=layer.digest,
            chain=chain,
            size=applied.size,
            seconds=round(time.monotonic() - started, 3),
        )
        self.report(
            Progress("unpacked", layer.digest, layer.media_type, offset=applied.size, total=applied.size)
        )
        return True

    async def _remove(self, key: str) -> None:
        try:
            await finish_despite_cancel(self.snapshotter.remove(self.namespace, key))
        except NotFound:
            pass
        except Exception as exc:  # the unpack's own error is what the caller must see
            self._log.warning("removing unfinished snapshot failed", key=key, error=str(exc))


async def manifests_for(
    service: ImageService,
    namespace: str,
    target: Descriptor,
    platforms: Sequence[Platform],
    what: str,
) -> list[Descriptor]:
    """The manifests of an image (index or manifest target) for each platform, from content."""
    if target.media_type in MANIFEST_TYPES:
        return [target]
    if target.media_type not in INDEX_TYPES:
        raise InvalidArgument(f"{what}: unsupported target media type {q(target.media_type)}")
    children = parse_index(await service.read_document(namespace, target, what), what)
    found: list[Descriptor] = []
    for platform in platforms:
        chosen = select_manifest(children, platform, what)
        if chosen.media_type in INDEX_TYPES:
            nested = await manifests_for(
                service, namespace, chosen, [platform], f"{what} index {chosen.digest}"
            )
            chosen = nested[0]
        if all(chosen.digest != d.digest for d in found):
            found.append(chosen)
    return found


async def unpack_image(
    service: ImageService,
    namespace: str,
    target: Descriptor,
    *,
    image: str = "",
    platforms: Sequence[Platform] = (),
    snapshotter: str = "",
    lease: str = "",
    report: Report = ignore_progress,
) -> list[str]:
    """Unpack an image whose content is all in the store (after an import, or a pull without
    unpacking); returns the top chainID of each platform's manifest (default: the host's)."""
    what = f"image {q(image or target.digest)}"
    unpacker = Unpacker(service, namespace, snapshotter=snapshotter, lease=lease, image=image, report=report)
    tops = []
    for desc in await manifests_for(service, namespace, target, platforms or [Platform.host()], what):
        manifest = parse_manifest(await service.read_document(namespace, desc, what), f"{what} manifest")
        config = parse_config(
            await service.read_document(namespace, manifest.config, what),
            f"{what} config {manifest.config.digest}",
        )
        tops.append(await unpacker.unpack(manifest, manifest.config, config))
    return tops
