"""The common shim interface, and the protocol of the shim process.

Two contracts live here, one per side of the shim process:

1. `Shim`: what every runtime backend (runc, native, gVisor, kata) implements, one instance per
   task (container). The task manager drives tasks only through it:

       create(CreateRequest) -> pid          the container and its init process, not started
       start(exec_id) -> pid                 the init process, or an exec'd process added by exec
       state(exec_id) -> ProcessState        pid, status, stdio, exit status of one process
       kill(exec_id, signal, all)            one process, or every process of the container
       delete(exec_id) -> ExitInfo           a stopped (or unstarted) process; "" = the container
       exec(ExecRequest)                     add a process to a running container
       pids() -> [ProcessInfo]               the container's processes, exec'd ones named
       pause() / resume()                    freeze and thaw the container
       stats() -> Stats                      cgroup statistics (backend-specific document)
       update(resources, annotations)        change resources (OCI LinuxResources)
       wait(exec_id) -> ExitInfo             until the process exits (fine before start)
       close_io(exec_id)                     the process reads EOF on stdin
       resize_pty(exec_id, width, height)    a process created with a terminal
       exited(Event) -> bool                 the shim process reported an exit
       restore(records) -> [ProcessState]    after a daemon restart: rebuild from the shim process
       cleanup() -> ExitInfo                 after the shim process died: kill, delete, unmount

   An empty exec_id means the container's init process. Backends live in the daemon (plugins.
   runtimes.*), as plugins of type io.runtimed.runtime.v1, and are async.

2. The shim process's protocol (shim.server, over shim.protocol frames). The shim process is
   the container's supervisor: the parent (subreaper) of its processes, owner of their stdio and
   exit statuses; it outlives the daemon. It runs what a backend asks (`spawn`, e.g. `runc
   create ...`, whose leftover process it then adopts), signals, waits, and keeps the records a
   restarted daemon re-adopts. It knows nothing of runc: everything runtime-specific is the
   backend's. One shim process can hold the processes of several containers (a sandbox), which
   is why every call names its container.

       connect   Empty          -> ShimInfo        who it is, every process it holds; subscribes to events
       spawn     SpawnRequest   -> Pid             run a command with the process's stdio, adopt its process
       run       RunRequest     -> RunResult       run a command to its end (say `runc start`); its status
       signal    SignalRequest  -> Empty           kill(2) a process it holds
       wait      ProcessKey     -> ExitInfo        answered when the process exits
       close_io  ProcessKey     -> Empty           close the process's stdin
       resize    ResizeRequest  -> Empty           set a terminal's size
       forget    ProcessKey     -> ExitInfo        drop an exited (or never started) process and its stdio
       shutdown  ShutdownRequest-> Empty           exit once it holds nothing (now: at once)

   Events pushed to connected clients: Event(topic="exit"). Kept while no daemon listens.

Errors carry containerd's error classes (`ShimError.code`); the daemon maps them to its own
errors and so to gRPC codes. Timestamps are integers, nanoseconds since the epoch; 0 is unset.
This module imports only the standard library: the shim process loads it.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

PROTOCOL_VERSION = 1


class Status:
    """A process's status: the names of containerd's v1 types Status, lower case."""

    UNKNOWN = "unknown"
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    PAUSED = "paused"
    PAUSING = "pausing"


# ---------------------------------------------------------------------------------------------
# Errors


class ShimError(Exception):
    """An error of the shim interface; `code` is one of containerd's error classes."""

    code: ClassVar[str] = "unknown"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class NotFound(ShimError):
    code = "not_found"


class AlreadyExists(ShimError):
    code = "already_exists"


class InvalidArgument(ShimError):
    code = "invalid_argument"


class FailedPrecondition(ShimError):
    code = "failed_precondition"


class Unavailable(ShimError):
    code = "unavailable"


class NotImplementedByShim(ShimError):
    code = "not_implemented"


class Internal(ShimError):
    code = "internal"


ERRORS: dict[str, type[ShimError]] = {
    cls.code: cls
    for cls in (
        ShimError,
        NotFound,
        AlreadyExists,
        InvalidArgument,
        FailedPrecondition,
        Unavailable,
        NotImplementedByShim,
        Internal,
    )
}


def error_from_wire(error: Any) -> ShimError:
    if not isinstance(error, dict):
        return ShimError(str(error))
    # A code this daemon does not know (a newer shim's) is not the workload's failure: Internal.
    cls = ERRORS.get(str(error.get("code", "unknown")), Internal)
    return cls(str(error.get("message", "")))


# ---------------------------------------------------------------------------------------------
# Values


def _plain(value: Any) -> Any:
    if isinstance(value, Value):
        return value.to_wire()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class Value:
    """A request or result: a dataclass that travels as a JSON object.

    (Not dataclasses.asdict/fields: they deep-copy through the copy module, which would cost
    every shim process pages; these are shallow and enough for JSON-shaped values.)
    """

    __dataclass_fields__: ClassVar[dict[str, Any]]

    def to_wire(self) -> dict[str, Any]:
        return {name: _plain(getattr(self, name)) for name in self.__dataclass_fields__}

    @classmethod
    def from_wire(cls, data: Any) -> Self:
        """Build from a JSON object, ignoring keys this side does not know (a newer peer's)."""
        if not isinstance(data, dict):
            raise InvalidArgument(f"{cls.__name__}: expected an object, got {type(data).__name__}")
        known = cls.__dataclass_fields__
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise InvalidArgument(f"{cls.__name__}: {exc}") from None


@dataclass
class Empty(Value):
    pass


@dataclass
class Mount(Value):
    type: str
    source: str
    target: str = ""
    options: list[str] = field(default_factory=list)


@dataclass
class Stdio(Value):
    """The client's paths: FIFOs, "file:///path" (append to a file), or "" (nothing)."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


@dataclass
class CreateRequest(Value):
    bundle: str  # the task's directory; holds config.json (the OCI spec)
    rootfs: list[Mount] = field(default_factory=list)  # mounted on <bundle>/rootfs
    stdio: Stdio = field(default_factory=Stdio)
    options: dict[str, Any] = field(default_factory=dict)  # backend options, decoded by the backend


@dataclass
class ExecRequest(Value):
    exec_id: str
    spec: dict[str, Any]  # the OCI Process
    stdio: Stdio = field(default_factory=Stdio)


@dataclass
class ProcessState(Value):
    container_id: str
    exec_id: str
    pid: int
    status: str
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    exit_status: int = 0
    exited_at: int = 0


@dataclass
class ExitInfo(Value):
    pid: int
    exit_status: int
    exited_at: int


@dataclass
class ProcessInfo(Value):
    pid: int
    exec_id: str = ""  # "" for the init process and the processes it started


@dataclass
class Stats(Value):
    type: str  # what `data` is, e.g. "runc.v1.stats"
    data: dict[str, Any] = field(default_factory=dict)


# -- the shim process's protocol --------------------------------------------------------------


@dataclass
class ProcessKey(Value):
    container_id: str
    exec_id: str = ""


@dataclass
class SpawnRequest(Value):
    """Run `argv` with the process's stdio; the process it leaves behind joins the shim.

    With `pid_file` (runc create/exec: the command exits, the container process stays), the
    process is the pid the command wrote there once it exited with status 0. Without, the
    command itself is the process. With a terminal, the shim makes a console socket and puts its
    path in place of every "{console-socket}" in argv; the command must send the pty master to it.
    """

    container_id: str
    exec_id: str
    argv: list[str]
    stdio: Stdio = field(default_factory=Stdio)
    pid_file: str = ""
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if isinstance(self.stdio, dict):
            self.stdio = Stdio.from_wire(self.stdio)


@dataclass
class RunRequest(Value):
    """Run `argv` to its end, stdin and stdout on /dev/null, stderr into the shim's log; the answer
    is its exit status. Backends run the commands that leave nothing behind here (`runc start`,
    `runc delete`), as containerd's shims do: the daemon sends a message instead of forking. A
    command still running after `timeout` seconds is killed (status 137)."""

    container_id: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 60.0


@dataclass
class RunResult(Value):
    status: int  # the exit code, or 128+signal


@dataclass
class SignalRequest(Value):
    container_id: str
    exec_id: str = ""
    signal: int = 15


@dataclass
class ResizeRequest(Value):
    container_id: str
    exec_id: str = ""
    width: int = 0
    height: int = 0


@dataclass
class ShutdownRequest(Value):
    now: bool = False


@dataclass
class Pid(Value):
    pid: int


@dataclass
class ProcessRecord(Value):
    """What the shim process knows of one process."""

    container_id: str
    exec_id: str
    pid: int
    exited: bool = False
    exit_status: int = 0
    exited_at: int = 0
    stdio: Stdio = field(default_factory=Stdio)

    def __post_init__(self) -> None:
        if isinstance(self.stdio, dict):
            self.stdio = Stdio.from_wire(self.stdio)


@dataclass
class ShimInfo(Value):
    version: int
    pid: int
    processes: list[ProcessRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.processes = [ProcessRecord.from_wire(p) if isinstance(p, dict) else p for p in self.processes]


@dataclass
class Event(Value):
    """Pushed by the shim process to connected clients; topic "exit"."""

    topic: str
    container_id: str
    exec_id: str = ""
    pid: int = 0
    exit_status: int = 0
    exited_at: int = 0


# method -> (request type, result type); the shim process's dispatch table.
METHODS: dict[str, tuple[type[Value], type[Value]]] = {
    "connect": (Empty, ShimInfo),
    "spawn": (SpawnRequest, Pid),
    "run": (RunRequest, RunResult),
    "signal": (SignalRequest, Empty),
    "wait": (ProcessKey, ExitInfo),
    "close_io": (ProcessKey, Empty),
    "resize": (ResizeRequest, Empty),
    "forget": (ProcessKey, ExitInfo),
    "shutdown": (ShutdownRequest, Empty),
}


def exit_code(wait_status: int) -> int:
    """A waitpid status as a shell reports it: the exit code, or 128+signal."""
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 128 - code


# ---------------------------------------------------------------------------------------------
# The common shim interface


class Shim(abc.ABC):
    """One task (container) of a runtime backend. Calls may run concurrently."""

    @abc.abstractmethod
    async def create(self, request: CreateRequest) -> int: ...

    @abc.abstractmethod
    async def start(self, exec_id: str = "") -> int: ...

    @abc.abstractmethod
    async def state(self, exec_id: str = "") -> ProcessState: ...

    @abc.abstractmethod
    async def kill(self, exec_id: str = "", signal: int = 15, all: bool = False) -> None: ...

    @abc.abstractmethod
    async def delete(self, exec_id: str = "") -> ExitInfo: ...

    @abc.abstractmethod
    async def exec(self, request: ExecRequest) -> None: ...

    @abc.abstractmethod
    async def pids(self) -> list[ProcessInfo]: ...

    @abc.abstractmethod
    async def pause(self) -> None: ...

    @abc.abstractmethod
    async def resume(self) -> None: ...

    @abc.abstractmethod
    async def stats(self) -> Stats: ...

    @abc.abstractmethod
    async def update(self, resources: dict[str, Any], annotations: dict[str, str]) -> None: ...

    @abc.abstractmethod
    async def wait(self, exec_id: str = "") -> ExitInfo: ...

    @abc.abstractmethod
    async def close_io(self, exec_id: str = "") -> None: ...

    @abc.abstractmethod
    async def resize_pty(self, exec_id: str, width: int, height: int) -> None: ...

    @abc.abstractmethod
    def exited(self, event: Event) -> bool:
        """The shim process reported an exit: record it; False if it is not news (unknown or seen)."""

    @abc.abstractmethod
    async def restore(self, records: list[ProcessRecord]) -> list[ProcessState]:
        """After a daemon restart, rebuild the task from its shim process's records."""

    @abc.abstractmethod
    async def cleanup(self) -> ExitInfo:
        """The shim process is gone: kill and delete what it left, unmount, report the init's
        exit as best known (128+SIGKILL when it had to be killed, 255 when it is lost)."""
