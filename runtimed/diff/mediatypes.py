"""Layer media types (OCI and Docker) and the compression each one implies."""

from __future__ import annotations

from enum import StrEnum

from runtimed.errors import InvalidArgument

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LAYER_ND_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
LAYER_ND_TAR_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
LAYER_ND_TAR_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"


class Compression(StrEnum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


_COMPRESSION = {
    LAYER_TAR: Compression.NONE,
    LAYER_TAR_GZIP: Compression.GZIP,
    LAYER_TAR_ZSTD: Compression.ZSTD,
    LAYER_ND_TAR: Compression.NONE,
    LAYER_ND_TAR_GZIP: Compression.GZIP,
    LAYER_ND_TAR_ZSTD: Compression.ZSTD,
    DOCKER_LAYER: Compression.NONE,
    DOCKER_LAYER_GZIP: Compression.GZIP,
    DOCKER_FOREIGN_LAYER_GZIP: Compression.GZIP,
}

# What write_diff produces for each compression.
MEDIA_TYPE_OF = {
    Compression.NONE: LAYER_TAR,
    Compression.GZIP: LAYER_TAR_GZIP,
    Compression.ZSTD: LAYER_TAR_ZSTD,
}


def compression_of(media_type: str) -> Compression:
    """The compression of a layer media type; InvalidArgument for anything not a layer."""
    compression = _COMPRESSION.get(media_type)
    if compression is None:
        raise InvalidArgument(f"unsupported layer media type {media_type!r}")
    return compression


def is_layer(media_type: str) -> bool:
    return media_type in _COMPRESSION
