"""The registry client (runtimed.remotes) against a real docker-registry and misbehaving servers.

No mocks: the registry is Debian's docker-registry (tests/fixtures/registry.py), the odd servers
are real sockets on 127.0.0.1 (tests/fixtures/servers.py). Requests are counted from the
registry's access log.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from pathlib import Path

import pytest
from fixtures.images import (
    Blob,
    build_image,
    build_index,
    busybox_image,
    layer_tar,
    push_image,
    random_bytes,
)
from fixtures.registry import Registry, free_port
from fixtures.servers import ErrorServer, FullBacklogServer, HangingServer, RedirectServer, StaticServer

from runtimed import mediatypes
from runtimed.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Unavailable
from runtimed.reference import parse
from runtimed.remotes import (
    DockerConfig,
    PushResult,
    RegistryClient,
    file_source,
    new_digester,
    parse_challenges,
    static_credentials,
)
from runtimed.types import Descriptor

ALICE = {"alice": "secret"}


def unique(prefix: str = "test") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:10]}"


def blob_of(data: bytes, media_type: str = mediatypes.OCI_LAYER) -> Descriptor:
    return Descriptor(media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


async def fetch_all(client: RegistryClient, ref: str, desc: Descriptor) -> bytes:
    chunks: list[bytes] = []
    await client.fetch_to(ref, desc, chunks.append)
    return b"".join(chunks)


def blob_path(registry: Registry, digest: str) -> Path:
    """Where docker-registry's filesystem driver keeps a blob's bytes."""
    hexdigest = digest.split(":", 1)[1]
    return registry.data_dir / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


@pytest.fixture
async def client():
    async with RegistryClient() as c:
        yield c


@pytest.fixture
async def pushed(registry, client):
    """The busybox image pushed to a fresh repository of the session registry: (ref, image)."""
    ref = registry.ref(unique("busybox"), "v1")
    image = busybox_image()
    await push_image(client, ref, image)
    return ref, image


# --- resolve -----------------------------------------------------------------------------------


async def test_resolve_tag_to_digest(pushed, client):
    ref, image = pushed
    name, desc = await client.resolve(ref)
    assert name == ref
    assert (desc.digest, desc.size, desc.media_type) == (
        image.descriptor.digest,
        image.descriptor.size,
        mediatypes.OCI_MANIFEST,
    )


async def test_resolve_by_digest_and_by_tag_and_digest(pushed, client):
    ref, image = pushed
    name, desc = await client.resolve(parse(ref).with_digest(image.descriptor.digest))
    assert desc.digest == image.descriptor.digest
    assert name.endswith(f":v1@{image.descriptor.digest}")
    by_digest = f"{parse(ref).name}@{image.descriptor.digest}"
    assert (await client.resolve(by_digest))[1].digest == image.descriptor.digest


async def test_resolve_docker_schema2_and_index(registry, client):
    repo = unique("multi")
    docker = build_image(flavour="docker")
    await push_image(client, registry.ref(repo, "docker"), docker)
    _, desc = await client.resolve(registry.ref(repo, "docker"))
    assert desc.media_type == mediatypes.DOCKER_MANIFEST

    arm = build_image(architecture="arm64")
    amd = build_image(architecture="amd64")
    for image in (arm, amd):
        await push_image(client, registry.ref(repo, image.descriptor.digest[7:19]), image)
    index = build_index([amd, arm])
    await client.push_manifest(registry.ref(repo, "multi"), index.descriptor, index.data)
    _, desc = await client.resolve(registry.ref(repo, "multi"))
    assert (desc.media_type, desc.digest) == (mediatypes.OCI_INDEX, index.digest)
    assert json.loads(await client.fetch_bytes(registry.ref(repo, "multi"), desc))["manifests"][1][
        "platform"
    ] == {
        "architecture": "arm64",
        "os": "linux",
    }


async def test_resolve_unknown_tag_and_repository_are_not_found(pushed, registry, client):
    ref, _ = pushed
    with pytest.raises(NotFound) as info:
        await client.resolve(parse(ref).with_tag("nope"))
    assert str(parse(ref).with_tag("nope")) in str(info.value)
    missing = registry.ref("no/such/repo", "v1")
    with pytest.raises(NotFound, match=missing):
        await client.resolve(missing)


async def test_resolve_falls_back_to_get_and_checks_the_digest(pushed, client):
    """HEAD answers without Docker-Content-Digest (or refused): resolve GETs and hashes the body."""
    ref, image = pushed
    repository = parse(ref).repository
    routes = {f"/v2/{repository}/manifests/v1": image.manifest.data}
    with StaticServer(routes, content_type=mediatypes.OCI_MANIFEST) as web:
        _, desc = await client.resolve(f"{web.host}/{repository}:v1")
        assert (desc.digest, desc.size, desc.media_type) == (
            image.descriptor.digest,
            image.descriptor.size,
            mediatypes.OCI_MANIFEST,
        )
        assert [m for m, _ in web.requests] == ["HEAD", "GET"]

    # A registry whose Docker-Content-Digest does not match the body it sends.
    other = "sha256:" + "0" * 64
    lying = {"Docker-Content-Digest": other}
    with StaticServer(routes, content_type="application/json", headers=lying, head=False) as web:
        expected = pytest.raises(FailedPrecondition, match=f"sent Docker-Content-Digest {other}")
        with expected:
            await client.resolve(f"{web.host}/{repository}:v1")
    # A reference pinned to a digest that the body does not have.
    routes = {f"/v2/{repository}/manifests/{other}": image.manifest.data}
    with (
        StaticServer(routes, content_type="application/json", head=False) as web,
        pytest.raises(FailedPrecondition, match=f"sent a manifest with digest {image.descriptor.digest}"),
    ):
        await client.resolve(f"{web.host}/{repository}@{other}")


# --- fetch -------------------------------------------------------------------------------------


async def test_fetch_verifies_and_returns_identical_bytes(pushed, client):
    ref, image = pushed
    layer = image.layers[0]
    seen: list[int] = []
    chunks: list[bytes] = []

    async def write(chunk: bytes) -> None:  # async writers work too
        chunks.append(chunk)

    written = await client.fetch_to(ref, layer.descriptor, write, progress=seen.append)
    assert written == layer.descriptor.size and b"".join(chunks) == layer.data
    assert seen[-1] == layer.descriptor.size and seen == sorted(seen)
    manifest = await client.fetch_bytes(ref, image.descriptor)
    assert manifest == image.manifest.data
    assert await client.fetch_bytes(ref, image.config.descriptor) == image.config.data


async def test_wrong_size_expectation_fails_at_the_end(pushed, client):
    ref, image = pushed
    layer = image.layers[0].descriptor
    short = Descriptor(layer.media_type, layer.digest, layer.size - 1)
    with pytest.raises(FailedPrecondition, match="size mismatch") as info:
        await fetch_all(client, ref, short)
    assert layer.digest in str(info.value)


async def test_unknown_digest_is_not_found_naming_it(pushed, client):
    ref, _ = pushed
    wrong = blob_of(b"never pushed")
    with pytest.raises(NotFound) as info:
        await fetch_all(client, ref, wrong)
    assert wrong.digest in str(info.value) and "BLOB_UNKNOWN" in str(info.value)


async def test_corrupted_blob_is_detected_after_the_last_chunk(registry, client):
    """The registry serves other bytes under the digest (storage corruption): nothing gets committed."""
    ref = registry.ref(unique("corrupt"))
    data = random_bytes(300_000, seed=1)
    desc = blob_of(data)
    await client.push_blob(ref, desc, data)
    path = blob_path(registry, desc.digest)
    path.write_bytes(b"X" + path.read_bytes()[1:])  # same size, one byte changed

    committed = False
    received = 0
    with pytest.raises(FailedPrecondition) as info:
        async with client.fetch(ref, desc) as stream:
            async for chunk in stream:
                received += len(chunk)
            committed = True
    assert not committed and received == desc.size  # every byte came; the check came last
    message = str(info.value)
    assert f"digest mismatch: expected {desc.digest}, got sha256:" in message
    assert parse(ref).name in message


async def test_parallel_fetches_share_a_small_pool(registry):
    ref = registry.ref(unique("parallel"))
    blobs = [random_bytes(200_000, seed=n) for n in range(12)]
    async with RegistryClient(max_connections=3) as client:
        for data in blobs:
            await client.push_blob(ref, blob_of(data), data)
        results = await asyncio.gather(*(fetch_all(client, ref, blob_of(data)) for data in blobs))
    assert results == blobs


# --- resume with Range -------------------------------------------------------------------------


async def test_range_resume_completes_an_interrupted_download(registry, client):
    ref = registry.ref(unique("resume"))
    data = random_bytes(3 * 1024 * 1024 + 17, seed=2)
    desc = blob_of(data)
    await client.push_blob(ref, desc, data)

    # A first download that stops part-way (the daemon died, the connection broke).
    part = bytearray()
    async with client.fetch(ref, desc) as stream:
        async for chunk in stream:
            part += chunk
            if len(part) >= 1_000_000:
                break
    digester = new_digester(desc.digest)
    digester.update(bytes(part))

    mark = registry.log_mark()
    rest = bytearray()
    await client.fetch_to(ref, desc, rest.extend, offset=len(part), digester=digester)
    assert bytes(part + rest) == data
    assert [(r.method, r.status) for r in registry.requests(mark, parse(ref).repository)] == [("GET", 206)]

    # The digester must hold the prefix: a wrong one is caught at the end.
    wrong = new_digester(desc.digest)
    wrong.update(b"\0" * len(part))
    with pytest.raises(FailedPrecondition, match="digest mismatch"):
        await client.fetch_to(ref, desc, lambda _: None, offset=len(part), digester=wrong)
    with pytest.raises(InvalidArgument, match="needs the digester"):
        await client.fetch_to(ref, desc, lambda _: None, offset=len(part))


async def test_range_resume_when_the_server_ignores_range(client):
    data = random_bytes(500_000, seed=3)
    desc = blob_of(data)
    with StaticServer({f"/v2/app/blobs/{desc.digest}": data}) as web:
        ref = f"{web.host}/app:latest"
        rest = bytearray()
        digester = new_digester(desc.digest)
        digester.update(data[:123_456])
        await client.fetch_to(ref, desc, rest.extend, offset=123_456, digester=digester)
        assert bytes(rest) == data[123_456:]
        # Nothing left to fetch: only the check, no request.
        before = len(web.requests)
        full = new_digester(desc.digest)
        full.update(data)
        assert await client.fetch_to(ref, desc, lambda _: None, offset=len(data), digester=full) == 0
        assert len(web.requests) == before


# --- push --------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["bytes", "file"])
async def test_push_monolithic_then_pull_by_digest(registry, client, tmp_path, source):
    ref = registry.ref(unique("mono"))
    data = random_bytes(2 * 1024 * 1024, seed=4)
    desc = blob_of(data)
    payload = data
    if source == "file":
        (tmp_path / "blob").write_bytes(data)
        payload = file_source(tmp_path / "blob", chunk_size=100_000)
    mark = registry.log_mark()
    assert await client.push_blob(ref, desc, payload) == PushResult.UPLOADED
    methods = [r.method for r in registry.requests(mark, parse(ref).repository)]
    assert methods == ["HEAD", "POST", "PUT"]  # exists?, open the upload, one PUT with the body
    assert await fetch_all(client, f"{parse(ref).name}@{desc.digest}", desc) == data


async def test_push_chunked_then_pull_by_digest(registry, tmp_path):
    ref = registry.ref(unique("chunked"))
    data = random_bytes(3 * 256 * 1024 + 1000, seed=5)
    desc = blob_of(data)
    (tmp_path / "blob").write_bytes(data)
    sent: list[int] = []
    async with RegistryClient(chunked_upload_threshold=512 * 1024, upload_chunk_size=256 * 1024) as client:
        mark = registry.log_mark()
        result = await client.push_blob(
            ref, desc, file_source(tmp_path / "blob", 50_000), progress=sent.append
        )
        assert result == PushResult.UPLOADED
        requests = registry.requests(mark, parse(ref).repository)
        assert [r.method for r in requests] == ["HEAD", "POST", "PATCH", "PATCH", "PATCH", "PATCH", "PUT"]
        assert all(r.status == 202 for r in requests if r.method == "PATCH")
        assert sent[-1] == desc.size
        assert await fetch_all(client, ref, desc) == data


async def test_existing_blob_is_not_uploaded_again(pushed, registry, client):
    ref, image = pushed
    layer = image.layers[0]
    mark = registry.log_mark()
    assert await client.push_blob(ref, layer.descriptor, layer.data) == PushResult.EXISTS
    assert [(r.method, r.status) for r in registry.requests(mark, parse(ref).repository)] == [("HEAD", 200)]


async def test_cross_repository_mount(pushed, registry, client):
    ref, image = pushed
    layer = image.layers[0]
    target = registry.ref(unique("mounted"))
    mark = registry.log_mark()
    assert await client.push_blob(target, layer.descriptor, layer.data, mount_from=ref) == PushResult.MOUNTED
    requests = registry.requests(mark, parse(target).repository)
    assert [(r.method, r.status) for r in requests] == [("HEAD", 404), ("POST", 201)]
    assert "mount=" in requests[1].path and "from=" in requests[1].path
    assert await fetch_all(client, target, layer.descriptor) == layer.data


async def test_failed_mount_falls_back_to_upload(registry, client):
    data = b"only pushed here"
    desc = blob_of(data)
    elsewhere = registry.ref(unique("empty"))  # does not have the blob
    target = registry.ref(unique("target"))
    assert await client.push_blob(target, desc, data, mount_from=elsewhere) == PushResult.UPLOADED
    assert await fetch_all(client, target, desc) == data


async def test_push_manifest_by_tag_and_by_digest(registry, client):
    repo = unique("manifests")
    image = build_image([layer_tar({"etc/hello": b"hi\n"}, busybox=False)])
    for blob in (image.config, *image.layers):
        await client.push_blob(registry.ref(repo), blob.descriptor, blob.data)
    by_digest = f"{registry.host}/{repo}@{image.descriptor.digest}"
    assert (
        await client.push_manifest(by_digest, image.descriptor, image.manifest.data)
        == image.descriptor.digest
    )
    with pytest.raises(NotFound):
        await client.resolve(registry.ref(repo, "v1"))  # pushed by digest only: no tag yet
    await client.push_manifest(registry.ref(repo, "v1"), image.descriptor, image.manifest.data)
    assert (await client.resolve(registry.ref(repo, "v1")))[1].digest == image.descriptor.digest
    assert await client.exists(registry.ref(repo), image.descriptor)


async def test_push_refuses_data_that_does_not_match_the_descriptor(registry, client, tmp_path):
    ref = registry.ref(unique("liar"))
    desc = blob_of(b"the real content")
    with pytest.raises(InvalidArgument, match="but the descriptor says"):
        await client.push_blob(ref, desc, b"other content!!!")
    (tmp_path / "blob").write_bytes(b"other content!!!")  # same size, other bytes, from a stream
    with pytest.raises(FailedPrecondition, match="the source has"):
        await client.push_blob(ref, desc, file_source(tmp_path / "blob"))
    assert not await client.exists(ref, desc)
    manifest = Blob.of(mediatypes.OCI_MANIFEST, b"{}")
    with pytest.raises(InvalidArgument, match="but the descriptor says"):
        await client.push_manifest(ref, manifest.descriptor, b"{ }")


async def test_manifest_referring_to_missing_blobs_is_refused(registry, client):
    image = build_image([layer_tar({"x": b"y"}, busybox=False)])
    with pytest.raises(InvalidArgument) as info:
        await client.push_manifest(registry.ref(unique("incomplete")), image.descriptor, image.manifest.data)
    assert "MANIFEST_BLOB_UNKNOWN" in str(info.value)


# --- authentication ----------------------------------------------------------------------------


async def test_basic_auth(registry_factory):
    reg = registry_factory(auth="htpasswd", users=ALICE)
    ref = reg.ref(unique())
    async with RegistryClient(credentials=static_credentials({reg.host: ("alice", "secret")})) as client:
        await push_image(client, ref, busybox_image())
        assert (await client.resolve(ref))[1].digest == busybox_image().descriptor.digest


async def test_basic_auth_with_wrong_or_missing_credentials(registry_factory):
    reg = registry_factory(auth="htpasswd", users=ALICE)
    ref = reg.ref(unique())
    async with RegistryClient(credentials=static_credentials({reg.host: ("alice", "wrong")})) as client:
        with pytest.raises(PermissionDenied) as info:
            await client.resolve(ref)
        assert f"authentication failed for {reg.host}" in str(info.value)
    async with RegistryClient() as client:
        with pytest.raises(PermissionDenied, match=f"authentication failed for {reg.host}"):
            await client.resolve(ref)


async def test_basic_auth_from_docker_config(registry_factory, tmp_path, monkeypatch):
    reg = registry_factory(auth="htpasswd", users={"bob": "pa:ss"})
    config = tmp_path / "docker"
    config.mkdir()
    auth = base64.b64encode(b"bob:pa:ss").decode()
    (config / "config.json").write_text(
        json.dumps({"auths": {f"http://{reg.host}": {"auth": auth}}, "credsStore": "desktop"})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(config))
    async with RegistryClient(credentials=DockerConfig()) as client:
        await push_image(client, reg.ref("app"), busybox_image())

    # username/password entries work too, and the file is re-read when it changes.
    (config / "config.json").write_text(
        json.dumps({"auths": {reg.host: {"username": "bob", "password": "nope"}}})
    )
    async with RegistryClient(credentials=DockerConfig(config / "config.json")) as client:
        with pytest.raises(PermissionDenied):
            await client.resolve(reg.ref("app"))


def test_docker_config_errors_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"auths": {"h:1": {"auth": "not base64!"}}}')
    with pytest.raises(InvalidArgument, match="not base64"):
        DockerConfig(path)("h:1")
    path.write_text("{")
    with pytest.raises(InvalidArgument, match="invalid JSON"):
        DockerConfig(path)("h:1")
    assert DockerConfig(tmp_path / "missing.json")("h:1") is None
    docker_hub = json.dumps({"auths": {"https://index.docker.io/v1/": {"username": "u", "password": "p"}}})
    path.write_text(docker_hub)
    assert DockerConfig(path)("docker.io").username == "u"


async def test_bearer_token_flow_and_cache(registry_factory):
    reg = registry_factory(auth="token", users=ALICE)
    image = busybox_image()
    ref = reg.ref(unique())
    creds = static_credentials({reg.host: ("alice", "secret")})
    async with RegistryClient(credentials=creds) as client:
        await push_image(client, ref, image)
        assert reg.token_server.count == 1  # one pull,push token for the whole push

    before = reg.token_server.count
    async with RegistryClient(credentials=creds) as client:
        name, desc = await client.resolve(ref)
        manifest = json.loads(await client.fetch_bytes(name, desc))
        blobs = [
            Descriptor(d["mediaType"], d["digest"], d["size"])
            for d in [manifest["config"], *manifest["layers"]]
        ]
        fetched = await asyncio.gather(*(fetch_all(client, name, d) for d in blobs * 3))
        assert fetched == [image.config.data, image.layers[0].data] * 3
        assert client.auth.token_requests == 1
    assert reg.token_server.count - before == 1
    pull = f"repository:{parse(ref).repository}:pull"
    assert reg.token_server.requests[-1] == {"user": "alice", "scopes": [pull], "status": 200}


async def test_bearer_token_is_renewed_after_expiry(registry_factory):
    reg = registry_factory(auth="token", users=ALICE)
    ref = reg.ref(unique())
    creds = static_credentials({reg.host: ("alice", "secret")})
    reg.token_server.expires_in = 2  # the client refreshes 0.4 s before expiry
    async with RegistryClient(credentials=creds) as client:
        await push_image(client, ref, busybox_image())
        await client.resolve(ref)
        assert client.auth.token_requests == 1
        await asyncio.sleep(1.7)
        await client.resolve(ref)
        assert client.auth.token_requests == 2


async def test_bearer_with_wrong_credentials_or_anonymous(registry_factory):
    reg = registry_factory(auth="token", users=ALICE)
    ref = reg.ref(unique())
    async with RegistryClient(credentials=static_credentials({reg.host: ("alice", "bad")})) as client:
        with pytest.raises(PermissionDenied) as info:
            await client.resolve(ref)
        assert f"authentication failed for {reg.host}" in str(info.value)
        assert reg.token_server.realm in str(info.value)
    async with RegistryClient() as client:  # anonymous: a token without access, then a refusal
        with pytest.raises(PermissionDenied, match=f"authentication failed for {reg.host}"):
            await client.resolve(ref)


def test_parse_challenges():
    (bearer,) = parse_challenges(
        ['Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull"']
    )
    assert bearer.scheme == "bearer"
    assert bearer.params == {
        "realm": "https://auth.example/token",
        "service": "reg",
        "scope": "repository:a/b:pull",
    }
    basic, other = parse_challenges(['Basic realm="x \\"y\\"", Bearer realm=r'])
    assert (basic.scheme, basic.params) == ("basic", {"realm": 'x "y"'})
    assert (other.scheme, other.params) == ("bearer", {"realm": "r"})


# --- transport failures ------------------------------------------------------------------------


async def test_server_that_never_answers_times_out():
    with HangingServer() as hang:
        async with RegistryClient(read_timeout=1.0, connect_timeout=1.0) as client:
            started = time.monotonic()
            with pytest.raises(Unavailable) as info:
                await client.resolve(f"{hang.host}/app:v1")
            elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 3.0
    message = str(info.value)
    assert hang.host in message and "timed out" in message and "1s (read timeout)" in message


async def test_connect_that_never_completes_times_out():
    with FullBacklogServer() as full:
        async with RegistryClient(connect_timeout=0.5) as client:
            started = time.monotonic()
            with pytest.raises(Unavailable) as info:
                await client.resolve(f"{full.host}/app:v1")
            elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 2.5
    assert f"connecting to registry {full.host} timed out after 0.5s" in str(info.value)


async def test_download_that_stalls_midway_times_out_naming_progress():
    desc = blob_of(b"x" * 1000)
    preamble = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100
    with HangingServer(preamble) as hang:
        async with RegistryClient(read_timeout=0.5) as client:
            with pytest.raises(Unavailable) as info:
                await fetch_all(client, f"{hang.host}/app:v1", desc)
    assert "after 100 of 1000 bytes" in str(info.value) and "timed out" in str(info.value)


@pytest.mark.parametrize(
    ("status", "code"), [(500, "UNKNOWN"), (503, "UNAVAILABLE"), (429, "TOOMANYREQUESTS")]
)
async def test_server_errors_are_unavailable_with_the_registry_message(client, status, code):
    with ErrorServer(status, "storage backend on fire", code) as bad:
        with pytest.raises(Unavailable) as info:
            await client.resolve(f"{bad.host}/app:v1")
        message = str(info.value)
        assert f"registry {bad.host} answered {status}" in message
        assert f"{code}: storage backend on fire" in message
        with pytest.raises(Unavailable, match="storage backend on fire"):
            await fetch_all(client, f"{bad.host}/app:v1", blob_of(b"x"))


async def test_connection_refused_names_host_and_port(client):
    port = free_port()  # nothing listens there now
    with pytest.raises(Unavailable) as info:
        await client.resolve(f"127.0.0.1:{port}/app:v1")
    assert f"cannot connect to registry 127.0.0.1:{port}: connection refused" in str(info.value)


async def test_redirects_are_followed(pushed, registry, client):
    ref, image = pushed
    repository = parse(ref).repository
    with RedirectServer(registry.url) as hop:
        via = f"{hop.host}/{repository}:v1"
        name, desc = await client.resolve(via)
        assert desc.digest == image.descriptor.digest
        assert await fetch_all(client, name, image.layers[0].descriptor) == image.layers[0].data
        assert [m for m, _ in hop.requests] == ["HEAD", "GET"]


def test_loopback_registries_use_plain_http():
    client = RegistryClient()
    assert client.base_url("localhost:5000") == "http://localhost:5000"
    assert client.base_url("127.0.0.2") == "http://127.0.0.2"
    assert client.base_url("[::1]:5000") == "http://[::1]:5000"
    assert client.base_url("registry.example.com") == "https://registry.example.com"
    assert client.base_url("docker.io") == "https://registry-1.docker.io"
    assert RegistryClient(plain_http=True).base_url("registry.example.com") == "http://registry.example.com"
    assert RegistryClient(plain_http=False).base_url("localhost:5000") == "https://localhost:5000"
