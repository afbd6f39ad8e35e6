"""The shim process: a container's supervisor, serving shim.api's protocol on a unix socket.

Process model: the daemon's zygote (shim.zygote) forks; the child calls setsid() and forks the
shim, which runs `run()` here. Its parent exits at once, so init (or the nearest subreaper)
adopts it: it outlives the daemon. It is a child subreaper, so the container's processes, whose
parent (runc) exits early, are re-parented to it and it alone collects their exit statuses.

One thread, one event loop (shim.loop): the listening socket, each connection, the SIGCHLD
wakeup fd, stdin FIFOs and timers are callbacks. Nothing blocks but the rare terminal copy
threads (shim.stdio). A `spawn` runs its command (say `runc create`) and answers when the
command has exited and the process it left is adopted; a `wait` is answered when the process
exits; meanwhile other requests go on.

Exit statuses are the shim's to keep: each exit is pushed as an event to every connected
daemon, queued while none is, and kept in the process's record until the daemon forgets it, so
an exit that happens while the daemon is down is reported when it comes back.

On disk: the socket (path given by the daemon, under <state>/s/) and a record (JSON, path given
by the daemon, in the task's bundle): {"version", "namespace", "id", "address", "pid", ...the
daemon's own keys}. A restarted daemon re-adopts the shim from it. The shim removes both when
it exits: after `shutdown`, or by itself a few seconds after it was left holding nothing.
"""

from __future__ import annotations

import _signal
import _socket
import collections
import contextlib
import json
import os
import time
import traceback
from typing import Any, NoReturn

from shim import protocol, reaper
from shim.api import (
    METHODS,
    PROTOCOL_VERSION,
    AlreadyExists,
    Empty,
    Event,
    ExitInfo,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    NotImplementedByShim,
    Pid,
    ProcessKey,
    ProcessRecord,
    ResizeRequest,
    RunRequest,
    RunResult,
    ShimError,
    ShimInfo,
    ShutdownRequest,
    SignalRequest,
    SpawnRequest,
)
from shim.loop import Loop
from shim.stdio import ConsoleSocket, ProcessIO

PENDING_EVENTS = 1024  # events kept while no daemon listens; the oldest go first beyond that
IDLE_EXIT_SECONDS = 5.0  # a shim holding nothing exits by itself after this, if not told sooner
CONSOLE_PLACEHOLDER = "{console-socket}"
SEEN_EXITS = 4096  # exits of not-yet-known pids remembered while a spawn is in flight


def log(event: str, **fields: Any) -> None:
    """One line on stderr (the shim's log file): time, event, key=value fields; never fails."""
    text = " ".join(f"{k}={json.dumps(v)}" for k, v in fields.items())
    with contextlib.suppress(Exception):
        os.write(2, f"{time.time():.6f} {event} {text}\n".encode())


def _on_sigchld(signum: int, frame: Any) -> None:
    pass  # the wakeup fd does the work


def write_record(path: str, record: dict[str, Any]) -> None:
    temporary = f"{path}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        protocol.write_all_fd(fd, json.dumps(record).encode())  # no fsync: the state dir is volatile
    finally:
        os.close(fd)
    os.replace(temporary, path)


class Process:
    """The shim's record of one process."""

    def __init__(self, request: SpawnRequest, io: ProcessIO) -> None:
        self.container_id = request.container_id
        self.exec_id = request.exec_id
        self.stdio = request.stdio
        self.io = io
        self.pid = 0
        self.exited = False
        self.exit_status = 0
        self.exited_at = 0
        self.waiters: list[tuple[Connection, Any]] = []

    @property
    def key(self) -> tuple[str, str]:
        return self.container_id, self.exec_id

    def record(self) -> ProcessRecord:
        return ProcessRecord(
            container_id=self.container_id,
            exec_id=self.exec_id,
            pid=self.pid,
            exited=self.exited,
            exit_status=self.exit_status,
            exited_at=self.exited_at,
            stdio=self.stdio,
        )

    def exit_info(self) -> ExitInfo:
        return ExitInfo(pid=self.pid, exit_status=self.exit_status, exited_at=self.exited_at)


class Launch:
    """A spawn whose command is still running."""

    def __init__(
        self, request: SpawnRequest, process: Process, connection: Connection, request_id: Any
    ) -> None:
        self.request = request
        self.process = process
        self.connection = connection
        self.request_id = request_id
        self.console: ConsoleSocket | None = None
        self.timer = -1
        self.seen: dict[int, int] = {}


class Command:
    """A `run` whose command is still running."""

    def __init__(self, connection: Connection, request_id: Any) -> None:
        self.connection = connection
        self.request_id = request_id
        self.timer = -1


class Connection:
    def __init__(self, sock: _socket.socket, server: ShimServer) -> None:
        self.sock = sock
        self.server = server
        self.fd = sock.fileno()
        self.inbox = b""
        self.outbox = b""
        self.subscribed = False
        self.closed = False
        sock.setblocking(False)
        server.loop.add_reader(self.fd, self.on_readable)

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.inbox += data
        while len(self.inbox) >= protocol.HEADER.size:
            try:
                length = protocol.decode_length(self.inbox[: protocol.HEADER.size])
                end = protocol.HEADER.size + length
                if len(self.inbox) < end:
                    break
                message = protocol.decode_body(self.inbox[protocol.HEADER.size : end])
            except protocol.ProtocolError as exc:
                log("bad frame", error=str(exc))
                self.close()
                return
            self.inbox = self.inbox[end:]
            self.server.handle(self, message)
            if self.closed:
                return

    def send(self, message: dict[str, Any]) -> None:
        if self.closed:
            return
        self.outbox += protocol.encode(message)
        self.flush()

    def flush(self) -> None:
        try:
            while self.outbox:
                sent = self.sock.send(self.outbox)
                self.outbox = self.outbox[sent:]
        except BlockingIOError:
            self.server.loop.add_writer(self.fd, self.flush)
            return
        except OSError:
            self.close()
            return
        self.server.loop.remove_writer(self.fd)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.loop.remove_reader(self.fd)
        self.server.loop.remove_writer(self.fd)
        self.sock.close()
        self.server.forget_connection(self)


class ShimServer:
    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.loop = Loop()
        self.socket_path: str = params["socket"]
        self.record_path: str = params["record"]
        self.processes: dict[tuple[str, str], Process] = {}
        self.by_pid: dict[int, Process] = {}
        self.launches: dict[int, Launch] = {}  # by the command's pid
        self.commands: dict[int, Command] = {}  # runs, by the command's pid
        self.connections: set[Connection] = set()
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=PENDING_EVENTS)
        self.idle_timer = -1
        self.listener: _socket.socket | None = None

    # -- set-up and the main loop -------------------------------------------------------------

    def listen(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # the socket is 0600 from its first moment
        try:
            listener.bind(self.socket_path)
        finally:
            os.umask(old_umask)
        listener.listen(64)
        listener.setblocking(False)
        self.listener = listener
        record = dict(self.params.get("record_data") or {})
        record.update(
            version=PROTOCOL_VERSION,
            namespace=self.params["namespace"],
            id=self.params["id"],
            address=self.socket_path,
            pid=os.getpid(),
        )
        write_record(self.record_path, record)

    def serve(self) -> None:
        assert self.listener is not None
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # _signal, not signal: the latter's enum conversions cost each shim pages.
        _signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        _signal.signal(_signal.SIGCHLD, _on_sigchld)  # a handler, so the wakeup fd is written

        def on_signal() -> None:
            with contextlib.suppress(BlockingIOError):
                while os.read(wake_r, 4096):
                    pass
            self.on_exits(reaper.reap())

        self.loop.add_reader(wake_r, on_signal)
        self.loop.add_reader(self.listener.fileno(), self.accept)
        self.on_exits(reaper.reap())  # anything that exited before the handler was installed
        self.schedule_idle_exit()
        self.loop.run()

    def accept(self) -> None:
        assert self.listener is not None
        try:
            fd, _ = self.listener._accept()
        except (BlockingIOError, InterruptedError):
            return
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, fd)
        self.connections.add(Connection(sock, self))

    def forget_connection(self, connection: Connection) -> None:
        self.connections.discard(connection)
        for process in self.processes.values():
            process.waiters = [w for w in process.waiters if w[0] is not connection]

    def finish(self) -> None:
        """Remove the socket and the record: no daemon may adopt an exiting shim."""
        for path in (self.socket_path, self.record_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.sock.settimeout(1)
                connection.sock.sendall(connection.outbox)
            connection.close()
        if self.listener is not None:
            self.listener.close()

    # -- requests -----------------------------------------------------------------------------

    def handle(self, connection: Connection, message: dict[str, Any]) -> None:
        request_id = message.get("id")
        method = str(message.get("method", ""))
        try:
            types = METHODS.get(method)
            if types is None:
                raise NotImplementedByShim(f"method {method!r}")
            request = types[0].from_wire(message.get("params") or {})
            result = getattr(self, f"do_{method}")(connection, request_id, request)
        except ShimError as exc:
            connection.send({"id": request_id, "error": exc.to_wire()})
            return
        except Exception as exc:
            log("request failed", method=method, error=repr(exc), trace=traceback.format_exc())
            connection.send({"id": request_id, "error": Internal(f"shim {method}: {exc!r}").to_wire()})
            return
        if result is not None:  # None: answered later (spawn, run, wait)
            connection.send({"id": request_id, "result": result.to_wire()})
        if method == "connect":
            connection.subscribed = True
            self.flush_events()
        elif method == "shutdown" and (request.now or not self.processes):
            log("shutdown requested", now=request.now)
            self.loop.stop()

    def process(self, container_id: str, exec_id: str) -> Process:
        process = self.processes.get((container_id, exec_id))
        if process is None:
            raise NotFound(f"process does not exist {exec_id or container_id}")
        return process

    def do_connect(self, connection: Connection, request_id: Any, request: Empty) -> ShimInfo:
        return ShimInfo(
            version=PROTOCOL_VERSION, pid=os.getpid(), processes=[p.record() for p in self.processes.values()]
        )

    def do_shutdown(self, connection: Connection, request_id: Any, request: ShutdownRequest) -> Empty:
        return Empty()

    def do_spawn(self, connection: Connection, request_id: Any, request: SpawnRequest) -> Pid | None:
        key = (request.container_id, request.exec_id)
        if not request.container_id or not request.argv:
            raise InvalidArgument("spawn needs a container id and a command")
        if key in self.processes:
            raise AlreadyExists(f"process {request.exec_id or request.container_id}")
        if request.stdio.terminal and not request.pid_file:
            # The terminal's master comes from a launcher (runc) over the console socket.
            raise InvalidArgument("a terminal needs a launcher command that writes a pid file")
        io = ProcessIO(self.loop, request.exec_id or request.container_id, request.stdio)
        process = Process(request, io)
        launch = Launch(request, process, connection, request_id)
        argv = list(request.argv)
        try:
            if request.stdio.terminal:
                name = f"pty-{os.getpid()}-{len(self.launches)}-{time.monotonic_ns() % 10**6}.sock"
                launch.console = ConsoleSocket(os.path.join(os.path.dirname(self.socket_path), name))
                argv = [launch.console.path if a == CONSOLE_PLACEHOLDER else a for a in argv]
            pid = reaper.spawn(argv, io.child, request.env)
        except BaseException as exc:
            io.close()
            if launch.console is not None:
                launch.console.close()
            if isinstance(exc, OSError):
                raise InvalidArgument(f"cannot run {argv[0]}: {exc.strerror}") from None
            raise
        self.processes[key] = process
        self.cancel_idle_exit()
        if not request.pid_file:  # the command is the process
            process.pid = pid
            self.by_pid[pid] = process
            io.started()
            return Pid(pid=pid)
        self.launches[pid] = launch
        launch.timer = self.loop.call_later(request.timeout, lambda: self.launch_timed_out(pid))
        return None

    def do_run(self, connection: Connection, request_id: Any, request: RunRequest) -> None:
        if not request.argv:
            raise InvalidArgument("run needs a command")
        try:
            pid = reaper.spawn(request.argv, (None, None, 2), request.env)
        except OSError as exc:
            raise InvalidArgument(f"cannot run {request.argv[0]}: {exc.strerror}") from None
        command = Command(connection, request_id)
        command.timer = self.loop.call_later(request.timeout, lambda: self.launch_timed_out(pid))
        self.commands[pid] = command
        self.cancel_idle_exit()
        return None

    def launch_timed_out(self, pid: int) -> None:
        if pid in self.launches or pid in self.commands:
            log("command timed out, killing it", child=pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, _signal.SIGKILL)

    def launched(self, launch: Launch, status: int) -> None:
        """The spawn's command exited: adopt the process it left, or report its failure."""
        self.loop.cancel(launch.timer)
        process = launch.process
        request = launch.request
        try:
            if status != 0:
                # The command's failure (runc refusing a container), not the shim's: UNKNOWN.
                raise ShimError(f"{request.argv[0]} exited with status {status}")
            try:
                with open(request.pid_file) as handle:
                    process.pid = int(handle.read().strip())
            except (OSError, ValueError) as exc:
                raise Internal(f"{request.argv[0]} left no pid in {request.pid_file}: {exc}") from None
            if launch.console is not None:
                process.io.attach_console(launch.console.receive_master())
            process.io.started()
        except ShimError as exc:
            self.processes.pop(process.key, None)
            process.io.close()
            launch.connection.send({"id": launch.request_id, "error": exc.to_wire()})
            self.schedule_idle_exit()
            return
        finally:
            if launch.console is not None:
                launch.console.close()
        self.by_pid[process.pid] = process
        launch.connection.send({"id": launch.request_id, "result": Pid(pid=process.pid).to_wire()})
        if process.pid in launch.seen:  # it died before we knew its pid
            self.exited(process, launch.seen[process.pid])

    def do_signal(self, connection: Connection, request_id: Any, request: SignalRequest) -> Empty:
        process = self.process(request.container_id, request.exec_id)
        if process.exited:
            raise NotFound("process already finished")
        if not process.pid:
            raise FailedPrecondition(f"process {request.exec_id or request.container_id} is being created")
        try:
            os.kill(process.pid, request.signal)
        except ProcessLookupError:
            raise NotFound("process already finished") from None
        return Empty()

    def do_wait(self, connection: Connection, request_id: Any, request: ProcessKey) -> ExitInfo | None:
        process = self.process(request.container_id, request.exec_id)
        if process.exited:
            return process.exit_info()
        process.waiters.append((connection, request_id))
        return None

    def do_close_io(self, connection: Connection, request_id: Any, request: ProcessKey) -> Empty:
        self.process(request.container_id, request.exec_id).io.close_input()
        return Empty()

    def do_resize(self, connection: Connection, request_id: Any, request: ResizeRequest) -> Empty:
        self.process(request.container_id, request.exec_id).io.resize(request.width, request.height)
        return Empty()

    def do_forget(self, connection: Connection, request_id: Any, request: ProcessKey) -> ExitInfo:
        process = self.process(request.container_id, request.exec_id)
        if not process.exited and process.pid:
            raise FailedPrecondition(f"process {request.exec_id or request.container_id} is running")
        if not process.pid:
            raise FailedPrecondition(f"process {request.exec_id or request.container_id} is being created")
        del self.processes[process.key]
        self.by_pid.pop(process.pid, None)
        process.io.close()
        self.schedule_idle_exit()
        return process.exit_info()

    # -- exits and events ---------------------------------------------------------------------

    def on_exits(self, exits: list[tuple[int, int]]) -> None:
        for pid, status in exits:
            command = self.commands.pop(pid, None)
            if command is not None:
                self.loop.cancel(command.timer)
                answer = RunResult(status=status).to_wire()
                command.connection.send({"id": command.request_id, "result": answer})
                self.schedule_idle_exit()
                continue
            launch = self.launches.pop(pid, None)
            if launch is not None:
                self.launched(launch, status)
                continue
            process = self.by_pid.get(pid)
            if process is not None:
                self.exited(process, status)
                continue
            for pending in self.launches.values():  # perhaps the process of a spawn in flight
                if len(pending.seen) < SEEN_EXITS:
                    pending.seen[pid] = status

    def exited(self, process: Process, status: int) -> None:
        if process.exited:
            return
        process.exited = True
        process.exit_status = status
        process.exited_at = time.time_ns()
        process.io.exited()
        info = process.exit_info().to_wire()
        for connection, request_id in process.waiters:
            connection.send({"id": request_id, "result": info})
        process.waiters = []
        event = Event(
            topic="exit",
            container_id=process.container_id,
            exec_id=process.exec_id,
            pid=process.pid,
            exit_status=status,
            exited_at=process.exited_at,
        )
        log("exit", container=process.container_id, exec_id=process.exec_id, pid=process.pid, status=status)
        self.events.append({"event": event.to_wire()})
        self.flush_events()

    def flush_events(self) -> None:
        subscribers = [c for c in self.connections if c.subscribed and not c.closed]
        if not subscribers:
            return
        while self.events:
            message = self.events.popleft()
            for connection in subscribers:
                connection.send(message)

    # -- exiting when empty -------------------------------------------------------------------

    def schedule_idle_exit(self) -> None:
        if self.processes or self.launches or self.commands or self.idle_timer >= 0:
            return
        self.idle_timer = self.loop.call_later(IDLE_EXIT_SECONDS, self.exit_if_idle)

    def cancel_idle_exit(self) -> None:
        if self.idle_timer >= 0:
            self.loop.cancel(self.idle_timer)
            self.idle_timer = -1

    def exit_if_idle(self) -> None:
        self.idle_timer = -1
        if not self.processes and not self.launches and not self.commands:
            log("holding nothing, exiting")
            self.loop.stop()


def run(params: dict[str, Any], ready_fd: int) -> NoReturn:
    """The shim's life, in the zygote's grandchild. Reports readiness (or why not) on ready_fd."""
    status = 0
    try:
        reaper.set_child_subreaper()
        _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
        server = ShimServer(params)
        server.listen()
    except BaseException as exc:
        with contextlib.suppress(OSError):
            protocol.write_all_fd(ready_fd, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        os._exit(1)
    protocol.write_all_fd(ready_fd, json.dumps({"pid": os.getpid(), "address": server.socket_path}).encode())
    os.close(ready_fd)
    log("shim started", namespace=params["namespace"], id=params["id"], pid=os.getpid())
    try:
        server.serve()
    except BaseException as exc:
        log("shim failed", error=repr(exc), trace=traceback.format_exc())
        status = 1
    finally:
        server.finish()
        log("shim exiting", pid=os.getpid())
    os._exit(status)
