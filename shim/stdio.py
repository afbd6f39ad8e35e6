"""A process's stdio: the client's FIFOs, log files, or a terminal.

Paths come from the client (`ctr` makes FIFOs under /run/containerd/fifo/<n>/ and opens its
ends without blocking); the shim opens the other ends:

* stdout/stderr FIFO: first O_RDWR|O_NONBLOCK, which never blocks and never fails for want of
  a reader (our "keeper"), then O_WRONLY, which now succeeds at once. The write end goes to the
  process, so output flows straight from the process into the FIFO, without copying in the shim.
  The keeper is a reader while the process lives, so a client that goes away (ctr run -d) leaves
  output buffered rather than killing the process with SIGPIPE, as containerd's shim does. It is
  closed when the process exits, so the client reads EOF once the process (and whatever else
  holds its stdout) is done: ctr waits for that EOF before it deletes the task.
* stdin FIFO: a pipe to the process; the shim opens the FIFO O_RDONLY|O_NONBLOCK and copies in
  its event loop. Linux reports no hang-up on a FIFO until a writer has come and gone, so the
  copy starts when the client writes and ends (the process reads EOF) when the client closes
  its end, or at CloseIO.
* "file:///path": append to that file (ctr --log-uri): the process writes to it directly.
  "file:///path?format=jsonl" (runtimectl's detached containers): the process writes to a pipe
  and the shim's loop appends one JSON object per line to the file, docker json-file's records:
  {"log": "text\n", "stream": "stdout"|"stderr", "time": "2006-01-02T15:04:05.999999999Z"};
  stdout and stderr may name the same file. A line longer than 16 KiB is split into records
  (the last without its newline); a last unterminated line is written at EOF.
  "" is /dev/null (ctr --null-io). Other schemes (binary://) are refused.
* terminal: the command (runc) sends the pty master over a console socket (SCM_RIGHTS); two
  threads copy stdin FIFO -> master and master -> stdout (only terminals cost threads);
  ResizePty is an ioctl on the master.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import stat
import struct
import termios
import threading
import time
from urllib.parse import unquote, urlsplit

from shim.api import InvalidArgument, Stdio, Unavailable
from shim.loop import Loop

COPY_BUFFER = 32 * 1024
LOG_LINE_MAX = 16 * 1024  # docker's json-file splits longer lines into records of this size


def _path_of(value: str) -> str:
    """The filesystem path of a FIFO argument, or raise for unsupported URIs."""
    if "://" not in value:
        return value
    parts = urlsplit(value)
    if parts.scheme == "fifo":
        return unquote(parts.path)
    raise InvalidArgument(
        f"stdio {value!r}: scheme {parts.scheme!r} is not supported (use a FIFO or file://)"
    )


def _log_format(uri: str) -> str:
    """ "jsonl" for file:///path?format=jsonl, else "" (the process writes to the file itself)."""
    query = urlsplit(uri).query
    for item in query.split("&") if query else ():
        key, _, value = item.partition("=")
        if key == "format":
            if value != "jsonl":
                raise InvalidArgument(f"log uri {uri!r}: unknown format {value!r} (only jsonl)")
            return value
    return ""


def _rfc3339_nano(ns: int) -> str:
    seconds, fraction = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:09d}Z"


class _JsonLog:
    """One output pipe of a process, copied by the loop into a log file as JSON lines."""

    def __init__(self, loop: Loop, fd: int, log_fd: int, stream: str) -> None:
        self.loop = loop
        self.fd = fd  # the pipe's read end (non-blocking)
        self.log_fd = log_fd  # shared by stdout and stderr; ProcessIO closes it
        self.stream = stream
        self.partial = b""
        loop.add_reader(fd, self.on_readable)

    def on_readable(self) -> None:
        if self.fd < 0:
            return
        try:
            data = os.read(self.fd, COPY_BUFFER)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.write(data)
        else:
            self.finish()

    def write(self, data: bytes, final: bool = False) -> None:
        now = _rfc3339_nano(time.time_ns())
        buffer = self.partial + data
        records = []
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0 or end - start >= LOG_LINE_MAX:
                if len(buffer) - start >= LOG_LINE_MAX:
                    end = start + LOG_LINE_MAX - 1  # a piece of an over-long line, no newline
                elif end < 0:
                    break
            records.append(self.record(buffer[start : end + 1], now))
            start = end + 1
        self.partial = buffer[start:]
        if final and self.partial:
            records.append(self.record(self.partial, now))
            self.partial = b""
        if records:
            with contextlib.suppress(OSError):  # a full disk loses log lines, not the process
                os.write(self.log_fd, b"".join(records))

    def record(self, line: bytes, now: str) -> bytes:
        text = line.decode("utf-8", "replace")
        return (json.dumps({"log": text, "stream": self.stream, "time": now}) + "\n").encode()

    def finish(self) -> None:
        """EOF (every writer is gone) or the process is forgotten: drain, write the rest, close."""
        if self.fd < 0:
            return
        self.loop.remove_reader(self.fd)
        with contextlib.suppress(OSError):
            while data := os.read(self.fd, COPY_BUFFER):
                self.write(data)
        self.write(b"", final=True)
        _close(self.fd)
        self.fd = -1


def _open_log_file(uri: str) -> int:
    path = unquote(urlsplit(uri).path)
    if not path.startswith("/"):
        raise InvalidArgument(f"log uri {uri!r} must name an absolute path")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


class ProcessIO:
    """The stdio of one process, from spawn to forget."""

    def __init__(self, loop: Loop, name: str, stdio: Stdio) -> None:
        self.loop = loop
        self.name = name
        self.stdio = stdio
        # The process's ends, for the spawned command's fds 0-2 (ours are closed once it has them).
        self.child: list[int | None] = [None, None, None]
        self._keepers: list[int] = []
        self._fifo_in: int | None = None  # the client's stdin FIFO, read end
        self._pipe_in: int | None = None  # the pipe to the process's stdin, write end
        self._pending = b""
        self._master: int | None = None
        self._out: int | None = None  # terminal output target
        self._output_done = threading.Event()
        self._output_done.set()
        self._lock = threading.Lock()
        self._stdin_thread_stop = False
        self._logs: list[_JsonLog] = []  # jsonl log copies
        self._log_fds: dict[str, int] = {}  # jsonl log files by URI
        try:
            if stdio.terminal:
                if stdio.stdout:
                    self._out = self._open_output(stdio.stdout, keep=False)
            else:
                if stdio.stdin:
                    self.child[0], self._pipe_in = os.pipe2(os.O_CLOEXEC)
                self.child[1] = self._open_output(stdio.stdout) if stdio.stdout else None
                if (
                    stdio.stderr
                    and stdio.stderr == stdio.stdout
                    and self.child[1] is not None
                    and not self._log_fds
                ):
                    self.child[2] = os.dup(self.child[1])
                elif stdio.stderr:
                    self.child[2] = self._open_output(stdio.stderr, stream="stderr")
        except BaseException:
            self.close()
            raise

    def _open_output(self, value: str, keep: bool = True, stream: str = "stdout") -> int:
        if value.startswith("file://"):
            if not _log_format(value):
                return _open_log_file(value)
            if not keep:  # a terminal's output is copied raw by its thread: no streams, no lines
                raise InvalidArgument(f"log uri {value!r}: a terminal's output cannot be jsonl")
            log_fd = self._log_fds.get(value)
            if log_fd is None:
                log_fd = self._log_fds[value] = _open_log_file(value)
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(read_end, False)
            self._logs.append(_JsonLog(self.loop, read_end, log_fd, stream))
            return write_end
        path = _path_of(value)
        try:
            keeper = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise InvalidArgument(f"stdio {value!r} does not exist") from None
        except OSError as exc:
            raise Unavailable(f"cannot open stdio {value!r}: {exc.strerror}") from None
        try:
            is_fifo = stat.S_ISFIFO(os.fstat(keeper).st_mode)
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | (0 if is_fifo else os.O_APPEND))
        except OSError:
            os.close(keeper)
            raise
        if keep and is_fifo:
            self._keepers.append(keeper)
        else:
            os.close(keeper)
        return fd

    def started(self) -> None:
        """The process holds its ends now: drop our copies, start copying stdin."""
        for index, fd in enumerate(self.child):
            _close(fd)
            self.child[index] = None
        if self._pipe_in is not None and self.stdio.stdin:
            os.set_blocking(self._pipe_in, False)
            try:
                flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
                self._fifo_in = os.open(_path_of(self.stdio.stdin), flags)
            except OSError:
                self.close_stdin()
                return
            self.loop.add_reader(self._fifo_in, self._on_stdin)

    # -- stdin, in the loop -------------------------------------------------------------------

    def _on_stdin(self) -> None:
        assert self._fifo_in is not None
        try:
            data = os.read(self._fifo_in, COPY_BUFFER)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the client closed its end
            self.close_stdin()
            return
        self._pending = data
        self._flush_stdin()

    def _flush_stdin(self) -> None:
        assert self._pipe_in is not None and self._fifo_in is not None
        try:
            while self._pending:
                written = os.write(self._pipe_in, self._pending)
                self._pending = self._pending[written:]
        except BlockingIOError:
            # The process is not reading: stop reading the client until it does.
            self.loop.remove_reader(self._fifo_in)
            self.loop.add_writer(self._pipe_in, self._flush_stdin)
            return
        except OSError:  # the process closed its stdin
            self.close_stdin()
            return
        self.loop.remove_writer(self._pipe_in)
        self.loop.add_reader(self._fifo_in, self._on_stdin)

    def close_stdin(self) -> None:
        """The process reads EOF from now on (CloseIO, the client's EOF, the process's exit)."""
        self._stdin_thread_stop = True
        if self._fifo_in is not None:
            self.loop.remove_reader(self._fifo_in)
            _close(self._fifo_in)
            self._fifo_in = None
        if self._pipe_in is not None:
            self.loop.remove_writer(self._pipe_in)
            _close(self._pipe_in)
            self._pipe_in = None
        self._pending = b""
        if self._master is not None and self.stdio.stdin:
            # A terminal: the stdin thread may sit in open() for a client that never came.
            with contextlib.suppress(OSError):
                os.close(os.open(_path_of(self.stdio.stdin), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))

    # -- terminal, in threads -----------------------------------------------------------------

    def attach_console(self, master: int) -> None:
        """Copy between the pty master the command sent us and the client's FIFOs."""
        self._master = master
        self._output_done.clear()
        threading.Thread(target=self._copy_output, name=f"pty-out-{self.name}", daemon=True).start()
        if self.stdio.stdin:
            threading.Thread(target=self._copy_input, name=f"pty-in-{self.name}", daemon=True).start()

    def _copy_output(self) -> None:
        assert self._master is not None
        try:
            while True:
                try:
                    data = os.read(self._master, COPY_BUFFER)
                except InterruptedError:
                    continue
                except OSError:
                    break  # EIO: every slave end is closed, the process is gone
                if not data:
                    break
                with self._lock:
                    out = self._out
                if out is None:
                    continue
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(out, view) :]
                except OSError:  # the client went away; keep draining the terminal
                    with self._lock:
                        self._out = None
                    _close(out)
        finally:
            with self._lock:
                out, self._out = self._out, None
            _close(out)
            self._output_done.set()

    def _copy_input(self) -> None:
        source = -1
        try:
            source = os.open(_path_of(self.stdio.stdin), os.O_RDONLY | os.O_CLOEXEC)  # waits for the client
            while not self._stdin_thread_stop:
                data = os.read(source, COPY_BUFFER)
                if not data or self._stdin_thread_stop or self._master is None:
                    break
                view = memoryview(data)
                while view:
                    view = view[os.write(self._master, view) :]
        except OSError:
            pass  # EIO/EBADF: the terminal is gone; anything else ends the copy just the same
        finally:
            _close(source if source >= 0 else None)

    def resize(self, width: int, height: int) -> None:
        if self._master is None:
            raise InvalidArgument(f"process {self.name} has no terminal")
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    def close_input(self) -> None:
        """CloseIO: EOF on stdin; for a terminal, the EOF character."""
        if self._master is not None:
            with contextlib.suppress(OSError):
                os.write(self._master, b"\x04")
        self.close_stdin()

    # -- life cycle ---------------------------------------------------------------------------

    def exited(self) -> None:
        """The process is gone: the client sees EOF once its output is drained."""
        keepers, self._keepers = self._keepers, []
        for fd in keepers:
            _close(fd)
        self.close_stdin()

    def close(self) -> None:
        """Release everything (the process is forgotten, or never started)."""
        self.exited()
        for index, fd in enumerate(self.child):
            _close(fd)
            self.child[index] = None
        for log in self._logs:  # what is left in the pipes is written now
            log.finish()
        self._logs = []
        for fd in self._log_fds.values():
            _close(fd)
        self._log_fds = {}
        if self._master is not None:
            self._output_done.wait(2)
            _close(self._master)
            self._master = None
        with self._lock:
            out, self._out = self._out, None
        if self._output_done.is_set():
            _close(out)


class ConsoleSocket:
    """The unix socket a command sends a new terminal's master to (runc --console-socket)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old_umask = os.umask(0o177)
        try:
            self._sock.bind(path)
        finally:
            os.umask(old_umask)
        self._sock.listen(1)

    def receive_master(self, timeout: float = 5.0) -> int:
        """The master fd the command sent; call once the command has exited."""
        self._sock.settimeout(timeout)
        try:
            connection, _ = self._sock.accept()
        except TimeoutError:
            raise Unavailable("the terminal's master was never sent to the console socket") from None
        with connection:
            connection.settimeout(timeout)
            _, fds, _, _ = socket.recv_fds(connection, 4096, 1)
        if not fds:
            raise Unavailable("no terminal master arrived on the console socket")
        os.set_inheritable(fds[0], False)
        return fds[0]

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
