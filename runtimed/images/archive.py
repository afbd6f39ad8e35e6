"""Image archives: what import (archive_import) and export (archive_export) share.

Two formats, both plain tars:

* OCI image layout: `oci-layout` ({"imageLayoutVersion":"1.0.0"}), `index.json` (an image index
  whose entries carry the image names as annotations) and `blobs/<alg>/<hex>`;
* `docker save`: `manifest.json` ([{"Config","RepoTags","Layers"}]) naming a config
  `<id>.json` and uncompressed layer tars `<id>/layer.tar` (docker >= 25 writes an OCI layout
  plus manifest.json; an archive with `oci-layout` is read as OCI, like containerd does).

This module has the streaming tar reader (archives arrive as chunks over gRPC and are never held
in memory), the tar header writer for exports, the JSON encoding containerd's Go code produces (so
the manifests we synthesise hash to the same digests as `ctr images import`), and image-name
helpers that follow containerd's images/archive/reference.go.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from runtimed import reference
from runtimed.diff import tarstream
from runtimed.errors import InvalidArgument, q
from runtimed.platforms import Platform

OCI_LAYOUT_FILE = "oci-layout"
OCI_LAYOUT_VERSION = "1.0.0"
INDEX_FILE = "index.json"
DOCKER_MANIFEST_FILE = "manifest.json"
BLOBS_DIR = "blobs"

# Annotations on index entries naming the image (containerd's full name, OCI's tag-only name).
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

# A JSON document of an archive (oci-layout, index.json, manifest.json) larger than this is refused
# before it is parsed; manifests and configs get the same bound (runtimed.images.manifest).
MAX_JSON_SIZE = 4 * 1024 * 1024
CHUNK = 1 << 20  # content is written and streamed in 1 MiB pieces, as containerd does

BLOCK = tarstream.BLOCK
_ZERO_BLOCK = bytes(BLOCK)
_MAX_EXTENDED_HEADER = tarstream.MAX_SPECIAL_SIZE
# Archives people compress (`docker save | gzip`): named in the error instead of "not a tar".
_COMPRESSED = (
    (b"\x1f\x8b", "gzip", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd", "zstd"),
    (b"\xfd7zXZ\x00", "xz", "xz"),
    (b"BZh", "bzip2", "bzip2"),
)

REGULAR = "file"
DIRECTORY = "dir"
SYMLINK = "symlink"
HARDLINK = "hardlink"
_KINDS = {
    tarfile.REGTYPE: REGULAR,
    tarfile.AREGTYPE: REGULAR,
    tarfile.CONTTYPE: REGULAR,
    tarfile.DIRTYPE: DIRECTORY,
    tarfile.SYMTYPE: SYMLINK,
    tarfile.LNKTYPE: HARDLINK,
}
_UNSUPPORTED = {
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
    tarfile.GNUTYPE_SPARSE: "GNU sparse file",
}


@dataclass
class ImportOptions:
    # Names images that carry only a tag (or nothing) in the archive: "<base_name>:<tag>" or
    # "<base_name>@<digest>"; when given, full names in ref.name annotations must start with it.
    base_name: str = ""
    unpack: bool = True
    snapshotter: str = ""
    # Platforms to import (and unpack); empty means the daemon's own.
    platforms: list[Platform] = field(default_factory=list)
    all_platforms: bool = False
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class ExportOptions:
    # Platforms to export; empty means the daemon's own.
    platforms: list[Platform] = field(default_factory=list)
    all_platforms: bool = False
    # Leave out the docker-compatible manifest.json.
    skip_docker_manifest: bool = False


# -- member names --------------------------------------------------------------------------------


def member_path(name: str) -> str:
    """The clean path of an archive member ("./blobs//sha256/x" -> "blobs/sha256/x").

    An absolute name or one with a ".." component could name something outside the archive's
    own tree: InvalidArgument naming the member.
    """
    if "\0" in name:
        raise InvalidArgument(f"archive entry {q(name)}: name contains a NUL byte")
    if name.startswith("/"):
        raise InvalidArgument(f"archive entry {q(name)}: absolute path not allowed")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise InvalidArgument(f'archive entry {q(name)}: path escapes the archive ("..")')
    return "/".join(parts)


def link_target(name: str, linkname: str) -> str:
    """Where a symlink member points, as an archive path; InvalidArgument if outside the archive."""
    if linkname.startswith("/"):
        raise InvalidArgument(f"archive entry {q(name)}: symlink to absolute path {q(linkname)}")
    parts: list[str] = name.split("/")[:-1]
    for part in linkname.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise InvalidArgument(
                    f"archive entry {q(name)}: symlink to {q(linkname)} points outside the archive"
                )
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def blob_path(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    return f"{BLOBS_DIR}/{algorithm}/{encoded}"


def blob_digest(path: str) -> str | None:
    """The digest a `blobs/<alg>/<hex>` member claims to hold, None for any other path."""
    parts = path.split("/")
    if len(parts) != 3 or parts[0] != BLOBS_DIR:
        return None
    return f"{parts[1]}:{parts[2]}"


# -- streaming tar reader ------------------------------------------------------------------------


@dataclass
class Member:
    name: str  # clean path (member_path)
    raw_name: str  # as written in the archive, for messages
    kind: str
    size: int
    linkname: str = ""


class TarStream:
    """Reads a tar from an async stream of byte chunks, one member at a time.

    Header parsing is a few hundred bytes per member, cheap enough for the event loop; member data
    is handed on in pieces (hashing and disk writes happen in the content store's threads). After
    `next()` returns a member the caller consumes its data with `data()`, `read_all()` or `skip()`
    (or lets `next()` skip it).
    """

    def __init__(self, chunks: AsyncIterable[bytes]) -> None:
        self._chunks = aiter(chunks)
        self._buf = b""
        self._pos = 0
        self._remaining = 0  # data bytes of the current member not yet consumed
        self._padding = 0
        self.offset = 0  # archive bytes consumed
        self.member = ""  # name of the member being read, for messages
        self.ended = False

    async def _refill(self) -> bool:
        while True:
            chunk = await anext(self._chunks, None)
            if chunk is None:
                return False
            if chunk:
                self._buf, self._pos = bytes(chunk), 0
                return True

    def _truncated(self) -> InvalidArgument:
        where = f" in entry {q(self.member)}" if self.member else ""
        return InvalidArgument(
            f"archive: unexpected end of data{where} after {self.offset} bytes (truncated?)"
        )

    async def _read(self, n: int) -> bytes:
        """Exactly n bytes, or fewer at the end of the stream."""
        parts: list[bytes] = []
        while n > 0:
            if self._pos >= len(self._buf) and not await self._refill():
                break
            take = self._buf[self._pos : self._pos + n]
            self._pos += len(take)
            self.offset += len(take)
            n -= len(take)
            parts.append(take)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read_exact(self, n: int) -> bytes:
        data = await self._read(n)
        if len(data) != n:
            raise self._truncated()
        return data

    async def _skip(self, n: int) -> None:
        while n > 0:
            available = len(self._buf) - self._pos
            if available <= 0:
                if not await self._refill():
                    raise self._truncated()
                continue
            step = min(available, n)
            self._pos += step
            self.offset += step
            n -= step

    async def _finish_member(self) -> None:
        await self._skip(self._remaining + self._padding)
        self._remaining = self._padding = 0

    async def data(self, piece: int = CHUNK) -> AsyncIterator[bytes]:
        """The current member's data, in pieces of about `piece` bytes (the last may be smaller)."""
        pending: list[bytes] = []
        pending_size = 0
        while self._remaining > 0:
            if self._pos >= len(self._buf) and not await self._refill():
                raise self._truncated()
            start = self._pos
            end = min(len(self._buf), start + self._remaining)
            # A whole incoming chunk is passed on without a copy.
            chunk = self._buf if start == 0 and end == len(self._buf) else self._buf[start:end]
            self._pos = end
            self.offset += len(chunk)
            self._remaining -= len(chunk)
            pending.append(chunk)
            pending_size += len(chunk)
            if pending_size >= piece:
                yield pending[0] if len(pending) == 1 else b"".join(pending)
                pending, pending_size = [], 0
        if pending:
            yield pending[0] if len(pending) == 1 else b"".join(pending)
        await self._skip(self._padding)
        self._padding = 0

    async def read_all(self, limit: int) -> bytes:
        """The current member's data in one piece; InvalidArgument when larger than `limit`."""
        if self._remaining > limit:
            raise InvalidArgument(
                f"archive entry {q(self.member)}: {self._remaining} bytes is larger than the "
                f"{limit} bytes a JSON document of an archive may have"
            )
        data = await self._read_exact(self._remaining)
        self._remaining = 0
        await self._skip(self._padding)
        self._padding = 0
        return data

    async def skip(self) -> None:
        await self._finish_member()

    async def drain(self) -> None:
        """Consume whatever follows the end-of-archive marker (record padding, trailing data)."""
        self._pos = len(self._buf)
        while await self._refill():
            self._pos = len(self._buf)

    async def _header(self) -> bytes | None:
        at = self.offset
        block = await self._read(BLOCK)
        if at == 0:
            for magic, kind, tool in _COMPRESSED:
                if block.startswith(magic):
                    raise InvalidArgument(
                        f"archive is {kind}-compressed: decompress it first ({tool} -dc FILE | ... import -)"
                    )
        if len(block) < BLOCK:
            if not block:
                # Every tar writer ends with two zero blocks; a stream that just stops was cut.
                raise InvalidArgument(
                    f"archive: ends after {self.offset} bytes without an end-of-archive marker (truncated?)"
                )
            raise self._truncated()
        if block == _ZERO_BLOCK:
            second = await self._read(BLOCK)
            if second == _ZERO_BLOCK:
                self.ended = True
                return None
            if len(second) < BLOCK:
                raise self._truncated()
            raise InvalidArgument(f"archive: corrupt tar: a zero block followed by data at {self.offset}")
        return block

    async def next(self) -> Member | None:
        """The next member, or None after the end-of-archive marker."""
        if self._remaining or self._padding:
            await self._finish_member()
        pax: dict[str, bytes] = {}
        long_name: str | None = None
        long_link: str | None = None
        while True:
            at = self.offset
            block = await self._header()
            if block is None:
                if pax or long_name is not None or long_link is not None:
                    raise self._truncated()
                return None
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                after = f" after entry {q(self.member)}" if self.member else ""
                raise InvalidArgument(
                    f"archive: not a tar archive or corrupt tar header at offset {at}{after} ({exc})"
                ) from None
            size = info.size
            if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE) or info.type in (
                tarfile.GNUTYPE_LONGNAME,
                tarfile.GNUTYPE_LONGLINK,
            ):
                if size < 0 or size > _MAX_EXTENDED_HEADER:
                    raise InvalidArgument(f"archive: extended tar header of {size} bytes at offset {at}")
                payload = await self._read_exact(size)
                await self._skip(-size % BLOCK)
                if info.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
                    try:
                        pax.update(tarstream.parse_pax(payload))
                    except InvalidArgument:
                        raise InvalidArgument(f"archive: malformed PAX header at offset {at}") from None
                elif info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = _decode(payload.split(b"\0", 1)[0])
                elif info.type == tarfile.GNUTYPE_LONGLINK:
                    long_link = _decode(payload.split(b"\0", 1)[0])
                continue  # global PAX headers are ignored, as Go's archive/tar does
            return self._member(info, pax, long_name, long_link)

    def _member(
        self, info: tarfile.TarInfo, pax: dict[str, bytes], long_name: str | None, long_link: str | None
    ) -> Member:
        raw_name = long_name if long_name is not None else info.name
        linkname = long_link if long_link is not None else info.linkname
        size = info.size
        if "path" in pax:
            raw_name = _decode(pax["path"])
        if "linkpath" in pax:
            linkname = _decode(pax["linkpath"])
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise InvalidArgument(f"archive entry {q(raw_name)}: malformed PAX size") from None
        self.member = raw_name
        if any(key.startswith("GNU.sparse.") for key in pax):
            raise InvalidArgument(f"archive entry {q(raw_name)}: sparse files are not supported")
        kind = _KINDS.get(info.type)
        if kind is None:
            what = _UNSUPPORTED.get(info.type, f"tar type {info.type!r}")
            raise InvalidArgument(f"archive entry {q(raw_name)}: unsupported entry ({what})")
        if size < 0:
            raise InvalidArgument(f"archive entry {q(raw_name)}: negative size")
        if kind != REGULAR:
            size = 0  # only regular files carry data, whatever the size field says
        self._remaining = size
        self._padding = -size % BLOCK
        return Member(name=member_path(raw_name), raw_name=raw_name, kind=kind, size=size, linkname=linkname)


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


# -- tar writing ---------------------------------------------------------------------------------


def file_header(name: str, size: int, mode: int = 0o444) -> bytes:
    return tarstream.header(name, tarstream.REG, mode=mode, size=size)


def dir_header(name: str, mode: int = 0o755) -> bytes:
    return tarstream.header(name, tarstream.DIR, mode=mode)


def padding(size: int) -> bytes:
    return tarstream.data_padding(size)


END_OF_ARCHIVE = tarstream.END_OF_ARCHIVE


# -- JSON as Go's encoding/json writes it --------------------------------------------------------

_GO_ESCAPE = re.compile(r'["\\\x00-\x1f<>&\u2028\u2029\ud800-\udfff]')
_GO_SHORT = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _go_escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _GO_SHORT:
        return _GO_SHORT[char]
    if "\ud800" <= char <= "\udfff":
        return "\\ufffd"  # invalid UTF-8 (surrogate-escaped bytes) becomes U+FFFD, as in Go
    return f"\\u{ord(char):04x}"


def _go_string(value: str) -> str:
    return '"' + _GO_ESCAPE.sub(_go_escape, value) + '"'


def go_json(value: Any) -> bytes:
    """`value` encoded byte for byte as Go's json.Marshal would encode the same struct.

    Dicts are written in their own order (build them in the Go struct's field order; Go sorts map
    keys, so build maps with sorted keys); None is null; strings are escaped like Go (<, >, & and
    U+2028/9 as \\u escapes, no \\b or \\f short forms).
    """
    return _go_value(value).encode()


def _go_value(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _go_string(value)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{_go_string(k)}:{_go_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_go_value(v) for v in value) + "]"
    raise TypeError(f"go_json cannot encode {type(value).__name__}")


def go_map(values: Mapping[str, str]) -> dict[str, str]:
    """A Go map[string]string for go_json: keys sorted."""
    return {key: values[key] for key in sorted(values)}


def descriptor_json(
    media_type: str,
    digest: str,
    size: int,
    annotations: Mapping[str, str] | None = None,
    platform: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """An OCI descriptor in ocispec.Descriptor's field order (empty fields omitted)."""
    document: dict[str, Any] = {}
    if media_type:
        document["mediaType"] = media_type
    document["digest"] = digest
    document["size"] = size
    if annotations:
        document["annotations"] = go_map(annotations)
    if platform:
        document["platform"] = platform
    return document


def platform_json(platform: Platform) -> dict[str, str]:
    """An ocispec.Platform in its field order."""
    document = {"architecture": platform.architecture, "os": platform.os}
    if platform.variant:
        document["variant"] = platform.variant
    return document


# containerd's platforms.Normalize (1.6): what images.Platforms makes of a config's os/architecture.
_GO_ARCH = {
    "i386": ("386", ""),
    "x86_64": ("amd64", None),
    "x86-64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
}


def containerd_platform(os_name: str, architecture: str, variant: str = "") -> Platform:
    os_name = os_name.lower() or "linux"
    if os_name == "macos":
        os_name = "darwin"
    architecture, variant = architecture.lower(), variant.lower()
    normal, fixed = _GO_ARCH.get(architecture, (architecture, None))
    if fixed is not None:
        variant = fixed
    elif (normal, variant) in (("amd64", "v1"), ("arm64", "8"), ("arm64", "v8")):
        variant = ""
    elif normal == "arm" and variant in ("", "7"):
        variant = "v7"
    elif normal == "arm" and variant in ("5", "6", "8"):
        variant = "v" + variant
    return Platform(os_name, normal, variant)


# -- image names (containerd's images/archive/reference.go) --------------------------------------


def normalize_reference(ref: str) -> str:
    """docker's ParseDockerRef: "busybox" -> "docker.io/library/busybox:latest"; a reference with a
    digest keeps only the digest."""
    parsed = reference.parse(ref)
    if parsed.digest is not None and parsed.tag is not None:
        parsed = reference.Reference(parsed.host, parsed.repository, None, parsed.digest)
    return str(parsed)


def familiar_reference(name: str) -> str | None:
    """The short name docker shows ("busybox:latest"); None for a name docker cannot parse."""
    try:
        return reference.parse(name).familiar
    except InvalidArgument:
        return None


_PORT = re.compile(r"[0-9]*")


def oci_reference_name(name: str) -> str:
    """OCI's ref.name for a full image name: only the tag (or "@digest"), as containerd writes it.

    containerd parses the name as a URL "dummy://<name>" and takes what follows the first ":" or
    "@" of the path; a name that does not parse that way is used whole.
    """
    if "://" in name:
        return name
    host, slash, path = name.partition("/")
    if not host:
        return name
    port_start = host.rfind(":")
    if port_start >= 0 and not host.endswith("]") and not _PORT.fullmatch(host[port_start + 1 :]):
        return name  # Go's url.Parse refuses a non-numeric port
    match = re.search(r"[:@]", slash + path)
    if match is None:
        return ""
    obj = (slash + path)[match.start() :]
    return obj[1:] if obj.startswith(":") else obj


def is_image_prefix(name: str, prefix: str) -> bool:
    if not name.startswith(prefix):
        return False
    return len(name) == len(prefix) or name[len(prefix)] in "/:@"


def translate_ref_name(ref_name: str, base_name: str, *, check_prefix: bool) -> str:
    """containerd's refTranslator: a tag-only ref.name becomes "<base>:<tag>"; a full one is kept,
    unless `check_prefix` and it does not start with the base name (then "": not imported)."""
    if any(c in ref_name for c in "/:@"):
        if check_prefix and not is_image_prefix(ref_name, base_name):
            return ""
        return ref_name
    return f"{base_name}:{ref_name}"
