"""`runtimectl tasks ls|kill|ps|exec|pause|resume|metrics|rm`: running containers.

The process stdio of `exec` (and of `run`, runtimed.cli.run) works as ctr's does: the client
makes FIFOs, the daemon's shim opens their other ends; with -t the local terminal goes raw and
its size follows into the container. runtimectl exits with the process's exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import select
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from runtimed.api.containerd.cgroups.v1 import metrics_pb2 as cgroups_v1
from runtimed.api.containerd.cgroups.v2 import metrics_pb2 as cgroups_v2
from runtimed.cli.common import CLIError, Context, for_each, group
from runtimed.cli.output import add_format_options, print_json, render
from runtimed.wire import NAMESPACE_KEY

STOP_SIGNAL_LABEL = "io.containerd.image.config.stop-signal"
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
STATUS_NAMES = {0: "UNKNOWN", 1: "CREATED", 2: "RUNNING", 3: "STOPPED", 4: "PAUSED", 5: "PAUSING"}


def register(subparsers: argparse._SubParsersAction) -> None:
    commands = group(subparsers, "tasks", "manage running containers (tasks)", aliases=("task", "t"))

    ls = commands.add_parser("ls", aliases=["list"], help="list tasks", description="List tasks.")
    add_format_options(ls, quiet="task IDs")
    ls.set_defaults(func=list_tasks)

    kill = commands.add_parser(
        "kill",
        help="signal tasks",
        description="Signal tasks (default: the image's stop signal, else SIGTERM).",
    )
    kill.add_argument("-s", "--signal", help="signal name or number")
    kill.add_argument("-a", "--all", action="store_true", help="signal every process of the container")
    kill.add_argument("--exec-id", default="", help="signal this exec'd process instead")
    kill.add_argument("ids", metavar="ID", nargs="+")
    kill.set_defaults(func=kill_tasks)

    ps = commands.add_parser("ps", help="list a task's processes", description="List a task's processes.")
    ps.add_argument("id", metavar="ID")
    add_format_options(ps)
    ps.set_defaults(func=task_processes)

    exec_ = commands.add_parser(
        "exec",
        help="run a command in a running task",
        description="Run a command in a running task; exit with its status.",
    )
    exec_.add_argument("--exec-id", required=True, help="the new process's id (unique in the task)")
    exec_.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    exec_.add_argument("-i", "--interactive", action="store_true", help="keep stdin open and connect it")
    exec_.add_argument("-d", "--detach", action="store_true", help="do not wait for the process")
    exec_.add_argument("--cwd", default="", help="working directory")
    exec_.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE")
    exec_.add_argument("id", metavar="ID")
    exec_.add_argument("command", metavar="CMD", nargs=argparse.REMAINDER)
    exec_.set_defaults(func=exec_process)

    for name, verb in (("pause", "freeze"), ("resume", "thaw")):
        sub = commands.add_parser(name, help=f"{verb} tasks", description=f"{verb.capitalize()} tasks.")
        sub.add_argument("ids", metavar="ID", nargs="+")
        sub.set_defaults(func=pause_tasks if name == "pause" else resume_tasks)

    metrics = commands.add_parser(
        "metrics",
        aliases=["stats"],
        help="show tasks' cgroup statistics",
        description="Show cgroup statistics.",
    )
    metrics.add_argument("ids", metavar="ID", nargs="*")
    metrics.set_defaults(func=task_metrics)

    rm = commands.add_parser(
        "rm", aliases=["delete", "remove"], help="delete stopped tasks", description="Delete stopped tasks."
    )
    rm.add_argument("-f", "--force", action="store_true", help="kill a running task first")
    rm.add_argument("ids", metavar="ID", nargs="+")
    rm.set_defaults(func=delete_tasks)


# -- stubs --------------------------------------------------------------------------------------


class Stubs:
    """The services these commands use, on the context's channel."""

    def __init__(self, ctx: Context) -> None:
        from runtimed.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc

        self.ctx = ctx
        self.pb = tasks_pb2
        self.tasks = tasks_pb2_grpc.TasksStub(ctx.client.channel)

    def call(self, method: str, request: Any, *, timeout: float | None = -1) -> Any:
        return getattr(self.tasks, method)(
            request,
            metadata=[(NAMESPACE_KEY, self.ctx.namespace)],
            timeout=self.ctx.timeout if timeout == -1 else timeout,
        )

    def kill(self, container_id: str, signum: int, exec_id: str = "", all: bool = False) -> None:
        request = self.pb.KillRequest(container_id=container_id, exec_id=exec_id, signal=signum, all=all)
        self.call("Kill", request)

    def wait_future(self, container_id: str, exec_id: str = "") -> Any:
        request = self.pb.WaitRequest(container_id=container_id, exec_id=exec_id)
        return self.tasks.Wait.future(request, metadata=[(NAMESPACE_KEY, self.ctx.namespace)])


def parse_signal(text: str) -> int:
    if text.isdigit():
        return int(text)
    name = text.upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise CLIError(f"unknown signal {text!r}") from None


# -- stdio: FIFOs, the terminal, signals -------------------------------------------------------


def fifo_root() -> str:
    from runtimed.client import fifo_parent

    directory = fifo_parent()
    if directory is None:
        raise CLIError("no writable directory for the process's FIFOs")
    return directory


class LogCopy:
    """What an attached process writes, also appended to its container's log file (docker keeps
    logs of attached runs too): JSON lines as the shim writes them (shim.stdio), raw for a terminal."""

    def __init__(self, path: str, jsonl: bool) -> None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self.jsonl = jsonl
        self.partial: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def write(self, stream: str, data: bytes, final: bool = False) -> None:
        if not self.jsonl:
            if data:
                with contextlib.suppress(OSError):
                    os.write(self.fd, data)
            return
        import time

        ns = time.time_ns()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"
        *lines, rest = (self.partial.get(stream, b"") + data).split(b"\n")
        pieces = [line + b"\n" for line in lines] + ([rest] if final and rest else [])
        self.partial[stream] = b"" if final else rest
        records = b"".join(
            json.dumps({"log": piece.decode("utf-8", "replace"), "stream": stream, "time": stamp}).encode()
            + b"\n"
            for piece in pieces
        )
        if records:
            with self.lock, contextlib.suppress(OSError):
                os.write(self.fd, records)

    def close(self) -> None:
        for stream in list(self.partial):
            self.write(stream, b"", final=True)
        with contextlib.suppress(OSError):
            os.close(self.fd)


class Attachment:
    """The FIFOs of one process, copied to and from our own stdio (and to a log, if given)."""

    def __init__(
        self, name: str, *, stdin: bool, terminal: bool, log: LogCopy | None = None, gated: bool = False
    ) -> None:
        """gated: copy nothing until open_gate() (the process started), so that what runc writes
        when the task cannot be created (its own error) can be dropped by discard()."""
        self.directory = Path(tempfile.mkdtemp(prefix="rtctl-", dir=fifo_root()))
        self.terminal = terminal
        self.log = log
        self._gate = threading.Event()
        self._discard = False
        if not gated:
            self._gate.set()
        self.stdin = str(self.directory / f"{name}-stdin") if stdin else ""
        self.stdout = str(self.directory / f"{name}-stdout")
        self.stderr = "" if terminal else str(self.directory / f"{name}-stderr")
        for path in (self.stdin, self.stdout, self.stderr):
            if path:
                os.mkfifo(path, 0o600)
        self._threads = [self._copy_out(self.stdout, sys.stdout, "stdout")]
        if self.stderr:
            self._threads.append(self._copy_out(self.stderr, sys.stderr, "stderr"))
        if self.stdin:
            threading.Thread(target=self._copy_in, daemon=True).start()

    def _copy_out(self, path: str, target: Any, stream: str) -> threading.Thread:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # before the process exists, like ctr
        out = target.fileno()
        log = self.log

        def copy() -> None:
            try:
                self._gate.wait()
                if self._discard:
                    return
                while True:
                    ready, _, _ = select.select([fd], [], [], 1)
                    if not ready:
                        continue  # a FIFO reads as EOF until its writer has come
                    try:
                        data = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        return
                    with contextlib.suppress(OSError):
                        os.write(out, data)
                    if log is not None:
                        log.write(stream, data)
            finally:
                os.close(fd)

        thread = threading.Thread(target=copy, daemon=True)
        thread.start()
        return thread

    def _copy_in(self) -> None:
        with contextlib.suppress(OSError):
            fifo = os.open(self.stdin, os.O_WRONLY)  # waits for the shim's end
            try:
                while True:
                    data = os.read(sys.stdin.fileno(), 65536)
                    if not data:
                        break
                    os.write(fifo, data)
            finally:
                os.close(fifo)  # the process reads EOF, as with docker -i

    def open_gate(self) -> None:
        self._gate.set()

    def discard(self) -> None:
        """Drop whatever was written (the process never started) and stop copying."""
        self._discard = True
        self._gate.set()

    def wait_output(self, timeout: float = 10) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def close(self) -> None:
        if not self._gate.is_set():
            self.discard()
        shutil.rmtree(self.directory, ignore_errors=True)
        if self.log is not None:
            self.log.close()
            self.log = None


@contextlib.contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    if not enabled or not sys.stdin.isatty():
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(sys.stdin.fileno())
    tty.setraw(sys.stdin.fileno())
    try:
        yield
    finally:
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)


def resize(stubs: Stubs, container_id: str, exec_id: str = "") -> None:
    with contextlib.suppress(OSError):
        size = os.get_terminal_size(sys.stdout.fileno())
        request = stubs.pb.ResizePtyRequest(
            container_id=container_id, exec_id=exec_id, width=size.columns, height=size.lines
        )
        with contextlib.suppress(Exception):
            stubs.call("ResizePty", request)


@contextlib.contextmanager
def forwarding_signals(stubs: Stubs, container_id: str, exec_id: str, terminal: bool) -> Iterator[None]:
    """Our signals go to the process (ctr does the same); SIGWINCH resizes its terminal."""
    previous = {}

    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(Exception):
            stubs.kill(container_id, signum, exec_id)

    for signum in FORWARDED_SIGNALS:
        previous[signum] = signal.signal(signum, forward)
    if terminal:
        previous[signal.SIGWINCH] = signal.signal(
            signal.SIGWINCH, lambda *_: resize(stubs, container_id, exec_id)
        )
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def wait_exit(waiter: Any) -> int:
    """The process's exit status. Polls, so that signal handlers (forwarding) get to run."""
    import grpc

    while True:
        try:
            return int(waiter.result(timeout=0.2).exit_status)
        except grpc.FutureTimeoutError:
            continue


# -- commands -----------------------------------------------------------------------------------


def list_tasks(ctx: Context, args: argparse.Namespace) -> None:
    stubs = Stubs(ctx)
    tasks = sorted(stubs.call("List", stubs.pb.ListTasksRequest()).tasks, key=lambda t: t.id)
    render(
        args,
        tasks,
        ("TASK", "PID", "STATUS", "EXIT"),
        lambda t: (t.id, t.pid, STATUS_NAMES.get(t.status, "?"), t.exit_status if t.status == 3 else "-"),
        lambda t: {
            "id": t.id,
            "pid": t.pid,
            "status": STATUS_NAMES.get(t.status, "UNKNOWN").lower(),
            "exit_status": t.exit_status,
        },
        lambda t: t.id,
    )


def stop_signal(ctx: Context, container_id: str) -> int:
    with contextlib.suppress(Exception):
        label = ctx.client.container(container_id).labels.get(STOP_SIGNAL_LABEL, "")
        if label:
            return parse_signal(label)
    return int(signal.SIGTERM)


def kill_tasks(ctx: Context, args: argparse.Namespace) -> int:
    stubs = Stubs(ctx)

    def kill(container_id: str) -> None:
        signum = parse_signal(args.signal) if args.signal else stop_signal(ctx, container_id)
        stubs.kill(container_id, signum, args.exec_id, args.all)

    return for_each(ctx, args.ids, kill)


def task_processes(ctx: Context, args: argparse.Namespace) -> None:
    from runtimed.api.containerd.runc.options import oci_pb2

    stubs = Stubs(ctx)
    processes = stubs.call("ListPids", stubs.pb.ListPidsRequest(container_id=args.id)).processes

    def exec_id(process: Any) -> str:
        if process.info.type_url.endswith("containerd.runc.v1.ProcessDetails"):
            return oci_pb2.ProcessDetails.FromString(process.info.value).exec_id
        return ""

    render(
        args,
        list(processes),
        ("PID", "EXEC ID"),
        lambda p: (p.pid, exec_id(p) or "-"),
        lambda p: {"pid": p.pid, "exec_id": exec_id(p)},
    )


def exec_process(ctx: Context, args: argparse.Namespace) -> int:
    if not args.command:
        raise CLIError("exec needs a command")
    stubs = Stubs(ctx)
    container = ctx.client.container(args.id)
    try:
        spec = json.loads(container.spec.value)
    except ValueError as exc:
        raise CLIError(f"container {args.id}: its spec is not JSON: {exc}") from None
    process = dict(spec.get("process") or {})
    process["args"] = list(args.command)
    process["terminal"] = args.tty
    if args.cwd:
        process["cwd"] = args.cwd
    if args.env:
        process["env"] = [*(process.get("env") or []), *args.env]
    start = functools.partial(
        stubs.call, "Start", stubs.pb.StartRequest(container_id=args.id, exec_id=args.exec_id)
    )
    return run_exec(stubs, args.id, args.exec_id, process, args, start)


def run_exec(
    stubs: Stubs,
    container_id: str,
    exec_id: str,
    process: dict[str, Any],
    args: argparse.Namespace,
    start: Callable[[], Any],
    *,
    quiet_cleanup: bool = False,
) -> int:
    """Add the exec process, start it (`start`), and with no -d copy its stdio, forward signals and
    return its exit status once it is deleted again. args: tty, interactive, detach."""
    from google.protobuf import any_pb2

    attachment = None if args.detach else Attachment(exec_id, stdin=args.interactive, terminal=args.tty)
    try:
        request = stubs.pb.ExecProcessRequest(
            container_id=container_id,
            exec_id=exec_id,
            stdin=attachment.stdin if attachment else "",
            stdout=attachment.stdout if attachment else "",
            stderr=attachment.stderr if attachment else "",
            terminal=args.tty,
            spec=any_pb2.Any(type_url=PROCESS_TYPE_URL, value=json.dumps(process).encode()),
        )
        stubs.call("Exec", request)
        if attachment is None:
            start()
            return 0
        waiter = stubs.wait_future(container_id, exec_id)
        with raw_terminal(args.tty), forwarding_signals(stubs, container_id, exec_id, args.tty):
            start()
            if args.tty:
                resize(stubs, container_id, exec_id)
            status = wait_exit(waiter)
            attachment.wait_output()
        delete = stubs.pb.DeleteProcessRequest(container_id=container_id, exec_id=exec_id)
        with contextlib.suppress(Exception) if quiet_cleanup else contextlib.nullcontext():
            stubs.call("DeleteProcess", delete)
        return status
    finally:
        if attachment is not None:
            attachment.close()


def pause_tasks(ctx: Context, args: argparse.Namespace) -> int:
    stubs = Stubs(ctx)
    return for_each(ctx, args.ids, lambda i: stubs.call("Pause", stubs.pb.PauseTaskRequest(container_id=i)))


def resume_tasks(ctx: Context, args: argparse.Namespace) -> int:
    stubs = Stubs(ctx)
    return for_each(ctx, args.ids, lambda i: stubs.call("Resume", stubs.pb.ResumeTaskRequest(container_id=i)))


CGROUP_METRICS: dict[str, type[Message]] = {
    "io.containerd.cgroups.v1.Metrics": cgroups_v1.Metrics,
    "io.containerd.cgroups.v2.Metrics": cgroups_v2.Metrics,
}


def _plain_message(message: Message) -> dict[str, Any]:
    """The fields a message has set, with numbers as JSON numbers (not proto3 JSON's strings)."""
    plain: dict[str, Any] = {}
    for field, value in message.ListFields():
        if isinstance(value, Message):
            plain[field.name] = _plain_message(value)
        elif isinstance(value, (str, bytes, int, float, bool)):
            plain[field.name] = value
        else:  # repeated
            plain[field.name] = [_plain_message(v) if isinstance(v, Message) else v for v in value]
    return plain


def task_metrics(ctx: Context, args: argparse.Namespace) -> None:
    stubs = Stubs(ctx)
    filters = [f"id=={i}" for i in args.ids]
    metrics = stubs.call("Metrics", stubs.pb.MetricsRequest(filters=filters)).metrics
    if args.ids and not metrics:
        raise CLIError(f"no running task among {', '.join(args.ids)}")
    documents = []
    for metric in metrics:
        data: Any
        message = CGROUP_METRICS.get(metric.data.type_url)
        if message is not None:
            data = _plain_message(message.FromString(metric.data.value))
        else:
            try:
                data = json.loads(metric.data.value)
            except ValueError:
                data = {"type_url": metric.data.type_url, "size": len(metric.data.value)}
        documents.append({"id": metric.id, "type": metric.data.type_url, "data": data})
    print_json(documents)


def delete_tasks(ctx: Context, args: argparse.Namespace) -> int:
    stubs = Stubs(ctx)

    def delete(container_id: str) -> None:
        if args.force:
            process = stubs.call("Get", stubs.pb.GetRequest(container_id=container_id)).process
            if process.status in (2, 4, 5):  # running, paused, pausing
                waiter = stubs.wait_future(container_id)
                stubs.kill(container_id, int(signal.SIGKILL), all=True)
                waiter.result(timeout=30)
        response = stubs.call("Delete", stubs.pb.DeleteTaskRequest(container_id=container_id))
        if response.exit_status:
            print(f"{container_id}: exit status {response.exit_status}", file=sys.stderr)

    return for_each(ctx, args.ids, delete)
