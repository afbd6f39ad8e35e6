"""Content digests ("<algorithm>:<hex>") as OCI defines them, validated before any use."""

from __future__ import annotations

import hashlib
import re

from runtimed.errors import InvalidArgument, q

# Hex lengths of the algorithms the OCI image spec registers.
ALGORITHMS = {"sha256": 64, "sha384": 96, "sha512": 128}
_DIGEST = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")


def validate(digest: str, what: str = "digest") -> str:
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise InvalidArgument(f"{what} {q(digest)}: invalid checksum digest format")
    algorithm, encoded = match.groups()
    if algorithm not in ALGORITHMS:
        raise InvalidArgument(f"{what} {q(digest)}: unsupported digest algorithm {q(algorithm)}")
    if len(encoded) != ALGORITHMS[algorithm] or not re.fullmatch(r"[a-f0-9]+", encoded):
        raise InvalidArgument(
            f"{what} {q(digest)}: invalid {algorithm} digest, expected {ALGORITHMS[algorithm]} lowercase hex"
        )
    return digest


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
