"""Pull, push, tag, inspect and rmi through runtimectl against a real daemon and a real registry.

The registry is Debian's docker-registry (tests/fixtures/registry.py); what a real registry will
not do (serve a blob whose bytes are not its digest, a layer that is not gzip, a big layer slowly)
comes from FakeRegistry below, a small HTTP server in a thread of the test process. After every
failure the store must be as before: no new image, snapshot, lease or mount, and no blob that the
failed pull's (deleted) lease did not hold.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fixtures.images import (
    ARCH,
    Blob,
    TestImage,
    build_image,
    build_index,
    busybox_image,
    busybox_layer,
    canonical_json,
    layer_tar,
    push_image,
    random_bytes,
    sha256,
)
from fixtures.servers import ErrorServer, HangingServer

from runtimed import mediatypes
from runtimed.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from runtimed.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from runtimed.cli.output import human_size
from runtimed.cli.progress import PULL_WORDS, ProgressView
from runtimed.images.manifest import chain_ids
from runtimed.remotes import RegistryClient, static_credentials
from runtimed.wire import NAMESPACE_KEY

pytestmark = pytest.mark.root

REPO_ROOT = Path(__file__).resolve().parents[2]
ALICE = ("alice", "secret")
SERVICE_URI = "io.containerd.service.v1.images-service"
SNAPSHOTTERS = ("overlayfs", "native")


def unique(prefix: str) -> str:
    return f"{prefix}/{uuid.uuid4().hex[:10]}"


# -- driving runtimectl -------------------------------------------------------------------------


def runtimectl(
    daemon, *args: str, input: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNTIMED_")}
    return subprocess.run(
        [sys.executable, "-m", "runtimed.cli.main", "-a", daemon.address, *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
        cwd=REPO_ROOT,
        env=env,
    )


def ok(daemon, *args: str, **kwargs: Any) -> str:
    result = runtimectl(daemon, *args, **kwargs)
    assert result.returncode == 0, f"runtimectl {' '.join(args)}: {result.stderr}\n{daemon.log()[-4000:]}"
    return result.stdout


def fails(daemon, *args: str, **kwargs: Any) -> str:
    """runtimectl must fail like docker (exit 125, one line on stderr); returns that line."""
    result = runtimectl(daemon, *args, **kwargs)
    assert result.returncode == 125, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("runtimectl: "), result.stderr
    return lines[0]


# -- what the daemon holds ----------------------------------------------------------------------


@dataclass(frozen=True)
class Store:
    images: frozenset[str]
    content: frozenset[str]
    snapshots: frozenset[tuple[str, str, int]]  # (snapshotter, name, kind)
    leases: frozenset[str]
    mounts: tuple[str, ...]


def metadata(namespace: str = "default") -> list[tuple[str, str]]:
    return [(NAMESPACE_KEY, namespace)]


def store_of(daemon, namespace: str = "default") -> Store:
    with daemon.client(namespace) as client:
        md = metadata(namespace)
        content = content_pb2_grpc.ContentStub(client.channel)
        snapshots = snapshots_pb2_grpc.SnapshotsStub(client.channel)
        leases = leases_pb2_grpc.LeasesStub(client.channel)
        blobs = {
            i.digest for r in content.List(content_pb2.ListContentRequest(), metadata=md) for i in r.info
        }
        snaps = {
            (name, info.name, info.kind)
            for name in SNAPSHOTTERS
            for r in snapshots.List(snapshots_pb2.ListSnapshotsRequest(snapshotter=name), metadata=md)
            for info in r.info
        }
        held = {lease.id for lease in leases.List(leases_pb2.ListRequest(), metadata=md).leases}
        images = {image.name for image in client.images()}
    return Store(
        frozenset(images), frozenset(blobs), frozenset(snaps), frozenset(held), mounts_under(daemon.base)
    )


def mounts_under(path: Path) -> tuple[str, ...]:
    text = Path("/proc/self/mountinfo").read_text()
    return tuple(line for line in text.splitlines() if str(path) in line)


def ingests(daemon, namespace: str = "default") -> dict[str, int]:
    with daemon.client(namespace) as client:
        stub = content_pb2_grpc.ContentStub(client.channel)
        statuses = stub.ListStatuses(content_pb2.ListStatusesRequest(), metadata=metadata(namespace)).statuses
        return {s.ref: s.offset for s in statuses}


def content_info(daemon, digest: str, namespace: str = "default") -> Any:
    with daemon.client(namespace) as client:
        stub = content_pb2_grpc.ContentStub(client.channel)
        return stub.Info(content_pb2.InfoRequest(digest=digest), metadata=metadata(namespace)).info


def snapshot_info(daemon, name: str, snapshotter: str = "overlayfs", namespace: str = "default") -> Any:
    with daemon.client(namespace) as client:
        stub = snapshots_pb2_grpc.SnapshotsStub(client.channel)
        request = snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=name)
        return stub.Stat(request, metadata=metadata(namespace)).info


def assert_unchanged(daemon, before: Store, allowed_blobs: set[str] = frozenset()) -> None:
    """After a failed pull: nothing new but blobs the failed pull fetched (its lease is gone)."""
    after = store_of(daemon)
    assert after.images == before.images
    assert after.snapshots == before.snapshots
    assert after.leases == before.leases, "the pull's lease must be deleted"
    assert after.mounts == before.mounts == ()
    assert after.content - before.content <= allowed_blobs


@contextlib.contextmanager
def mounted_view(daemon, chain: str, snapshotter: str = "overlayfs") -> Iterator[Path]:
    """The root filesystem of a committed snapshot, mounted read-only on a temp directory."""
    key = f"view-{uuid.uuid4().hex[:8]}"
    target = daemon.base / key
    target.mkdir()
    with daemon.client() as client:
        stub = snapshots_pb2_grpc.SnapshotsStub(client.channel)
        request = snapshots_pb2.ViewSnapshotRequest(snapshotter=snapshotter, key=key, parent=chain)
        mounts = stub.View(request, metadata=metadata()).mounts
        try:
            for mount in mounts:
                subprocess.run(
                    ["mount", "-t", mount.type, "-o", ",".join(mount.options), mount.source, str(target)],
                    check=True,
                )
            try:
                yield target
            finally:
                for _ in mounts:
                    subprocess.run(["umount", str(target)], check=True)
        finally:
            stub.Remove(
                snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key), metadata=metadata()
            )
            target.rmdir()


# -- images -------------------------------------------------------------------------------------


def multi_layer_image() -> TestImage:
    """Three layers: busybox and many files; whiteouts of a file, a directory and an opaque
    directory; files changed and added on top."""
    base = {f"data/keep/{i:03}.txt": f"file {i}\n".encode() for i in range(400)}
    base |= {"data/gone/x.txt": b"x", "data/opaque/old.txt": b"old", "etc/hello": b"one\n"}
    middle = {f"data/more/{i:03}.bin": random_bytes(2048, seed=i) for i in range(200)}
    middle |= {"data/.wh.gone": b"", "data/opaque/.wh..wh..opq": b"", "data/opaque/new.txt": b"new"}
    top = {"etc/hello": b"two\n", "data/keep/.wh.000.txt": b""}
    layers = [layer_tar(base), layer_tar(middle, busybox=False), layer_tar(top, busybox=False)]
    return build_image(layers, cmd=("cat", "/etc/hello"))


async def push_to(registry, repository: str, image: TestImage, tag: str = "v1", **creds: Any) -> str:
    ref = registry.ref(repository, tag)
    credentials = static_credentials({registry.host: creds["auth"]}) if creds else None
    async with RegistryClient(credentials=credentials) as client:
        await push_image(client, ref, image)
    return ref


def top_chain(image: TestImage) -> str:
    return chain_ids(list(image.diff_ids))[-1]


# -- a registry that serves what it is told -----------------------------------------------------


class FakeRegistry:
    """Serves fixed manifests (by tag and digest) and blobs of one repository on 127.0.0.1.

    Blobs honour Range (206), so a resumed download shows as a Range request in `ranges`; blobs
    in `slow` are sent at `rate` bytes per second (None: full speed).
    """

    def __init__(self, repository: str, manifest: Blob, blobs: dict[str, bytes], tag: str = "v1") -> None:
        self.repository, self.manifest, self.blobs, self.tag = repository, manifest, blobs, tag
        self.slow: set[str] = set()
        self.rate: float | None = None
        self.ranges: list[tuple[str, str]] = []  # (digest, Range header)
        self.served: dict[str, int] = {}  # digest -> bytes sent
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.start()

    @property
    def ref(self) -> str:
        return f"{self.host}/{self.repository}:{self.tag}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._serve(body=True)

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def _serve(self, body: bool) -> None:
                prefix = f"/v2/{fake.repository}/"
                if self.path == "/v2/":
                    return self._send(200, b"{}", {"Content-Type": "application/json"}, body)
                if self.path in (
                    prefix + f"manifests/{fake.tag}",
                    prefix + f"manifests/{fake.manifest.digest}",
                ):
                    headers = {
                        "Content-Type": fake.manifest.descriptor.media_type,
                        "Docker-Content-Digest": fake.manifest.digest,
                    }
                    return self._send(200, fake.manifest.data, headers, body)
                digest = self.path.removeprefix(prefix + "blobs/")
                data = fake.blobs.get(digest) if self.path.startswith(prefix + "blobs/") else None
                if data is None:
                    error = {"errors": [{"code": "BLOB_UNKNOWN", "message": "unknown"}]}
                    return self._send(
                        404, json.dumps(error).encode(), {"Content-Type": "application/json"}, body
                    )
                start, status, headers = 0, 200, {"Content-Type": "application/octet-stream"}
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if match:
                    fake.ranges.append((digest, self.headers["Range"]))
                    start, status = int(match[1]), 206
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                self._send(status, data[start:], headers, body, digest=digest)

            def _send(self, status: int, data: bytes, headers: dict, body: bool, digest: str = "") -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not body:
                    return
                step = 64 * 1024
                with contextlib.suppress(OSError):  # the client (or the daemon) went away
                    for start in range(0, len(data), step):
                        self.wfile.write(data[start : start + step])
                        fake.served[digest] = fake.served.get(digest, 0) + min(step, len(data) - start)
                        if digest in fake.slow and fake.rate:
                            time.sleep(step / fake.rate)

        return Handler


@pytest.fixture
def fake_registry() -> Iterator[callable]:
    started: list[FakeRegistry] = []

    def make(*args: Any, **kwargs: Any) -> FakeRegistry:
        server = FakeRegistry(*args, **kwargs)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def config_file(base: Path, **service: Any) -> Path:
    lines = ["version = 1", f'[plugins."{SERVICE_URI}"]']
    lines += [f"{key} = {json.dumps(value)}" for key, value in service.items()]
    path = base / "runtimed-test.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def quick_daemon(daemon_factory, tmp_path):
    """A daemon whose registry timeouts are short (a hanging registry fails in seconds)."""
    return daemon_factory(config=config_file(tmp_path, connect_timeout=2, read_timeout=2)).start()


# -- the round trip -----------------------------------------------------------------------------


async def test_pull_push_pull_back_by_digest(daemon, registry):
    image = multi_layer_image()
    source = await push_to(registry, unique("pull/multi"), image)
    chains = chain_ids(list(image.diff_ids))

    out = ok(daemon, "pull", source)
    assert out.splitlines()[-1].startswith(f"Pulled {source} ")
    for layer in image.layers:
        assert f"{layer.digest[:19]}: Pull complete" in out  # non-tty: one line per step

    # What ctr would have written: gc refs, distribution source, uncompressed, snapshot refs.
    host, repository = source.split("/", 1)[0], source.split("/", 1)[1].rsplit(":", 1)[0]
    manifest = content_info(daemon, image.manifest.digest).labels
    assert manifest["containerd.io/gc.ref.content.config"] == image.config.digest
    for i, layer in enumerate(image.layers):
        assert manifest[f"containerd.io/gc.ref.content.l.{i}"] == layer.digest
        labels = content_info(daemon, layer.digest).labels
        assert labels["containerd.io/uncompressed"] == image.diff_ids[i]
        assert labels[f"containerd.io/distribution.source.{host}"] == repository
    config = content_info(daemon, image.config.digest).labels
    assert config["containerd.io/gc.ref.snapshot.overlayfs"] == chains[-1]
    store = store_of(daemon)
    assert {("overlayfs", chain, 3) for chain in chains} <= store.snapshots
    assert not [s for s in store.snapshots if s[2] != 3], "only committed snapshots remain"
    assert store.leases == frozenset() and store.mounts == ()
    assert ingests(daemon) == {}

    # The unpacked filesystem, whiteouts applied.
    with mounted_view(daemon, chains[-1]) as root:
        assert (root / "etc/hello").read_bytes() == b"two\n"
        assert not (root / "data/gone").exists()
        assert [p.name for p in (root / "data/opaque").iterdir()] == ["new.txt"]
        assert not (root / "data/keep/000.txt").exists() and (root / "data/keep/399.txt").exists()
        assert len(list((root / "data/more").iterdir())) == 200
        assert (root / "bin/busybox").stat().st_size == Path("/bin/busybox").stat().st_size

    # Push to another repository: the layers are mounted there, not uploaded again.
    target = registry.ref(unique("push/copy"), "v2")
    mark = registry.log_mark()
    out = ok(daemon, "push", source, target)
    assert (
        out.splitlines()[-1]
        == f"{target}: digest: {image.manifest.digest} size: {image.manifest.descriptor.size}"
    )
    requests = registry.requests(since=mark)
    mounts = [r for r in requests if r.method == "POST" and "mount=" in r.path]
    assert len(mounts) == len(image.layers) + 1 and all(r.status == 201 for r in mounts)
    assert not [r for r in requests if r.method in ("PATCH", "PUT") and "/blobs/uploads/" in r.path]
    assert "Mounted from another repository" in out

    # Pull it back by digest: same digest, and nothing is fetched or unpacked again.
    by_digest = target.rsplit(":", 1)[0] + "@" + image.manifest.digest
    out = ok(daemon, "pull", by_digest)
    assert out.count("Already exists") == 2 + len(image.layers)
    assert out.count("Already unpacked") == len(image.layers)
    images = {i.name: i for i in daemon.client().images()}
    assert images[by_digest].target.digest == images[source].target.digest == image.manifest.digest
    labels = content_info(daemon, image.layers[0].digest).labels
    sources = set(labels[f"containerd.io/distribution.source.{host}"].split(","))
    assert sources == {repository, target.split("/", 1)[1].rsplit(":", 1)[0]}


async def test_concurrent_pulls_unpack_each_layer_once(daemon, registry):
    image = multi_layer_image()
    ref = await push_to(registry, unique("pull/twice"), image)
    argv = [sys.executable, "-m", "runtimed.cli.main", "-a", daemon.address, "pull", "-q"]
    pulls = [subprocess.Popen([*argv, ref], stdout=subprocess.DEVNULL, cwd=REPO_ROOT) for _ in range(2)]
    for pull in pulls:
        assert pull.wait(timeout=120) == 0
    assert daemon.log().count('"layer applied"') == len(image.layers)
    assert ("overlayfs", top_chain(image), 3) in store_of(daemon).snapshots


async def test_pull_platforms_from_an_index(daemon, registry):
    other = "arm64" if ARCH != "arm64" else "amd64"
    native = busybox_image()
    foreign = build_image([layer_tar({"etc/arch": other.encode()}, busybox=False)], architecture=other)
    repository = unique("pull/index")
    async with RegistryClient() as client:
        for image in (native, foreign):
            await push_image(
                client, registry.ref(repository, image.manifest.digest.split(":")[1][:12]), image
            )
        index = build_index([native, foreign])
        ref = registry.ref(repository, "multi")
        await client.push_manifest(ref, index.descriptor, index.data)

    ok(daemon, "pull", "--platform", f"linux/{other}", ref)
    held = store_of(daemon)
    assert {foreign.manifest.digest, foreign.config.digest, index.digest} <= held.content
    assert native.manifest.digest not in held.content
    assert ("overlayfs", top_chain(foreign), 3) in held.snapshots
    assert ("overlayfs", top_chain(native), 3) not in held.snapshots
    image = daemon.client().image(ref)
    assert image.target.digest == index.digest and image.target.media_type == mediatypes.OCI_INDEX
    labels = content_info(daemon, index.digest).labels
    assert labels["containerd.io/gc.ref.content.m.0"] == native.manifest.digest
    assert labels["containerd.io/gc.ref.content.m.1"] == foreign.manifest.digest

    # Pushing needs all of an index's manifests, or one platform.
    copy = registry.ref(unique("push/index"), "v1")
    line = fails(daemon, "push", ref, copy)
    assert native.manifest.digest in line and "is not in the content store" in line
    last = ok(daemon, "push", "--platform", f"linux/{other}", ref, copy).splitlines()[-1]
    assert last == f"{copy}: digest: {foreign.manifest.digest} size: {len(foreign.manifest.data)}"

    # Default: the host's platform; --all-platforms fetches everything but unpacks only the host's.
    ok(daemon, "pull", "--all-platforms", ref)
    assert ok(daemon, "push", "-q", ref, copy).strip() == index.digest
    held = store_of(daemon)
    assert {native.manifest.digest, *native.blobs} <= held.content
    assert ("overlayfs", top_chain(native), 3) in held.snapshots

    # inspect shows the host's manifest; images shows the host's size.
    data = json.loads(ok(daemon, "inspect", ref))
    assert data["index"]["manifests"][1]["digest"] == foreign.manifest.digest
    assert data["manifest"]["config"]["digest"] == native.config.digest
    assert data["config"]["architecture"] == ARCH

    assert "no manifest for platform linux/s390x" in fails(daemon, "pull", "--platform", "linux/s390x", ref)


async def test_pull_into_native_without_unpack_then_quiet(daemon, registry):
    image = busybox_image("docker")
    ref = await push_to(registry, unique("pull/flags"), image)
    assert ok(daemon, "pull", "--no-unpack", ref) and store_of(daemon).snapshots == frozenset()
    assert ok(daemon, "pull", "-q", "--snapshotter", "native", ref) == ref + "\n"
    assert ("native", image.diff_ids[0], 3) in store_of(daemon).snapshots
    config = content_info(daemon, image.config.digest).labels
    assert config["containerd.io/gc.ref.snapshot.native"] == image.diff_ids[0]
    line = fails(daemon, "pull", "--snapshotter", "nope", ref)
    assert 'snapshotter "nope" not loaded' in line
    # A lone manifest must be for the platform asked for.
    line = fails(daemon, "pull", "--platform", "linux/s390x", ref)
    assert f"image is for platform linux/{ARCH}, not linux/s390x" in line
    ok(daemon, "pull", "-q", "--platform", f"linux/{ARCH}", ref)


# -- credentials ---------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["htpasswd", "token"])
async def test_pull_and_push_with_credentials(daemon, registry_factory, auth):
    secured = registry_factory(auth=auth)
    image = busybox_image()
    ref = await push_to(secured, unique("auth/app"), image, auth=ALICE)
    before = store_of(daemon)

    assert "authentication failed" in fails(daemon, "pull", ref)
    assert_unchanged(daemon, before)
    assert "authentication failed" in fails(daemon, "pull", "--user", "alice:wrong", ref)
    assert_unchanged(daemon, before)

    ok(daemon, "pull", "--user", "alice", "--password-stdin", ref, input="secret\n")
    assert ref in store_of(daemon).images
    target = secured.ref(unique("auth/copy"), "v1")
    assert "authentication failed" in fails(daemon, "push", ref, target)
    ok(daemon, "push", "--user", "alice:secret", ref, target)
    async with RegistryClient(credentials=static_credentials({secured.host: ALICE})) as client:
        _, desc = await client.resolve(target)
    assert desc.digest == image.manifest.digest


async def test_credentials_from_the_daemons_docker_config(daemon_factory, registry_factory, tmp_path):
    secured = registry_factory(auth="htpasswd")
    ref = await push_to(secured, unique("auth/config"), busybox_image(), auth=ALICE)
    docker_config = tmp_path / "docker.json"
    docker_config.write_text(
        json.dumps({"auths": {secured.host: {"username": "alice", "password": "secret"}}})
    )
    daemon = daemon_factory(config=config_file(tmp_path, docker_config=str(docker_config))).start()
    ok(daemon, "pull", ref)


# -- failures -----------------------------------------------------------------------------------


async def test_unknown_tag_and_repository(daemon, registry):
    repository = unique("pull/known")
    await push_to(registry, repository, busybox_image())
    before = store_of(daemon)
    line = fails(daemon, "pull", registry.ref(repository, "nope"))
    assert f"{registry.host}/{repository}:nope" in line and "not found" in line
    line = fails(daemon, "pull", registry.ref("no/such-repo", "v1"))
    assert f"{registry.host}/no/such-repo:v1" in line and "not found" in line
    assert "must be lowercase" in fails(daemon, "pull", "127.0.0.1:1/Bad:v1")
    assert_unchanged(daemon, before)


@pytest.mark.parametrize(("status", "words"), [(401, "authentication failed"), (500, "answered 500")])
def test_registry_answering_errors(quick_daemon, status, words):
    before = store_of(quick_daemon)
    with ErrorServer(status, "disk on fire") as server:
        line = fails(quick_daemon, "pull", f"{server.host}/team/app:v1")
    assert words in line and server.host in line
    assert_unchanged(quick_daemon, before)


def test_registry_that_hangs(quick_daemon):
    before = store_of(quick_daemon)
    with HangingServer() as server:
        started = time.monotonic()
        line = fails(quick_daemon, "pull", f"{server.host}/team/app:v1")
    assert time.monotonic() - started < 30
    assert "timed out" in line and server.host in line
    assert_unchanged(quick_daemon, before)


def descriptor_json(blob: Blob) -> dict[str, Any]:
    return {"mediaType": blob.descriptor.media_type, "digest": blob.digest, "size": len(blob.data)}


def corrupt(image: TestImage, *, blob: bytes | None = None, diff_id: str | None = None) -> tuple[Blob, dict]:
    """The image's manifest and blobs with its first layer replaced (blob) or its diff id wrong."""
    layer = image.layers[0]
    blobs = dict(image.blobs)
    if blob is not None:  # the descriptor's digest is honest, the bytes are not a valid layer
        layer = Blob.of(layer.descriptor.media_type, blob)
        blobs = {image.config.digest: image.config.data, layer.digest: blob}
    config = json.loads(image.config.data)
    if diff_id is not None:
        config["rootfs"]["diff_ids"][0] = diff_id
    config_blob = Blob.of(image.config.descriptor.media_type, canonical_json(config))
    blobs.pop(image.config.digest, None)
    blobs[config_blob.digest] = config_blob.data
    manifest = {
        "schemaVersion": 2,
        "mediaType": image.manifest.descriptor.media_type,
        "config": descriptor_json(config_blob),
        "layers": [descriptor_json(layer)],
    }
    return Blob.of(image.manifest.descriptor.media_type, canonical_json(manifest)), blobs


def test_layer_whose_bytes_do_not_match_its_digest(daemon, fake_registry):
    image = busybox_image()
    layer = image.layers[0]
    blobs = dict(image.blobs)
    blobs[layer.digest] = layer.data[:-10] + b"0123456789"  # same size, other bytes
    server = fake_registry("bad/digest", image.manifest, blobs)
    before = store_of(daemon)
    line = fails(daemon, "pull", server.ref)
    assert "digest mismatch" in line and layer.digest in line
    assert_unchanged(daemon, before, allowed_blobs={image.manifest.digest, image.config.digest})
    assert layer.digest not in store_of(daemon).content
    assert ingests(daemon) == {}, "a blob known to be wrong is not kept for a resume"


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("not-gzip", "invalid argument"),
        ("truncated-gzip", "invalid argument"),
        ("wrong-diff-id", "wrong diff id calculated on extraction"),
    ],
)
def test_layers_that_cannot_be_unpacked(daemon, fake_registry, case, words):
    image = busybox_image()
    if case == "not-gzip":
        manifest, blobs = corrupt(image, blob=b"this is not gzip at all" * 100)
    elif case == "truncated-gzip":
        manifest, blobs = corrupt(image, blob=gzip.compress(busybox_layer())[:300_000])
    else:
        manifest, blobs = corrupt(image, diff_id=sha256(b"something else"))
    server = fake_registry(unique("bad/layer"), manifest, blobs)
    before = store_of(daemon)
    line = fails(daemon, "pull", server.ref)
    assert words in line and f'unpacking image "{server.ref}" layer sha256:' in line
    assert_unchanged(daemon, before, allowed_blobs={manifest.digest, *blobs})
    assert not list(Path(daemon.root).glob("io.containerd.snapshotter.v1.overlayfs/snapshots/new-*"))


# -- a daemon killed in the middle of a pull ----------------------------------------------------


def test_kill_during_pull_then_resume(daemon, fake_registry):
    big = layer_tar({"big/blob.bin": random_bytes(24 << 20, seed=7)}, busybox=False)
    image = build_image([busybox_layer(), big], compress=False)  # uncompressed: bytes on the wire = size
    layer = image.layers[1]
    server = fake_registry(unique("slow/app"), image.manifest, image.blobs)
    server.slow, server.rate = {layer.digest}, 6 << 20  # about 4 s for the big layer

    pull = subprocess.Popen(
        [sys.executable, "-m", "runtimed.cli.main", "-a", daemon.address, "pull", server.ref],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    ref = f"layer-{layer.digest}"
    deadline = time.monotonic() + 30
    while ingests(daemon).get(ref, 0) < 6 << 20:
        assert time.monotonic() < deadline, "the slow layer never got going"
        time.sleep(0.05)
    daemon.kill()
    _, err = pull.communicate(timeout=30)
    assert pull.returncode == 125, err

    daemon.start()
    # Consistent: no image, nothing half-made, the partial layer kept for a resume.
    store = store_of(daemon)
    assert server.ref not in store.images
    assert not [s for s in store.snapshots if s[2] != 3], store.snapshots
    assert store.mounts == ()
    offset = ingests(daemon)[ref]
    assert offset > 0

    server.rate = None
    ok(daemon, "pull", server.ref)
    assert (layer.digest, f"bytes={offset}-") in server.ranges, server.ranges
    store = store_of(daemon)
    assert server.ref in store.images
    assert ("overlayfs", top_chain(image), 3) in store.snapshots
    assert ingests(daemon) == {}
    assert not [s for s in store.snapshots if s[2] != 3]


def test_client_going_away_cancels_the_pull(daemon, fake_registry):
    big = layer_tar({"big/blob.bin": random_bytes(16 << 20, seed=8)}, busybox=False)
    image = build_image([busybox_layer(), big], compress=False)
    layer = image.layers[1]
    server = fake_registry(unique("slow/cancel"), image.manifest, image.blobs)
    server.slow, server.rate = {layer.digest}, 4 << 20
    before = store_of(daemon)

    pull = subprocess.Popen(
        [sys.executable, "-m", "runtimed.cli.main", "-a", daemon.address, "pull", server.ref],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO_ROOT,
    )
    ref = f"layer-{layer.digest}"
    deadline = time.monotonic() + 30
    while ingests(daemon).get(ref, 0) < 3 << 20:
        assert time.monotonic() < deadline, "the slow layer never got going"
        time.sleep(0.05)
    pull.send_signal(signal.SIGINT)  # ^C: the CLI goes away, the daemon cancels the pull
    assert pull.wait(timeout=30) == 130

    deadline = time.monotonic() + 10
    while store_of(daemon).leases and time.monotonic() < deadline:
        time.sleep(0.1)
    after = store_of(daemon)
    assert after.leases == before.leases and after.images == before.images and after.mounts == ()
    assert not [s for s in after.snapshots if s[2] != 3], "no active snapshot is left"
    offset = ingests(daemon)[ref]
    assert offset > 0, "what arrived is kept for a resume"

    server.rate = None
    ok(daemon, "pull", server.ref)
    assert (layer.digest, f"bytes={offset}-") in server.ranges


# -- tag, images, inspect, rmi ------------------------------------------------------------------


async def test_tag_images_inspect_rmi(daemon, registry):
    image = multi_layer_image()
    ref = await push_to(registry, unique("cli/app"), image)
    ok(daemon, "pull", "-q", ref)

    ok(daemon, "tag", ref, "example.org/team/app:v2")
    ok(daemon, "images", "tag", ref, "busybox")  # normalised like docker
    names = {i.name for i in daemon.client().images()}
    assert {"example.org/team/app:v2", "docker.io/library/busybox:latest"} <= names
    other = busybox_image()
    other_ref = await push_to(registry, unique("cli/other"), other)
    ok(daemon, "pull", "-q", other_ref)
    ok(daemon, "tag", other_ref, "busybox")  # an existing name is re-pointed
    assert daemon.client().image("docker.io/library/busybox:latest").target.digest == other.manifest.digest

    rows = [line.split() for line in ok(daemon, "images").splitlines()]
    assert rows[0] == ["REPOSITORY", "TAG", "DIGEST", "SIZE", "CREATED"]
    by_name = {(row[0], row[1]): row for row in rows[1:]}
    size = image.config.descriptor.size + sum(layer.descriptor.size for layer in image.layers)
    assert by_name[("example.org/team/app", "v2")][2] == image.manifest.digest
    assert by_name[("example.org/team/app", "v2")][3] == human_size(size)
    assert ("busybox", "latest") in by_name
    assert ok(daemon, "images", "-q").split() == sorted(names | {other_ref})
    listed = {item["name"]: item for item in json.loads(ok(daemon, "images", "--format", "json"))}
    assert listed["example.org/team/app:v2"]["size"] == size

    data = json.loads(ok(daemon, "inspect", "busybox"))
    assert data["image"]["name"] == "docker.io/library/busybox:latest"
    assert data["manifest"]["layers"][0]["digest"] == other.layers[0].digest
    assert data["config"]["rootfs"]["diff_ids"] == list(other.diff_ids)
    assert 'image "nope"' in fails(daemon, "inspect", "nope")

    assert ok(daemon, "rmi", "busybox", "example.org/team/app:v2").split() == [
        "busybox",
        "example.org/team/app:v2",
    ]
    assert "not found" in fails(daemon, "rmi", "busybox")
    assert {i.name for i in daemon.client().images()} == {ref, other_ref}


def test_progress_view_draws_docker_like_lines():
    class P:
        def __init__(self, event, name="", offset=0, total=0, message=""):
            self.event, self.name, self.offset, self.total, self.message = event, name, offset, total, message

    digest_a, digest_b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    out = io.StringIO()
    view = ProgressView(PULL_WORDS, out=out, tty=True)
    for progress in (
        P("fetching", digest_a, 0, 45_600_000),
        P("fetching", digest_b, 0, 1000),
        P("fetching", digest_a, 12_300_000, 45_600_000),
        P("fetched", digest_b, 1000, 1000),
    ):
        view.update(progress)
    text = out.getvalue()
    assert "sha256:aaaaaaaaaaaa: Downloading [" + "=" * 12 + ">" + " " * 37 + "] 12.3MB/45.6MB" in text
    assert "\x1b[2A\r\x1b[2Ksha256:aaaaaaaaaaaa: Downloading" in text  # redrawn in place
    assert "\x1b[1A\r\x1b[2Ksha256:bbbbbbbbbbbb: Download complete" in text

    plain = io.StringIO()
    view = ProgressView(PULL_WORDS, out=plain, tty=False)
    for offset in (0, 10, 20):
        view.update(P("fetching", digest_a, offset, 100))
    view.update(P("fetched", digest_a, 100, 100))
    assert (
        plain.getvalue()
        == "sha256:aaaaaaaaaaaa: Downloading (100B)\nsha256:aaaaaaaaaaaa: Download complete\n"
    )
