"""Image archives on real stores: the streaming tar reader, containerd's naming and JSON rules,
import of OCI layouts and docker save tars (labels, names, platforms, unpack), export, and bad
archives that must fail naming what is wrong and leave nothing behind."""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from fixtures.archives import (
    IMAGE_NAME,
    REF_NAME,
    TarMember,
    archive_file,
    archive_names,
    blob_member,
    descriptor,
    docker_archive,
    docker_image,
    docker_members,
    image_blobs,
    layout_members,
    oci_archive,
    oci_index_archive,
    oci_members,
    tar_bytes,
)
from fixtures.images import ARCH, build_image, busybox_image, gzip_bytes, layer_tar, random_bytes, sha256

from plugins.snapshotters.native import NativeSnapshotter
from runtimed.content import ContentStore
from runtimed.errors import Internal, InvalidArgument, NotFound
from runtimed.events.exchange import Exchange
from runtimed.images import archive
from runtimed.images.archive import ExportOptions, ImportOptions, TarStream
from runtimed.images.archive_export import export_archive
from runtimed.images.archive_import import (
    DOCKER_LAYER,
    DOCKER_LAYER_GZIP,
    default_base_name,
    gc_labels,
    import_archive,
    layer_media_type,
)
from runtimed.images.manifest import DOCKER_CONFIG, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, chain_ids
from runtimed.images.service import ImageService
from runtimed.metadata.plugin import open_metadata
from runtimed.platforms import Platform
from runtimed.plugin import PluginSet
from runtimed.types import Descriptor

NS = "default"
OTHER_ARCH = "arm64" if ARCH != "arm64" else "amd64"
HOST = Platform.host()


@pytest.fixture
async def service(tmp_path):
    events = Exchange()
    meta = await open_metadata(tmp_path / "meta.db", events)
    content = ContentStore(tmp_path / "content", meta.db, events)
    await content.open()
    native = await NativeSnapshotter.open(tmp_path / "native")
    yield ImageService(
        content, meta.images, meta.leases, {"native": native}, PluginSet(), default_snapshotter="native"
    )
    await native.close()
    await content.close()
    await meta.close()


async def chunked(data: bytes, size: int = 65536):
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def load(service: ImageService, data: bytes, namespace: str = NS, size: int = 65536, **options):
    events = []
    images = await import_archive(
        service, namespace, chunked(data, size), ImportOptions(**options), events.append
    )
    return images, events


async def export(service: ImageService, names: list[str], namespace: str = NS, **options) -> bytes:
    return b"".join([c async for c in export_archive(service, namespace, names, ExportOptions(**options))])


async def state(service: ImageService, namespace: str = NS) -> dict:
    """Everything an import can leave behind, to compare before and after."""
    native = service.snapshotters["native"]
    return {
        "content": sorted(
            (i.digest, tuple(sorted(i.labels.items()))) for i in await service.content.list(namespace)
        ),
        "images": sorted(i.name for i in await service.images.list(namespace)),
        "leases": [lease.id for lease in await service.leases.list(namespace)],
        "snapshots": sorted(i.name for i in await native.list(namespace)),
        "ingests": sorted(os.listdir(service.content.root / "ingest")),
        "blob_files": sorted(os.listdir(service.content.root / "blobs" / "sha256")),
    }


def labels_of(infos, digest: str) -> dict[str, str]:
    return next(i.labels for i in infos if i.digest == digest)


# -- the streaming tar reader ------------------------------------------------------------------------


async def read_members(data: bytes, size: int) -> list[tuple[str, str, bytes]]:
    tar = TarStream(chunked(data, size))
    found = []
    while (member := await tar.next()) is not None:
        body = b"".join([piece async for piece in tar.data(4096)]) if member.kind == archive.REGULAR else b""
        found.append((member.name, member.kind, body))
    await tar.drain()
    return found


@pytest.mark.parametrize("size", [1, 7, 511, 512, 513, 4096, 1 << 20])
async def test_tar_stream_reads_members_whatever_the_chunking(size):
    long_name = "dir/" + "n" * 150 + "/file"
    members = [
        TarMember("dir/", kind=tarfile.DIRTYPE),
        TarMember("dir/a", b"alpha"),
        TarMember("dir/empty", b""),
        TarMember(long_name, random_bytes(10_000)),
        TarMember("dir/link", kind=tarfile.SYMTYPE, linkname="a"),
    ]
    found = await read_members(tar_bytes(members), size)
    assert found == [
        ("dir", "dir", b""),
        ("dir/a", "file", b"alpha"),
        ("dir/empty", "file", b""),
        (long_name, "file", random_bytes(10_000)),
        ("dir/link", "symlink", b""),
    ]


async def test_tar_stream_reads_gnu_long_names():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("g/" + "x" * 200)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert await read_members(buffer.getvalue(), 100) == [("g/" + "x" * 200, "file", b"abc")]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (tar_bytes([TarMember("a", b"x" * 2000)])[:1200], 'unexpected end of data in entry "a"'),
        (tar_bytes([TarMember("a", b"x")], end_marker=False), "without an end-of-archive marker"),
        (tar_bytes([TarMember("a", b"x")])[: 1024 + 512], "unexpected end of data"),
        (b"hello world" * 100, "not a tar archive"),
        (gzip_bytes(tar_bytes([TarMember("a", b"x")])), "gzip-compressed"),
        (b"", "without an end-of-archive marker"),
    ],
)
async def test_tar_stream_refuses_truncated_and_foreign_data(data, message):
    with pytest.raises(InvalidArgument, match=message):
        await read_members(data, 100)


def test_member_paths_are_cleaned_and_escapes_refused():
    assert archive.member_path("./blobs//sha256/./x") == "blobs/sha256/x"
    assert archive.member_path("./") == ""
    for bad in ("../evil", "a/../../evil", "/etc/passwd", "a/..", "x\0y"):
        with pytest.raises(InvalidArgument, match="archive entry"):
            archive.member_path(bad)
    assert archive.link_target("a/b/layer.tar", "../c/layer.tar") == "a/c/layer.tar"
    for bad in ("/etc/passwd", "../../../x"):
        with pytest.raises(InvalidArgument, match="symlink"):
            archive.link_target("a/layer.tar", bad)


# -- containerd's rules ------------------------------------------------------------------------------


def test_go_json_matches_go_encoding():
    document = {"b": 1, "a": [True, None, "x"], "s": '<a&b>\u2028\b\f\x01"\\\n\u00e9'}
    assert archive.go_json(document) == (
        b'{"b":1,"a":[true,null,"x"],"s":"\\u003ca\\u0026b\\u003e\\u2028\\u0008\\u000c\\u0001\\"\\\\\\n'
        + "\u00e9".encode()
        + b'"}'
    )
    assert archive.go_json({"s": "bad\udcff"}) == b'{"s":"bad\\ufffd"}'
    plain = {"schemaVersion": 2, "manifests": [{"mediaType": "m", "digest": "d", "size": 3}]}
    assert archive.go_json(plain) == json.dumps(plain, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    ("name", "ref"),
    [
        ("docker.io/library/busybox:latest", "latest"),
        ("127.0.0.1:5000/team/app:v1", "v1"),
        ("example.com/app@sha256:" + "a" * 64, "@sha256:" + "a" * 64),
        ("example.com/app:v1@sha256:" + "a" * 64, "v1@sha256:" + "a" * 64),
        ("busybox:latest", "busybox:latest"),  # Go's url.Parse refuses the "port": the name is kept
        ("busybox", ""),
    ],
)
def test_oci_reference_name_is_containerds(name, ref):
    assert archive.oci_reference_name(name) == ref


def test_reference_helpers():
    assert archive.normalize_reference("busybox") == "docker.io/library/busybox:latest"
    assert (
        archive.normalize_reference("app:v1@sha256:" + "b" * 64) == "docker.io/library/app@sha256:" + "b" * 64
    )
    assert archive.familiar_reference("docker.io/library/busybox:latest") == "busybox:latest"
    assert archive.familiar_reference("example.com/a/b") == "example.com/a/b:latest"
    assert archive.familiar_reference("Not A Name") is None
    assert archive.translate_ref_name("v1", "base", check_prefix=False) == "base:v1"
    assert archive.translate_ref_name("other/x:v1", "base", check_prefix=True) == ""
    assert archive.translate_ref_name("base/x:v1", "base", check_prefix=True) == "base/x:v1"
    assert archive.translate_ref_name("basement:v1", "base", check_prefix=True) == ""
    assert archive.containerd_platform("Linux", "x86_64") == Platform("linux", "amd64", "")
    assert archive.containerd_platform("linux", "arm") == Platform("linux", "arm", "v7")
    assert archive.containerd_platform("", "aarch64", "v8") == Platform("linux", "arm64", "")


def test_layer_media_types_and_gc_labels():
    assert layer_media_type(b"\x1f\x8b\x08\x00") == DOCKER_LAYER_GZIP
    assert layer_media_type(b"\x28\xb5\x2f\xfd") == DOCKER_LAYER_GZIP
    assert layer_media_type(b"bin/busyb") == DOCKER_LAYER
    assert layer_media_type(b"") == DOCKER_LAYER
    config = Descriptor(DOCKER_CONFIG, "sha256:c", 1)
    layers = [Descriptor(DOCKER_LAYER, f"sha256:{i}", 1) for i in range(2)]
    odd = Descriptor("application/x-other", "sha256:o", 1)
    assert gc_labels([config, *layers, odd]) == {
        "containerd.io/gc.ref.content.config": "sha256:c",
        "containerd.io/gc.ref.content.l.0": "sha256:0",
        "containerd.io/gc.ref.content.l.1": "sha256:1",
        "containerd.io/gc.ref.content.0": "sha256:o",
    }


# -- import --------------------------------------------------------------------------------------------


async def test_import_oci_layout_records_labels_and_unpacks(service):
    image = busybox_image()
    images, events = await load(service, oci_archive([("docker.io/library/app:v1", image)]))
    assert [(i.name, i.target.digest, i.target.media_type) for i in images] == [
        ("docker.io/library/app:v1", image.manifest.digest, OCI_MANIFEST)
    ]
    assert images[0].target.annotations == {IMAGE_NAME: "docker.io/library/app:v1", REF_NAME: "v1"}
    infos = await service.content.list(NS)
    # index.json is not kept: nothing references it (ctr leaves it to the GC)
    assert sorted(i.digest for i in infos) == sorted(sha256(d) for d in image_blobs(image))
    assert labels_of(infos, image.manifest.digest) == {
        "containerd.io/gc.ref.content.config": image.config.digest,
        "containerd.io/gc.ref.content.l.0": image.layers[0].digest,
    }
    top = chain_ids(image.diff_ids)[-1]
    assert labels_of(infos, image.config.digest) == {"containerd.io/gc.ref.snapshot.native": top}
    assert labels_of(infos, image.layers[0].digest) == {"containerd.io/uncompressed": image.diff_ids[0]}
    after = await state(service)
    assert after["snapshots"] == [top] and after["leases"] == [] and after["ingests"] == []
    assert [e.event for e in events if e.event in ("saved", "resolved", "done")] == [
        "saved", "saved", "saved", "saved", "resolved", "done"
    ]  # fmt: skip

    # Again: everything exists, nothing is written twice, the image is the same.
    data = oci_archive([("docker.io/library/app:v1", image)])
    again, events = await load(service, data)
    assert again[0].target == images[0].target
    # only index.json, which the first import dropped as unreferenced
    assert [e.name for e in events if e.event == "saved"] == [sha256(archive_file(data, "index.json"))]
    assert await state(service) == after


async def test_import_in_odd_chunks_and_into_other_namespaces(service):
    image = build_image([layer_tar(), layer_tar({"etc/x": random_bytes(300_000)}, busybox=False)])
    data = oci_archive([("docker.io/library/two:v1", image)])
    first, _ = await load(service, data, namespace="a", size=777, unpack=False)
    second, _ = await load(service, data, namespace="b", size=1 << 20, unpack=False)
    assert first[0].target == second[0].target
    assert (await state(service, "a"))["content"] == (await state(service, "b"))["content"]


async def test_import_names_from_ref_name_and_base_name(service):
    a, b, c = busybox_image(), build_image(cmd=["true"]), build_image(cmd=["false"])
    data = oci_archive([("v1", a), ("example.com/team/b:v2", b), (None, c)], annotations="oci")
    images, _ = await load(service, data, unpack=False)
    assert sorted(i.name for i in images) == sorted(
        [f"{default_base_name()}:v1", "example.com/team/b:v2", f"{default_base_name()}@{c.manifest.digest}"]
    )
    # With a base name, full names outside it are not imported (ctr's FilterRefPrefix).
    images, _ = await load(service, data, namespace="based", unpack=False, base_name="example.com/team/b")
    assert sorted(i.name for i in images) == sorted(
        ["example.com/team/b:v1", "example.com/team/b:v2", f"example.com/team/b@{c.manifest.digest}"]
    )
    with pytest.raises(NotFound, match="no image named under base name"):
        await load(service, oci_archive([("other.io/x:v1", a)], annotations="oci"), base_name="mine")


async def test_import_multi_platform_index_keeps_the_platforms_asked_for(service):
    host = build_image()
    other = build_image([layer_tar({"other": b"arch"}, busybox=False)], architecture=OTHER_ARCH)
    data = oci_index_archive("docker.io/library/multi:v1", [host, other])
    images, _ = await load(service, data)
    index_digest = images[0].target.digest
    assert images[0].target.media_type == OCI_INDEX
    infos = await service.content.list(NS)
    present = {i.digest for i in infos}
    assert set(sha256(d) for d in image_blobs(host)) <= present
    assert not set(sha256(d) for d in image_blobs(other)) & present  # dropped: not for this platform
    assert labels_of(infos, index_digest) == {"containerd.io/gc.ref.content.m.0": host.manifest.digest}

    images, _ = await load(service, data, namespace="all", all_platforms=True)
    infos = await service.content.list("all")
    assert labels_of(infos, index_digest) == {
        "containerd.io/gc.ref.content.m.0": host.manifest.digest,
        "containerd.io/gc.ref.content.m.1": other.manifest.digest,
    }
    assert set(sha256(d) for d in image_blobs(other)) <= {i.digest for i in infos}

    # A single-platform archive of another platform imports only when asked for that platform.
    only_other = oci_index_archive("docker.io/library/other:v1", [other])
    with pytest.raises(
        NotFound, match=f'image "docker.io/library/other:v1": no manifest for platform {HOST}'
    ):
        await load(service, only_other, namespace="y")
    assert (await state(service, "y"))["content"] == []
    images, events = await load(service, only_other, namespace="y", all_platforms=True)
    assert images[0].name == "docker.io/library/other:v1"
    assert any(e.event == "unpacked" and "not unpacked" in e.message for e in events)


async def test_import_docker_save_archive_builds_containerds_manifest(service):
    layers = [layer_tar(), layer_tar({"etc/hello": b"hi"}, busybox=False)]
    image = docker_image(layers)
    images, _ = await load(service, docker_archive([(["app:v1", "example.com/app"], image)]))
    assert [i.name for i in images] == ["docker.io/library/app:v1", "example.com/app:latest"]
    target = images[0].target
    assert target.media_type == DOCKER_MANIFEST and images[1].target.digest == target.digest
    assert images[1].target.annotations == {IMAGE_NAME: "example.com/app:latest", REF_NAME: "latest"}
    manifest_bytes = b"".join([c async for c in service.content.read(NS, target.digest)])
    assert manifest_bytes == archive.go_json(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "digest": sha256(image.config), "size": len(image.config)},
            "layers": [{"mediaType": DOCKER_LAYER, "digest": sha256(t), "size": len(t)} for t in layers],
        }
    )
    after = await state(service)
    # docker's VERSION, json and repositories files are gone; config, layers and manifest stay
    assert len(after["content"]) == 4
    assert after["snapshots"] == sorted(chain_ids([sha256(t) for t in layers]))


async def test_import_docker_save_layer_symlinks(service):
    layer = layer_tar({"a": b"b"}, busybox=False)
    image = docker_image([layer, layer])
    members = docker_members([(["dup:v1"], image)])
    # docker save writes a repeated layer once and links the second to it
    second = image.layer_dir(1) + "/layer.tar"
    members = [m for m in members if m.name != second]
    members.append(TarMember(second, kind=tarfile.SYMTYPE, linkname=f"../{image.layer_dir(0)}/layer.tar"))
    images, _ = await load(service, tar_bytes(members))
    assert images[0].name == "docker.io/library/dup:v1"

    files = (await state(service))["blob_files"]
    escape = [
        *docker_members([(["x:v1"], image)]),
        TarMember("evil", kind=tarfile.SYMTYPE, linkname="../../etc"),
    ]
    with pytest.raises(InvalidArgument, match='"evil": symlink to "../../etc" points outside'):
        await load(service, tar_bytes(escape), namespace="evil")
    dangling = [*docker_members([(["x:v1"], image)]), TarMember("d", kind=tarfile.SYMTYPE, linkname="nope")]
    with pytest.raises(InvalidArgument, match='"d": symlink to "nope", which is not a file of the archive'):
        await load(service, tar_bytes(dangling), namespace="evil")
    empty = {"content": [], "images": [], "leases": [], "snapshots": [], "ingests": [], "blob_files": files}
    assert await state(service, "evil") == empty


def bad_archives() -> dict[str, tuple[bytes, type[Exception], str]]:
    image = busybox_image()
    good = oci_members([("docker.io/library/app:v1", image)])
    layer_name = blob_member(image.layers[0].data).name

    def replace(name: str, data: bytes) -> list[TarMember]:
        return [TarMember(m.name, data, m.kind, m.linkname) if m.name == name else m for m in good]

    not_json = b"this is not { json"
    bad_manifest = layout_members(
        [descriptor(OCI_MANIFEST, sha256(not_json), len(not_json), {IMAGE_NAME: "docker.io/library/bad:v1"})],
        [not_json],
    )
    without_layer = [m for m in good if m.name != layer_name]
    corrupt = bytearray(image.layers[0].data)
    corrupt[100] ^= 0xFF
    return {
        "corrupt blob": (
            tar_bytes(replace(layer_name, bytes(corrupt))),
            InvalidArgument,
            f'archive entry "{layer_name}": content digest .* does not match',
        ),
        "manifest not json": (tar_bytes(bad_manifest), InvalidArgument, "manifest .* is not valid JSON"),
        "missing blob": (
            tar_bytes(without_layer),
            NotFound,
            f"layers\\[0\\]: blob {image.layers[0].digest} is not in the archive",
        ),
        "truncated": (tar_bytes(good)[: 512 + 300_000], InvalidArgument, "unexpected end of data in entry"),
        "dotdot": (
            tar_bytes([*good, TarMember("../evil", b"x")]),
            InvalidArgument,
            '"../evil": path escapes',
        ),
        "absolute": (tar_bytes([TarMember("/etc/evil", b"x"), *good]), InvalidArgument, "absolute path"),
        "symlink": (
            tar_bytes([*good, TarMember("blobs/sha256/link", kind=tarfile.SYMTYPE, linkname="/etc/passwd")]),
            InvalidArgument,
            "symlinks are not allowed in an OCI image layout",
        ),
        "hardlink": (
            tar_bytes([*good, TarMember("hard", kind=tarfile.LNKTYPE, linkname="index.json")]),
            InvalidArgument,
            '"hard": hard links are not allowed',
        ),
        "device": (
            tar_bytes([TarMember("dev", kind=tarfile.CHRTYPE), *good]),
            InvalidArgument,
            "unsupported entry \\(character device\\)",
        ),
        "huge index": (
            tar_bytes(replace("index.json", b" " * (4 * 1024 * 1024 + 1))),
            InvalidArgument,
            '"index.json": 4194305 bytes is larger than',
        ),
        "index not json": (
            tar_bytes(replace("index.json", b"[nope")),
            InvalidArgument,
            '"index.json" is not valid',
        ),
        "no index": (
            tar_bytes([m for m in good if m.name != "index.json"]),
            InvalidArgument,
            'OCI image layout without "index.json"',
        ),
        "layout version": (
            tar_bytes(replace("oci-layout", b'{"imageLayoutVersion":"9"}')),
            InvalidArgument,
            "unsupported image layout version",
        ),
        "unknown format": (
            tar_bytes([TarMember("hello.txt", b"hi")]),
            InvalidArgument,
            "unrecognised archive",
        ),
        "docker manifest not json": (
            tar_bytes(
                [
                    *docker_members([(["a:v1"], docker_image([layer_tar()]))])[:-2],
                    TarMember("manifest.json", b"{"),
                ]
            ),
            InvalidArgument,
            '"manifest.json" is not valid JSON',
        ),
        "docker missing layer": (
            tar_bytes(
                [
                    m
                    for m in docker_members([(["a:v1"], docker_image([layer_tar()]))])
                    if "layer.tar" not in m.name
                ]
            ),
            NotFound,
            'layer .*layer.tar" is not in the archive',
        ),
    }


@pytest.mark.parametrize("case", sorted(bad_archives()))
async def test_bad_archives_fail_and_leave_nothing_behind(service, case):
    data, error, message = bad_archives()[case]
    # Something imported before must survive, shared blobs included (a blob missing from the
    # archive is fine when the namespace has it: then keep an image that does not share it).
    keep = busybox_image() if case != "missing blob" else build_image([layer_tar({"k": b"1"}, busybox=False)])
    await load(service, oci_archive([("docker.io/library/keep:v1", keep)]))
    before = await state(service)
    with pytest.raises(error, match=message):
        await load(service, data)
    assert await state(service) == before


async def test_cancelled_import_leaves_nothing_behind(service):
    before = await state(service)
    data = oci_archive(
        [("docker.io/library/app:v1", build_image([layer_tar({"big": random_bytes(3 << 20)})]))]
    )
    gate = asyncio.Event()

    async def slow():
        async for chunk in chunked(data, 65536):
            yield chunk
            if len(chunk) == 65536:
                gate.set()
                await asyncio.sleep(0.01)

    task = asyncio.create_task(import_archive(service, NS, slow(), ImportOptions()))
    await gate.wait()
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await state(service) == before


async def test_concurrent_imports_of_one_archive(service):
    data = oci_archive([("docker.io/library/app:v1", busybox_image())])
    results = await asyncio.gather(*(load(service, data, size=4096) for _ in range(3)))
    assert len({images[0].target.digest for images, _ in results}) == 1
    assert (await state(service))["ingests"] == []


async def test_unknown_snapshotter_fails_before_reading(service):
    with pytest.raises(InvalidArgument, match='snapshotter "nope" not loaded'):
        await load(service, b"", snapshotter="nope")


# -- export --------------------------------------------------------------------------------------------


async def test_export_round_trip_keeps_digests(service):
    image = build_image([layer_tar(), layer_tar({"etc/a": b"b"}, busybox=False)])
    imported, _ = await load(service, oci_archive([("docker.io/library/app:v1", image)]), unpack=False)
    data = await export(service, ["app:v1"])  # a familiar name finds docker.io/library/app:v1
    assert archive_names(data) == [
        "blobs",
        "blobs/sha256",
        *sorted(f"blobs/sha256/{sha256(d).split(':')[1]}" for d in image_blobs(image)),
        "index.json",
        "manifest.json",
        "oci-layout",
    ]
    assert json.loads(archive_file(data, "index.json"))["manifests"] == [
        {
            "mediaType": OCI_MANIFEST,
            "digest": image.manifest.digest,
            "size": len(image.manifest.data),
            "annotations": {IMAGE_NAME: "docker.io/library/app:v1", REF_NAME: "v1"},
        }
    ]
    docker_manifest = json.loads(archive_file(data, "manifest.json"))
    assert docker_manifest == [
        {
            "Config": "blobs/sha256/" + image.config.digest.split(":")[1],
            "RepoTags": ["app:v1"],
            "Layers": ["blobs/sha256/" + layer.digest.split(":")[1] for layer in image.layers],
        }
    ]
    assert archive_file(data, "oci-layout") == b'{"imageLayoutVersion":"1.0.0"}'
    again, _ = await load(service, data, namespace="copy", unpack=False)
    assert [(i.name, i.target) for i in again] == [(i.name, i.target) for i in imported]
    assert (await state(service, "copy"))["content"] == (await state(service))["content"]


async def test_export_multi_platform_index(service):
    host = build_image()
    other = build_image([layer_tar({"o": b"x"}, busybox=False)], architecture=OTHER_ARCH)
    await load(
        service,
        oci_index_archive("docker.io/library/multi:v1", [host, other]),
        all_platforms=True,
        unpack=False,
    )
    names = set(archive_names(await export(service, ["docker.io/library/multi:v1"])))
    assert {f"blobs/sha256/{sha256(d).split(':')[1]}" for d in image_blobs(host)} <= names
    assert not {f"blobs/sha256/{sha256(d).split(':')[1]}" for d in image_blobs(other)} & names
    data = await export(service, ["docker.io/library/multi:v1"], all_platforms=True)
    assert {f"blobs/sha256/{sha256(d).split(':')[1]}" for d in image_blobs(other)} <= set(archive_names(data))
    # manifest.json names the daemon's platform
    assert json.loads(archive_file(data, "manifest.json"))[0]["Config"].endswith(
        host.config.digest.split(":")[1]
    )
    with pytest.raises(NotFound, match="no manifest for platform"):
        await export(service, ["docker.io/library/multi:v1"], platforms=[Platform("linux", "s390x")])


async def test_export_errors_come_before_any_byte(service):
    await load(service, oci_archive([("docker.io/library/app:v1", busybox_image())]), unpack=False)
    stream = export_archive(service, NS, ["app:v1", "missing:v1"], ExportOptions())
    with pytest.raises(NotFound, match='image "missing:v1"'):
        await anext(stream)
    await service.content.delete(NS, busybox_image().layers[0].digest)
    with pytest.raises(
        NotFound, match=f"layers\\[0\\]: content {busybox_image().layers[0].digest} not found"
    ):
        await export(service, ["app:v1"])


async def test_export_checks_blob_digests(service, tmp_path):
    image = build_image([layer_tar({"x": b"y"}, busybox=False)])
    await load(service, oci_archive([("docker.io/library/app:v1", image)]), unpack=False)
    path = service.content.blob_file(image.layers[0].digest)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(Internal, match="does not match its digest"):
        await export(service, ["docker.io/library/app:v1"])


async def test_export_of_docker_import_reimports_identically(service):
    image = docker_image([layer_tar()])
    first, _ = await load(service, docker_archive([(["app:v1"], image)]), unpack=False)
    data = await export(service, ["app:v1"])
    again, _ = await load(service, data, namespace="copy", unpack=False)
    assert again[0].target == first[0].target
    assert json.loads(archive_file(data, "manifest.json"))[0]["RepoTags"] == ["app:v1"]


def test_tar_written_by_export_is_what_tarfile_reads(tmp_path: Path):
    header = archive.file_header("blobs/sha256/" + "a" * 64, 3)
    data = header + b"abc" + archive.padding(3) + archive.END_OF_ARCHIVE
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.getmembers()[0]
        assert (member.name, member.size, member.mode) == ("blobs/sha256/" + "a" * 64, 3, 0o444)


async def test_blob_missing_from_archive_is_fine_when_the_namespace_has_it(service):
    image = busybox_image()
    await load(service, oci_archive([("docker.io/library/base:v1", image)]), unpack=False)
    layer = blob_member(image.layers[0].data).name
    thin = [m for m in oci_members([("docker.io/library/thin:v1", image)]) if m.name != layer]
    images, _ = await load(service, tar_bytes(thin), labels={"team": "a"})
    assert (images[0].name, images[0].labels) == ("docker.io/library/thin:v1", {"team": "a"})
    with pytest.raises(NotFound, match=f"blob {image.layers[0].digest} is not in the archive"):
        await load(service, tar_bytes(thin), namespace="empty")
