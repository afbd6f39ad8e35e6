"""Parsing untrusted image documents, platform selection and chain IDs."""

from __future__ import annotations

import hashlib
import json

import pytest

from runtimed.errors import InvalidArgument, NotFound
from runtimed.images import manifest as m
from runtimed.platforms import Platform


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media_type: str, data: bytes, platform: dict | None = None) -> dict:
    d = {"mediaType": media_type, "digest": digest(data), "size": len(data)}
    if platform:
        d["platform"] = platform
    return d


def test_chain_ids_match_the_oci_definition():
    a, b, c = ("sha256:" + ch * 64 for ch in "abc")
    chains = m.chain_ids([a, b, c])
    assert chains[0] == a
    assert chains[1] == "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert chains[2] == "sha256:" + hashlib.sha256(f"{chains[1]} {c}".encode()).hexdigest()
    assert m.chain_ids([]) == []


def test_parse_manifest_and_config():
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [digest(b"layer")]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": m.OCI_MANIFEST,
            "config": descriptor(m.OCI_CONFIG, config),
            "layers": [descriptor(m.LAYER_TYPES[1], b"gz")],
        }
    ).encode()
    parsed = m.parse_manifest(manifest)
    assert parsed.config.digest == digest(config) and len(parsed.layers) == 1
    image_config = m.parse_config(config)
    assert image_config.platform == Platform("linux", "amd64")
    assert image_config.diff_ids == [digest(b"layer")]
    assert image_config.config["Cmd"] == ["sh"]
    assert m.media_type_of(manifest, "manifest") == m.OCI_MANIFEST


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"schemaVersion": 1}', "schemaVersion must be 2"),
        (b'{"schemaVersion": 2, "config": {"size": 1}, "layers": []}', "mediaType must be"),
        (
            b'{"schemaVersion": 2, "config": {"mediaType": "x", "digest": "sha256:zz", "size": 1},'
            b' "layers": []}',
            "invalid",
        ),
        (
            b'{"schemaVersion": 2, "config": {"mediaType": "x", "digest": "sha256:'
            + b"a" * 64
            + b'", "size": -1}, "layers": []}',
            "size must be a non-negative integer",
        ),
        (b'{"schemaVersion": 2, "config": null, "layers": "x"}', "layers must be a list"),
        (b"{" + b" " * m.MAX_DOCUMENT_SIZE + b"}", "larger than a manifest may be"),
    ],
)
def test_bad_manifests_name_the_problem(data, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        m.parse_manifest(data, "manifest sha256:test")


def test_bad_config():
    with pytest.raises(InvalidArgument, match="rootfs.type"):
        m.parse_config(b'{"rootfs": {"type": "nope"}}')
    with pytest.raises(InvalidArgument, match=r"diff_ids\[0\]"):
        m.parse_config(b'{"rootfs": {"type": "layers", "diff_ids": ["md5:x"]}}')


def test_platform_selection_prefers_exact_variant():
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                descriptor(m.OCI_MANIFEST, b"arm7", {"os": "linux", "architecture": "arm", "variant": "v7"}),
                descriptor(m.OCI_MANIFEST, b"arm6", {"os": "linux", "architecture": "arm", "variant": "v6"}),
                descriptor(m.OCI_MANIFEST, b"amd64", {"os": "linux", "architecture": "amd64"}),
                descriptor(
                    m.OCI_MANIFEST, b"arm64", {"os": "linux", "architecture": "arm64", "variant": "v8"}
                ),
            ],
        }
    ).encode()
    manifests = m.parse_index(index)
    assert m.select_manifest(manifests, Platform.parse("linux/amd64")).digest == digest(b"amd64")
    assert m.select_manifest(manifests, Platform.parse("linux/arm/v6")).digest == digest(b"arm6")
    assert m.select_manifest(manifests, Platform.parse("linux/arm64")).digest == digest(b"arm64")
    assert m.select_manifest(manifests, Platform.parse("aarch64")).digest == digest(b"arm64")
    with pytest.raises(NotFound, match="no manifest for platform linux/s390x"):
        m.select_manifest(manifests, Platform.parse("linux/s390x"))


def test_platform_parsing():
    assert str(Platform.parse("linux/amd64")) == "linux/amd64"
    assert Platform.parse("x86_64") == Platform("linux", "amd64")
    for bad in ("", "linux//v7", "a/b/c/d"):
        with pytest.raises(InvalidArgument):
            Platform.parse(bad)
