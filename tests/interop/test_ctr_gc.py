"""containerd's `ctr` against runtimed's garbage collection: `ctr images rm --sync` frees space."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from fixtures.images import TestImage, build_image, canonical_json, layer_tar

CONTENT_ROOT = "io.containerd.content.v1.content"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


def rows(output: str) -> list[list[str]]:
    return [line.split() for line in output.strip().splitlines()]


def write_oci_archive(path: Path, images: dict[str, TestImage]) -> None:
    """An OCI image-layout tar (what `ctr images export` writes) holding `images` by name."""
    blobs: dict[str, bytes] = {}
    manifests = []
    for name, image in images.items():
        for blob in (image.manifest, image.config, *image.layers):
            blobs[blob.digest] = blob.data
        target = image.descriptor
        descriptor = {"mediaType": target.media_type, "digest": target.digest, "size": target.size}
        manifests.append({**descriptor, "annotations": {REF_NAME: name}})
    index = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
    files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}', "index.json": index}
    files |= {f"blobs/sha256/{digest[7:]}": data for digest, data in sorted(blobs.items())}
    with tarfile.open(path, "w") as archive:
        for member_name, data in files.items():
            member = tarfile.TarInfo(member_name)
            member.size, member.mode = len(data), 0o644
            archive.addfile(member, io.BytesIO(data))


def blob_files(daemon) -> set[str]:
    directory = daemon.root / CONTENT_ROOT / "blobs" / "sha256"
    return {"sha256:" + name for name in os.listdir(directory)} if directory.exists() else set()


def content_digests(run_ctr, daemon, namespace: str = "default") -> set[str]:
    return {
        row[0] for row in rows(run_ctr(daemon.address, "content", "ls", "-q", namespace=namespace).stdout)
    }


def test_ctr_images_rm_sync_frees_the_content(daemon, run_ctr, tmp_path):
    app = build_image([layer_tar({"etc/app.conf": b"app\n"}, busybox=False)])
    base = build_image([layer_tar({"etc/base.conf": b"base\n"}, busybox=False)])
    archive = tmp_path / "images.tar"
    write_oci_archive(archive, {"docker.io/library/app:1": app, "docker.io/library/base:1": base})
    run_ctr(daemon.address, "images", "import", "--no-unpack", str(archive))
    app_blobs = {app.manifest.digest, *app.blobs}
    base_blobs = {base.manifest.digest, *base.blobs}
    imported = content_digests(run_ctr, daemon)
    # ctr also stores the archive's index.json; no image points at it, so it is garbage.
    assert app_blobs | base_blobs <= imported

    run_ctr(daemon.address, "images", "rm", "--sync", "docker.io/library/app:1")
    assert content_digests(run_ctr, daemon) == base_blobs
    assert blob_files(daemon) == base_blobs

    run_ctr(daemon.address, "images", "rm", "--sync", "docker.io/library/base:1")
    assert rows(run_ctr(daemon.address, "content", "ls").stdout) == [["DIGEST", "SIZE", "AGE", "LABELS"]]
    assert blob_files(daemon) == set()
    assert rows(run_ctr(daemon.address, "leases", "ls", "-q").stdout) == []


def test_ctr_images_rm_in_one_namespace_keeps_the_other(daemon, run_ctr, tmp_path):
    image = build_image([layer_tar({"shared.txt": b"shared\n"}, busybox=False)])
    archive = tmp_path / "shared.tar"
    write_oci_archive(archive, {"docker.io/library/shared:1": image})
    for namespace in ("team-a", "team-b"):
        run_ctr(daemon.address, "images", "import", "--no-unpack", str(archive), namespace=namespace)
    run_ctr(daemon.address, "images", "rm", "--sync", "docker.io/library/shared:1", namespace="team-b")
    assert content_digests(run_ctr, daemon, "team-b") == set()
    # The same blobs, recorded in team-a too: its records and the shared files stay.
    assert content_digests(run_ctr, daemon, "team-a") == {image.manifest.digest, *image.blobs}
    assert blob_files(daemon) == {image.manifest.digest, *image.blobs}
    run_ctr(daemon.address, "images", "rm", "--sync", "docker.io/library/shared:1", namespace="team-a")
    assert content_digests(run_ctr, daemon, "team-a") == set()
    assert blob_files(daemon) == set()


def test_ctr_import_unpacked_then_rm_sync_frees_the_snapshots(daemon, run_ctr, tmp_path):
    """The default import unpacks (Diff.Apply into overlayfs); rm --sync takes the snapshots too."""
    plugins = rows(run_ctr(daemon.address, "plugins", "ls").stdout)
    if ["io.containerd.grpc.v1", "diff", "-", "ok"] not in plugins:
        pytest.skip("no working diff service: ctr cannot unpack")
    layers = [layer_tar({name: name.encode()}, busybox=False) for name in ("a.txt", "b.txt")]
    image = build_image(layers)
    archive = tmp_path / "unpacked.tar"
    write_oci_archive(archive, {"docker.io/library/unpacked:1": image})
    run_ctr(daemon.address, "images", "import", str(archive))
    snapshots = rows(run_ctr(daemon.address, "snapshots", "ls").stdout)[1:]
    assert len(snapshots) == 2 and all(row[-1] == "Committed" for row in snapshots)
    run_ctr(daemon.address, "images", "rm", "--sync", "docker.io/library/unpacked:1")
    assert rows(run_ctr(daemon.address, "snapshots", "ls").stdout) == [["KEY", "PARENT", "KIND"]]
    assert content_digests(run_ctr, daemon) == set() and blob_files(daemon) == set()
