"""runtimectl import|load and export|save against a real daemon, through the Transfer service.

Round trips keep digests (same daemon, other namespace, another daemon); docker save tars import;
bad archives fail with a clear error and leave the store (content, images, snapshots, leases,
ingests) and the daemon root's files exactly as before; a client that goes away mid-import leaves
nothing either; a failed export leaves no file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fixtures.archives import (
    IMAGE_NAME,
    TarMember,
    archive_file,
    archive_names,
    blob_member,
    descriptor,
    docker_archive,
    docker_image,
    layout_members,
    oci_archive,
    oci_index_archive,
    oci_members,
    tar_bytes,
)
from fixtures.images import ARCH, build_image, busybox_image, layer_tar, random_bytes, sha256

from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from runtimed.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from runtimed.api.runtimed.services.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from runtimed.images.manifest import OCI_MANIFEST, chain_ids
from runtimed.wire import NAMESPACE_KEY

pytestmark = pytest.mark.root

REPO_ROOT = Path(__file__).resolve().parents[2]
NAME = "docker.io/library/app:v1"


def runtimectl(
    daemon, *args: str, namespace: str = "default", stdin: bytes | None = None
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNTIMED_")}
    return subprocess.run(
        [sys.executable, "-m", "runtimed.cli.main", "-a", daemon.address, "-n", namespace, *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=env,
    )


def ok(daemon, *args: str, **kwargs: Any) -> str:
    result = runtimectl(daemon, *args, **kwargs)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def fails(daemon, *args: str, **kwargs: Any) -> str:
    result = runtimectl(daemon, *args, **kwargs)
    assert result.returncode == 125, (result.stdout, result.stderr)
    return result.stderr.decode()


def md(namespace: str = "default") -> list[tuple[str, str]]:
    return [(NAMESPACE_KEY, namespace)]


@dataclass(frozen=True)
class Store:
    content: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    images: tuple[tuple[str, str], ...]
    snapshots: tuple[str, ...]
    leases: tuple[str, ...]
    ingests: tuple[str, ...]
    files: tuple[str, ...]  # every path under the daemon root, databases aside


def root_files(root: Path) -> tuple[str, ...]:
    found = []
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            if name.endswith(("-wal", "-shm", "-journal")):
                continue
            found.append(os.path.relpath(os.path.join(directory, name), root))
    return tuple(sorted(found))


def store_of(daemon, namespace: str = "default") -> Store:
    with daemon.client(namespace) as client:
        content = content_pb2_grpc.ContentStub(client.channel)
        snapshots = snapshots_pb2_grpc.SnapshotsStub(client.channel)
        leases = leases_pb2_grpc.LeasesStub(client.channel)
        infos = [
            i for r in content.List(content_pb2.ListContentRequest(), metadata=md(namespace)) for i in r.info
        ]
        snaps = [
            i.name
            for name in ("overlayfs", "native")
            for r in snapshots.List(
                snapshots_pb2.ListSnapshotsRequest(snapshotter=name), metadata=md(namespace)
            )
            for i in r.info
        ]
        return Store(
            content=tuple(sorted((i.digest, tuple(sorted(i.labels.items()))) for i in infos)),
            images=tuple(sorted((i.name, i.target.digest) for i in client.images())),
            snapshots=tuple(sorted(snaps)),
            leases=tuple(
                lease.id for lease in leases.List(leases_pb2.ListRequest(), metadata=md(namespace)).leases
            ),
            ingests=tuple(
                s.ref
                for s in content.ListStatuses(
                    content_pb2.ListStatusesRequest(), metadata=md(namespace)
                ).statuses
            ),
            files=root_files(daemon.root),
        )


def images_of(daemon, namespace: str = "default") -> dict[str, str]:
    with daemon.client(namespace) as client:
        return {image.name: image.target.digest for image in client.images()}


def test_import_export_round_trip_keeps_digests(daemon, daemon_factory, tmp_path):
    image = build_image([layer_tar(), layer_tar({"etc/motd": b"hello"}, busybox=False)])
    archive = tmp_path / "app.tar"
    archive.write_bytes(oci_archive([(NAME, image)]))

    out = ok(daemon, "import", str(archive))
    assert f"Imported {NAME} (sha256:{image.manifest.digest[7:19]})" in out
    assert images_of(daemon) == {NAME: image.manifest.digest}
    top = chain_ids(image.diff_ids)[-1]
    assert top in store_of(daemon).snapshots

    exported = tmp_path / "out.tar"
    out = ok(daemon, "export", "-o", str(exported), "app:v1")
    assert f"Exported app:v1 to {exported}" in out
    data = exported.read_bytes()
    assert json.loads(archive_file(data, "manifest.json"))[0]["RepoTags"] == ["app:v1"]
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]

    # Same daemon, another namespace (docker's spelling), and a fresh daemon: same digests.
    out = ok(daemon, "load", "-i", str(exported), namespace="copy")
    assert out.splitlines() == [
        f"Unpacking {NAME} (sha256:{image.manifest.digest[7:19]})...",
        f"Loaded image: {NAME}",
    ]
    assert images_of(daemon, "copy") == {NAME: image.manifest.digest}
    other = daemon_factory().start()
    assert ok(other, "import", "-q", "--no-unpack", str(exported)) == NAME + "\n"
    assert images_of(other) == {NAME: image.manifest.digest}
    assert {d for d, _ in store_of(other).content} == {d for d, _ in store_of(daemon).content}
    # ...and exporting from there gives the same bytes.
    assert ok(other, "export", "-o", str(tmp_path / "again.tar"), NAME)
    assert (tmp_path / "again.tar").read_bytes() == data


def test_stdin_import_and_stdout_save(daemon):
    image = busybox_image()
    data = oci_archive([(NAME, image)])
    assert ok(daemon, "import", "-q", "-", stdin=data) == NAME + "\n"
    assert ok(daemon, "load", "-q", stdin=data, namespace="two") == NAME + "\n"
    result = runtimectl(daemon, "save", NAME)
    assert result.returncode == 0, result.stderr
    assert "index.json" in archive_names(result.stdout)
    assert ok(daemon, "import", "-q", "-", stdin=result.stdout, namespace="three") == NAME + "\n"
    assert images_of(daemon, "three") == {NAME: image.manifest.digest}


def test_docker_save_archive(daemon, tmp_path):
    layers = [layer_tar(), layer_tar({"etc/hello": b"hi"}, busybox=False)]
    archive = tmp_path / "docker.tar"
    archive.write_bytes(docker_archive([(["app:v1", "example.com/team/app:v2"], docker_image(layers))]))
    out = ok(daemon, "load", "-i", str(archive))
    assert out.splitlines()[-2:] == [
        "Loaded image: docker.io/library/app:v1",
        "Loaded image: example.com/team/app:v2",
    ]
    found = images_of(daemon)
    assert len(set(found.values())) == 1
    store = store_of(daemon)
    assert (
        chain_ids([d for d in json.loads(docker_image(layers).config)["rootfs"]["diff_ids"]])[-1]
        in store.snapshots
    )
    # docker's VERSION/json/repositories files were not kept
    assert len(store.content) == 4


def test_platforms_through_the_cli(daemon, tmp_path):
    other_arch = "arm64" if ARCH != "arm64" else "amd64"
    host = build_image()
    other = build_image([layer_tar({"o": b"1"}, busybox=False)], architecture=other_arch)
    archive = tmp_path / "multi.tar"
    archive.write_bytes(oci_index_archive(NAME, [host, other]))
    ok(daemon, "import", "--all-platforms", "--no-unpack", str(archive))
    small = runtimectl(daemon, "save", NAME).stdout
    full = runtimectl(daemon, "save", "--all-platforms", NAME).stdout
    assert f"blobs/sha256/{other.manifest.digest[7:]}" not in archive_names(small)
    assert f"blobs/sha256/{other.manifest.digest[7:]}" in archive_names(full)
    only = runtimectl(daemon, "save", "--platform", f"linux/{other_arch}", NAME).stdout
    assert f"blobs/sha256/{host.manifest.digest[7:]}" not in archive_names(only)
    error = fails(daemon, "import", "--platform", "linux/s390x", str(archive), namespace="s390x")
    assert "no manifest for platform linux/s390x" in error


def bad_archives() -> dict[str, tuple[bytes, str]]:
    image = busybox_image()
    good = oci_members([(NAME, image)])
    layer = blob_member(image.layers[0].data)
    corrupt = bytearray(layer.data)
    corrupt[1000] ^= 0xFF
    not_json = b"{not json"
    return {
        "truncated": (tar_bytes(good)[:700_000], "unexpected end of data in entry"),
        "corrupt blob": (
            tar_bytes([TarMember(m.name, bytes(corrupt)) if m.name == layer.name else m for m in good]),
            f'archive entry "{layer.name}": content digest',
        ),
        "manifest not json": (
            tar_bytes(
                layout_members(
                    [
                        descriptor(
                            OCI_MANIFEST,
                            sha256(not_json),
                            len(not_json),
                            {IMAGE_NAME: "docker.io/library/x:v1"},
                        )
                    ],
                    [not_json],
                )
            ),
            "is not valid JSON",
        ),
        "missing blob": (tar_bytes([m for m in good if m.name != layer.name]), "is not in the archive"),
        "dotdot": (tar_bytes([*good, TarMember("../evil", b"x")]), 'archive entry "../evil": path escapes'),
        "symlink": (
            tar_bytes([*good, TarMember("evil", kind=tarfile.SYMTYPE, linkname="/etc/shadow")]),
            "symlinks are not allowed",
        ),
    }


@pytest.mark.parametrize("case", sorted(bad_archives()))
def test_bad_archives_leave_nothing_behind(daemon, tmp_path, case):
    data, message = bad_archives()[case]
    keep = oci_archive([("docker.io/library/keep:v1", build_image([layer_tar({"k": b"1"}, busybox=False)]))])
    ok(daemon, "import", str(_write(tmp_path / "keep.tar", keep)))
    before = store_of(daemon)
    error = fails(daemon, "import", str(_write(tmp_path / "bad.tar", data)))
    assert re.search(message, error), error
    assert store_of(daemon) == before


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_client_going_away_mid_import_leaves_nothing(daemon):
    before = store_of(daemon)
    data = oci_archive([(NAME, build_image([layer_tar({"big": random_bytes(8 << 20)})]))])
    sent = []

    def requests():
        yield transfer_pb2.ImportRequest(options=transfer_pb2.ImportOptions(unpack=True))
        for start in range(0, len(data), 1 << 16):
            sent.append(start)
            yield transfer_pb2.ImportRequest(data=data[start : start + (1 << 16)])
            time.sleep(0.01)

    with daemon.client() as client:
        stream = transfer_pb2_grpc.TransferStub(client.channel).Import(requests(), metadata=md())
        for progress in stream:
            if progress.event == "reading" and len(sent) > 20:
                stream.cancel()
                break
    deadline = time.monotonic() + 10
    while store_of(daemon) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store_of(daemon) == before


def test_export_failures_leave_no_file(daemon, tmp_path):
    target = tmp_path / "out.tar"
    error = fails(daemon, "export", "-o", str(target), "missing:v1")
    assert 'image "missing:v1": not found' in error
    assert os.listdir(tmp_path) == []
    result = runtimectl(daemon, "export", "-o", str(tmp_path / "no" / "dir.tar"), "missing:v1")
    assert result.returncode == 125


def test_transfer_import_reports_progress_and_images(daemon):
    data = oci_archive([(NAME, busybox_image())])

    def requests():
        yield transfer_pb2.ImportRequest(options=transfer_pb2.ImportOptions(unpack=False, labels={"a": "b"}))
        yield transfer_pb2.ImportRequest(data=data)

    with daemon.client() as client:
        events = list(transfer_pb2_grpc.TransferStub(client.channel).Import(requests(), metadata=md()))
    assert [e.event for e in events if e.event in ("saved", "resolved", "done")] == [
        "saved", "saved", "saved", "saved", "resolved", "done"
    ]  # fmt: skip
    done = events[-1]
    assert (done.name, done.image.name, dict(done.image.labels)) == (NAME, NAME, {"a": "b"})
    assert done.image.target.digest == busybox_image().manifest.digest
