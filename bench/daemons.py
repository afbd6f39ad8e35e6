"""The processes a benchmark run starts: a registry, runtimed and containerd, each on private paths.

Everything lives under one temp directory (the Workspace). Every process is started here, recorded
by pid and stopped by that pid; nothing is ever looked up or killed by name. Shims that a daemon
started are found by our temp path in their command line (containerd's shim gets `-address
<our socket>`), so a system containerd's shims can never match.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CTR = shutil.which("ctr") or "/usr/bin/ctr"
CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"
REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def child_env() -> dict[str, str]:
    """The environment for everything we start: no proxies (the registry is on loopback)."""
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS and not k.startswith("REGISTRY_")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class CtrResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def reason(self) -> str:
        """A one-line account of a failure, for "n/a (...)" cells."""
        text = (self.stderr.strip() or self.stdout.strip() or f"exit status {self.returncode}").splitlines()
        lines = [line for line in text if "version mismatch" not in line] or text
        return lines[-1][:160] if lines else f"exit status {self.returncode}"


def run_timed(argv: Sequence[str], timeout: float = 600, stdin: int | None = subprocess.DEVNULL) -> CtrResult:
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, env=child_env(), stdin=stdin
        )
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out, err = -1, str(exc.stdout or ""), f"timed out after {timeout:.0f} s"
    return CtrResult(list(argv), code, out, err, time.perf_counter() - start)


@dataclass
class Workspace:
    """The run's temp directory and every process started in it; close() undoes it all."""

    base: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @classmethod
    def create(cls, parent: str | None = None) -> Workspace:
        return cls(Path(tempfile.mkdtemp(prefix="runtimed-bench-", dir=parent)))

    def spawn(self, argv: Sequence[str], log_name: str, **kwargs: object) -> subprocess.Popen[bytes]:
        with open(self.base / log_name, "ab") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=child_env(),
                start_new_session=True,  # our ^C goes to the harness, which then stops them in order
                preexec_fn=_die_with_parent,
                **kwargs,  # type: ignore[arg-type]
            )
        self.processes.append(proc)
        return proc

    def descendants_by_path(self, exclude: set[int]) -> list[int]:
        """Pids that name our temp dir in their command line, cwd or open files (daemons' shims and
        helpers: a forked shim has its zygote's command line, but its log is open under our dir)."""
        found = []
        marker = str(self.base)
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in exclude or int(entry) == os.getpid():
                continue
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
                    continue
                links = [f"/proc/{entry}/cwd"] + [
                    f"/proc/{entry}/fd/{fd}" for fd in os.listdir(f"/proc/{entry}/fd")
                ]
            except OSError:
                continue
            for link in links:
                with contextlib.suppress(OSError):
                    if os.readlink(link).startswith(marker + "/"):
                        found.append(int(entry))
                        break
        return found

    def close(self) -> list[str]:
        """Stop every process (ours by pid, then strays under our path), unmount, remove. Never raises."""
        problems: list[str] = []
        for proc in reversed(self.processes):
            stop_process(proc)
        ours = {p.pid for p in self.processes}
        strays = self.descendants_by_path(ours)
        if strays:  # shims the daemons left behind: their containers first, then the shims
            children: dict[int, list[int]] = {}
            for pid, ppid in parent_map().items():
                children.setdefault(ppid, []).append(pid)
            doomed: list[int] = []
            todo = list(strays)
            while todo:
                pid = todo.pop()
                if pid not in doomed:
                    doomed.append(pid)
                    todo.extend(children.get(pid, []))
            for pid in reversed(doomed):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            problems.append(f"killed {len(doomed)} stray processes left under {self.base}: {sorted(doomed)}")
        time.sleep(0.2 if problems else 0)
        for mount in mounts_under(self.base):
            result = subprocess.run(["umount", "-l", mount], capture_output=True, text=True)
            if result.returncode != 0:
                problems.append(f"umount {mount}: {result.stderr.strip()}")
        left = mounts_under(self.base)
        if left:  # never rmtree through a mount: it would delete the mounted filesystem's files
            problems.append(f"mounts still under {self.base}; left in place: {left}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)
        return problems


def parent_map() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the harness dies, even by SIGKILL (no finally runs then)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10)


def mounts_under(base: Path) -> list[str]:
    """Mount points at or below base, deepest first (the order to unmount them)."""
    prefix = str(base).rstrip("/") + "/"
    points = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix) or point == str(base):
                points.append(point)
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


# --- the registry -----------------------------------------------------------------------------------


@dataclass
class Registry:
    workspace: Workspace
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Registry:
        root = self.workspace.base / "registry"
        root.mkdir()
        for _attempt in range(3):  # a free port can be taken between probing and binding
            self.port = free_port()
            config = {
                "version": "0.1",
                "log": {"level": "warn", "accesslog": {"disabled": True}},
                "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
                "http": {"addr": self.host, "secret": "runtimed-bench"},
            }
            (root / "config.yml").write_text(json.dumps(config))  # YAML is a superset of JSON
            self.proc = self.workspace.spawn([REGISTRY, "serve", str(root / "config.yml")], "registry.log")
            if _wait(lambda: _http_ok(f"http://{self.host}/v2/"), self.proc, 15):
                return self
            stop_process(self.proc)
        raise RuntimeError(
            f"docker-registry did not start: {(self.workspace.base / 'registry.log').read_text()}"
        )


def _http_ok(url: str) -> bool:
    try:
        with _NO_PROXY.open(url, timeout=1):
            return True
    except (OSError, urllib.error.URLError):
        return False


def _wait(ready: object, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if ready():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


# --- the two daemons --------------------------------------------------------------------------------


@dataclass
class Daemon:
    """One daemon under test. `name` is "runtimed" or "containerd"; `ctr(...)` drives it."""

    name: str
    workspace: Workspace
    proc: subprocess.Popen[bytes] | None = None

    @property
    def dir(self) -> Path:
        return self.workspace.base / self.name

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def socket(self) -> Path:
        return self.dir / f"{self.name}.sock"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.workspace.base / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 60) -> Daemon:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = self.workspace.spawn(self.command(), self.log_path.name, cwd=str(REPO))
        if not _wait(lambda: self.socket.exists() and self.ctr("version", timeout=10).ok, self.proc, timeout):
            raise RuntimeError(f"{self.name} did not start; its log:\n{self.log_tail()}")
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def ctr_argv(self, *args: str, namespace: str = "default") -> list[str]:
        return [CTR, "--address", str(self.socket), "--namespace", namespace, *args]

    def ctr(self, *args: str, namespace: str = "default", timeout: float = 600) -> CtrResult:
        return run_timed(self.ctr_argv(*args, namespace=namespace), timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=30)


class Runtimed(Daemon):
    def __init__(self, workspace: Workspace) -> None:
        super().__init__("runtimed", workspace)

    def command(self) -> list[str]:
        # Our own config file: a machine's /etc/runtimed/config.toml must not leak into the figures.
        config = self.dir / "config.toml"
        config.write_text("version = 1\n")
        return [
            sys.executable,
            "-m",
            "runtimed.daemon.main",
            "--root",
            str(self.root),
            "--state",
            str(self.state),
            "--address",
            f"unix://{self.socket}",
            "--config",
            str(config),
            "--log-level",
            "warning",
        ]

    def runtimectl_argv(self, *args: str, namespace: str = "default") -> list[str]:
        return [
            sys.executable,
            "-m",
            "runtimed.cli.main",
            "-a",
            f"unix://{self.socket}",
            "-n",
            namespace,
            *args,
        ]


class Containerd(Daemon):
    def __init__(self, workspace: Workspace) -> None:
        super().__init__("containerd", workspace)

    def command(self) -> list[str]:
        config = self.dir / "config.toml"
        # Every path containerd would otherwise default to (/var/lib, /run, /opt) is ours.
        config.write_text(
            f"""version = 2
root = "{self.root}"
state = "{self.state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{self.socket}"

[ttrpc]
  address = "{self.socket}.ttrpc"

[debug]
  address = ""
  level = "warn"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{self.dir / "opt"}"
"""
        )
        return [CONTAINERD, "--config", str(config)]
