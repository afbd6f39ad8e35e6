"""docker's container commands by name: ps, start, stop, restart, kill, rm, pause, unpause, exec,
wait, top, stats and inspect (containers and images).

A container's state is its task's (Tasks.List): running, paused, stopped (exited, with its exit
status) or none, in which case the exit runtimectl recorded in the container's labels (see
runtimed.cli.run) tells "Exited (N) ... ago" from "Created". `stop` and `rm -f` delete the task
once it has exited, so no shim stays behind for a stopped container. `top` reads /proc on the
daemon's host (runtimectl runs there, as root, as nerdctl does) for the pids Tasks.ListPids names.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from runtimed.cli.common import ERROR_EXIT, CLIError, Context, error_message, for_each, report
from runtimed.cli.output import human_duration, print_json, print_table
from runtimed.cli.run import (
    LABEL_CMD,
    LABEL_ENTRYPOINT,
    LABEL_ERROR,
    LABEL_EXIT_CODE,
    LABEL_FINISHED,
    LABEL_MOUNTS,
    LABEL_STARTED,
    STOP_SIGNAL_LABEL,
    InvokeError,
    Services,
    attached_log,
    create_task,
    delete_task_quietly,
    image_info,
    invoke_status,
    is_code,
    log_path_of,
    record_exit,
    remove_container,
    resolve_user,
    start_task,
)
from runtimed.cli.tasks import (
    Attachment,
    Stubs,
    forwarding_signals,
    parse_signal,
    raw_terminal,
    resize,
    run_exec,
    wait_exit,
)

RUNNING, PAUSED, STOPPED, CREATED, PAUSING = 2, 4, 3, 1, 5
DEFAULT_STOP_TIMEOUT = 10


def register(subparsers: argparse._SubParsersAction) -> None:
    ps = subparsers.add_parser(
        "ps", help="list containers", description="List containers (running ones unless -a), like docker ps."
    )
    ps.add_argument("-a", "--all", action="store_true", help="show all containers, not only running ones")
    ps.add_argument("-q", "--quiet", action="store_true", help="only print names")
    ps.add_argument("--no-trunc", action="store_true", help="do not truncate the command")
    ps.add_argument(
        "-f",
        "--filter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="name=SUBSTRING, status=created|running|paused|exited, label=KEY[=VALUE], ancestor=IMAGE",
    )
    ps.add_argument("--format", default="table", help="table, json, or a Go template such as '{{.Name}}'")
    ps.set_defaults(func=ps_command)

    start = subparsers.add_parser(
        "start",
        help="start stopped containers",
        description="Start containers with a new task; -a attaches to one.",
    )
    start.add_argument(
        "-a", "--attach", action="store_true", help="attach stdout/stderr, exit with its status"
    )
    start.add_argument("-i", "--interactive", action="store_true", help="attach stdin too (with -a)")
    start.add_argument("names", metavar="NAME", nargs="+")
    start.set_defaults(func=start_command)

    for name, text in (("stop", "stop"), ("restart", "restart")):
        sub = subparsers.add_parser(
            name,
            help=f"{text} running containers",
            description=f"{text.capitalize()} containers: the stop signal (the image's, else SIGTERM), "
            "then SIGKILL after the timeout" + (", then start again." if name == "restart" else "."),
        )
        sub.add_argument(
            "-t",
            "--time",
            type=int,
            default=DEFAULT_STOP_TIMEOUT,
            metavar="SECONDS",
            help=f"seconds to wait before SIGKILL (default {DEFAULT_STOP_TIMEOUT})",
        )
        sub.add_argument("-s", "--signal", default="", help="signal to stop with (default: the stop signal)")
        sub.add_argument("names", metavar="NAME", nargs="+")
        sub.set_defaults(func=stop_command if name == "stop" else restart_command)

    kill = subparsers.add_parser(
        "kill",
        help="signal running containers",
        description="Send a signal (default SIGKILL) to containers' main process.",
    )
    kill.add_argument("-s", "--signal", default="SIGKILL", help="signal name or number (default SIGKILL)")
    kill.add_argument("names", metavar="NAME", nargs="+")
    kill.set_defaults(func=kill_command)

    rm = subparsers.add_parser(
        "rm",
        help="remove containers",
        description="Remove containers: the task, "
        "the container, its snapshot and its log. A running one needs -f.",
    )
    rm.add_argument("-f", "--force", action="store_true", help="kill a running container first")
    rm.add_argument("-v", "--volumes", action="store_true", help="accepted for docker compatibility")
    rm.add_argument("names", metavar="NAME", nargs="+")
    rm.set_defaults(func=rm_command)

    for name, verb in (("pause", "freeze"), ("unpause", "thaw")):
        sub = subparsers.add_parser(
            name, help=f"{verb} containers", description=f"{verb.capitalize()} every process of containers."
        )
        sub.add_argument("names", metavar="NAME", nargs="+")
        sub.set_defaults(func=pause_command if name == "pause" else unpause_command)

    exec_ = subparsers.add_parser(
        "exec",
        help="run a command in a running container",
        description="Run a command in a running container; exit with its status "
        "(126: cannot invoke it, 127: not found).",
    )
    exec_.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    exec_.add_argument("-i", "--interactive", action="store_true", help="connect stdin")
    exec_.add_argument("-d", "--detach", action="store_true", help="run in the background")
    exec_.add_argument("-e", "--env", action="append", default=[], metavar="NAME[=VALUE]")
    exec_.add_argument("-w", "--workdir", default="", metavar="DIR", help="working directory")
    exec_.add_argument("-u", "--user", default="", metavar="USER[:GROUP]", help="user to run as")
    exec_.add_argument("name", metavar="NAME")
    exec_.add_argument("command", metavar="CMD", nargs=argparse.REMAINDER)
    exec_.set_defaults(func=exec_command)

    wait = subparsers.add_parser(
        "wait",
        help="wait for containers to stop, print their exit codes",
        description="Block until containers stop, then print their exit codes.",
    )
    wait.add_argument("names", metavar="NAME", nargs="+")
    wait.set_defaults(func=wait_command)

    top = subparsers.add_parser(
        "top", help="show a container's processes", description="Show a container's processes as ps -ef does."
    )
    top.add_argument("name", metavar="NAME")
    top.set_defaults(func=top_command)

    stats = subparsers.add_parser(
        "stats",
        help="show containers' resource usage",
        description="Show CPU, memory and process counts of running containers "
        "(cgroup v1 or v2 metrics), refreshed every second unless --no-stream.",
    )
    stats.add_argument("--no-stream", action="store_true", help="print one sample and exit")
    stats.add_argument("-a", "--all", action="store_true", help="accepted for docker compatibility")
    stats.add_argument("--format", default="table", help="table, json, or a Go template")
    stats.add_argument("names", metavar="NAME", nargs="*")
    stats.set_defaults(func=stats_command)

    # docker's inspect takes containers and images: ours replaces the image-only one.
    _drop_parser(subparsers, "inspect")
    inspect = subparsers.add_parser(
        "inspect",
        help="show containers or images as JSON",
        description="Show containers (state, config, mounts, log path) as a JSON "
        "array; a name that is no container is looked up as an image.",
    )
    inspect.add_argument("-f", "--format", default="", help="a Go template such as '{{.State.Status}}'")
    inspect.add_argument("--type", choices=("container", "image"), default="", help="only this kind")
    inspect.add_argument("names", metavar="NAME", nargs="+")
    inspect.set_defaults(func=inspect_command)


def _drop_parser(subparsers: argparse._SubParsersAction, name: str) -> None:
    """Forget a sub-command another module registered (argparse refuses duplicates)."""
    parser = subparsers._name_parser_map.pop(name, None)
    if parser is None:
        return
    for alias in [k for k, v in subparsers._name_parser_map.items() if v is parser]:
        del subparsers._name_parser_map[alias]
    subparsers._choices_actions[:] = [a for a in subparsers._choices_actions if a.dest != name]


# -- state -------------------------------------------------------------------------------------


@dataclass
class State:
    container: Any
    task: Any | None  # tasks_pb2 Process from Tasks.List, or None

    @property
    def name(self) -> str:
        return self.container.id

    @property
    def status(self) -> str:
        """docker's State.Status: created, running, paused, exited."""
        if self.task is not None:
            if self.task.status == RUNNING:
                return "running"
            if self.task.status in (PAUSED, PAUSING):
                return "paused"
            if self.task.status == STOPPED:
                return "exited"
            return "created"
        return "exited" if self.container.labels.get(LABEL_EXIT_CODE, "") else "created"

    @property
    def exit_code(self) -> int:
        if self.task is not None and self.task.status == STOPPED:
            return int(self.task.exit_status)
        with contextlib.suppress(ValueError):
            return int(self.container.labels.get(LABEL_EXIT_CODE, "") or 0)
        return 0

    @property
    def pid(self) -> int:
        return int(self.task.pid) if self.task is not None and self.status in ("running", "paused") else 0

    def started_at(self) -> float | None:
        """Epoch seconds of the last start: the label runtimectl sets, else the process's start."""
        stamp = parse_time(self.container.labels.get(LABEL_STARTED, ""))
        if stamp is None and self.pid:
            stamp = process_start(self.pid)
        return stamp

    def finished_at(self) -> float | None:
        if self.task is not None and self.task.status == STOPPED and self.task.HasField("exited_at"):
            stamp = self.task.exited_at
            return stamp.seconds + stamp.nanos / 1e9
        return parse_time(self.container.labels.get(LABEL_FINISHED, ""))

    def status_text(self) -> str:
        """docker ps's STATUS column."""
        status = self.status
        if status in ("running", "paused"):
            started = self.started_at()
            up = "Up " + (human_duration(time.time() - started) if started else "")
            return up.rstrip() + (" (Paused)" if status == "paused" else "")
        if status == "exited":
            finished = self.finished_at()
            ago = f" {human_duration(max(0.0, time.time() - finished))} ago" if finished else ""
            return f"Exited ({self.exit_code}){ago}"
        return "Created"


def parse_time(text: str) -> float | None:
    """Epoch seconds of an RFC 3339 UTC time as runtimectl writes it (…Z, nanoseconds)."""
    if not text:
        return None
    import calendar

    try:
        whole, _, fraction = text.rstrip("Z").partition(".")
        seconds = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S"))
        return seconds + (float(f"0.{fraction}") if fraction else 0.0)
    except ValueError:
        return None


def rfc3339(stamp: float | None) -> str:
    if not stamp:
        return "0001-01-01T00:00:00Z"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + f".{int(stamp % 1 * 1e9):09d}Z"


def _boot_time() -> float:
    with open("/proc/stat") as handle:
        for line in handle:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name (field 3 onwards, so index 0 is the state)."""
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    return text[text.rindex(")") + 2 :].split()


def process_start(pid: int) -> float | None:
    try:
        return _boot_time() + int(_stat_fields(pid)[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def list_tasks(stubs: Stubs) -> dict[str, Any]:
    return {t.id: t for t in stubs.call("List", stubs.pb.ListTasksRequest()).tasks}


def get_task(stubs: Stubs, name: str) -> Any | None:
    try:
        return stubs.call("Get", stubs.pb.GetRequest(container_id=name)).process
    except Exception as exc:
        if is_code(exc, "NOT_FOUND"):
            return None
        raise


def get_container(ctx: Context, name: str) -> Any:
    try:
        return ctx.client.container(name)
    except Exception as exc:
        if is_code(exc, "NOT_FOUND") or is_code(exc, "INVALID_ARGUMENT"):  # not a container name
            raise CLIError(f"no such container: {name}") from None
        raise


def state_of(ctx: Context, stubs: Stubs, name: str) -> State:
    return State(get_container(ctx, name), get_task(stubs, name))


# -- ps ----------------------------------------------------------------------------------------


def familiar(image: str) -> str:
    from runtimed.errors import InvalidArgument
    from runtimed.reference import parse

    try:
        ref = parse(image)
    except InvalidArgument:
        return image
    text = ref.familiar
    return text.removesuffix(":latest") if ref.digest is None else text


def command_of(container: Any) -> list[str]:
    labels = container.labels
    if LABEL_CMD in labels or LABEL_ENTRYPOINT in labels:
        with contextlib.suppress(ValueError):
            return [
                *json.loads(labels.get(LABEL_ENTRYPOINT) or "[]"),
                *json.loads(labels.get(LABEL_CMD) or "[]"),
            ]
    with contextlib.suppress(ValueError, AttributeError):
        return list((json.loads(container.spec.value or b"{}").get("process") or {}).get("args") or [])
    return []


def ps_view(state: State, no_trunc: bool = False) -> dict[str, Any]:
    container = state.container
    command = " ".join(command_of(container))
    created = container.created_at.seconds + container.created_at.nanos / 1e9
    return {
        "ID": state.name,
        "Name": state.name,
        "Names": state.name,
        "Image": familiar(container.image) if container.image else "",
        "Command": json.dumps(
            command if no_trunc or len(command) <= 20 else command[:19] + "…", ensure_ascii=False
        ),
        "CreatedAt": rfc3339(created),
        "RunningFor": human_duration(max(0.0, time.time() - created)) + " ago",
        "Status": state.status_text(),
        "State": state.status,
        "Labels": ",".join(
            f"{k}={v}"
            for k, v in sorted(container.labels.items())
            if not k.startswith(("runtimed/", "io.containerd."))
        ),
        "Runtime": container.runtime.name,
        "Pid": state.pid,
        "ExitCode": state.exit_code,
    }


def matches(state: State, filters: list[str]) -> bool:
    """docker ps --filter: the same key ORs, different keys AND."""
    by_key: dict[str, list[str]] = {}
    for text in filters:
        key, sep, value = text.partition("=")
        if not sep or key not in ("name", "status", "label", "ancestor", "id"):
            raise CLIError(f"invalid filter {text!r}: use name=, status=, label=, ancestor=")
        by_key.setdefault(key, []).append(value)
    labels = state.container.labels
    image = state.container.image
    tests = {
        "name": lambda v: v in state.name,
        "id": lambda v: state.name.startswith(v),
        "status": lambda v: state.status == v,
        "label": lambda v: (
            labels.get(v.partition("=")[0]) == v.partition("=")[2] if "=" in v else v in labels
        ),
        "ancestor": lambda v: image in (v, familiar(image)) or familiar(image) == familiar(v),
    }
    return all(any(tests[key](v) for v in values) for key, values in by_key.items())


def ps_command(ctx: Context, args: argparse.Namespace) -> None:
    stubs = Stubs(ctx)
    tasks = list_tasks(stubs)
    states = [State(c, tasks.get(c.id)) for c in ctx.client.containers()]
    if not args.all and not any(f.startswith("status=") for f in args.filter):
        states = [s for s in states if s.status in ("running", "paused")]
    states = [s for s in states if matches(s, args.filter)]
    states.sort(key=lambda s: (-s.container.created_at.seconds, -s.container.created_at.nanos, s.name))
    if args.quiet:
        for state in states:
            print(state.name)
        return
    views = [ps_view(s, args.no_trunc) for s in states]
    if args.format == "json":
        print_json(views)
    elif args.format == "table":
        print_table(
            ("NAME", "IMAGE", "COMMAND", "CREATED", "STATUS"),
            [(v["Name"], v["Image"], v["Command"], v["RunningFor"], v["Status"]) for v in views],
        )
    else:
        from runtimed.cli.template import print_formatted

        print_formatted(args.format, views)


# -- start, stop, restart, kill, rm, pause ------------------------------------------------------


def start_one(ctx: Context, services: Services, stubs: Stubs, name: str) -> None:
    """A new detached task for a container (logging to its log file); running already: nothing."""
    container = get_container(ctx, name)
    task = get_task(stubs, name)
    if task is not None:
        if task.status in (RUNNING, PAUSED, PAUSING):
            return
        stubs.call("Delete", stubs.pb.DeleteTaskRequest(container_id=name))
    try:
        create_task(ctx, services, stubs, container, attachment=None)
    except InvokeError as exc:
        record_exit(services, name, exc.status, str(exc))
        raise
    try:
        start_task(services, stubs, name)
    except BaseException:
        delete_task_quietly(stubs, name)
        raise


def start_command(ctx: Context, args: argparse.Namespace) -> int:
    services, stubs = Services(ctx), Stubs(ctx)
    if not args.attach:
        return for_each(ctx, args.names, lambda n: start_one(ctx, services, stubs, n))
    if len(args.names) != 1:
        raise CLIError("you cannot start and attach multiple containers at once")
    name = args.names[0]
    container = get_container(ctx, name)
    task = get_task(stubs, name)
    if task is not None:
        if task.status in (RUNNING, PAUSED, PAUSING):
            raise CLIError(f"container {name} is already running")
        stubs.call("Delete", stubs.pb.DeleteTaskRequest(container_id=name))
    terminal = bool((json.loads(container.spec.value or b"{}").get("process") or {}).get("terminal"))
    attachment = Attachment(
        name, stdin=args.interactive or terminal, terminal=terminal, log=attached_log(container), gated=True
    )
    try:
        try:
            create_task(ctx, services, stubs, container, attachment=attachment)
            attachment.open_gate()
        except InvokeError as exc:
            record_exit(services, name, exc.status, str(exc))
            report(str(exc))
            return exc.status
        waiter = stubs.wait_future(name)
        with raw_terminal(terminal), forwarding_signals(stubs, name, "", terminal):
            start_task(services, stubs, name)
            if terminal:
                resize(stubs, name)
            status = wait_exit(waiter)
            attachment.wait_output()
        record_exit(services, name, status)
        delete_task_quietly(stubs, name)
        return status
    finally:
        attachment.close()


def stop_signal_of(container: Any) -> int:
    label = container.labels.get(STOP_SIGNAL_LABEL, "")
    with contextlib.suppress(CLIError):
        if label:
            return parse_signal(label)
    return int(signal.SIGTERM)


def deleted_meanwhile(exc: BaseException) -> bool:
    """A task Delete that lost a race with another (the watcher of a `run -d --rm` container)."""
    if is_code(exc, "NOT_FOUND"):
        return True
    return is_code(exc, "FAILED_PRECONDITION") and "being deleted" in (exc.details() or "")  # type: ignore[attr-defined]


def stop_one(ctx: Context, services: Services, stubs: Stubs, name: str, timeout: int, sig: str = "") -> None:
    """The stop signal, SIGKILL after timeout seconds; then the exit is recorded and the task deleted."""
    container = get_container(ctx, name)
    task = get_task(stubs, name)
    if task is None:
        return
    if task.status in (RUNNING, PAUSED, PAUSING):
        waiter = stubs.wait_future(name)
        signum = parse_signal(sig) if sig else stop_signal_of(container)
        with contextlib.suppress(Exception):
            stubs.kill(name, signum)
        if task.status != RUNNING:
            with contextlib.suppress(Exception):  # a frozen process cannot act on its signal
                stubs.call("Resume", stubs.pb.ResumeTaskRequest(container_id=name))
        try:
            waiter.result(timeout=max(timeout, 0))
        except Exception:
            with contextlib.suppress(Exception):
                stubs.kill(name, int(signal.SIGKILL), all=True)
            waiter.result(timeout=60)
    try:
        response = stubs.call("Delete", stubs.pb.DeleteTaskRequest(container_id=name))
    except Exception as exc:
        if deleted_meanwhile(exc):
            return
        raise
    record_exit(services, name, int(response.exit_status))


def stop_command(ctx: Context, args: argparse.Namespace) -> int:
    services, stubs = Services(ctx), Stubs(ctx)
    return for_each(ctx, args.names, lambda n: stop_one(ctx, services, stubs, n, args.time, args.signal))


def restart_command(ctx: Context, args: argparse.Namespace) -> int:
    services, stubs = Services(ctx), Stubs(ctx)

    def restart(name: str) -> None:
        stop_one(ctx, services, stubs, name, args.time, args.signal)
        start_one(ctx, services, stubs, name)

    return for_each(ctx, args.names, restart)


def kill_command(ctx: Context, args: argparse.Namespace) -> int:
    signum = parse_signal(args.signal)
    stubs = Stubs(ctx)

    def kill(name: str) -> None:
        get_container(ctx, name)
        task = get_task(stubs, name)
        if task is None or task.status not in (RUNNING, PAUSED, PAUSING):
            raise CLIError(f"cannot kill container {name}: it is not running")
        stubs.kill(name, signum)

    return for_each(ctx, args.names, kill)


def rm_command(ctx: Context, args: argparse.Namespace) -> int:
    services, stubs = Services(ctx), Stubs(ctx)

    def rm(name: str) -> None:
        get_container(ctx, name)
        task = get_task(stubs, name)
        if task is not None:
            if task.status in (RUNNING, PAUSED, PAUSING):
                if not args.force:
                    raise CLIError(
                        f"cannot remove container {name}: it is {State(None, task).status}: "
                        "stop it first or use rm -f"
                    )
                waiter = stubs.wait_future(name)
                stubs.kill(name, int(signal.SIGKILL), all=True)
                if task.status != RUNNING:
                    with contextlib.suppress(Exception):
                        stubs.call("Resume", stubs.pb.ResumeTaskRequest(container_id=name))
                waiter.result(timeout=60)
            try:
                stubs.call("Delete", stubs.pb.DeleteTaskRequest(container_id=name))
            except Exception as exc:
                if not deleted_meanwhile(exc):
                    raise
        try:
            remove_container(ctx, services, name)
        except Exception as exc:
            if not is_code(exc, "NOT_FOUND"):  # removed meanwhile (by a `run -d --rm` watcher)
                raise

    return for_each(ctx, args.names, rm)


def pause_command(ctx: Context, args: argparse.Namespace) -> int:
    stubs = Stubs(ctx)
    return for_each(ctx, args.names, lambda n: stubs.call("Pause", stubs.pb.PauseTaskRequest(container_id=n)))


def unpause_command(ctx: Context, args: argparse.Namespace) -> int:
    stubs = Stubs(ctx)
    return for_each(
        ctx, args.names, lambda n: stubs.call("Resume", stubs.pb.ResumeTaskRequest(container_id=n))
    )


def wait_command(ctx: Context, args: argparse.Namespace) -> int:
    stubs = Stubs(ctx)

    def wait(name: str) -> None:
        get_container(ctx, name)
        task = get_task(stubs, name)
        if task is None:
            state = State(get_container(ctx, name), None)
            print(state.exit_code)
            return
        print(wait_exit(stubs.wait_future(name)))

    return for_each(ctx, args.names, wait, echo=False)


# -- exec --------------------------------------------------------------------------------------


def exec_command(ctx: Context, args: argparse.Namespace) -> int:

    from runtimed.cli.run import host_env
    from runtimed.tasks import spec as specs

    if not args.command:
        raise CLIError("exec needs a command")
    stubs = Stubs(ctx)
    container = get_container(ctx, args.name)
    task = get_task(stubs, args.name)
    if task is None or task.status != RUNNING:
        state = "paused" if task is not None and task.status in (PAUSED, PAUSING) else "not running"
        raise CLIError(f"container {args.name} is {state}")
    spec = json.loads(container.spec.value or b"{}")
    process = dict(spec.get("process") or {})
    process["args"] = list(args.command)
    process["terminal"] = args.tty
    if args.workdir:
        process["cwd"] = args.workdir
    env = host_env(args.env)
    if args.tty:
        env.append("TERM=xterm")
    if env:
        process["env"] = specs._merge_env(process.get("env") or [], env)
    if args.user:
        services = Services(ctx)
        info = image_info(services, ctx.client.image(container.image))
        uid, _, gid = resolve_user(services, info, args.user).partition(":")
        process["user"] = {"uid": int(uid), "gid": int(gid or 0)}
    exec_id = "exec-" + secrets.token_hex(6)
    try:
        start = functools.partial(_start_exec, ctx, stubs, args.name, exec_id)
        return run_exec(stubs, args.name, exec_id, process, args, start, quiet_cleanup=True)
    except InvokeError as exc:
        report(str(exc))
        return exc.status


def _start_exec(ctx: Context, stubs: Stubs, name: str, exec_id: str) -> None:
    try:
        stubs.call("Start", stubs.pb.StartRequest(container_id=name, exec_id=exec_id))
    except Exception as exc:
        message = error_message(exc, ctx)
        if message is None:
            raise
        with contextlib.suppress(Exception):
            stubs.call("DeleteProcess", stubs.pb.DeleteProcessRequest(container_id=name, exec_id=exec_id))
        status = invoke_status(message)
        if status != ERROR_EXIT:
            raise InvokeError(message, status) from None
        raise


# -- top and stats -----------------------------------------------------------------------------


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _tty_name(tty_nr: int) -> str:
    if tty_nr == 0:
        return "?"
    major, minor = os.major(tty_nr), os.minor(tty_nr)
    if 136 <= major <= 143:
        return f"pts/{(major - 136) * 256 + minor}"
    return f"tty{minor}" if major == 4 else "?"


def process_row(pid: int) -> tuple[str, ...] | None:
    """ps -ef's columns for one pid: UID PID PPID C STIME TTY TIME CMD."""
    try:
        fields = _stat_fields(pid)
        with open(f"/proc/{pid}/status") as handle:
            uid = next(int(line.split()[1]) for line in handle if line.startswith("Uid:"))
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = [a.decode(errors="replace") for a in handle.read().split(b"\0") if a]
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
        comm = text[text.index("(") + 1 : text.rindex(")")]
    except (OSError, StopIteration, ValueError):
        return None  # gone meanwhile
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    started = _boot_time() + int(fields[19]) / ticks
    elapsed = max(time.time() - started, 1e-3)
    local = time.localtime(started)
    stime = time.strftime("%H:%M" if time.time() - started < 86400 else "%b%d", local)
    return (
        _user_name(uid),
        str(pid),
        fields[1],
        str(int(cpu * 100 / elapsed)),
        stime,
        _tty_name(int(fields[4])),
        _clock(cpu),
        " ".join(argv) if argv else f"[{comm}]",
    )


def top_command(ctx: Context, args: argparse.Namespace) -> None:
    stubs = Stubs(ctx)
    get_container(ctx, args.name)
    task = get_task(stubs, args.name)
    if task is None or task.status not in (RUNNING, PAUSED, PAUSING):
        raise CLIError(f"container {args.name} is not running")
    processes = stubs.call("ListPids", stubs.pb.ListPidsRequest(container_id=args.name)).processes
    rows = [row for row in (process_row(p.pid) for p in sorted(processes, key=lambda p: p.pid)) if row]
    print_table(("UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"), rows)


def _host_memory() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Sample:
    cpu_ns: int
    memory: int
    limit: int
    pids: int
    at: float


def sample_metrics(stubs: Stubs, names: list[str]) -> dict[str, Sample]:
    from runtimed.cli.tasks import CGROUP_METRICS

    filters = [f"id=={n}" for n in names]
    metrics = stubs.call("Metrics", stubs.pb.MetricsRequest(filters=filters)).metrics
    now = time.monotonic()
    host = _host_memory()
    samples = {}
    for metric in metrics:
        message = CGROUP_METRICS.get(metric.data.type_url)
        if message is None:
            continue
        data = message.FromString(metric.data.value)
        if metric.data.type_url.endswith("v1.Metrics"):
            cpu = data.cpu.usage.total
            usage = data.memory.usage.usage
            memory = max(0, usage - data.memory.total_inactive_file)
            limit = data.memory.usage.limit
        else:
            cpu = data.cpu.usage_usec * 1000
            memory = max(0, data.memory.usage - data.memory.inactive_file)
            limit = data.memory.usage_limit
        if not limit or limit >= host > 0:
            limit = host
        samples[metric.id] = Sample(cpu, memory, limit, data.pids.current, now)
    return samples


def stats_views(first: dict[str, Sample], second: dict[str, Sample]) -> list[dict[str, Any]]:
    views = []
    for name in sorted(second):
        now = second[name]
        before = first.get(name)
        cpu = 0.0
        if before is not None and now.at > before.at:
            cpu = (now.cpu_ns - before.cpu_ns) / ((now.at - before.at) * 1e9) * 100
        views.append(
            {
                "Name": name,
                "ID": name,
                "Container": name,
                "CPUPerc": f"{max(cpu, 0.0):.2f}%",
                "MemUsage": f"{_binary(now.memory)} / {_binary(now.limit)}",
                "MemPerc": f"{(now.memory / now.limit * 100 if now.limit else 0.0):.2f}%",
                "PIDs": str(now.pids),
            }
        )
    return views


def _binary(size: float) -> str:
    """docker stats' memory units: 1.5MiB, 7.7GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            return f"{size:.4g}{unit}"
        size /= 1024
    return f"{size:.4g}PiB"


def _print_stats(views: list[dict[str, Any]], form: str) -> None:
    if form == "json":
        print_json(views)
    elif form == "table":
        print_table(
            ("NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "PIDS"),
            [(v["Name"], v["CPUPerc"], v["MemUsage"], v["MemPerc"], v["PIDs"]) for v in views],
        )
    else:
        from runtimed.cli.template import print_formatted

        print_formatted(form, views)


def stats_command(ctx: Context, args: argparse.Namespace) -> int:
    stubs = Stubs(ctx)
    names = list(args.names)
    for name in names:
        task = get_task(stubs, name)
        get_container(ctx, name)
        if task is None or task.status not in (RUNNING, PAUSED, PAUSING):
            raise CLIError(f"container {name} is not running")
    first = sample_metrics(stubs, names)
    time.sleep(0.5)
    while True:
        second = sample_metrics(stubs, names)
        views = stats_views(first, second)
        if not args.no_stream and sys.stdout.isatty():
            sys.stdout.write("\x1b[2J\x1b[H")
        _print_stats(views, args.format)
        sys.stdout.flush()
        if args.no_stream:
            return 0
        first = second
        time.sleep(1)


# -- inspect -----------------------------------------------------------------------------------


def inspect_view(ctx: Context, state: State) -> dict[str, Any]:
    container = state.container
    spec = json.loads(container.spec.value or b"{}") if container.HasField("spec") else {}
    process = spec.get("process") or {}
    user = process.get("user") or {}
    resources = (spec.get("linux") or {}).get("resources") or {}
    labels = container.labels
    try:
        mounts = json.loads(labels.get(LABEL_MOUNTS) or "[]")
    except ValueError:
        mounts = []
    try:
        entrypoint = json.loads(labels.get(LABEL_ENTRYPOINT) or "null")
        cmd = json.loads(labels.get(LABEL_CMD) or "null")
    except ValueError:
        entrypoint, cmd = None, process.get("args")
    if entrypoint is None and cmd is None:
        cmd = process.get("args")
    cpu = resources.get("cpu") or {}
    created = container.created_at.seconds + container.created_at.nanos / 1e9
    status = state.status
    return {
        "Id": state.name,
        "Name": state.name,
        "Created": rfc3339(created),
        "Image": container.image,
        "Namespace": ctx.namespace,
        "State": {
            "Status": status,
            "Running": status == "running",
            "Paused": status == "paused",
            "Pid": state.pid,
            "ExitCode": state.exit_code,
            "Error": labels.get(LABEL_ERROR, ""),
            "StartedAt": rfc3339(state.started_at()),
            "FinishedAt": rfc3339(state.finished_at() if status == "exited" else None),
        },
        "Config": {
            "Hostname": spec.get("hostname", ""),
            "User": f"{user.get('uid', 0)}:{user.get('gid', 0)}" if user else "",
            "Env": process.get("env") or [],
            "Cmd": cmd,
            "Entrypoint": entrypoint,
            "WorkingDir": process.get("cwd", ""),
            "Tty": bool(process.get("terminal")),
            "Labels": {k: v for k, v in labels.items() if not k.startswith("runtimed/")},
            "StopSignal": labels.get(STOP_SIGNAL_LABEL, ""),
        },
        "Mounts": [
            {
                "Type": m.get("type", "bind"),
                **({"Name": m["name"]} if m.get("name") else {}),
                "Source": m.get("source", ""),
                "Destination": m.get("destination", ""),
                "Mode": m.get("mode", ""),
                "RW": bool(m.get("rw", True)),
            }
            for m in mounts
        ],
        "LogPath": log_path_of(container),
        "HostConfig": {
            "Runtime": container.runtime.name,
            "Memory": int((resources.get("memory") or {}).get("limit") or 0),
            "NanoCpus": int(cpu["quota"] * 1e9 / cpu["period"])
            if cpu.get("quota") and cpu.get("period")
            else 0,
            "PidsLimit": int((resources.get("pids") or {}).get("limit") or 0),
        },
        "Snapshotter": container.snapshotter,
        "SnapshotKey": container.snapshot_key,
    }


def inspect_command(ctx: Context, args: argparse.Namespace) -> int:
    stubs = Stubs(ctx)
    if len(args.names) == 1 and args.type != "container" and not args.format:
        # One image: the document `images inspect` prints (not an array), as before containers came.
        try:
            container = None if args.type == "image" else get_container(ctx, args.names[0])
        except CLIError:
            container = None
        if container is None:
            from runtimed.cli.images import inspect_image

            inspect_image(ctx, argparse.Namespace(image=args.names[0]))
            return 0
    results: list[Any] = []
    status = 0
    for name in args.names:
        try:
            if args.type != "image":
                try:
                    results.append(inspect_view(ctx, state_of(ctx, stubs, name)))
                    continue
                except CLIError:
                    if args.type == "container":
                        raise
            results.append(_image_document(ctx, name))
        except Exception as exc:
            message = error_message(exc, ctx)
            if message is None:
                raise
            report(message if args.type else f"no such object: {name}")
            status = ERROR_EXIT
    if args.format:
        from runtimed.cli.template import render

        for item in results:
            print(render(args.format, item))
    else:
        print_json(results)
    return status


def _image_document(ctx: Context, name: str) -> dict[str, Any]:
    """What `images inspect` shows: the record with its index, manifest and config."""
    import io
    from contextlib import redirect_stdout

    from runtimed.cli.images import inspect_image

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        inspect_image(ctx, argparse.Namespace(image=name))
    return json.loads(buffer.getvalue())
