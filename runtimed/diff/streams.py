"""Decompression of a layer blob as a stream of chunks, hashed (the diffID) on the way.

gzip is inflated in-process with zlib; zstd goes through the `zstd` binary (Debian package zstd)
in a subprocess pipe, so neither needs a Python dependency. The decompress + hash step runs in a
producer thread: zlib, hashlib and os.read release the GIL on large buffers, so it overlaps with the
consumer (tar parsing and file creation) on a second core.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import queue
import re
import shutil
import subprocess
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from runtimed.diff.mediatypes import Compression
from runtimed.errors import FailedPrecondition, InvalidArgument, RuntimedError

CHUNK = 1 << 20
# How much inflated output one zlib call may produce (bounds memory on a decompression bomb).
MAX_INFLATE = 4 << 20
QUEUE_DEPTH = 8
PIPE_SIZE = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"

Blob = BinaryIO | Path | str


def _reader(blob: Blob) -> tuple[Callable[[int], bytes], Callable[[], None], int | None]:
    """A read(n) function for a blob, a close function, and the fd when the blob is a file we opened."""
    if isinstance(blob, str | Path):
        try:
            fd = os.open(blob, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise FailedPrecondition(f"layer blob {str(blob)!r}: {exc.strerror}") from exc
        return (lambda n: os.read(fd, n)), (lambda: os.close(fd)), fd
    return blob.read, (lambda: None), None


def _plain(read: Callable[[int], bytes]) -> Iterator[bytes]:
    while chunk := read(CHUNK):
        yield chunk


def _gunzip(read: Callable[[int], bytes]) -> Iterator[bytes]:
    """Inflate a (possibly multi-member) gzip stream; corrupt or truncated input raises InvalidArgument."""
    inflater = zlib.decompressobj(31)
    started = False  # whether the current member has received input
    members = 0
    pending = b""
    while True:
        data = pending or read(CHUNK)
        pending = b""
        if not data:
            break
        if not started:
            if len(data) < 2 and (more := read(CHUNK)):
                data += more
            if data[:2] != GZIP_MAGIC:
                what = "trailing data after the gzip stream" if members else "not a gzip stream"
                raise InvalidArgument(f"layer blob: {what}")
            started = True
        try:
            while data:
                out = inflater.decompress(data, MAX_INFLATE)
                if out:
                    yield out
                if inflater.eof:
                    pending = inflater.unused_data
                    members += 1
                    inflater = zlib.decompressobj(31)
                    started = False
                    break
                data = inflater.unconsumed_tail
        except zlib.error as exc:
            raise InvalidArgument(f"layer blob: corrupt gzip stream: {exc}") from exc
    if started or members == 0:
        raise InvalidArgument("layer blob: gzip stream truncated (unexpected end of compressed data)")


class _Zstd:
    """`zstd -d` in a subprocess: the blob goes to its stdin (directly when it is a file)."""

    def __init__(self, read: Callable[[int], bytes], fd: int | None) -> None:
        binary = shutil.which("zstd")
        if binary is None:
            raise FailedPrecondition("zstd layers need the zstd binary (Debian package zstd)")
        self._feeder: threading.Thread | None = None
        self.proc = subprocess.Popen(
            [binary, "-d", "-c", "-q"],
            stdin=fd if fd is not None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        if fd is None:
            self._feeder = threading.Thread(target=self._feed, args=(read,), daemon=True, name="zstd-feed")
            self._feeder.start()

    def _feed(self, read: Callable[[int], bytes]) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            while chunk := read(CHUNK):
                stdin.write(chunk)
        except (OSError, ValueError):
            pass  # the process went away: its exit status tells what happened
        finally:
            with contextlib.suppress(OSError, ValueError):
                stdin.close()

    def chunks(self) -> Iterator[bytes]:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        out = self.proc.stdout.fileno()
        while chunk := os.read(out, CHUNK):
            yield chunk
        status = self.proc.wait()
        if self._feeder is not None:
            self._feeder.join()
        if status != 0:
            message = self.proc.stderr.read().decode(errors="replace").strip()
            message = re.sub(r"^(zstd: )?/\*stdin\*\\ ?: ", "", message)
            message = message or f"zstd exit status {status}"
            raise InvalidArgument(f"layer blob: corrupt zstd stream: {message}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError, ValueError):
                    pipe.close()
        if self._feeder is not None:
            self._feeder.join()


_END = object()


class UncompressedStream:
    """The uncompressed bytes of a layer blob, as chunks, with their sha256 and count.

    Use as a context manager; `next_chunk()` returns b"" at the end, after which `digest` and
    `size` are final. Errors of the producer (corrupt data, I/O) are raised by `next_chunk()`.
    """

    def __init__(self, blob: Blob, compression: Compression, *, threaded: bool = True) -> None:
        self._hash = hashlib.sha256()
        self.size = 0
        self._read, self._close_source, fd = _reader(blob)
        self._zstd: _Zstd | None = None
        try:
            if compression is Compression.GZIP:
                source = _gunzip(self._read)
            elif compression is Compression.ZSTD:
                self._zstd = _Zstd(self._read, fd)
                source = self._zstd.chunks()
            else:
                source = _plain(self._read)
        except BaseException:
            self._close_source()
            raise
        self._source = source
        self._done = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if threaded:
            self._queue: queue.Queue = queue.Queue(QUEUE_DEPTH)
            self._thread = threading.Thread(target=self._produce, daemon=True, name="layer-decompress")
            self._thread.start()

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def _pull(self) -> bytes:
        """One chunk from the decoder, hashed; b"" at the end."""
        chunk = next(self._source, b"")
        if chunk:
            self._hash.update(chunk)
            self.size += len(chunk)
        return chunk

    def _produce(self) -> None:
        # Only decompression here: the consumer hashes, which balances the two threads' work.
        try:
            while not self._stop.is_set():
                chunk = next(self._source, b"")
                self._put(chunk if chunk else _END)
                if not chunk:
                    return
        except BaseException as exc:
            self._put(exc)

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next_chunk(self) -> bytes:
        if self._done:
            return b""
        if self._thread is None:
            try:
                chunk = self._pull()
            except RuntimedError:
                raise
            except OSError as exc:
                raise FailedPrecondition(f"reading layer blob: {exc}") from exc
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._done = True
                if isinstance(item, OSError):
                    raise FailedPrecondition(f"reading layer blob: {item}") from item
                raise item
            chunk = b"" if item is _END else item
            if chunk:
                self._hash.update(chunk)
                self.size += len(chunk)
        if not chunk:
            self._done = True
        return chunk

    def drain(self) -> None:
        """Read (and hash) whatever follows the end of the tar archive."""
        while self.next_chunk():
            pass

    def close(self) -> None:
        self._stop.set()
        try:
            if self._zstd is not None:
                # First, so that a producer blocked on its pipe sees the end at once.
                self._zstd.close()
        finally:
            if self._thread is not None:
                while self._thread.is_alive():
                    with contextlib.suppress(queue.Empty):
                        self._queue.get(timeout=0.05)
                self._thread.join()
            self._close_source()

    def __enter__(self) -> UncompressedStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
