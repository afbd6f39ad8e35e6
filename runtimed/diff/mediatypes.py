"""Layer media types (OCI and Docker) and the compression each one implies."""

from __future__ import annotations

from enum import StrEnum

from runtimed.errors import InvalidArgument, q
from runtimed.mediatypes import DOCKER_FOREIGN_LAYER_GZIP, DOCKER_LAYER, DOCKER_LAYER_GZIP
from runtimed.mediatypes import OCI_LAYER as LAYER_TAR
from runtimed.mediatypes import OCI_LAYER_GZIP as LAYER_TAR_GZIP
from runtimed.mediatypes import OCI_LAYER_ND as LAYER_ND_TAR
from runtimed.mediatypes import OCI_LAYER_ND_GZIP as LAYER_ND_TAR_GZIP
from runtimed.mediatypes import OCI_LAYER_ND_ZSTD as LAYER_ND_TAR_ZSTD
from runtimed.mediatypes import OCI_LAYER_ZSTD as LAYER_TAR_ZSTD


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
        raise InvalidArgument(f"unsupported layer media type {q(media_type)}")
    return compression


def is_layer(media_type: str) -> bool:
    return media_type in _COMPRESSION
