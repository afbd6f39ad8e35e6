"""`ctr images import|export` against runtimed, and archives crossing between ctr and runtimectl.

ctr does the archive work client-side (Leases, Content, Images, Snapshots, Diff); runtimectl has
the daemon do it (Transfer). Either way the same digests must come out: the OCI blobs are the
archive's own bytes, and for `docker save` tars both synthesise byte-identical manifests and index.
Exports of both are byte-identical tars.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.archives import (
    archive_file,
    archive_names,
    docker_archive,
    docker_image,
    oci_archive,
    oci_index_archive,
)
from fixtures.images import ARCH, build_image, layer_tar

from runtimed.api.runtimed.services.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from runtimed.images.manifest import chain_ids
from runtimed.wire import NAMESPACE_KEY

pytestmark = pytest.mark.root

REPO_ROOT = Path(__file__).resolve().parents[2]
NAME = "docker.io/library/app:v1"
OTHER_ARCH = "arm64" if ARCH != "arm64" else "amd64"


def runtimectl(daemon, *args: str, namespace: str = "default") -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNTIMED_")}
    result = subprocess.run(
        [sys.executable, "-m", "runtimed.cli.main", "-a", daemon.address, "-n", namespace, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def ctr_images(run_ctr, daemon, namespace: str) -> dict[str, str]:
    """name -> target digest, from `ctr images ls`."""
    out = run_ctr(daemon.address, "images", "ls", namespace=namespace).stdout
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    return {row[0]: row[2] for row in rows}


def rt_images(daemon, namespace: str) -> dict[str, str]:
    with daemon.client(namespace) as client:
        return {image.name: image.target.digest for image in client.images()}


def test_ctr_import_oci_archive_unpacks_into_runtimed(daemon, run_ctr, tmp_path):
    image = build_image([layer_tar(), layer_tar({"etc/motd": b"hi"}, busybox=False)])
    archive = tmp_path / "app.tar"
    archive.write_bytes(oci_archive([(NAME, image)]))
    out = run_ctr(daemon.address, "images", "import", str(archive), namespace="c").stdout
    assert f"unpacking {NAME} ({image.manifest.digest})...done" in out
    assert ctr_images(run_ctr, daemon, "c") == {NAME: image.manifest.digest}
    snapshots = run_ctr(daemon.address, "snapshots", "ls", namespace="c").stdout
    for chain in chain_ids(image.diff_ids):
        assert chain in snapshots
    content = run_ctr(daemon.address, "content", "ls", namespace="c").stdout
    assert f"containerd.io/gc.ref.content.l.1={image.layers[1].digest}" in content

    # The same archive through runtimectl: the same records, and unpack finds ctr's snapshots.
    runtimectl(daemon, "import", str(archive), namespace="c")
    assert rt_images(daemon, "c") == {NAME: image.manifest.digest}
    runtimectl(daemon, "import", str(archive), namespace="r")
    assert rt_images(daemon, "r") == {NAME: image.manifest.digest}
    assert set(run_ctr(daemon.address, "snapshots", "ls", namespace="r").stdout.split()) == set(
        snapshots.split()
    )


def test_exports_of_ctr_and_runtimectl_are_identical(daemon, run_ctr, tmp_path):
    host = build_image()
    other = build_image([layer_tar({"o": b"x"}, busybox=False)], architecture=OTHER_ARCH)
    (tmp_path / "multi.tar").write_bytes(oci_index_archive("docker.io/library/multi:v1", [host, other]))
    # Not the multi-platform image's host manifest: containerd drops the first image's tag from
    # manifest.json when an index resolves to the same manifest (runtimectl keeps both).
    (tmp_path / "app.tar").write_bytes(oci_archive([(NAME, build_image(cmd=["id"]))]))
    run_ctr(daemon.address, "images", "import", "--all-platforms", "--no-unpack", str(tmp_path / "multi.tar"))
    run_ctr(daemon.address, "images", "import", "--no-unpack", str(tmp_path / "app.tar"))
    cases = {
        "one": ([NAME], []),
        "two": ([NAME, "docker.io/library/multi:v1"], []),
        "all": (["docker.io/library/multi:v1"], ["--all-platforms"]),
        "platform": (["docker.io/library/multi:v1"], ["--platform", f"linux/{OTHER_ARCH}"]),
    }
    for case, (names, flags) in cases.items():
        ours, theirs = tmp_path / f"{case}-rt.tar", tmp_path / f"{case}-ctr.tar"
        run_ctr(daemon.address, "images", "export", *flags, str(theirs), *names)
        runtimectl(daemon, "export", "-o", str(ours), *flags, *names)
        if len(names) == 1:
            assert ours.read_bytes() == theirs.read_bytes(), case
        else:  # manifest.json lists manifests in Go map order (random); all else is identical
            a, b = ours.read_bytes(), theirs.read_bytes()
            assert archive_names(a) == archive_names(b)
            for member in archive_names(a):
                if member == "manifest.json":
                    key = lambda entry: entry["Config"]  # noqa: E731
                    assert sorted(json.loads(archive_file(a, member)), key=key) == sorted(
                        json.loads(archive_file(b, member)), key=key
                    )
                elif not member.endswith(("blobs", "sha256")):
                    assert archive_file(a, member) == archive_file(b, member), (case, member)
    manifest = json.loads(archive_file((tmp_path / "two-rt.tar").read_bytes(), "manifest.json"))
    assert sorted(tag for entry in manifest for tag in entry["RepoTags"]) == ["app:v1", "multi:v1"]


def test_archives_cross_between_ctr_and_runtimectl(daemon, run_ctr, tmp_path):
    image = build_image([layer_tar(), layer_tar({"x": b"y"}, busybox=False)])
    source = tmp_path / "source.tar"
    source.write_bytes(oci_archive([(NAME, image)]))

    # runtimectl export -> ctr import
    runtimectl(daemon, "import", "--no-unpack", str(source), namespace="a")
    runtimectl(daemon, "export", "-o", str(tmp_path / "from-rt.tar"), NAME, namespace="a")
    run_ctr(daemon.address, "images", "import", str(tmp_path / "from-rt.tar"), namespace="b")
    assert ctr_images(run_ctr, daemon, "b") == {NAME: image.manifest.digest}

    # ctr export -> runtimectl import
    run_ctr(daemon.address, "images", "export", str(tmp_path / "from-ctr.tar"), NAME, namespace="b")
    runtimectl(daemon, "import", str(tmp_path / "from-ctr.tar"), namespace="c")
    assert rt_images(daemon, "c") == {NAME: image.manifest.digest}
    assert (tmp_path / "from-ctr.tar").read_bytes() == (tmp_path / "from-rt.tar").read_bytes()


def test_docker_save_archive_gets_ctrs_digests(daemon, run_ctr, tmp_path):
    first = docker_image([layer_tar(), layer_tar({"etc/hello": b"hi"}, busybox=False)])
    second = docker_image([layer_tar({"only": b"arm"}, busybox=False)], architecture="arm", variant="v7")
    archive = tmp_path / "docker.tar"
    archive.write_bytes(docker_archive([(["app:v1", "example.com/team/app"], first), (["arm:v1"], second)]))

    run_ctr(
        daemon.address, "images", "import", "--all-platforms", "--no-unpack", "--index-name", "idx",
        str(archive), namespace="ctr",
    )  # fmt: skip
    theirs = ctr_images(run_ctr, daemon, "ctr")
    index_digest = theirs.pop("idx")

    requests = [
        transfer_pb2.ImportRequest(options=transfer_pb2.ImportOptions(all_platforms=True)),
        transfer_pb2.ImportRequest(data=archive.read_bytes()),
    ]
    with daemon.client("rt") as client:
        events = list(
            transfer_pb2_grpc.TransferStub(client.channel).Import(
                iter(requests), metadata=[(NAMESPACE_KEY, "rt")]
            )
        )
    assert rt_images(daemon, "rt") == theirs
    assert set(theirs) == {
        "docker.io/library/app:v1",
        "example.com/team/app:latest",
        "docker.io/library/arm:v1",
    }
    # the index runtimectl synthesised (and dropped: no image names it) is ctr's, byte for byte
    assert index_digest in {e.name for e in events if e.event == "saved"}

    # Unpacked by each (the host's image only: ctr would fail unpacking the arm one here).
    host_only = tmp_path / "host.tar"
    host_only.write_bytes(docker_archive([(["app:v1"], first)]))
    run_ctr(daemon.address, "images", "import", str(host_only), namespace="ctr2")
    runtimectl(daemon, "import", str(host_only), namespace="rt2")
    assert rt_images(daemon, "rt2") == ctr_images(run_ctr, daemon, "ctr2")
    snapshots = set(run_ctr(daemon.address, "snapshots", "ls", namespace="ctr2").stdout.split())
    assert set(run_ctr(daemon.address, "snapshots", "ls", namespace="rt2").stdout.split()) == snapshots
