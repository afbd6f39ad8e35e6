"""The registry going away in the middle of a pull.

* a real docker-registry behind a throttling TCP proxy of ours (the stable address the pull
  names): while a 24 MiB layer streams, the registry process is killed by its pid; the pull
  fails UNAVAILABLE naming the registry; nothing partial is visible (no image, no layer among
  the content, the store intact); what arrived is kept as an ingest; the registry comes back
  (same storage, new port behind the same proxy address) and a retry resumes the layer with a
  Range request (206) and succeeds; the image runs.
* a server of our own that closes the connection in the middle of a blob: same error, same
  guarantees, and the retry asks for the rest with a Range request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import pytest
from crash.invariants import Stubs, check_store, cleanup, leaks, md, run_from_image
from fixtures.images import build_image, busybox_layer, layer_tar, push_image, random_bytes
from fixtures.tasks import reap_leftovers

from runtimed.api.containerd.services.content.v1 import content_pb2
from runtimed.api.containerd.services.images.v1 import images_pb2
from runtimed.api.runtimed.services.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from runtimed.remotes import RegistryClient

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (overlay mounts, runc)"),
]


class ThrottlingProxy:
    """127.0.0.1:<port> -> 127.0.0.1:<upstream>, registry-to-client bytes at `rate` per second
    (None: full speed). When the upstream end closes, the client's end is closed too."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.rate: float | None = None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, throttled: bool) -> None:
        step = 64 * 1024
        try:
            while data := source.recv(step):
                sink.sendall(data)
                if throttled and self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
        for end in self._sockets:
            with contextlib.suppress(OSError):
                end.close()


def pull(daemon, namespace: str, ref: str) -> str:
    stubs = Stubs(daemon.address)
    try:
        transfer = transfer_pb2_grpc.TransferStub(stubs.channel)
        request = transfer_pb2.PullRequest(
            reference=ref, unpack=True, registry=transfer_pb2.RegistryOptions(plain_http=True)
        )
        last = None
        for progress in transfer.Pull(request, metadata=md(namespace), timeout=120):
            last = progress
        return last.image.name
    finally:
        stubs.close()


def ingest_offsets(daemon, namespace: str) -> dict[str, int]:
    stubs = Stubs(daemon.address)
    try:
        listing = stubs.content.ListStatuses(content_pb2.ListStatusesRequest(), metadata=md(namespace))
        return {s.ref: s.offset for s in listing.statuses}
    finally:
        stubs.close()


def visible(daemon, namespace: str) -> tuple[set[str], set[str]]:
    """(content digests, image names) the namespace sees."""
    stubs = Stubs(daemon.address)
    try:
        content = {
            i.digest
            for r in stubs.content.List(content_pb2.ListContentRequest(), metadata=md(namespace))
            for i in r.info
        }
        images = {
            i.name for i in stubs.images.List(images_pb2.ListImagesRequest(), metadata=md(namespace)).images
        }
        return content, images
    finally:
        stubs.close()


def big_image():
    big = layer_tar({"big/blob.bin": random_bytes(24 << 20, seed=11)}, busybox=False)
    return build_image([busybox_layer(), big], compress=False, cmd=("true",))  # bytes on the wire = size


def wait_for_ingest(daemon, namespace: str, ref: str, least: int) -> None:
    deadline = time.monotonic() + 30
    while ingest_offsets(daemon, namespace).get(ref, 0) < least:
        assert time.monotonic() < deadline, f"{ref} never reached {least} bytes"
        time.sleep(0.02)


def assert_failed_cleanly(daemon, namespace: str, error: grpc.RpcError, host: str, image, ref: str) -> int:
    print(error.code(), error.details())
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    assert host in error.details(), "the error names the registry"
    problems = check_store(daemon)
    assert not problems, "\n".join(problems)
    content, images = visible(daemon, namespace)
    assert image.layers[1].digest not in content, "a partial layer is visible"
    assert ref not in images
    offset = ingest_offsets(daemon, namespace).get(f"layer-{image.layers[1].digest}", 0)
    assert 0 < offset < image.layers[1].descriptor.size, "what arrived is kept for a resume"
    return offset


@pytest.fixture
def proxy() -> Iterator[Any]:
    started: list[ThrottlingProxy] = []

    def make(upstream: int) -> ThrottlingProxy:
        started.append(ThrottlingProxy(upstream))
        return started[-1]

    yield make
    for p in started:
        p.stop()


def test_registry_killed_mid_blob_then_back(daemon, registry_factory, proxy, tmp_path):
    reg = registry_factory()
    image = big_image()
    asyncio.run(_push(reg.ref("gone/app", "v1"), image))
    front = proxy(reg.port)
    front.rate = 6 << 20  # about 4 s for the big layer
    ref = f"{front.host}/gone/app:v1"
    namespace = "gone"
    failure: dict[str, grpc.RpcError] = {}

    def run() -> None:
        try:
            pull(daemon, namespace, ref)
        except grpc.RpcError as exc:
            failure["error"] = exc

    puller = threading.Thread(target=run)
    puller.start()
    wait_for_ingest(daemon, namespace, f"layer-{image.layers[1].digest}", 4 << 20)
    reg._kill()  # by its pid: the registry process goes away mid-blob
    puller.join(60)
    assert "error" in failure, "the pull did not fail"
    offset = assert_failed_cleanly(daemon, namespace, failure["error"], front.host, image, ref)

    reg.start()  # the same storage, back on a new port behind the same address
    front.upstream, front.rate = reg.port, None
    mark = reg.log_mark()
    assert pull(daemon, namespace, ref) == ref
    blob = f"/v2/gone/app/blobs/{image.layers[1].digest}"
    resumed = [r for r in reg.requests(since=mark) if r.path == blob]
    assert resumed and all(r.status == 206 for r in resumed), (offset, resumed)
    problems = check_store(daemon)
    assert not problems, "\n".join(problems)
    assert run_from_image(daemon, namespace, ref, tmp_path) == 0
    cleanup(daemon)
    found = leaks(daemon)
    reap_leftovers(daemon.state, [])
    assert not found, found


async def _push(ref: str, image) -> None:
    async with RegistryClient() as client:
        await push_image(client, ref, image)


class CuttingRegistry:
    """Serves one image; the first GET of `cut` sends half the blob and closes the connection."""

    def __init__(self, repository: str, image) -> None:
        self.repository, self.image = repository, image
        self.blobs = {blob.digest: blob.data for blob in (image.config, *image.layers)}
        self.cut = image.layers[1].digest
        self.cuts = 1
        self.ranges: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                prefix = f"/v2/{fake.repository}/"
                manifest = fake.image.manifest
                if self.path == "/v2/":
                    return self._send(200, b"{}", "application/json", body)
                if self.path in (prefix + "manifests/v1", prefix + f"manifests/{manifest.digest}"):
                    return self._send(
                        200, manifest.data, manifest.descriptor.media_type, body, manifest.digest
                    )
                digest = self.path.removeprefix(prefix + "blobs/")
                data = fake.blobs.get(digest)
                if data is None:
                    error = json.dumps({"errors": [{"code": "BLOB_UNKNOWN", "message": "unknown"}]}).encode()
                    return self._send(404, error, "application/json", body)
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if match:
                    fake.ranges.append(self.headers["Range"])
                    start = int(match[1])
                self.send_response(206 if match else 200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data) - start))
                if match:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                payload = data[start:]
                if digest == fake.cut and fake.cuts > 0:
                    fake.cuts -= 1
                    payload = payload[: len(payload) // 2]
                    with contextlib.suppress(OSError):
                        self.wfile.write(payload)
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                with contextlib.suppress(OSError):
                    self.wfile.write(payload)

            def _send(self, status: int, data: bytes, media_type: str, body: bool, digest: str = "") -> None:
                self.send_response(status)
                self.send_header("Content-Type", media_type)
                self.send_header("Content-Length", str(len(data)))
                if digest:
                    self.send_header("Docker-Content-Digest", digest)
                self.end_headers()
                if body:
                    self.wfile.write(data)

        return Handler


def test_connection_closed_mid_blob_then_retry(daemon, tmp_path):
    image = big_image()
    server = CuttingRegistry("cut/app", image)
    ref = f"{server.host}/cut/app:v1"
    namespace = "cut"
    try:
        with pytest.raises(grpc.RpcError) as failure:
            pull(daemon, namespace, ref)
        assert_failed_cleanly(daemon, namespace, failure.value, server.host, image, ref)
        assert pull(daemon, namespace, ref) == ref
        assert server.ranges and server.ranges[-1].startswith("bytes="), server.ranges
        problems = check_store(daemon)
        assert not problems, "\n".join(problems)
    finally:
        server.stop()
    cleanup(daemon)
    found = leaks(daemon)
    reap_leftovers(daemon.state, [])
    assert not found, found
