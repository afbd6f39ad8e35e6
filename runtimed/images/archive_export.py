"""Exporting images as one OCI image-layout tar (with docker's manifest.json), streamed in chunks.

The archive is what `ctr images export` (containerd 1.6, images/archive/exporter.go) writes:

    blobs/ blobs/sha256/ blobs/sha256/<hex>...   every blob the images need, mode 0444
    index.json      one entry per named image: its target descriptor annotated with
                    io.containerd.image.name (the full name) and org.opencontainers.image.ref.name
                    (containerd's OCI ref name: the tag)
    manifest.json   docker's [{"Config","RepoTags","Layers"}], one per manifest (for an index, the
                    best match of the platforms), so `docker load` accepts the archive too
    oci-layout      {"imageLayoutVersion":"1.0.0"}

entries sorted by name, as containerd writes them. Platforms: an image whose target is an index
contributes the manifests of the requested platforms (default: the daemon's), or all of them;
a manifest target is exported whole.

Everything is resolved before the first byte is produced (images, documents, every blob present
with its recorded size), so a missing image or blob is an error, not a truncated archive. Blobs
are read and re-verified against their digests in worker threads while the tar streams out.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import structlog

from runtimed.content import ContentStore
from runtimed.errors import Internal, InvalidArgument, NotFound, q
from runtimed.images import archive
from runtimed.images.archive import (
    ANNOTATION_IMAGE_NAME,
    ANNOTATION_REF_NAME,
    BLOBS_DIR,
    CHUNK,
    DOCKER_MANIFEST_FILE,
    INDEX_FILE,
    OCI_LAYOUT_FILE,
    OCI_LAYOUT_VERSION,
    ExportOptions,
)
from runtimed.images.manifest import INDEX_TYPES, MANIFEST_TYPES, parse_index, parse_manifest
from runtimed.images.service import ImageService
from runtimed.platforms import Platform
from runtimed.types import Descriptor

log = structlog.get_logger("runtimed.images")


@dataclass
class _Entry:
    """One tar entry: a directory, a small document (data) or a blob of the content store."""

    name: str
    mode: int
    size: int = 0
    data: bytes | None = None
    digest: str = ""
    directory: bool = False


@dataclass
class _DockerManifest:
    manifest: Descriptor
    names: list[str] = field(default_factory=list)


@dataclass
class ExportPlan:
    entries: list[_Entry]
    images: list[str]

    @property
    def size(self) -> int:
        """The size of the whole tar, in bytes."""
        total = len(archive.END_OF_ARCHIVE)
        for entry in self.entries:
            total += len(_header(entry)) + entry.size + len(archive.padding(entry.size))
        return total


def _header(entry: _Entry) -> bytes:
    if entry.directory:
        return archive.dir_header(entry.name, entry.mode)
    return archive.file_header(entry.name, entry.size, entry.mode)


async def export_archive(
    service: ImageService,
    namespace: str,
    names: Sequence[str],
    options: ExportOptions | None = None,
) -> AsyncIterator[bytes]:
    """The archive of the named images as chunks of about 1 MiB; errors come before the first."""
    plan = await plan_export(service, namespace, names, options or ExportOptions())
    log.info("exporting images", namespace=namespace, images=plan.images, entries=len(plan.entries))
    async for chunk in stream_plan(service.content, namespace, plan):
        yield chunk


async def plan_export(
    service: ImageService, namespace: str, names: Sequence[str], options: ExportOptions
) -> ExportPlan:
    return await _Planner(service, namespace, options).plan(names)


class _Planner:
    def __init__(self, service: ImageService, namespace: str, options: ExportOptions) -> None:
        self.service = service
        self.namespace = namespace
        self.options = options
        self.platforms = options.platforms or [Platform.host()]
        self.blobs: dict[str, _Entry] = {}
        self.docker: dict[str, _DockerManifest] = {}  # by manifest digest
        self.resolved_index: dict[str, str] = {}  # index digest -> the manifest manifest.json uses

    async def plan(self, names: Sequence[str]) -> ExportPlan:
        if not names:
            raise InvalidArgument("export: name at least one image")
        targets: list[Descriptor] = []
        exported: list[str] = []
        for name in dict.fromkeys(names):
            image = await self.service.get_image(self.namespace, name)
            annotations = {
                **image.target.annotations,
                ANNOTATION_IMAGE_NAME: image.name,
                ANNOTATION_REF_NAME: archive.oci_reference_name(image.name),
            }
            target = Descriptor(image.target.media_type, image.target.digest, image.target.size, annotations)
            await self._target(target, f"image {q(image.name)}")
            targets.append(target)
            exported.append(image.name)

        entries = [
            _Entry(OCI_LAYOUT_FILE, 0o444, data=archive.go_json({"imageLayoutVersion": OCI_LAYOUT_VERSION})),
            _Entry(INDEX_FILE, 0o644, data=self._index(targets)),
        ]
        if self.docker and not self.options.skip_docker_manifest:
            entries.append(_Entry(DOCKER_MANIFEST_FILE, 0o644, data=await self._docker_manifest()))
        if self.blobs:
            entries.append(_Entry(f"{BLOBS_DIR}/", 0o755, directory=True))
            for algorithm in sorted({digest.split(":", 1)[0] for digest in self.blobs}):
                entries.append(_Entry(f"{BLOBS_DIR}/{algorithm}/", 0o755, directory=True))
        entries.extend(self.blobs.values())
        for entry in entries:
            if entry.data is not None:
                entry.size = len(entry.data)
        entries.sort(key=lambda entry: entry.name)
        return ExportPlan(entries, exported)

    def _index(self, targets: Sequence[Descriptor]) -> bytes:
        manifests = [archive.descriptor_json(t.media_type, t.digest, t.size, t.annotations) for t in targets]
        return archive.go_json({"schemaVersion": 2, "manifests": manifests})

    def _matches(self, platform: Platform | None) -> bool:
        return platform is None or any(p.matches(platform) for p in self.platforms)

    def _preference(self, desc: Descriptor) -> tuple[int, int]:
        if desc.platform is None:
            return (1, 0)
        for rank, platform in enumerate(self.platforms):
            if platform.matches(desc.platform):
                return (0, rank)
        return (0, len(self.platforms))

    async def _target(self, target: Descriptor, what: str) -> None:
        name = target.annotations[ANNOTATION_IMAGE_NAME]
        if target.media_type in MANIFEST_TYPES:
            if target.digest not in self.docker:
                await self._walk(target, what)
                self.docker[target.digest] = _DockerManifest(target)
            self.docker[target.digest].names.append(name)
            return
        if target.media_type not in INDEX_TYPES:
            raise InvalidArgument(
                f"{what}: only images whose target is a manifest or an index may be exported, "
                f"not {q(target.media_type)}"
            )
        if target.digest not in self.resolved_index:
            await self._blob(target, what)
            children = parse_index(await self._document(target, what), f"{what} index {target.digest}")
            matching = []
            for i, child in enumerate(children):
                if self._matches(child.platform):
                    matching.append(child)
                elif not self.options.all_platforms:
                    continue
                await self._walk(child, f"{what} index {target.digest} manifests[{i}]")
            chosen = ""
            if matching:
                best = sorted(matching, key=self._preference)[0]
                chosen = best.digest
                self.docker.setdefault(chosen, _DockerManifest(best))
            elif not self.options.all_platforms:
                wanted = ", ".join(map(str, self.platforms))
                have = ", ".join(str(c.platform) for c in children if c.platform) or "none"
                raise NotFound(f"{what}: no manifest for platform {wanted} (the image has: {have})")
            self.resolved_index[target.digest] = chosen
        chosen = self.resolved_index[target.digest]
        if chosen:
            self.docker[chosen].names.append(name)

    async def _walk(self, desc: Descriptor, what: str) -> None:
        """The blob and everything below it (containerd's ChildrenHandler: no platform filter)."""
        if desc.digest in self.blobs:
            return
        await self._blob(desc, what)
        if desc.media_type in MANIFEST_TYPES:
            what = f"{what} manifest {desc.digest}"
            manifest = parse_manifest(await self._document(desc, what), what)
            await self._blob(manifest.config, f"{what} config")
            for i, layer in enumerate(manifest.layers):
                await self._blob(layer, f"{what} layers[{i}]")
        elif desc.media_type in INDEX_TYPES:
            what = f"{what} index {desc.digest}"
            for i, child in enumerate(parse_index(await self._document(desc, what), what)):
                await self._walk(child, f"{what} manifests[{i}]")

    async def _blob(self, desc: Descriptor, what: str) -> None:
        """Add a blob, checked now: present in the namespace with the descriptor's size."""
        if desc.digest in self.blobs:
            return
        try:
            info = await self.service.content.info(self.namespace, desc.digest)
        except NotFound:
            raise NotFound(
                f"{what}: content {desc.digest} not found (an image pulled for other platforms "
                "can be exported only for those)"
            ) from None
        if info.size != desc.size:
            raise InvalidArgument(
                f"{what}: descriptor says {desc.size} bytes, content {desc.digest} has {info.size}"
            )
        self.blobs[desc.digest] = _Entry(
            archive.blob_path(desc.digest), 0o444, size=desc.size, digest=desc.digest
        )

    async def _document(self, desc: Descriptor, what: str) -> bytes:
        return await self.service.read_document(self.namespace, desc, what)

    async def _docker_manifest(self) -> bytes:
        entries = []
        for item in self.docker.values():
            what = f"manifest {item.manifest.digest}"
            manifest = parse_manifest(await self._document(item.manifest, what), what)
            tags = []
            for name in item.names:
                familiar = archive.familiar_reference(name)
                if familiar is None:
                    # containerd fails the whole export; docker load only needs the tags it can read.
                    log.warning("image name left out of manifest.json: not a docker reference", name=name)
                    continue
                tags.append(familiar)
            entries.append(
                {
                    "Config": archive.blob_path(manifest.config.digest),
                    "RepoTags": tags or None,
                    "Layers": [archive.blob_path(layer.digest) for layer in manifest.layers] or None,
                }
            )
        return archive.go_json(entries)


async def stream_plan(content: ContentStore, namespace: str, plan: ExportPlan) -> AsyncIterator[bytes]:
    """The tar of a plan: headers and documents batched, blobs in 1 MiB reads."""
    pending: list[bytes] = []
    pending_size = 0
    for entry in plan.entries:
        pending.append(_header(entry))
        pending_size += len(pending[-1])
        if entry.data is not None:
            pending.append(entry.data)
            pending_size += len(entry.data)
        elif entry.digest:
            async for chunk in _blob_chunks(content, namespace, entry.digest, entry.size):
                if pending:
                    pending.append(chunk)
                    yield b"".join(pending)
                    pending, pending_size = [], 0
                else:
                    yield chunk
        pad = archive.padding(entry.size)
        if pad:
            pending.append(pad)
            pending_size += len(pad)
        if pending_size >= CHUNK:
            yield b"".join(pending)
            pending, pending_size = [], 0
    pending.append(archive.END_OF_ARCHIVE)
    yield b"".join(pending)


async def _blob_chunks(content: ContentStore, namespace: str, digest: str, size: int) -> AsyncIterator[bytes]:
    """A blob's bytes, read and hashed in worker threads; its digest is checked at the end."""
    path = await content.blob_path(namespace, digest)
    try:
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"content {digest}") from None
    hasher = hashlib.sha256()

    def read(offset: int) -> bytes:
        data = os.pread(fd, min(CHUNK, size - offset), offset)
        hasher.update(data)
        return data

    try:
        offset = 0
        while offset < size:
            chunk = await asyncio.to_thread(read, offset)
            if not chunk:
                raise Internal(f"content {digest} is shorter on disk than its {size} bytes")
            offset += len(chunk)
            yield chunk
    finally:
        os.close(fd)
    if "sha256:" + hasher.hexdigest() != digest:
        raise Internal(f"content {digest} on disk does not match its digest (corrupt content store)")
