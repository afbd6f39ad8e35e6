"""containerd's `ctr` against runtimed's content and leases services."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import queue
import subprocess
import tarfile
from pathlib import Path

import grpc
import pytest

from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from runtimed.wire import NAMESPACE_KEY

MIB = 1 << 20


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def rows(output: str) -> list[list[str]]:
    return [line.split() for line in output.strip().splitlines()]


@pytest.fixture
def ctr_bytes(ctr_bin, daemon):
    """ctr_bytes(*args, stdin=PATH, namespace=None) -> CompletedProcess with bytes output.

    `run_ctr` decodes text and gives ctr no stdin; `content ingest` reads stdin (a regular file
    here, as in `ctr content ingest REF < file`, so ctr can seek on resume) and `content get`
    prints raw bytes.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
    env["CONTAINERD_SUPPRESS_DEPRECATION_WARNINGS"] = "1"

    def run(*args: str, stdin: Path | None = None, namespace: str | None = None):
        cmd = [ctr_bin, "--address", str(daemon.socket_path)]
        if namespace is not None:
            cmd += ["--namespace", namespace]
        with open(stdin or os.devnull, "rb") as source:
            return subprocess.run([*cmd, *args], env=env, stdin=source, capture_output=True, timeout=60)

    return run


def blob(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_ctr_content_ingest_ls_get_label_rm(daemon, run_ctr, ctr_bytes, tmp_path):
    data = os.urandom(3 * MIB + 123)
    digest = sha(data)
    source = blob(tmp_path, "layer", data)
    ingest = ctr_bytes(
        "content", "ingest", "--expected-digest", digest, "--expected-size", str(len(data)), "layer-1",
        stdin=source,
    )  # fmt: skip
    assert ingest.returncode == 0, ingest.stderr
    # Ingesting it again, under another ref, is a success (ALREADY_EXISTS at STAT).
    assert (
        ctr_bytes("content", "ingest", "--expected-digest", digest, "layer-2", stdin=source).returncode == 0
    )
    # Without an expected digest (as `images import` writes), the server computes it.
    small = blob(tmp_path, "config", b'{"architecture": "amd64"}')
    assert ctr_bytes("content", "ingest", "config", stdin=small).returncode == 0
    table = rows(run_ctr(daemon.address, "content", "ls").stdout)
    assert table[0] == ["DIGEST", "SIZE", "AGE", "LABELS"]
    listed = {row[0]: row for row in table[1:]}
    assert set(listed) == {digest, sha(small.read_bytes())}
    assert listed[digest][1] == "3.146MB" and listed[digest][-1] == "-"
    got = ctr_bytes("content", "get", digest)
    assert got.returncode == 0 and got.stdout == data

    run_ctr(daemon.address, "content", "label", digest, "containerd.io/gc.ref.content.l.0=x", "team=a")
    labelled = {row[0]: row[-1] for row in rows(run_ctr(daemon.address, "content", "ls").stdout)[1:]}
    assert sorted(labelled[digest].split(",")) == ["containerd.io/gc.ref.content.l.0=x", "team=a"]
    run_ctr(daemon.address, "content", "label", digest, "team=")
    labelled = {row[0]: row[-1] for row in rows(run_ctr(daemon.address, "content", "ls").stdout)[1:]}
    assert labelled[digest] == "containerd.io/gc.ref.content.l.0=x"
    only = rows(
        run_ctr(daemon.address, "content", "ls", "-q", 'labels."containerd.io/gc.ref.content.l.0"').stdout
    )
    assert only == [[digest]]

    assert run_ctr(daemon.address, "content", "rm", digest).stdout.split() == [digest]
    assert [row[0] for row in rows(run_ctr(daemon.address, "content", "ls", "-q").stdout)] == [
        sha(small.read_bytes())
    ]
    missing = ctr_bytes("content", "get", digest)
    assert missing.returncode != 0
    assert f"content digest {digest}: not found" in missing.stderr.decode()
    assert os.listdir(daemon.root / "io.containerd.content.v1.content" / "blobs" / "sha256") == [
        sha(small.read_bytes()).split(":")[1]
    ]


def test_ctr_content_ingest_verifies_the_digest(daemon, run_ctr, ctr_bytes, tmp_path):
    wrong = sha(b"not this")
    source = blob(tmp_path, "data", b"this")
    result = ctr_bytes("content", "ingest", "--expected-digest", wrong, "bad", stdin=source)
    assert result.returncode != 0
    stderr = result.stderr.decode()
    assert f"unexpected commit digest {sha(b'this')}, expected {wrong}: failed precondition" in stderr
    assert run_ctr(daemon.address, "content", "ls", "-q").stdout.strip() == ""
    assert rows(run_ctr(daemon.address, "content", "active").stdout) == [["REF", "SIZE", "AGE"]]


def test_ctr_content_namespaces_and_adoption(daemon, run_ctr, ctr_bytes, tmp_path):
    data = os.urandom(100_000)
    source = blob(tmp_path, "shared", data)
    assert ctr_bytes("content", "ingest", "shared", stdin=source, namespace="team-a").returncode == 0
    elsewhere = ctr_bytes("content", "get", sha(data), namespace="team-b")
    assert elsewhere.returncode != 0 and "not found" in elsewhere.stderr.decode()
    # Naming the digest in team-b adopts the blob: STAT reports it complete, ctr seeks past
    # its whole input and commits.
    adopted = ctr_bytes(
        "content", "ingest", "--expected-digest", sha(data), "shared", stdin=source, namespace="team-b"
    )
    assert adopted.returncode == 0, adopted.stderr
    assert ctr_bytes("content", "get", sha(data), namespace="team-b").stdout == data
    run_ctr(daemon.address, "content", "rm", sha(data), namespace="team-a")
    assert ctr_bytes("content", "get", sha(data), namespace="team-b").stdout == data


def test_ctr_content_active_shows_open_ingests(daemon, run_ctr):
    requests: queue.Queue = queue.Queue()
    with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
        stub = content_pb2_grpc.ContentStub(channel)
        responses = stub.Write(iter(requests.get, None), metadata=[(NAMESPACE_KEY, "default")], timeout=60)
        requests.put(
            content_pb2.WriteContentRequest(action=content_pb2.STAT, ref="layer-sha256:abc", total=10)
        )
        next(responses)
        requests.put(content_pb2.WriteContentRequest(action=content_pb2.WRITE, data=b"12345"))
        assert next(responses).offset == 5
        table = rows(run_ctr(daemon.address, "content", "active").stdout)
        assert table[0] == ["REF", "SIZE", "AGE"]
        assert table[1][:2] == ["layer-sha256:abc", "5B"]
        requests.put(None)


def test_ctr_leases_create_ls_rm(daemon, run_ctr):
    generated = run_ctr(daemon.address, "leases", "create", "purpose=test").stdout.strip()
    assert generated
    assert run_ctr(daemon.address, "leases", "create", "--id", "mine", "x=y").stdout.strip() == "mine"
    table = rows(run_ctr(daemon.address, "leases", "ls").stdout)
    assert table[0] == ["ID", "CREATED", "AT", "LABELS"]
    labels = {row[0]: sorted(row[-1].split(",")) for row in table[1:]}
    assert set(labels) == {generated, "mine"}
    assert labels["mine"][0].startswith("containerd.io/gc.expire=") and labels["mine"][1] == "x=y"
    assert "purpose=test" in labels[generated]
    assert rows(run_ctr(daemon.address, "leases", "ls", "-q", "id==mine").stdout) == [["mine"]]
    assert run_ctr(daemon.address, "leases", "rm", "mine").stdout.strip() == "mine"
    missing = run_ctr(daemon.address, "leases", "rm", "mine", check=False)
    assert missing.returncode != 0 and 'lease "mine": not found' in missing.stderr
    duplicate = run_ctr(daemon.address, "leases", "create", "--id", generated, check=False)
    assert duplicate.returncode != 0 and "already exists" in duplicate.stderr
    assert rows(run_ctr(daemon.address, "leases", "ls", "-q").stdout) == [[generated]]
    # Leases belong to their namespace.
    assert rows(run_ctr(daemon.address, "leases", "ls", "-q", namespace="other").stdout) == []


def oci_archive(path: Path) -> dict[str, str]:
    """A one-layer OCI image archive named docker.io/library/hello:1; the digests by role."""

    def tar_of(files: dict[str, bytes]) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as archive:
            for name, data in files.items():
                member = tarfile.TarInfo(name)
                member.size = len(data)
                archive.addfile(member, io.BytesIO(data))
        return out.getvalue()

    layer_tar = tar_of({"hello.txt": b"hello from runtimed\n"})
    layer = gzip.compress(layer_tar, mtime=0)
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha(layer_tar)]}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha(layer),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": sha(manifest),
                    "size": len(manifest),
                    "annotations": {"org.opencontainers.image.ref.name": "docker.io/library/hello:1"},
                }
            ],
        }
    ).encode()
    files = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}'}
    files |= {f"blobs/sha256/{sha(b)[7:]}": b for b in (layer, config, manifest)}
    files["index.json"] = index
    path.write_bytes(tar_of(files))
    return {"index": sha(index), "manifest": sha(manifest), "config": sha(config), "layer": sha(layer)}


def test_ctr_images_import_writes_content_under_a_lease(daemon, run_ctr, tmp_path):
    archive = tmp_path / "hello.tar"
    digests = oci_archive(archive)
    for namespace in ("default", "default", "other"):  # again: every blob ALREADY_EXISTS
        run_ctr(daemon.address, "images", "import", "--no-unpack", str(archive), namespace=namespace)
        listed = {
            row[0]: row for row in rows(run_ctr(daemon.address, "content", "ls", namespace=namespace).stdout)
        }
        # index.json is stored too, but no image points at it: the GC may take it any time.
        assert {digests["manifest"], digests["config"], digests["layer"]} <= set(listed)
        assert sorted(listed[digests["manifest"]][-1].split(",")) == [
            f"containerd.io/gc.ref.content.config={digests['config']}",
            f"containerd.io/gc.ref.content.l.0={digests['layer']}",
        ]
        images = rows(run_ctr(daemon.address, "images", "ls", namespace=namespace).stdout)
        assert images[1][:3] == [
            "docker.io/library/hello:1",
            "application/vnd.oci.image.manifest.v1+json",
            digests["manifest"],
        ]
        # The import's lease is gone, its ingests committed.
        assert rows(run_ctr(daemon.address, "leases", "ls", "-q", namespace=namespace).stdout) == []
        assert rows(run_ctr(daemon.address, "content", "active", namespace=namespace).stdout) == [
            ["REF", "SIZE", "AGE"]
        ]


def test_ctr_plugins_ls_shows_content_and_leases(daemon, run_ctr):
    status = {(r[0], r[1]): r[-1] for r in rows(run_ctr(daemon.address, "plugins", "ls").stdout)[1:]}
    assert status[("io.containerd.content.v1", "content")] == "ok"
    assert status[("io.containerd.grpc.v1", "content")] == "ok"
    assert status[("io.containerd.grpc.v1", "leases")] == "ok"
