"""Shared fixtures: a real runtimed daemon on a private root, state and socket."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fixtures.registry import registry, registry_factory  # noqa: F401 - a real registry (tests/fixtures)

from runtimed.client import Client

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0


def _socket_ready(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


@dataclass
class Daemon:
    """One runtimed process; tests start, kill and restart it by pid."""

    base: Path
    config: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def socket_path(self) -> Path:
        return self.base / "runtimed.sock"

    @property
    def address(self) -> str:
        return str(self.socket_path)

    @property
    def log_path(self) -> Path:
        return self.base / "runtimed.log"

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "runtimed.daemon.main",
            "--address", f"unix://{self.socket_path}",
            "--root", str(self.root),
            "--state", str(self.state),
            "--log-level", "debug",
        ]  # fmt: skip
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        return cmd + self.extra_args

    def start(self) -> Daemon:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the daemon owns it for its life
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=log, cwd=REPO_ROOT)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"runtimed exited with {self.process.returncode}:\n{self.log()}")
            if _socket_ready(self.socket_path):
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"runtimed did not start within {START_TIMEOUT}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def client(self, namespace: str = "default") -> Client:
        return Client(self.address, namespace=namespace)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait for a clean exit; returns the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the daemon (our own pid only)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=15)

    def restart(self) -> Daemon:
        self.stop()
        return self.start()


def make_base() -> Path:
    # Short paths: unix socket paths must fit in 107 bytes.
    return Path(tempfile.mkdtemp(prefix="rtd-", dir="/tmp"))


@pytest.fixture
def daemon_factory() -> Iterator[callable]:
    daemons: list[Daemon] = []

    def make(**kwargs) -> Daemon:
        daemon = Daemon(base=make_base(), **kwargs)
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        daemon.kill()
        shutil.rmtree(daemon.base, ignore_errors=True)


@pytest.fixture
def daemon(daemon_factory) -> Daemon:
    return daemon_factory().start()


@pytest.fixture
def client(daemon) -> Iterator[Client]:
    with daemon.client() as c:
        yield c


def requires_root() -> pytest.MarkDecorator:
    return pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
