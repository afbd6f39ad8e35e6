"""Importing an image archive (OCI image layout or `docker save` tar) streamed in chunks.

The result is what `ctr images import` (containerd 1.6, images/archive/importer.go + import.go)
leaves in the same store, digests included:

* every regular file of the tar is written to the content store as it streams by, under the ref
  "tar-<path>" and a lease; `blobs/<alg>/<hex>` files are verified against the digest they are
  named by (ctr does not check; a mismatch here names the entry);
* OCI layout: `index.json` is the root. docker save: a Docker schema 2 manifest is built per
  manifest.json entry (config + layer tars, media types detected as containerd does), and an index
  naming each RepoTag; both encoded as Go encodes them, so the digests agree with containerd's;
* walking from the root (platform-filtered), every index gets `containerd.io/gc.ref.content.m.<i>`
  labels and every manifest `...config` / `...l.<i>`; every blob the walk needs must be there
  (NotFound naming it); image names come from `io.containerd.image.name`, else
  `org.opencontainers.image.ref.name` (a bare tag gets the base name), else "<base>@<digest>";
* the images are unpacked (unless told not to) and only then recorded, so a failure leaves no image.

Unsafe archives are refused before anything is recorded: absolute or ".." member names, hard links,
devices, symlinks (except docker save's own layer aliases "<id>/layer.tar -> ../<id2>/layer.tar",
which must point at a file of the archive), JSON documents larger than 4 MiB, sparse files.

Nothing stays behind on failure: the writer of a half-read entry is aborted, the lease is deleted,
and the content this import created and nothing else references is deleted at once (the GC would
collect it too, later). On success, blobs of the archive no image needs (docker's legacy `<id>/json`
files, other platforms, the index itself) are dropped the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from runtimed import digests
from runtimed.aio import finish_despite_cancel
from runtimed.content import Writer
from runtimed.errors import AlreadyExists, InvalidArgument, NotFound, RuntimedError, Unavailable, q
from runtimed.images import archive
from runtimed.images.archive import (
    ANNOTATION_IMAGE_NAME,
    ANNOTATION_REF_NAME,
    DOCKER_MANIFEST_FILE,
    INDEX_FILE,
    MAX_JSON_SIZE,
    OCI_LAYOUT_FILE,
    OCI_LAYOUT_VERSION,
    ImportOptions,
    Member,
    TarStream,
)
from runtimed.images.manifest import (
    CONFIG_TYPES,
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    load_json_object,
    parse_config,
    parse_index,
    parse_manifest,
)
from runtimed.images.service import ImageService, Progress, Report, ignore_progress
from runtimed.images.unpack import unpack_image
from runtimed.metadata.images import validate_name
from runtimed.platforms import Platform
from runtimed.types import Descriptor, Image

log = structlog.get_logger("runtimed.images")

T = TypeVar("T")

DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
UNCOMPRESSED_LABEL = "containerd.io/uncompressed"
GC_REF_CONTENT = "containerd.io/gc.ref.content."
GC_ROOT_LABEL = "containerd.io/gc.root"
# How long a write waits for another writer of the same ref (a concurrent import of the same
# archive in the same namespace) before giving up; containerd's clients retry the same way.
REF_LOCK_WAIT = 60.0
_HEAD = 10  # bytes containerd looks at to detect a layer's compression

_GZIP_MAGIC = b"\x1f\x8b\x08"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def layer_media_type(head: bytes) -> str:
    """containerd's media type for a docker save layer: compressed (gzip or zstd, 1.6 calls both
    gzip) or a plain tar."""
    skippable = len(head) >= 8 and int.from_bytes(head[:4], "little") & 0xFFFFFFF0 == 0x184D2A50
    if head.startswith((_GZIP_MAGIC, _ZSTD_MAGIC)) or skippable:
        return DOCKER_LAYER_GZIP
    return DOCKER_LAYER


def gc_label_key(media_type: str) -> str:
    """containerd's ChildGCLabels: the label (prefix) a parent uses to reference a child."""
    if media_type in CONFIG_TYPES:
        return GC_REF_CONTENT + "config"
    if media_type in MANIFEST_TYPES:
        return GC_REF_CONTENT + "m."
    if media_type.startswith("application/vnd.oci.image.layer.") or media_type.split("+")[0] in (
        DOCKER_LAYER,
        DOCKER_LAYER_GZIP,
        "application/vnd.docker.image.rootfs.foreign.diff.tar",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    ):
        return GC_REF_CONTENT + "l."
    return GC_REF_CONTENT


def gc_labels(children: Sequence[Descriptor]) -> dict[str, str]:
    """containerd's SetChildrenMappedLabels: m.0, m.1, config, l.0, ... keyed per label kind."""
    labels: dict[str, str] = {}
    seen: Counter[str] = Counter()
    for child in children:
        key = gc_label_key(child.media_type)
        index = seen[key]
        seen[key] += 1
        if index > 0 or key.endswith("."):
            key = f"{key}{index}"
        labels[key] = child.digest
    return labels


def default_base_name() -> str:
    """What ctr names tag-only images without --base-name: "import-<date>"."""
    return "import-" + time.strftime("%Y-%m-%d")


@dataclass
class _Blob:
    """A file of the archive as written to the content store."""

    digest: str
    size: int
    head: bytes | None = None  # its first bytes, when they streamed by


@dataclass
class _DockerEntry:
    config: str
    repo_tags: list[str]
    layers: list[str]


@dataclass
class _Named:
    """An image the archive names: its record name and target (an index entry)."""

    name: str
    target: Descriptor
    platforms: list[Platform | None] = field(default_factory=list)  # of the manifests under it


async def import_archive(
    service: ImageService,
    namespace: str,
    chunks: AsyncIterable[bytes],
    options: ImportOptions | None = None,
    report: Report = ignore_progress,
) -> list[Image]:
    """Import the tar streamed as `chunks` into `namespace`; returns the image records made."""
    return await _Import(service, namespace, options or ImportOptions(), report).run(chunks)


class _Import:
    def __init__(self, service: ImageService, namespace: str, options: ImportOptions, report: Report) -> None:
        self.service = service
        self.content = service.content
        self.namespace = namespace
        self.options = options
        self.report = report
        self.lease = ""
        self.blobs: dict[str, _Blob] = {}  # archive path -> blob
        self.symlinks: dict[str, tuple[str, str]] = {}  # archive path -> (raw name, link target)
        self.layout: bytes | None = None
        self.index: tuple[_Blob, bytes] | None = None
        self.docker_manifest: bytes | None = None
        self.created: set[str] = set()  # digests this import made visible in the namespace
        self.kept: set[str] = set()  # digests the imported images reference
        self.visited: dict[str, list[Platform | None]] = {}
        self.log = log.bind(namespace=namespace)

    # -- the whole operation ------------------------------------------------------------------------

    async def run(self, chunks: AsyncIterable[bytes]) -> list[Image]:
        started = time.monotonic()
        if self.options.unpack:
            self.service.snapshotter(self.options.snapshotter)  # an unknown one fails before reading
        try:
            async with self.service.lease(self.namespace, "import") as lease:
                self.lease = lease
                images = await self._run(chunks)
        except BaseException as exc:
            error = str(exc) or type(exc).__name__
            self.log.info("import failed, removing what it wrote", error=error, created=len(self.created))
            await finish_despite_cancel(self._discard(self.created))
            raise
        await finish_despite_cancel(self._discard(self.created - self.kept))
        self.log.info(
            "archive imported",
            images=[image.name for image in images],
            seconds=round(time.monotonic() - started, 3),
        )
        return images

    async def _run(self, chunks: AsyncIterable[bytes]) -> list[Image]:
        await self._read(chunks)
        if self.layout is not None:
            root, root_data, what = self._oci_root()
        elif self.docker_manifest is not None:
            root, root_data = await self._docker_root()
            what = "docker archive"
        else:
            raise InvalidArgument(
                "unrecognised archive: neither an OCI image layout (oci-layout, index.json) "
                "nor a docker save archive (manifest.json)"
            )
        self.log.debug(
            "archive read", format="oci" if self.layout is not None else "docker", index=root.digest
        )
        named = await self._walk(root, root_data, what)
        if self.options.unpack:
            await self._unpack(named)
        images = []
        for entry in named:
            image = Image(name=entry.name, target=entry.target, labels=dict(self.options.labels))
            images.append(await self.service.save_image(self.namespace, image))
        for image in images:
            self.report(Progress("done", image.name, image.target.media_type, image=image))
        return images

    # -- reading the tar ----------------------------------------------------------------------------

    async def _read(self, chunks: AsyncIterable[bytes]) -> None:
        tar = TarStream(chunks)
        while (member := await tar.next()) is not None:
            if member.kind == archive.DIRECTORY:
                continue
            if member.kind == archive.HARDLINK:
                raise InvalidArgument(f"archive entry {q(member.raw_name)}: hard links are not allowed")
            if member.kind == archive.SYMLINK:
                # Allowed only as docker save's layer aliases; checked once the format is known.
                self.symlinks[member.name] = (member.raw_name, member.linkname)
                continue
            if not member.name:
                raise InvalidArgument(f"archive entry {q(member.raw_name)}: a file must have a name")
            self.report(Progress("reading", member.raw_name, offset=tar.offset, total=member.size))
            if member.name == OCI_LAYOUT_FILE:
                self.layout = await tar.read_all(MAX_JSON_SIZE)
            elif member.name == DOCKER_MANIFEST_FILE:
                self.docker_manifest = await tar.read_all(MAX_JSON_SIZE)
            elif member.name == INDEX_FILE:
                data = await tar.read_all(MAX_JSON_SIZE)
                blob = await self._put("tar-" + INDEX_FILE, data)
                self.index = (blob, data)
                self.blobs[member.name] = blob
            else:
                self.blobs[member.name] = await self._ingest(tar, member)
        await tar.drain()

    async def _ingest(self, tar: TarStream, member: Member) -> _Blob:
        """Stream one archive file into the content store; verified when named by its digest."""
        expected = archive.blob_digest(member.name) or ""
        if expected:
            digests.validate(expected, f"archive entry {q(member.raw_name)}: blob name")
            if not expected.startswith("sha256:"):
                raise InvalidArgument(f"archive entry {q(member.raw_name)}: only sha256 blobs are supported")
        writer = await self._writer("tar-" + member.name, member.size, expected)
        if writer is None:
            await self._verify(tar, member, expected)
            self.report(Progress("exists", expected, total=member.size))
            return _Blob(expected, member.size)
        head: bytes | None = None
        try:
            status = writer.status()
            if expected and status.offset == member.size and writer.digest() == expected:
                # Held by another namespace (adopted), or a complete earlier ingest.
                await self._verify(tar, member, expected)
            else:
                head = b""
                first = True
                async for piece in tar.data():
                    if len(head) < _HEAD:
                        head += piece[: _HEAD - len(head)]
                    # Offset 0 first: drops what an interrupted import left under this ref.
                    await writer.write(piece, 0 if first else None)
                    first = False
                if first and status.offset:
                    await writer.write(b"", 0)
            digest = writer.digest()
            if expected and digest != expected:
                raise _mismatch(member, digest)
            await self._commit(writer, member.size, digest)
        except BaseException:
            await finish_despite_cancel(writer.abort())
            raise
        finally:
            await finish_despite_cancel(writer.close())
        return _Blob(digest, member.size, head)

    async def _verify(self, tar: TarStream, member: Member, expected: str) -> None:
        """Check the bytes of a blob the store has already, without writing them again."""
        hasher = hashlib.sha256()
        async for piece in tar.data():
            await asyncio.to_thread(hasher.update, piece)
        if "sha256:" + hasher.hexdigest() != expected:
            raise _mismatch(member, "sha256:" + hasher.hexdigest())

    async def _put(self, ref: str, data: bytes) -> _Blob:
        """Write a small document (index.json, a synthesised manifest or index) to content."""
        digest = digests.sha256_of(data)
        writer = await self._writer(ref, len(data), digest)
        if writer is None:
            return _Blob(digest, len(data), data[:_HEAD])
        try:
            status = writer.status()
            if not (status.offset == len(data) and writer.digest() == digest):
                await writer.write(data, 0)
            await self._commit(writer, len(data), digest)
        except BaseException:
            await finish_despite_cancel(writer.abort())
            raise
        finally:
            await finish_despite_cancel(writer.close())
        return _Blob(digest, len(data), data[:_HEAD])

    async def _writer(self, ref: str, size: int, expected: str) -> Writer | None:
        """An open writer for ref (waiting while another holds it), None if the namespace has
        the blob already (then it is on the lease all the same)."""
        deadline = time.monotonic() + REF_LOCK_WAIT
        delay = 0.05
        while True:
            writer = self.content.writer(self.namespace, ref, size, expected, lease=self.lease)
            try:
                await writer.open()
                return writer
            except AlreadyExists:
                return None
            except Unavailable:
                if time.monotonic() + delay > deadline:
                    raise
            except BaseException:
                # An open cut short (cancelled) keeps its fresh ingest for a resume; an import
                # never resumes, so drop it.
                await finish_despite_cancel(self._abort(ref))
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _abort(self, ref: str) -> None:
        with contextlib.suppress(NotFound, Unavailable):
            await self.content.abort(self.namespace, ref)

    async def _commit(self, writer: Writer, size: int, digest: str) -> None:
        try:
            await writer.commit(size, digest)
        except AlreadyExists:
            self.report(Progress("exists", digest, total=size))
            return
        self.created.add(digest)
        self.report(Progress("saved", digest, total=size))

    # -- the two formats ------------------------------------------------------------------------------

    def _oci_root(self) -> tuple[Descriptor, bytes, str]:
        assert self.layout is not None
        layout = load_json_object(self.layout, f"archive entry {q(OCI_LAYOUT_FILE)}")
        version = layout.get("imageLayoutVersion")
        if version != OCI_LAYOUT_VERSION:
            raise InvalidArgument(
                f"archive entry {q(OCI_LAYOUT_FILE)}: unsupported image layout version {q(version)} "
                f"(supported: {OCI_LAYOUT_VERSION})"
            )
        if self.index is None:
            raise InvalidArgument(f"OCI image layout without {q(INDEX_FILE)}")
        if self.symlinks:
            raw, _ = next(iter(self.symlinks.values()))
            raise InvalidArgument(f"archive entry {q(raw)}: symlinks are not allowed in an OCI image layout")
        blob, data = self.index
        return Descriptor(OCI_INDEX, blob.digest, blob.size), data, f"archive entry {q(INDEX_FILE)}"

    async def _docker_root(self) -> tuple[Descriptor, bytes]:
        """containerd's importer for docker save archives: a manifest per entry, an index of them."""
        assert self.docker_manifest is not None
        entries = _docker_entries(self.docker_manifest)
        if not entries:
            raise InvalidArgument(f"archive entry {q(DOCKER_MANIFEST_FILE)} lists no image")
        blobs = dict(self.blobs)
        for name, (raw, linkname) in self.symlinks.items():
            target = archive.link_target(name, linkname)
            if target not in self.blobs:
                raise InvalidArgument(
                    f"archive entry {q(raw)}: symlink to {q(linkname)}, which is not a file of the archive"
                )
            blobs[name] = self.blobs[target]
        compressed = await self._compressed_variants()
        index_entries: list[dict[str, Any]] = []
        for i, entry in enumerate(entries):
            what = f"archive entry {q(DOCKER_MANIFEST_FILE)} [{i}]"
            config = blobs.get(archive.member_path(entry.config))
            if config is None:
                raise NotFound(f"{what}: image config {q(entry.config)} is not in the archive")
            layers = []
            for path in entry.layers:
                layer = blobs.get(archive.member_path(path))
                if layer is None:
                    raise NotFound(f"{what}: layer {q(path)} is not in the archive")
                layers.append(await self._docker_layer(layer, compressed))
            manifest = {
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST,
                "config": archive.descriptor_json(DOCKER_CONFIG, config.digest, config.size),
                "layers": layers,
            }
            data = archive.go_json(manifest)
            written = await self._put(f"manifest-{digests.sha256_of(data)}", data)
            platform = await self._config_platform(config, f"{what} config {q(entry.config)}")
            if not entry.repo_tags:
                index_entries.append(
                    archive.descriptor_json(DOCKER_MANIFEST, written.digest, written.size, platform=platform)
                )
            for tag in entry.repo_tags:
                try:
                    name = archive.normalize_reference(tag)
                except InvalidArgument as exc:
                    raise InvalidArgument(f"{what}: RepoTags {q(tag)}: {exc.reason}") from None
                annotations = {
                    ANNOTATION_IMAGE_NAME: name,
                    ANNOTATION_REF_NAME: archive.oci_reference_name(name),
                }
                index_entries.append(
                    archive.descriptor_json(
                        DOCKER_MANIFEST, written.digest, written.size, annotations, platform=platform
                    )
                )
        data = archive.go_json({"schemaVersion": 2, "manifests": index_entries or None})
        index = await self._put(f"manifest-{digests.sha256_of(data)}", data)
        return Descriptor(OCI_INDEX, index.digest, index.size), data

    async def _compressed_variants(self) -> dict[str, Descriptor]:
        """Blobs of the namespace labelled as a compressed form of an uncompressed digest:
        containerd's importer uses such a blob instead of a docker save layer tar."""
        found: dict[str, Descriptor] = {}
        for info in await self.content.list(self.namespace):
            uncompressed = info.labels.get(UNCOMPRESSED_LABEL)
            if uncompressed:
                found[uncompressed] = Descriptor("", info.digest, info.size)
        return found

    async def _docker_layer(self, layer: _Blob, compressed: dict[str, Descriptor]) -> dict[str, Any]:
        variant = compressed.get(layer.digest)
        digest, size, head = layer.digest, layer.size, layer.head
        if variant is not None:
            digest, size, head = variant.digest, variant.size, None
        if head is None:
            head = await self._head(digest, size)
        return archive.descriptor_json(layer_media_type(head), digest, size)

    async def _head(self, digest: str, size: int) -> bytes:
        head = b""
        async for chunk in self.content.read(self.namespace, digest, 0, min(size, _HEAD)):
            head += chunk
        return head

    async def _config_platform(self, config: _Blob, what: str) -> dict[str, str]:
        """The platform containerd's images.Platforms reads from a config: os and architecture."""
        data = await self.service.read_document(
            self.namespace, Descriptor(DOCKER_CONFIG, config.digest, config.size), what
        )
        document = load_json_object(data, what)
        values = {}
        for key in ("os", "architecture"):
            value = document.get(key, "")
            if not isinstance(value, str):
                raise InvalidArgument(f"{what}: {key} must be a string")
            values[key] = value
        return archive.platform_json(archive.containerd_platform(values["os"], values["architecture"]))

    # -- the walk -------------------------------------------------------------------------------------

    def _wanted(self, platform: Platform | None) -> bool:
        if platform is None or self.options.all_platforms:
            return True
        return any(p.matches(platform) for p in self._platforms())

    def _platforms(self) -> list[Platform]:
        return self.options.platforms or [Platform.host()]

    async def _walk(self, root: Descriptor, root_data: bytes, what: str) -> list[_Named]:
        entries = parse_index(root_data, what)
        chosen = [(i, entry) for i, entry in enumerate(entries) if self._wanted(entry.platform)]
        if not chosen:
            available = ", ".join(sorted({str(e.platform) for e in entries if e.platform})) or "none"
            wanted = ", ".join(map(str, self._platforms()))
            raise NotFound(f"{what}: no image for platform {wanted} in the archive (it has: {available})")
        named: list[_Named] = []
        for i, entry in chosen:
            name = self._image_name(entry, f"{what} manifests[{i}]")
            if not name:
                self.log.info("archive image skipped: not under the base name", digest=entry.digest)
                continue
            target = Descriptor(entry.media_type, entry.digest, entry.size, dict(entry.annotations))
            named.append(_Named(name, target))
            self.report(Progress("resolved", name, entry.media_type, message=entry.digest))
        if not named:
            raise NotFound(f"{what}: no image named under base name {q(self.options.base_name)}")
        await self._label(root.digest, [entry for _, entry in chosen])
        by_digest = {entry.digest: (i, entry) for i, entry in chosen}
        for item in named:
            i, entry = by_digest[item.target.digest]
            item.platforms = await self._visit(entry, f"{what} manifests[{i}]")
            if not item.platforms and entry.media_type in INDEX_TYPES:
                wanted = ", ".join(map(str, self._platforms()))
                raise NotFound(f"image {q(item.name)}: no manifest for platform {wanted} in the archive")
        # Last name wins, like ctr's Update-then-Create of each in turn.
        return list({item.name: item for item in named}.values())

    def _image_name(self, entry: Descriptor, what: str) -> str:
        base = self.options.base_name
        name = entry.annotations.get(ANNOTATION_IMAGE_NAME, "")
        if not name:
            ref_name = entry.annotations.get(ANNOTATION_REF_NAME, "")
            if ref_name:
                name = archive.translate_ref_name(
                    ref_name, base or default_base_name(), check_prefix=bool(base)
                )
                if not name:
                    return ""
            else:
                # ctr would import such an entry without any name; naming it by digest keeps it usable.
                name = f"{base or default_base_name()}@{entry.digest}"
        try:
            return validate_name(name)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{what}: {exc.reason}") from None

    async def _label(self, parent: str, children: Sequence[Descriptor]) -> None:
        if children:
            await self.service.set_labels(self.namespace, parent, gc_labels(children))

    async def _present(self, desc: Descriptor, what: str) -> None:
        """The blob must be in the namespace now (from this archive, or from before), with its size."""
        try:
            info = await self.content.info(self.namespace, desc.digest)
        except NotFound:
            raise NotFound(f"{what}: blob {desc.digest} is not in the archive") from None
        if info.size != desc.size:
            raise InvalidArgument(
                f"{what}: descriptor says {desc.size} bytes, blob {desc.digest} has {info.size}"
            )
        self.kept.add(desc.digest)

    async def _visit(self, desc: Descriptor, what: str) -> list[Platform | None]:
        """Check and label what the image needs under `desc`; the platforms of its manifests."""
        if desc.digest in self.visited:
            return self.visited[desc.digest]
        found: list[Platform | None] = []
        if desc.media_type in INDEX_TYPES:
            await self._present(desc, what)
            what = f"index {desc.digest} ({what})"
            children = parse_index(await self._document(desc, what), what)
            chosen = [(i, c) for i, c in enumerate(children) if self._wanted(c.platform)]
            await self._label(desc.digest, [c for _, c in chosen])
            for i, child in chosen:
                below = await self._visit(child, f"{what} manifests[{i}]")
                found.extend([child.platform] if child.media_type in MANIFEST_TYPES else below)
        elif desc.media_type in MANIFEST_TYPES:
            await self._present(desc, what)
            what = f"manifest {desc.digest} ({what})"
            manifest = parse_manifest(await self._document(desc, what), what)
            await self._label(desc.digest, [manifest.config, *manifest.layers])
            await self._present(manifest.config, f"{what} config")
            if manifest.config.media_type in CONFIG_TYPES:
                parse_config(await self._document(manifest.config, f"{what} config"), f"{what} config")
            for i, layer in enumerate(manifest.layers):
                await self._present(layer, f"{what} layers[{i}]")
            found.append(desc.platform)
        else:
            # Not something an image needs (containerd does not follow it either); kept if present.
            with contextlib.suppress(NotFound):
                await self._present(desc, what)
        self.visited[desc.digest] = found
        return found

    async def _document(self, desc: Descriptor, what: str) -> bytes:
        return await self.service.read_document(self.namespace, desc, what)

    # -- unpack and clean-up --------------------------------------------------------------------------

    async def _unpack(self, named: Sequence[_Named]) -> None:
        wanted = self._platforms()
        done: set[str] = set()
        for item in named:
            if item.target.digest in done:
                continue
            done.add(item.target.digest)
            platforms = wanted[:1]
            if item.target.media_type in INDEX_TYPES:
                platforms = [p for p in wanted if any(m is None or p.matches(m) for m in item.platforms)]
                if not platforms:
                    message = "not unpacked: no manifest for " + ", ".join(map(str, wanted))
                    self.report(Progress("unpacked", item.name, item.target.media_type, message=message))
                    continue
            self.report(Progress("unpacking", item.name, item.target.media_type, message=item.target.digest))
            await unpack_image(
                self.service,
                self.namespace,
                item.target,
                image=item.name,
                platforms=platforms,
                snapshotter=self.options.snapshotter,
                lease=self.lease,
                report=self.report,
            )
            self.report(Progress("unpacked", item.name, item.target.media_type, message=item.target.digest))

    async def _discard(self, candidates: set[str]) -> None:
        """Delete blobs this import created that nothing references (the lease is gone by now).

        The GC would collect them too; deleting here makes a failed import leave nothing behind at
        once, and the deletion events (/content/delete) schedule a collection for whatever else
        (snapshots of a failed unpack) only the GC can tell is garbage.
        """
        if not candidates:
            return
        referenced = await self._referenced(candidates)
        removed = 0
        for digest in sorted(candidates - referenced):
            try:
                await self.content.delete(self.namespace, digest)
                removed += 1
            except NotFound:
                pass
            except RuntimedError as exc:
                self.log.warning("removing imported blob failed", digest=digest, error=str(exc))
        if removed:
            self.log.debug("removed unreferenced imported blobs", count=removed)

    async def _referenced(self, candidates: set[str]) -> set[str]:
        """What in the namespace holds a candidate: an image, another lease, a gc.root or gc.ref
        label of content that stays (followed through the candidates' own labels)."""
        held = {image.target.digest for image in await self.service.images.list(self.namespace)}
        for lease in await self.service.leases.list(self.namespace):
            with contextlib.suppress(NotFound):
                for resource in await self.service.leases.list_resources(self.namespace, lease.id):
                    if resource.type == "content":
                        held.add(resource.id)
        refs: dict[str, list[str]] = {}
        for info in await self.content.list(self.namespace):
            refs[info.digest] = [v for k, v in info.labels.items() if k.startswith(GC_REF_CONTENT)]
            if GC_ROOT_LABEL in info.labels:
                held.add(info.digest)
            if info.digest not in candidates:
                held.update(refs[info.digest])
        pending = [digest for digest in held if digest in candidates]
        while pending:
            for child in refs.get(pending.pop(), ()):
                if child not in held:
                    held.add(child)
                    pending.append(child)
        return held


def _mismatch(member: Member, digest: str) -> InvalidArgument:
    return InvalidArgument(
        f"archive entry {q(member.raw_name)}: content digest {digest} does not match the digest "
        "the entry is named by (corrupt archive)"
    )


def _docker_entries(data: bytes) -> list[_DockerEntry]:
    what = f"archive entry {q(DOCKER_MANIFEST_FILE)}"
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(document, list):
        raise InvalidArgument(f"{what} must be a JSON list")
    entries = []
    for i, item in enumerate(document):
        if not isinstance(item, dict):
            raise InvalidArgument(f"{what} [{i}] must be an object")
        config = item.get("Config")
        tags = item.get("RepoTags") or []
        layers = item.get("Layers") or []
        if not isinstance(config, str) or not config:
            raise InvalidArgument(f"{what} [{i}]: Config must be a file name")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise InvalidArgument(f"{what} [{i}]: RepoTags must be a list of strings")
        if not isinstance(layers, list) or not all(isinstance(x, str) and x for x in layers):
            raise InvalidArgument(f"{what} [{i}]: Layers must be a list of file names")
        entries.append(_DockerEntry(config, tags, layers))
    return entries
