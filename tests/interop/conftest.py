"""Fixtures for interop tests: containerd's own clients against our daemon.

Two clients are available, both needing scripts/install.sh to have run:

* `ctr` (Debian's containerd package), through `run_ctr`;
* the PyPI `containerd` stubs, through `run_pyclient`, which runs tests/interop/pyclient_probe.py
  in the separate .venv-interop (those stubs need protobuf 3.20, the project needs a modern one).

The `daemon` fixture (tests/conftest.py) starts runtimed on a temp root and socket; a test looks like

    def test_version(daemon, run_ctr, run_pyclient):
        assert "Server:" in run_ctr(daemon.address, "version").stdout
        assert run_pyclient(daemon.address, "version")["version"]

        assert run_pyclient(daemon.address, "namespace-create", "dup") == {
            "namespace": {"name": "dup", "labels": {}}
        }
        again = run_pyclient(daemon.address, "namespace-create", "dup")
        assert again["error"]["code"] == "ALREADY_EXISTS"

        result = run_ctr(daemon.address, "containers", "info", "nope", namespace="ns1", check=False)
        assert result.returncode != 0 and "not found" in result.stderr

A missing client skips the test, unless RUNTIMED_INTEROP_REQUIRED=1 (scripts/test.sh, i.e. CI, sets
it after installing both), in which case it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
INTEROP_PYTHON = REPO_ROOT / ".venv-interop" / "bin" / "python"
PROBE = Path(__file__).resolve().with_name("pyclient_probe.py")


def _unavailable(reason: str) -> None:
    if os.environ.get("RUNTIMED_INTEROP_REQUIRED") == "1":
        pytest.fail(f"{reason} (RUNTIMED_INTEROP_REQUIRED=1)", pytrace=False)
    pytest.skip(reason)


def _socket_path(address: str | os.PathLike[str]) -> str:
    address = os.fspath(address)
    for prefix in ("unix://", "unix:"):
        if address.startswith(prefix):
            return address[len(prefix) :]
    return address


class ClientError(subprocess.CalledProcessError):
    """A client exited non-zero; str() includes its output, which pytest then shows."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


@pytest.fixture(scope="session")
def ctr_bin() -> str:
    """Path of containerd's `ctr` client."""
    path = shutil.which("ctr")
    if path is None:
        _unavailable("containerd's ctr client not installed: run scripts/install.sh")
    return path


@pytest.fixture(scope="session")
def interop_python() -> Path:
    """The interop venv's python, which has the PyPI `containerd` stubs and protobuf 3.20."""
    if not os.access(INTEROP_PYTHON, os.X_OK):
        _unavailable(f"interop virtualenv missing ({INTEROP_PYTHON}): run scripts/install.sh")
    return INTEROP_PYTHON


def _ctr_env() -> dict[str, str]:
    # Nothing from the outer environment may redirect ctr to another daemon, namespace,
    # snapshotter or runtime (CONTAINERD_ADDRESS, CONTAINERD_NAMESPACE, ...).
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
    env["CONTAINERD_SUPPRESS_DEPRECATION_WARNINGS"] = "1"
    return env


@pytest.fixture
def run_ctr(ctr_bin: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """run_ctr(address, *args, namespace=None, check=True, timeout=60) -> CompletedProcess (text).

    Runs `ctr --address <socket path> [--namespace ns] args...`. With check=True a non-zero exit
    raises ClientError (a CalledProcessError) showing ctr's stdout and stderr.
    """

    def run(
        address: str | os.PathLike[str],
        *args: str,
        namespace: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [ctr_bin, "--address", _socket_path(address)]
        if namespace is not None:
            cmd += ["--namespace", namespace]
        cmd += [str(a) for a in args]
        result = subprocess.run(
            cmd,
            env=_ctr_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise ClientError(result.returncode, cmd, result.stdout, result.stderr)
        return result

    return run


@pytest.fixture
def run_pyclient(interop_python: Path) -> Callable[..., dict[str, Any]]:
    """run_pyclient(address, op, *args, namespace="default", timeout=60) -> dict.

    Runs tests/interop/pyclient_probe.py under the interop venv and returns its JSON output.
    A gRPC error comes back as {"error": {"code": "NOT_FOUND", "details": ...}}; a crash or bad
    usage of the probe raises ClientError with its stderr.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    # protobuf 3.20.3 on py3.11 is the pure-python wheel anyway; say so explicitly.
    env["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"

    def run(
        address: str | os.PathLike[str],
        op: str,
        *args: str,
        namespace: str = "default",
        timeout: float = 60,
    ) -> dict[str, Any]:
        cmd = [
            str(interop_python),
            str(PROBE),
            "--address",
            _socket_path(address),
            "--namespace",
            namespace,
            "--timeout",
            str(max(timeout - 5, 1)),
            op,
            *(str(a) for a in args),
        ]
        result = subprocess.run(
            cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise ClientError(result.returncode, cmd, result.stdout, result.stderr)
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError:
            raise ClientError(result.returncode, cmd, result.stdout, result.stderr) from None

    return run
