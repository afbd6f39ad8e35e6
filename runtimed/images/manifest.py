"""OCI and Docker image documents: indexes, manifests, configs, platforms and chain IDs.

Everything read here is untrusted input (from a registry or an archive): each parser
checks types and required fields and raises InvalidArgument naming the document.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from runtimed import digests
from runtimed.diff.mediatypes import _COMPRESSION
from runtimed.errors import InvalidArgument, NotFound
from runtimed.mediatypes import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
)
from runtimed.platforms import Platform
from runtimed.types import Descriptor

INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)

LAYER_TYPES = tuple(_COMPRESSION)

# A document bigger than this is not a manifest; refuse before parsing it.
MAX_DOCUMENT_SIZE = 4 * 1024 * 1024


@dataclass
class Manifest:
    config: Descriptor
    layers: list[Descriptor]
    media_type: str


@dataclass
class ImageConfig:
    platform: Platform
    diff_ids: list[str]
    # The "config" object (Entrypoint, Cmd, Env, WorkingDir, User, ...) as given.
    config: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


def load_json_object(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_DOCUMENT_SIZE:
        raise InvalidArgument(f"{what}: {len(data)} bytes is larger than a manifest may be")
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return document


def _str(document: dict[str, Any], key: str, what: str, *, required: bool = True) -> str:
    value = document.get(key, "")
    if not isinstance(value, str) or (required and not value):
        raise InvalidArgument(f"{what}: {key} must be a non-empty string")
    return value


def parse_descriptor(value: Any, what: str) -> Descriptor:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a descriptor object")
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument(f"{what}: size must be a non-negative integer")
    annotations = value.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise InvalidArgument(f"{what}: annotations must map strings to strings")
    platform = value.get("platform")
    if platform is not None:
        if not isinstance(platform, dict):
            raise InvalidArgument(f"{what}: platform must be an object")
        variant = platform.get("variant") or ""
        if not isinstance(variant, str):
            raise InvalidArgument(f"{what}: platform.variant must be a string")
        platform = Platform(_str(platform, "os", what), _str(platform, "architecture", what), variant)
    return Descriptor(
        media_type=_str(value, "mediaType", what),
        digest=digests.validate(_str(value, "digest", what), f"{what} digest"),
        size=size,
        annotations=dict(annotations),
        platform=platform,
    )


def media_type_of(data: bytes, what: str) -> str:
    """The mediaType a document declares, or its shape's type when it declares none."""
    document = load_json_object(data, what)
    declared = document.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if "manifests" in document:
        return OCI_INDEX
    if "layers" in document and "config" in document:
        return OCI_MANIFEST
    raise InvalidArgument(f"{what} is neither an image index nor a manifest")


def parse_index(data: bytes, what: str = "index") -> list[Descriptor]:
    document = load_json_object(data, what)
    manifests = document.get("manifests")
    if not isinstance(manifests, list):
        raise InvalidArgument(f"{what}: manifests must be a list")
    return [parse_descriptor(m, f"{what} manifests[{i}]") for i, m in enumerate(manifests)]


def parse_manifest(data: bytes, what: str = "manifest") -> Manifest:
    document = load_json_object(data, what)
    if document.get("schemaVersion") != 2:
        raise InvalidArgument(f"{what}: schemaVersion must be 2 (schema 1 manifests are not supported)")
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise InvalidArgument(f"{what}: layers must be a list")
    return Manifest(
        config=parse_descriptor(document.get("config"), f"{what} config"),
        layers=[parse_descriptor(layer, f"{what} layers[{i}]") for i, layer in enumerate(layers)],
        media_type=document.get("mediaType") or OCI_MANIFEST,
    )


def parse_config(data: bytes, what: str = "image config") -> ImageConfig:
    document = load_json_object(data, what)
    rootfs = document.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise InvalidArgument(f'{what}: rootfs.type must be "layers"')
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise InvalidArgument(f"{what}: rootfs.diff_ids must be a list of digests")
    for i, diff_id in enumerate(diff_ids):
        digests.validate(diff_id, f"{what} rootfs.diff_ids[{i}]")
    config = document.get("config") or {}
    if not isinstance(config, dict):
        raise InvalidArgument(f"{what}: config must be an object")
    platform = Platform(
        str(document.get("os") or "linux"),
        str(document.get("architecture") or ""),
        str(document.get("variant") or ""),
    )
    return ImageConfig(platform=platform.normalized(), diff_ids=list(diff_ids), config=config, raw=document)


def select_manifest(manifests: Sequence[Descriptor], platform: Platform, what: str = "index") -> Descriptor:
    """The first manifest for `platform`, preferring an exact variant match."""
    candidates = [m for m in manifests if m.media_type in MANIFEST_TYPES + INDEX_TYPES and m.platform]
    exact = [m for m in candidates if m.platform.normalized() == platform.normalized()]
    if exact:
        return exact[0]
    loose = [m for m in candidates if platform.matches(m.platform)]
    if loose:
        return loose[0]
    # An index entry without a platform (e.g. a single-manifest OCI layout) matches anything.
    unlabelled = [m for m in manifests if m.media_type in MANIFEST_TYPES and m.platform is None]
    if unlabelled:
        return unlabelled[0]
    available = ", ".join(str(m.platform) for m in candidates) or "none"
    raise NotFound(f"{what}: no manifest for platform {platform} (available: {available})")


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """OCI ChainIDs: chain[0] = diff[0]; chain[n] = sha256(chain[n-1] + " " + diff[n])."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            chains.append("sha256:" + hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest())
    return chains
