"""The runc backend: runtime names io.containerd.runc.v2 (v1) and runc.

It drives runc's command line (create/start/state/kill/delete/ps/pause/resume/exec/events
--stats/update) with its own --root per namespace, under this plugin's state directory, and a
JSON log per task (<bundle>/log.json), from which runc's errors are read back. cgroups are
runc's business: it honours the spec's linux.cgroupsPath on cgroup v1 (hybrid too), v2, and with
systemd_cgroup.

The two commands that leave a container process behind, `runc create` and `runc exec --detach`,
are run by the task's shim process (shim.server "spawn"), so that the process is re-parented to
the shim when runc exits and the shim alone owns its stdio and exit status. The commands whose
output we do not read (start, kill, pause, resume, delete) are run by the shim too ("run"), as
containerd's shim runs them: the daemon sends a message instead of forking and reaping a runc.
Those whose output we read (state, ps, events --stats, update's input) and everything after the
shim died (cleanup) run here, as asyncio subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import structlog

from runtimed.api.containerd.runc.options import oci_pb2
from runtimed.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PluginSkipped,
    RuntimedError,
    Unavailable,
    q,
)
from runtimed.plugin import InitContext, PluginType, Registration
from runtimed.tasks import bundle as bundles
from runtimed.tasks.oom import OomWatch
from runtimed.tasks.runtime import Runtime, TaskContext
from runtimed.types import AnyValue
from runtimed.types import Mount as CoreMount
from shim import api
from shim.api import ExecRequest, ExitInfo, ProcessInfo, ProcessState, Shim, SpawnRequest, Stats, Status
from shim.process import Process
from shim.server import CONSOLE_PLACEHOLDER

log = structlog.get_logger("runtimed.runtime.runc")

OPTIONS_TYPES = ("containerd.runc.v1.Options", "type.googleapis.com/containerd.runc.v1.Options")
COMMAND_TIMEOUT = 60.0
CREATE_TIMEOUT = 120.0
DELETE_WAIT = 10.0  # for the init of a created container that runc delete --force kills
SHIM_TIMEOUT = 30.0  # a shim call that is not a wait: a hung shim must not hang the API


def _classify(message: str) -> type[RuntimedError]:
    lowered = message.lower()
    if any(s in lowered for s in ("does not exist", "no such process", "executable file not found")):
        return NotFound
    if any(s in lowered for s in ("not running", "is stopped", "is paused", "already", "cannot")):
        return FailedPrecondition
    # Anything else runc refused is the workload's problem, not a runtimed bug: UNKNOWN, as
    # containerd reports it, rather than INTERNAL.
    return RuntimedError


class Runc:
    """runc's command line for one task: one --root, one JSON log."""

    def __init__(self, binary: str, root: str, log_path: Path, systemd_cgroup: bool) -> None:
        self.binary = binary
        self.root = root
        self.log_path = log_path
        self.systemd_cgroup = systemd_cgroup

    def argv(self, *args: str) -> list[str]:
        argv = [self.binary, "--root", self.root, "--log", str(self.log_path), "--log-format", "json"]
        if self.systemd_cgroup:
            argv.append("--systemd-cgroup")
        return [*argv, *args]

    def log_offset(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def logged_error(self, offset: int) -> str:
        """The error messages runc logged since offset."""
        messages = []
        with contextlib.suppress(OSError), open(self.log_path, "rb") as handle:
            handle.seek(offset)
            for line in handle.read().splitlines():
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if entry.get("level") in ("error", "fatal") and entry.get("msg"):
                        messages.append(str(entry["msg"]))
        return "; ".join(messages)

    async def run(self, *args: str, input: bytes | None = None, timeout: float = COMMAND_TIMEOUT) -> bytes:
        offset = self.log_offset()
        process = await asyncio.create_subprocess_exec(
            *self.argv(*args),
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(input), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise Internal(f"runc {args[0]} did not finish within {timeout}s") from None
        if process.returncode != 0:
            message = stderr.decode(errors="replace").strip() or self.logged_error(offset)
            message = message or f"exit status {process.returncode}"
            raise _classify(message)(f"runc {args[0]}: {message}")
        return stdout


class RuncTask(Shim):
    """One container driven through runc."""

    def __init__(self, runtime: RuncRuntime, context: TaskContext, options: dict[str, Any]) -> None:
        self.context = context
        self.id = context.container_id
        self.bundle = context.bundle
        self.options = options
        self.runc = Runc(
            binary=str(options.get("binary_name") or runtime.binary),
            root=str(options.get("root") or runtime.root / context.namespace),
            log_path=context.bundle / "log.json",
            systemd_cgroup=bool(options.get("systemd_cgroup", runtime.systemd_cgroup)),
        )
        self.init = Process(self.id, "", api.Stdio())
        self.execs: dict[str, Process] = {}
        self.oom: OomWatch | None = None  # while the container runs: its memory cgroup's OOM kills
        self.log = log.bind(namespace=context.namespace, container=self.id)

    @property
    def rootfs(self) -> Path:
        return self.bundle / bundles.ROOTFS

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        process = self.execs.get(exec_id)
        if process is None:
            raise NotFound(f"process does not exist {exec_id}")
        return process

    async def _runc(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> None:
        """Run a runc command that prints nothing we need, in the shim process; here if the shim
        is gone. runc's error comes from its JSON log, as for spawn."""
        offset = self.runc.log_offset()
        request = api.RunRequest(container_id=self.id, argv=self.runc.argv(*args), timeout=timeout)
        try:
            result = await self.context.shim.call("run", request, api.RunResult, timeout=timeout + 10)
        except Unavailable:
            await self.runc.run(*args, timeout=timeout)
            return
        if result.status != 0:
            message = self.runc.logged_error(offset) or f"exit status {result.status}"
            raise _classify(message)(f"runc {args[0]}: {message}")

    async def _spawn(self, request: SpawnRequest, what: str) -> int:
        """Run a runc command in the shim process; runc's own error if it fails."""
        offset = self.runc.log_offset()
        try:
            result = await self.context.shim.call("spawn", request, api.Pid, timeout=request.timeout + 10)
        except RuntimedError as exc:
            if type(exc) is not RuntimedError:  # the shim refused the request itself
                raise
            message = self.runc.logged_error(offset)
            if message:
                raise _classify(message)(f"{what}: {message}") from exc
            # runc logged nothing (it crashed, or a wrapper failed): what it printed went to the
            # process's stderr, as with containerd.
            raise RuntimedError(f"{what}: {exc.message}; see the process's stderr") from exc
        return result.pid

    # -- create / start / exec ----------------------------------------------------------------

    async def create(self, request: api.CreateRequest) -> int:
        self.init.stdio = request.stdio
        if request.rootfs:
            core = [CoreMount(m.type, m.source, m.target, list(m.options)) for m in request.rootfs]
            await bundles.mount_rootfs(core, self.rootfs)  # makes the directory too
        else:
            await asyncio.to_thread(self.rootfs.mkdir, mode=0o711, exist_ok=True)
        args = ["create", "--bundle", str(self.bundle), "--pid-file", str(self.bundle / "init.pid")]
        if request.stdio.terminal:
            args += ["--console-socket", CONSOLE_PLACEHOLDER]
        if self.options.get("no_pivot_root"):
            args.append("--no-pivot")
        if self.options.get("no_new_keyring"):
            args.append("--no-new-keyring")
        spawn = SpawnRequest(
            container_id=self.id,
            exec_id="",
            argv=self.runc.argv(*args, self.id),
            stdio=request.stdio,
            pid_file=str(self.bundle / "init.pid"),
            timeout=CREATE_TIMEOUT,
        )
        try:
            self.init.pid = await self._spawn(spawn, "OCI runtime create failed")
        except BaseException:
            with contextlib.suppress(RuntimedError):
                await self.runc.run("delete", "--force", self.id)
            with contextlib.suppress(RuntimedError):
                await bundles.unmount_all(self.rootfs)
            raise
        self.init.spawned.set()
        return self.init.pid

    async def start(self, exec_id: str = "") -> int:
        process = self.process(exec_id)
        process.require_startable()
        if not exec_id:
            await self._runc("start", self.id)
            if process.status == Status.CREATED:
                process.status = Status.RUNNING
            self._watch_oom()
            return process.pid
        if self.init.status != Status.RUNNING:
            raise FailedPrecondition(f"cannot exec in a {self.init.status} container")
        spec_path = self.bundle / f"exec-{exec_id}.json"
        pid_path = self.bundle / f"exec-{exec_id}.pid"
        args = ["exec", "--detach", "--process", str(spec_path), "--pid-file", str(pid_path)]
        if process.stdio.terminal:
            args += ["--console-socket", CONSOLE_PLACEHOLDER]
        try:
            await asyncio.to_thread(bundles.write_json, spec_path, process.spec)
            spawn = SpawnRequest(
                container_id=self.id,
                exec_id=exec_id,
                argv=self.runc.argv(*args, self.id),
                stdio=process.stdio,
                pid_file=str(pid_path),
                timeout=COMMAND_TIMEOUT,
            )
            process.pid = await self._spawn(spawn, "OCI runtime exec failed")
        except BaseException:
            # ctr waits before it starts: a failed start must end that wait, not hang it.
            process.set_exited(255, time.time_ns())
            process.spawned.set()
            raise
        finally:
            for path in (spec_path, pid_path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        if process.status == Status.CREATED:
            process.status = Status.RUNNING
        process.spawned.set()
        return process.pid

    async def exec(self, request: ExecRequest) -> None:
        if request.exec_id in self.execs:
            raise AlreadyExists(f"id {request.exec_id}")
        if self.init.status not in (Status.RUNNING, Status.CREATED):
            raise FailedPrecondition(f"cannot exec in a {self.init.status} container")
        spec = dict(request.spec)
        spec["terminal"] = request.stdio.terminal
        self.execs[request.exec_id] = Process(self.id, request.exec_id, request.stdio, spec)

    def _watch_oom(self) -> None:
        if self.oom is None and self.init.pid and not self.init.exited:
            try:
                self.oom = OomWatch.start(self.init.pid, self.context.on_oom)
            except OSError as exc:
                self.log.warning("cannot watch the container for OOM kills", error=str(exc))

    def _unwatch_oom(self) -> None:
        """Report an OOM kill not yet seen, then stop watching (the cgroup is about to go)."""
        if self.oom is not None:
            self.oom.check()
            self.oom.stop()
            self.oom = None

    # -- queries ------------------------------------------------------------------------------

    async def state(self, exec_id: str = "") -> ProcessState:
        return self.process(exec_id).state()

    async def wait(self, exec_id: str = "") -> ExitInfo:
        process = self.process(exec_id)
        await process.spawned.wait()
        if process.exited:
            return ExitInfo(pid=process.pid, exit_status=process.exit_status, exited_at=process.exited_at)
        key = api.ProcessKey(container_id=self.id, exec_id=exec_id)
        info = await self.context.shim.call("wait", key, ExitInfo)
        if not process.exited:
            process.set_exited(info.exit_status, info.exited_at)
        return info

    async def pids(self) -> list[ProcessInfo]:
        output = await self.runc.run("ps", "--format", "json", self.id)
        pids = json.loads(output or b"[]") or []
        exec_ids = {p.pid: p.exec_id for p in self.execs.values() if p.pid}
        return [ProcessInfo(pid=pid, exec_id=exec_ids.get(pid, "")) for pid in pids]

    async def stats(self) -> Stats:
        output = await self.runc.run("events", "--stats", self.id)
        document = json.loads(output or b"{}")
        return Stats(type="runc.v1.stats", data=document.get("data") or {})

    # -- control ------------------------------------------------------------------------------

    async def kill(self, exec_id: str = "", signal: int = 15, all: bool = False) -> None:
        process = self.process(exec_id)
        if exec_id:
            process.require_signalable()
            if process.status == Status.CREATED:
                raise FailedPrecondition(f"process {exec_id} is not started")
            request = api.SignalRequest(container_id=self.id, exec_id=exec_id, signal=signal)
            await self.context.shim.call("signal", request, api.Empty, timeout=SHIM_TIMEOUT)
            return
        if not all:
            process.require_signalable()
        try:
            await self._runc("kill", *(["--all"] if all else []), self.id, str(signal))
        except (NotFound, FailedPrecondition) as exc:
            if not all:
                raise NotFound("process already finished") from exc

    async def pause(self) -> None:
        self.init.require(Status.RUNNING, action="pause")
        self.init.status = Status.PAUSING
        try:
            await self._runc("pause", self.id)
        except BaseException:
            if self.init.status == Status.PAUSING:
                self.init.status = Status.RUNNING
            raise
        if self.init.status == Status.PAUSING:
            self.init.status = Status.PAUSED

    async def resume(self) -> None:
        self.init.require(Status.PAUSED, action="resume")
        await self._runc("resume", self.id)
        if self.init.status == Status.PAUSED:
            self.init.status = Status.RUNNING

    async def update(self, resources: dict[str, Any], annotations: dict[str, str]) -> None:
        self.init.require(Status.RUNNING, Status.PAUSED, Status.CREATED, action="update")
        await self.runc.run("update", "--resources", "-", self.id, input=json.dumps(resources).encode())

    async def close_io(self, exec_id: str = "") -> None:
        process = self.process(exec_id)
        if not process.spawned.is_set():
            raise FailedPrecondition(f"process {process.name} is not started")
        key = api.ProcessKey(container_id=self.id, exec_id=exec_id)
        await self.context.shim.call("close_io", key, api.Empty, timeout=SHIM_TIMEOUT)

    async def resize_pty(self, exec_id: str, width: int, height: int) -> None:
        self.process(exec_id)
        request = api.ResizeRequest(container_id=self.id, exec_id=exec_id, width=width, height=height)
        await self.context.shim.call("resize", request, api.Empty, timeout=SHIM_TIMEOUT)

    def exited(self, event: api.Event) -> bool:
        process = self.init if not event.exec_id else self.execs.get(event.exec_id)
        if process is None or process.exit_reported:
            return False
        if process is self.init and self.oom is not None:
            self.oom.check()  # an OOM that killed the init is reported before its exit
        process.set_exited(event.exit_status, event.exited_at)
        process.exit_reported = True
        return True

    # -- delete -------------------------------------------------------------------------------

    async def delete(self, exec_id: str = "") -> ExitInfo:
        process = self.process(exec_id)
        process.require_deletable()
        if exec_id:
            info = ExitInfo(pid=process.pid, exit_status=process.exit_status, exited_at=process.exited_at)
            if process.pid:
                key = api.ProcessKey(container_id=self.id, exec_id=exec_id)
                with contextlib.suppress(NotFound):
                    info = await self.context.shim.call("forget", key, ExitInfo, timeout=SHIM_TIMEOUT)
            self.execs.pop(exec_id, None)
            return info
        running = sorted(e for e, p in self.execs.items() if p.status == Status.RUNNING)
        if running:
            raise FailedPrecondition(
                f"container {q(self.id)} has running exec processes: {', '.join(running)}"
            )
        self._unwatch_oom()
        with contextlib.suppress(NotFound):
            await self._runc("delete", "--force", self.id)
        key = api.ProcessKey(container_id=self.id)
        info = ExitInfo(pid=process.pid, exit_status=process.exit_status, exited_at=process.exited_at)
        if process.pid:
            if not process.exited:  # created, never started: runc delete --force killed it
                with contextlib.suppress(TimeoutError, NotFound):
                    info = await asyncio.wait_for(self.context.shim.call("wait", key, ExitInfo), DELETE_WAIT)
                    process.set_exited(info.exit_status, info.exited_at)
            for exec_id_left in list(self.execs):
                with contextlib.suppress(RuntimedError):
                    left = api.ProcessKey(container_id=self.id, exec_id=exec_id_left)
                    await self.context.shim.call("forget", left, ExitInfo, timeout=SHIM_TIMEOUT)
            with contextlib.suppress(NotFound):
                info = await self.context.shim.call("forget", key, ExitInfo, timeout=SHIM_TIMEOUT)
        self.execs.clear()
        await bundles.unmount_all(self.rootfs)
        return info

    # -- restart and failure ------------------------------------------------------------------

    async def restore(self, records: list[api.ProcessRecord]) -> list[ProcessState]:
        for record in records:
            if record.container_id != self.id:
                continue
            if record.exec_id:
                process = Process(self.id, record.exec_id, record.stdio)
                self.execs[record.exec_id] = process
            else:
                process = self.init
                process.stdio = record.stdio
            process.pid = record.pid
            process.spawned.set()
            if record.exited:
                process.set_exited(record.exit_status, record.exited_at)
            else:
                process.status = Status.RUNNING
        if self.init.pid and not self.init.exited:
            with contextlib.suppress(RuntimedError, ValueError):
                state = json.loads(await self.runc.run("state", self.id))
                if state.get("status") in (Status.CREATED, Status.PAUSED):
                    self.init.status = state["status"]
        if self.init.status in (Status.RUNNING, Status.PAUSED):
            self._watch_oom()
        return [self.init.state(), *(p.state() for p in self.execs.values())]

    async def cleanup(self) -> ExitInfo:
        pid = self.init.pid
        if not pid:
            with contextlib.suppress(OSError, ValueError):
                pid = int((self.bundle / "init.pid").read_text().strip())
        exit_status = 255  # the status was the dead shim's to collect: it is lost
        self._unwatch_oom()
        try:
            state = json.loads(await self.runc.run("state", self.id))
        except (RuntimedError, ValueError):
            state = None
        if state is not None:
            if state.get("status") in ("created", "running", "paused", "pausing"):
                exit_status = 128 + signal.SIGKILL
            with contextlib.suppress(RuntimedError):
                await self.runc.run("delete", "--force", self.id)
        await bundles.unmount_all(self.rootfs)
        exited_at = time.time_ns()
        for process in [self.init, *self.execs.values()]:
            if not process.exited:
                process.set_exited(exit_status, exited_at)
            process.spawned.set()
        return ExitInfo(pid=pid, exit_status=exit_status, exited_at=exited_at)


class RuncRuntime(Runtime):
    names = ("io.containerd.runc.v2", "io.containerd.runc.v1", "runc")

    def __init__(self, binary: str, root: Path, systemd_cgroup: bool) -> None:
        self.binary = binary
        self.root = root
        self.systemd_cgroup = systemd_cgroup

    def decode_options(self, options: AnyValue | None) -> dict[str, Any]:
        if options is None or not options.value:
            return {}
        if options.type_url not in OPTIONS_TYPES:
            raise InvalidArgument(
                f"runtime options of type {q(options.type_url)} are not runc's (containerd.runc.v1.Options)"
            )
        try:
            message = oci_pb2.Options.FromString(options.value)
        except Exception as exc:
            raise InvalidArgument(f"runc options: {exc}") from None
        decoded = {
            "binary_name": message.binary_name,
            "root": message.root,
            "systemd_cgroup": message.systemd_cgroup,
            "no_pivot_root": message.no_pivot_root,
            "no_new_keyring": message.no_new_keyring,
        }
        return {k: v for k, v in decoded.items() if v}

    def new_task(self, context: TaskContext, options: dict[str, Any]) -> RuncTask:
        return RuncTask(self, context, options)


def init(ctx: InitContext) -> RuncRuntime:
    binary = str(ctx.config["binary"])
    path = shutil.which(binary)
    if path is None:
        raise PluginSkipped(
            f"runc binary {q(binary)} not found: install runc or set binary in "
            f"[plugins.{q(ctx.registration.uri)}]"
        )
    if os.geteuid() != 0:
        raise PluginSkipped(f"runc needs root (runtimed runs as uid {os.geteuid()})")
    ctx.ensure_dirs()
    root = Path(ctx.config["root"]) if ctx.config["root"] else ctx.state
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    ctx.exports.update(binary=path, root=str(root))
    return RuncRuntime(path, root, bool(ctx.config["systemd_cgroup"]))


PLUGINS = [
    Registration(
        type=PluginType.RUNTIME,
        id="runc",
        init=init,
        config={
            "binary": "runc",
            # runc's --root; each namespace gets <root>/<namespace>. Default: the plugin's state dir.
            "root": "",
            "systemd_cgroup": False,
        },
    )
]
