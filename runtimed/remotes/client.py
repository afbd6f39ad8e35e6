"""An async registry client for the OCI distribution spec (and Docker's registry v2 API).

One RegistryClient serves many concurrent tasks (parallel layer fetches and uploads) over a
bounded connection pool; it keeps per-host authentication state and cached tokens.

    async with RegistryClient(credentials=DockerConfig()) as registry:
        name, desc = await registry.resolve("127.0.0.1:5000/team/app:v1")
        manifest = await registry.fetch_bytes(name, desc)
        written = await registry.fetch_to(name, layer, ingest.write)    # verified digest and size
        async with registry.fetch(name, layer) as stream:              # or iterate yourself
            async for chunk in stream: ...
        await registry.push_blob("127.0.0.1:5000/other:v1", layer, data, mount_from=name)

Every stream is verified: the iteration that would end the stream raises FailedPrecondition
when the bytes do not have the descriptor's size and digest, so a caller that commits only
after the loop finishes never commits bad content. Registry failures become runtimed.errors
(see runtimed.remotes.http).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import inspect
import ipaddress
import json
import os
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol

import httpx
import structlog

from runtimed import __version__, digests, mediatypes
from runtimed.errors import FailedPrecondition, InvalidArgument, OutOfRange, q
from runtimed.reference import Reference, parse
from runtimed.remotes.auth import Authorizer, CredentialProvider
from runtimed.remotes.http import read_error_body, status_error, transport_error
from runtimed.types import Descriptor

log = structlog.get_logger("runtimed.remotes")

MiB = 1024 * 1024
# containerd's limit for a manifest read into memory; a bigger one is not a manifest.
MAX_MANIFEST_SIZE = 4 * MiB
# Registries that serve docker.io references.
_API_HOSTS = {"docker.io": "registry-1.docker.io"}

# Writes fetched bytes somewhere: a plain or an async callable.
Writer = Callable[[bytes], Awaitable[object] | object]
# What push_blob uploads: the bytes, or a callable opening a fresh stream of them each time it is
# called (an upload retried after a 401 re-reads the source).
BlobData = bytes | Callable[[], AsyncIterable[bytes]]
Progress = Callable[[int], object]


class Digester(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...
    def copy(self) -> Digester: ...


class PushResult(enum.StrEnum):
    EXISTS = "exists"  # the registry had the content already
    MOUNTED = "mounted"  # mounted from another repository on the same registry
    UPLOADED = "uploaded"


def new_digester(digest: str) -> Digester:
    """A fresh hash object for a digest's algorithm (feed it a blob's first bytes to resume)."""
    algorithm = digests.validate(digest).split(":", 1)[0]
    return hashlib.new(algorithm)


def file_source(path: str | os.PathLike[str], chunk_size: int = MiB) -> Callable[[], AsyncIterator[bytes]]:
    """A BlobData reading a file in a worker thread, so uploads never block the event loop."""

    async def read() -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(open, path, "rb")
        try:
            while chunk := await asyncio.to_thread(handle.read, chunk_size):
                yield chunk
        finally:
            await asyncio.to_thread(handle.close)

    return read


def is_loopback(host: str) -> bool:
    """Whether a reference's host ("localhost:5000", "127.0.0.1", "[::1]:5000") is this machine."""
    name = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _as_ref(ref: Reference | str) -> Reference:
    return ref if isinstance(ref, Reference) else parse(ref)


def _pull(ref: Reference) -> str:
    return f"repository:{ref.repository}:pull"


def _push(ref: Reference) -> str:
    return f"repository:{ref.repository}:pull,push"


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip()


class BlobStream:
    """The body of one blob fetch, verified against its descriptor as it is iterated.

    `offset` is where the bytes handed out start (0 for fetch, the resume point for
    fetch_range); `received` counts the bytes handed out so far.
    """

    def __init__(
        self,
        response: httpx.Response | None,
        descriptor: Descriptor,
        *,
        what: str,
        offset: int,
        skip: int,
        digester: Digester,
        client: RegistryClient,
    ) -> None:
        self.descriptor = descriptor
        self.offset = offset
        self.received = 0
        self._response = response
        self._what = what
        self._skip = skip  # bytes to hash but not hand out (a server that ignored Range)
        self._digester = digester
        self._client = client

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = self.descriptor.size
        total = self.offset - self._skip  # bytes of the blob seen so far, counting the resumed prefix
        if self._response is not None:
            try:
                async for chunk in self._response.aiter_bytes():
                    total += len(chunk)
                    if total > size:
                        raise FailedPrecondition(
                            f"{self._what}: size mismatch: the registry sent more than {size} bytes"
                        )
                    self._digester.update(chunk)
                    if self._skip:
                        dropped = min(self._skip, len(chunk))
                        self._skip -= dropped
                        chunk = chunk[dropped:]
                        if not chunk:
                            continue
                    self.received += len(chunk)
                    yield chunk
            except httpx.HTTPError as exc:
                raise self._client._transport_error(exc, f" after {total} of {size} bytes") from exc
        if total != size:
            raise FailedPrecondition(f"{self._what}: size mismatch: expected {size} bytes, got {total}")
        algorithm = self.descriptor.digest.split(":", 1)[0]
        actual = f"{algorithm}:{self._digester.hexdigest()}"
        if actual != self.descriptor.digest:
            raise FailedPrecondition(
                f"{self._what}: digest mismatch: expected {self.descriptor.digest}, "
                f"got {actual} ({size} bytes)"
            )

    async def aclose(self) -> None:
        if self._response is not None:
            await self._response.aclose()


class RegistryClient:
    """Talks to OCI registries; safe to share between tasks. Close it with aclose() (or async with).

    plain_http: None picks HTTP for loopback hosts (localhost, 127.0.0.0/8, ::1) and HTTPS for
    the rest; True or False forces one for every host. connect_timeout bounds a TCP/TLS connect,
    read_timeout how long a response may stay silent (an idle timeout, not a total one, so big
    blobs are fine). Blobs larger than chunked_upload_threshold go up in upload_chunk_size PATCHes.
    """

    def __init__(
        self,
        *,
        credentials: CredentialProvider | None = None,
        plain_http: bool | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_connections: int = 16,
        chunked_upload_threshold: int = 64 * MiB,
        upload_chunk_size: int = 16 * MiB,
        verify_tls: bool = True,
        user_agent: str = f"runtimed/{__version__}",
    ) -> None:
        if upload_chunk_size <= 0:
            raise InvalidArgument(f"upload_chunk_size {upload_chunk_size}: must be positive")
        self.plain_http = plain_http
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.chunked_upload_threshold = chunked_upload_threshold
        self.upload_chunk_size = upload_chunk_size
        self._http = httpx.AsyncClient(
            # pool=None: a task waiting for one of max_connections is queued, not failed.
            timeout=httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=None),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            # Registries redirect blob GETs to storage; httpx drops Authorization across origins.
            follow_redirects=True,
            headers={"User-Agent": user_agent},
            verify=verify_tls,
            trust_env=False,  # the daemon's environment must not reroute registry traffic
        )
        self.auth = Authorizer(
            self._http, credentials, connect_timeout=connect_timeout, read_timeout=read_timeout
        )

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def base_url(self, host: str) -> str:
        """The registry API root for a reference host ("http://127.0.0.1:5000", "https://registry-1.docker.io")."""
        plain = self.plain_http if self.plain_http is not None else is_loopback(host)
        return f"{'http' if plain else 'https'}://{_API_HOSTS.get(host, host)}"

    def _url(self, ref: Reference, *parts: str) -> str:
        return "/".join([self.base_url(ref.host), "v2", ref.repository, *parts])

    # --- resolve ---------------------------------------------------------------------------------

    async def resolve(self, ref: Reference | str) -> tuple[str, Descriptor]:
        """Resolve a reference to (canonical name, descriptor of its manifest or index)."""
        ref = _as_ref(ref)
        url = self._url(ref, "manifests", ref.object)
        what = str(ref)
        headers = {"Accept": mediatypes.RESOLVE_ACCEPT}
        response = await self._send("HEAD", ref, url, scopes=[_pull(ref)], headers=headers)
        if response.status_code == 200:
            desc = self._head_descriptor(ref, response)
            if desc is not None:
                log.debug(
                    "resolved", ref=what, digest=desc.digest, media_type=desc.media_type, size=desc.size
                )
                return what, desc
        elif response.status_code in (401, 403, 404):
            raise self._status_error(response, b"", ref, what)
        # Otherwise GET: HEAD may be unsupported (400, 405), and a failing GET carries the
        # registry's error JSON that a HEAD answer has no body for (429, 5xx).

        response = await self._send("GET", ref, url, scopes=[_pull(ref)], headers=headers, stream=True)
        await self._expect(response, ref, what, 200)
        body = await self._read_limited(response, MAX_MANIFEST_SIZE, what)
        header_digest = response.headers.get("Docker-Content-Digest")
        expected = header_digest or ref.digest
        if expected is not None:
            digests.validate(expected, f"{what}: Docker-Content-Digest from {ref.host}")
        algorithm = (expected or "sha256:").split(":", 1)[0]
        actual = f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"
        if header_digest is not None and header_digest != actual:
            raise FailedPrecondition(
                f"{what}: registry {ref.host} sent Docker-Content-Digest {header_digest} "
                f"for a manifest whose digest is {actual}"
            )
        if ref.digest is not None and ref.digest.split(":", 1)[0] == algorithm and ref.digest != actual:
            raise FailedPrecondition(f"{what}: registry {ref.host} sent a manifest with digest {actual}")
        desc = Descriptor(media_type=self._body_media_type(response, body), digest=actual, size=len(body))
        log.debug(
            "resolved", ref=what, digest=desc.digest, media_type=desc.media_type, size=desc.size, get=True
        )
        return what, desc

    def _head_descriptor(self, ref: Reference, response: httpx.Response) -> Descriptor | None:
        digest = response.headers.get("Docker-Content-Digest") or ref.digest
        length = response.headers.get("Content-Length")
        media_type = _media_type(response.headers.get("Content-Type"))
        if (
            not digest
            or not length
            or not length.isdigit()
            or not media_type
            or media_type == "application/json"
        ):
            return None  # not enough to go on: GET the manifest
        digests.validate(digest, f"{ref}: Docker-Content-Digest from {ref.host}")
        if ref.digest is not None and digest != ref.digest:
            raise FailedPrecondition(f"{ref}: registry {ref.host} answered for digest {digest}")
        return Descriptor(media_type=media_type, digest=digest, size=int(length))

    @staticmethod
    def _body_media_type(response: httpx.Response, body: bytes) -> str:
        header = _media_type(response.headers.get("Content-Type"))
        if header and header not in ("application/json", "application/octet-stream", "text/plain"):
            return header
        try:
            document = json.loads(body)
        except ValueError:
            return header or "application/octet-stream"
        if isinstance(document, dict):
            if isinstance(document.get("mediaType"), str):
                return document["mediaType"]
            if "manifests" in document:
                return mediatypes.OCI_INDEX
            if "layers" in document or "config" in document:
                return mediatypes.OCI_MANIFEST
        return header or "application/octet-stream"

    # --- fetch -----------------------------------------------------------------------------------

    @asynccontextmanager
    async def fetch(self, ref: Reference | str, desc: Descriptor) -> AsyncIterator[BlobStream]:
        """Open a verified stream of a blob, manifest or index (async with; iterate the stream)."""
        ref = _as_ref(ref)
        response = await self._open(ref, desc, headers={})
        stream = BlobStream(
            response, desc, what=self._what(ref, desc), offset=0, skip=0, digester=new_digester(desc.digest),
            client=self,
        )  # fmt: skip
        try:
            yield stream
        finally:
            await stream.aclose()

    @asynccontextmanager
    async def fetch_range(
        self, ref: Reference | str, desc: Descriptor, offset: int, digester: Digester
    ) -> AsyncIterator[BlobStream]:
        """Open a verified stream of a blob from `offset` on, to resume an interrupted download.

        `digester` must hold the hash of the first `offset` bytes (new_digester() fed with what
        was written); it is copied, not changed. A registry that ignores Range sends the whole
        blob: the prefix is then hashed and skipped here, so the caller still gets bytes from
        `offset` on and a check of the whole blob.
        """
        ref = _as_ref(ref)
        what = self._what(ref, desc)
        if not 0 <= offset <= desc.size:
            raise OutOfRange(f"{what}: resume offset {offset} outside 0..{desc.size}")
        if offset == desc.size:  # nothing left to fetch: just check what the caller has
            stream = BlobStream(
                None, desc, what=what, offset=offset, skip=0, digester=digester.copy(), client=self
            )
            yield stream
            return
        response = await self._open(ref, desc, headers={"Range": f"bytes={offset}-"}, accept=(200, 206))
        if response.status_code == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                await response.aclose()
                raise FailedPrecondition(
                    f"{what}: registry {ref.host} answered Range bytes={offset}- with "
                    f"Content-Range {q(response.headers.get('Content-Range'))}"
                )
            stream = BlobStream(
                response, desc, what=what, offset=offset, skip=0, digester=digester.copy(), client=self
            )
        else:
            log.info("registry ignored Range, fetching the whole blob", host=ref.host, digest=desc.digest)
            stream = BlobStream(
                response, desc, what=what, offset=offset, skip=offset, digester=new_digester(desc.digest),
                client=self,
            )  # fmt: skip
        try:
            yield stream
        finally:
            await stream.aclose()

    async def fetch_to(
        self,
        ref: Reference | str,
        desc: Descriptor,
        write: Writer,
        *,
        offset: int = 0,
        digester: Digester | None = None,
        progress: Progress | None = None,
    ) -> int:
        """Stream a blob into `write` (sync or async) and verify it; returns the bytes written.

        With offset > 0 it resumes (see fetch_range; digester is then required). The error for a
        wrong size or digest comes after the last write: commit only when this returns.
        progress(n) is called with the blob bytes held so far (offset included).
        """
        if offset:
            if digester is None:
                raise InvalidArgument(
                    f"resuming blob {desc.digest} at {offset} needs the digester of its prefix"
                )
            opened = self.fetch_range(ref, desc, offset, digester)
        else:
            opened = self.fetch(ref, desc)
        async with opened as stream:
            async for chunk in stream:
                result = write(chunk)
                if inspect.isawaitable(result):
                    await result
                if progress is not None:
                    progress(stream.offset + stream.received)
            return stream.received

    async def fetch_bytes(
        self, ref: Reference | str, desc: Descriptor, max_size: int = MAX_MANIFEST_SIZE
    ) -> bytes:
        """A small verified blob (manifest, index, config) in memory."""
        if desc.size > max_size:
            raise FailedPrecondition(
                f"{self._what(_as_ref(ref), desc)}: {desc.size} bytes is more than the "
                f"{max_size} read into memory"
            )
        body = bytearray()
        async with self.fetch(ref, desc) as stream:
            async for chunk in stream:
                body += chunk
        return bytes(body)

    async def _open(
        self, ref: Reference, desc: Descriptor, *, headers: dict[str, str], accept: tuple[int, ...] = (200,)
    ) -> httpx.Response:
        digests.validate(desc.digest, f"descriptor of {ref}: digest")
        what = self._what(ref, desc)
        # identity: a compressed transfer would make sizes and Range offsets meaningless.
        headers = {**headers, "Accept-Encoding": "identity"}
        endpoints = ["blobs"]
        if mediatypes.is_manifest(desc.media_type):
            endpoints = ["manifests", "blobs"]  # some registries serve manifests from /blobs/ only
            headers["Accept"] = f"{desc.media_type}, */*"
        for index, endpoint in enumerate(endpoints):
            url = self._url(ref, endpoint, desc.digest)
            response = await self._send("GET", ref, url, scopes=[_pull(ref)], headers=headers, stream=True)
            if response.status_code == 404 and index + 1 < len(endpoints):
                await response.aclose()
                continue
            await self._expect(response, ref, what, *accept)
            return response
        raise AssertionError("unreachable")

    @staticmethod
    def _what(ref: Reference, desc: Descriptor) -> str:
        kind = "manifest" if mediatypes.is_manifest(desc.media_type) else "blob"
        return f"{kind} {desc.digest} of {ref.name}"

    # --- push ------------------------------------------------------------------------------------

    async def exists(self, ref: Reference | str, desc: Descriptor) -> bool:
        """Whether the repository already has this blob or manifest (HEAD by digest)."""
        ref = _as_ref(ref)
        return await self._exists(ref, desc, [_pull(ref)])

    async def _exists(self, ref: Reference, desc: Descriptor, scopes: list[str]) -> bool:
        digests.validate(desc.digest, f"descriptor of {ref}: digest")
        endpoint = "manifests" if mediatypes.is_manifest(desc.media_type) else "blobs"
        headers = {"Accept": f"{desc.media_type}, */*"} if endpoint == "manifests" else {}
        url = self._url(ref, endpoint, desc.digest)
        response = await self._send("HEAD", ref, url, scopes=scopes, headers=headers)
        if response.status_code == 200:
            return True
        if response.status_code == 404:
            return False
        raise self._status_error(response, b"", ref, self._what(ref, desc))

    async def push_blob(
        self,
        ref: Reference | str,
        desc: Descriptor,
        data: BlobData,
        *,
        mount_from: Reference | str | None = None,
        progress: Progress | None = None,
    ) -> PushResult:
        """Upload a blob unless the repository has it; try a cross-repository mount first when
        mount_from names another repository on the same registry that has it.

        Up to chunked_upload_threshold bytes go in one PUT (monolithic), larger blobs in PATCHes
        of upload_chunk_size. The registry checks the digest when the upload completes.
        """
        ref = _as_ref(ref)
        what = f"blob {desc.digest} for {ref.name}"
        digests.validate(desc.digest, f"{what}: digest")
        if isinstance(data, bytes):
            _check_bytes(data, desc, what)
        source = _as_ref(mount_from) if isinstance(mount_from, str) else mount_from
        if source is not None and (source.host != ref.host or source.repository == ref.repository):
            source = None  # a mount works only between repositories of one registry
        scopes = [_push(ref)] + ([_pull(source)] if source is not None else [])

        if await self._exists(ref, desc, scopes):
            log.debug("blob exists", repository=ref.name, digest=desc.digest)
            return PushResult.EXISTS

        uploads = self._url(ref, "blobs", "uploads") + "/"
        if source is not None:
            params = {"mount": desc.digest, "from": source.repository}
            response = await self._send("POST", ref, uploads, scopes=scopes, params=params)
            await self._expect(response, ref, what, 201, 202)
            if response.status_code == 201:
                log.info("blob mounted", repository=ref.name, source=source.name, digest=desc.digest)
                return PushResult.MOUNTED
            # 202: the registry could not mount and opened an ordinary upload instead.
        else:
            response = await self._send("POST", ref, uploads, scopes=scopes)
            await self._expect(response, ref, what, 202)
        location = self._location(response, what)

        started = time.monotonic()
        try:
            if desc.size <= self.chunked_upload_threshold:
                await self._upload_monolithic(ref, desc, data, location, scopes, what, progress)
            else:
                await self._upload_chunked(ref, desc, data, location, scopes, what, progress)
        except BaseException:
            await self._cancel_upload(ref, location, scopes)
            raise
        seconds = time.monotonic() - started
        log.info(
            "blob uploaded",
            repository=ref.name,
            digest=desc.digest,
            size=desc.size,
            chunked=desc.size > self.chunked_upload_threshold,
            mib_s=round(desc.size / MiB / seconds, 1) if seconds > 0 else None,
        )
        return PushResult.UPLOADED

    async def _upload_monolithic(
        self,
        ref: Reference,
        desc: Descriptor,
        data: BlobData,
        location: httpx.URL,
        scopes: list[str],
        what: str,
        progress: Progress | None,
    ) -> None:
        checker = _SourceCheck(desc, what, progress)

        def body() -> bytes | AsyncIterator[bytes]:
            checker.reset()
            if isinstance(data, bytes):
                if progress is not None:
                    progress(len(data))
                return data
            return checker.wrap(data())

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)}
        url = location.copy_merge_params({"digest": desc.digest})
        response = await self._send("PUT", ref, url, scopes=scopes, headers=headers, body=body)
        if response.status_code not in (201, 204) and not isinstance(data, bytes):
            checker.verify()  # a source that sent other bytes explains a 400 better than the registry
        await self._expect(response, ref, what, 201, 204)

    async def _upload_chunked(
        self,
        ref: Reference,
        desc: Descriptor,
        data: BlobData,
        location: httpx.URL,
        scopes: list[str],
        what: str,
        progress: Progress | None,
    ) -> None:
        checker = _SourceCheck(desc, what, progress)
        offset = 0
        async for piece in _rechunk(data, self.upload_chunk_size):
            checker.update(piece)
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(len(piece)),
                "Content-Range": f"{offset}-{offset + len(piece) - 1}",
            }
            response = await self._send("PATCH", ref, location, scopes=scopes, headers=headers, body=piece)
            await self._expect(response, ref, what, 202)
            location = self._location(response, what)
            offset += len(piece)
            received = _range_end(response.headers.get("Range"))
            if received is not None and received + 1 != offset:
                raise FailedPrecondition(
                    f"{what}: registry {ref.host} holds {received + 1} bytes of the upload "
                    f"after {offset} were sent"
                )
        checker.verify()  # before committing: a wrong source must not become a wrong blob
        url = location.copy_merge_params({"digest": desc.digest})
        response = await self._send("PUT", ref, url, scopes=scopes, headers={"Content-Length": "0"}, body=b"")
        await self._expect(response, ref, what, 201, 204)

    async def _cancel_upload(self, ref: Reference, location: httpx.URL, scopes: list[str]) -> None:
        """Best effort: tell the registry to drop an upload session that failed."""
        try:
            async with asyncio.timeout(5):  # bounded: this may run while the task is being cancelled
                response = await self._send("DELETE", ref, location, scopes=scopes)
                await response.aclose()
        except Exception as exc:
            log.debug(
                "cancelling upload failed", location=str(location.copy_with(query=None)), error=str(exc)
            )

    async def push_manifest(
        self, ref: Reference | str, desc: Descriptor, data: bytes, *, by_digest: bool = False
    ) -> str:
        """PUT a manifest or index under ref's tag (or, with by_digest or no tag, its digest).

        Returns the digest. Blobs it refers to must be pushed first: registries check.
        """
        ref = _as_ref(ref)
        what = f"manifest {desc.digest} for {ref}"
        digests.validate(desc.digest, f"{what}: digest")
        _check_bytes(data, desc, what)
        if ref.digest is not None and ref.digest != desc.digest:
            raise InvalidArgument(f"{what}: the reference names digest {ref.digest}")
        target = desc.digest if by_digest or ref.tag is None else ref.tag
        url = self._url(ref, "manifests", target)
        headers = {"Content-Type": desc.media_type}
        response = await self._send("PUT", ref, url, scopes=[_push(ref)], headers=headers, body=data)
        await self._expect(response, ref, what, 201, 200, 204)
        stored = response.headers.get("Docker-Content-Digest")
        if stored and stored != desc.digest:
            raise FailedPrecondition(f"{what}: registry {ref.host} stored it as {stored}")
        log.info(
            "manifest pushed", ref=f"{ref.name}:{target}" if target == ref.tag else f"{ref.name}@{target}"
        )
        return desc.digest

    @staticmethod
    def _location(response: httpx.Response, what: str) -> httpx.URL:
        location = response.headers.get("Location")
        if not location:
            raise FailedPrecondition(f"{what}: registry answered {response.status_code} without a Location")
        return response.url.join(location)  # it may be relative

    # --- one request -----------------------------------------------------------------------------

    async def _send(
        self,
        method: str,
        ref: Reference,
        url: str | httpx.URL,
        *,
        scopes: list[str],
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        body: bytes | Callable[[], bytes | AsyncIterator[bytes]] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """Send one request, authenticating as the host asked before; on a 401 learn and retry once."""
        for attempt in (1, 2):
            authorization = await self.auth.authorization(ref.host, scopes)
            request_headers = dict(headers or {})
            if authorization is not None:
                request_headers["Authorization"] = authorization
            content = body() if callable(body) else body
            request = self._http.build_request(
                method, url, headers=request_headers, params=params, content=content
            )
            started = time.monotonic()
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.HTTPError as exc:
                raise self._transport_error(exc) from exc
            log.debug(
                "registry request",
                method=method,
                url=str(request.url.copy_with(query=None)),
                status=response.status_code,
                ms=round((time.monotonic() - started) * 1000, 1),
                redirects=len(response.history) or None,
            )
            if response.status_code == 401 and attempt == 1:
                retry = self.auth.unauthorized(
                    ref.host, response.headers.get_list("WWW-Authenticate"), scopes, authorization
                )
                if retry is not None:
                    await response.aclose()
                    scopes = retry
                    continue
            return response
        raise AssertionError("unreachable")

    async def _expect(self, response: httpx.Response, ref: Reference, what: str, *statuses: int) -> None:
        if response.status_code not in statuses:
            body = await read_error_body(response)
            raise self._status_error(response, body, ref, what)

    def _status_error(self, response: httpx.Response, body: bytes, ref: Reference, what: str) -> Exception:
        hint = ""
        if response.status_code == 401:
            creds = self.auth.credentials_for(ref.host)
            if creds is None:
                hint = f"no credentials for {ref.host}"
            else:
                hint = f"the registry refused user {q(creds.username)}"
        return status_error(response, body, host=ref.host, what=what, auth_hint=hint)

    async def _read_limited(self, response: httpx.Response, limit: int, what: str) -> bytes:
        body = bytearray()
        try:
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    raise FailedPrecondition(f"{what}: manifest larger than {limit} bytes")
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        finally:
            await response.aclose()
        return bytes(body)

    def _transport_error(self, exc: httpx.HTTPError, during: str = "") -> Exception:
        return transport_error(
            exc, connect_timeout=self.connect_timeout, read_timeout=self.read_timeout, during=during
        )


class _SourceCheck:
    """Counts and hashes what an upload source produced, to name a source that lied."""

    def __init__(self, desc: Descriptor, what: str, progress: Progress | None) -> None:
        self.desc, self.what, self.progress = desc, what, progress
        self.reset()

    def reset(self) -> None:
        self.size = 0
        self.digester = new_digester(self.desc.digest)

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.desc.size:
            raise FailedPrecondition(
                f"{self.what}: the source has more than the expected {self.desc.size} bytes"
            )
        self.digester.update(chunk)
        if self.progress is not None:
            self.progress(self.size)

    async def wrap(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self.update(chunk)
            yield chunk
        if self.size != self.desc.size:
            raise FailedPrecondition(
                f"{self.what}: the source ended after {self.size} of the expected {self.desc.size} bytes"
            )

    def verify(self) -> None:
        algorithm = self.desc.digest.split(":", 1)[0]
        actual = f"{algorithm}:{self.digester.hexdigest()}"
        if self.size != self.desc.size or actual != self.desc.digest:
            raise FailedPrecondition(
                f"{self.what}: the source has {self.size} bytes with digest {actual}, "
                f"expected {self.desc.size} bytes with digest {self.desc.digest}"
            )


def _check_bytes(data: bytes, desc: Descriptor, what: str) -> None:
    algorithm = desc.digest.split(":", 1)[0]
    actual = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
    if len(data) != desc.size or actual != desc.digest:
        raise InvalidArgument(
            f"{what}: data has {len(data)} bytes with digest {actual}, "
            f"but the descriptor says {desc.size} bytes with digest {desc.digest}"
        )


async def _rechunk(data: BlobData, size: int) -> AsyncIterator[bytes]:
    """Upload pieces of exactly `size` bytes (the last one shorter) from bytes or a stream."""
    if isinstance(data, bytes):
        for start in range(0, len(data), size):
            yield data[start : start + size]
        return
    buffer = bytearray()
    async for chunk in data():
        buffer += chunk
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _content_range_start(value: str | None) -> int | None:
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    return int(match[1]) if match else None


def _range_end(value: str | None) -> int | None:
    """The end of an upload's Range header ("0-1023", docker's form, or "bytes=0-1023")."""
    match = re.fullmatch(r"(?:bytes=)?(\d+)-(\d+)", (value or "").strip())
    return int(match[2]) if match else None
