"""Ingests on disk: <plugin root>/ingest/<sha256 of "namespace/ref">/ holding `data` and `status.json`.

The directory name is a hash so that any ref (refs are free text, often `layer-sha256:...`)
maps to a safe path, and so that the same ref in two namespaces are two ingests.
`status.json` is small and rewritten atomically; the offset of an ingest is the size of its
data file, so nothing has to be rewritten per write.

Everything here is blocking file I/O: the store calls it from worker threads only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from runtimed.content.types import IngestStatus
from runtimed.storage import write_atomic

log = structlog.get_logger("runtimed.content")

DATA = "data"
STATUS = "status.json"
CHUNK = 1 << 20  # containerd streams content in 1 MiB chunks


def ingest_key(namespace: str, ref: str) -> str:
    return hashlib.sha256(f"{namespace}/{ref}".encode()).hexdigest()


@dataclass
class Record:
    """What status.json holds."""

    ref: str
    namespace: str
    total: int = 0
    expected: str = ""
    started_at: int = 0
    updated_at: int = 0

    def status(self, offset: int) -> IngestStatus:
        return IngestStatus(
            ref=self.ref,
            offset=offset,
            total=self.total,
            expected=self.expected,
            started_at=self.started_at,
            updated_at=self.updated_at,
        )


def load_record(directory: Path) -> Record | None:
    """The record of an ingest directory; None when missing or unreadable (a torn creation)."""
    try:
        raw = json.loads((directory / STATUS).read_text())
        record = Record(
            ref=str(raw["ref"]),
            namespace=str(raw["namespace"]),
            total=int(raw.get("total", 0)),
            expected=str(raw.get("expected", "")),
            started_at=int(raw.get("started_at", 0)),
            updated_at=int(raw.get("updated_at", 0)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


def save_record(directory: Path, record: Record) -> None:
    write_atomic(directory / STATUS, json.dumps(asdict(record), sort_keys=True).encode())


def read_status(directory: Path, namespace: str, ref: str) -> IngestStatus | None:
    """The status of the ingest of (namespace, ref) in `directory`, or None if there is none."""
    record = load_record(directory)
    if record is None or record.namespace != namespace or record.ref != ref:
        return None
    try:
        offset = (directory / DATA).stat().st_size
    except FileNotFoundError:
        return None
    return record.status(offset)


def scan(root: Path, namespace: str) -> Iterator[IngestStatus]:
    """Statuses of every ingest of `namespace` under `root`."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        record = load_record(Path(entry.path))
        if record is None or record.namespace != namespace:
            continue
        status = read_status(Path(entry.path), namespace, record.ref)
        if status is not None:
            yield status


def remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def sweep(root: Path) -> int:
    """Remove what a crash can leave: ingest directories without a record or without data.

    A commit renames `data` into blobs/ before removing the directory, so a directory with a
    record but no data is a committed ingest whose clean-up was interrupted.
    """
    removed = 0
    for entry in list(os.scandir(root)):
        directory = Path(entry.path)
        if not entry.is_dir(follow_symlinks=False):
            directory.unlink(missing_ok=True)
            removed += 1
        elif load_record(directory) is None or not (directory / DATA).is_file():
            remove(directory)
            removed += 1
    return removed


class IngestFile:
    """The open data file of one ingest and the running hash of everything in it.

    Every method blocks (file I/O, hashing) and takes `_lock`, so a close that follows a
    cancelled write waits for that write's thread to finish instead of racing it.
    """

    def __init__(self, directory: Path, record: Record, fd: int, offset: int, hasher: hashlib._Hash) -> None:
        self.directory = directory
        self.record = record
        self.offset = offset
        self._fd = fd
        self._hasher = hasher
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls, directory: Path, namespace: str, ref: str, total: int, expected: str, now: int
    ) -> IngestFile:
        """Resume the ingest in `directory` if there is a usable one, else start it afresh."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = directory / DATA
        record = load_record(directory)
        resumable = (
            record is not None and record.namespace == namespace and record.ref == ref and data.is_file()
        )
        if resumable and record is not None and total > 0 and record.total > 0 and total != record.total:
            # As containerd: a resume with another size is a new upload, not an error.
            log.info("ingest total changed, starting over", ref=ref, old=record.total, new=total)
            resumable = False
        if resumable and record is not None:
            fd = os.open(data, os.O_RDWR | os.O_CLOEXEC)
            try:
                hasher = hashlib.sha256()
                offset = 0
                while chunk := os.pread(fd, CHUNK, offset):
                    hasher.update(chunk)
                    offset += len(chunk)
                changed = False
                if total > 0 and record.total == 0:
                    record.total, changed = total, True
                if expected and record.expected != expected:
                    record.expected, changed = expected, True
                if changed:
                    save_record(directory, record)
            except BaseException:
                os.close(fd)
                raise
            log.debug("ingest resumed", namespace=namespace, ref=ref, offset=offset)
            return cls(directory, record, fd, offset, hasher)
        record = Record(
            ref=ref, namespace=namespace, total=total, expected=expected, started_at=now, updated_at=now
        )
        fd = os.open(data, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            save_record(directory, record)
        except BaseException:
            os.close(fd)
            raise
        return cls(directory, record, fd, 0, hashlib.sha256())

    @property
    def data_path(self) -> Path:
        return self.directory / DATA

    def digest(self) -> str:
        return "sha256:" + self._hasher.hexdigest()

    def write(self, data: bytes) -> int:
        with self._lock:
            view = memoryview(data)
            position = self.offset
            while view:
                written = os.pwrite(self._fd, view, position)
                position += written
                view = view[written:]
            self._hasher.update(data)
            self.offset = position
            return position

    def truncate(self) -> None:
        with self._lock:
            os.ftruncate(self._fd, 0)
            self._hasher = hashlib.sha256()
            self.offset = 0

    def copy_from(self, source: Path, size: int) -> None:
        """Fill the (empty) ingest with the first `size` bytes of `source`."""
        with self._lock, open(source, "rb") as handle:
            while self.offset < size:
                chunk = handle.read(min(CHUNK, size - self.offset))
                if not chunk:
                    break
                os.pwrite(self._fd, chunk, self.offset)
                self._hasher.update(chunk)
                self.offset += len(chunk)

    def sync(self) -> int:
        """Flush the data to disk; the size on disk, which is what a commit verifies."""
        with self._lock:
            os.fsync(self._fd)
            return os.fstat(self._fd).st_size

    def close(self, updated_at: int = 0) -> None:
        """Close the data file, keeping the ingest for a later resume.

        An ingest whose data a commit already moved into blobs/ is removed instead.
        """
        with self._lock:
            if self._fd < 0:
                return
            fd, self._fd = self._fd, -1
            try:
                if not self.data_path.exists():
                    remove(self.directory)
                elif updated_at:
                    os.fsync(fd)
                    self.record.updated_at = updated_at
                    save_record(self.directory, self.record)
            finally:
                os.close(fd)

    def discard(self) -> None:
        """Close and remove the ingest."""
        with self._lock:
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                with contextlib.suppress(OSError):
                    os.close(fd)
        remove(self.directory)
