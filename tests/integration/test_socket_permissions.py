"""Only root reaches the daemon: the socket is 0600 root:root, the root and state directories
are closed to others, and a real client run as another user (nobody, via setpriv) is refused."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

NOBODY = 65534
SETPRIV = shutil.which("setpriv")
CTR = shutil.which("ctr")
SYSTEM_PYTHON = next((p for p in ("/usr/bin/python3", "/bin/python3") if os.access(p, os.X_OK)), None)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users"),
    pytest.mark.skipif(SETPRIV is None, reason="setpriv (util-linux) is not installed"),
]


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    command = [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, cwd="/")


@pytest.fixture
def reachable_daemon(daemon):
    """The daemon, with its temp base opened (0755) so that only the socket's own mode guards it."""
    os.chmod(daemon.base, 0o755)
    return daemon


def test_socket_and_directories_are_closed_to_others(reachable_daemon):
    daemon = reachable_daemon
    info = os.stat(daemon.socket_path)
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600, oct(info.st_mode)
    assert (info.st_uid, info.st_gid) == (0, 0)
    for directory in (daemon.root, daemon.state):
        info = os.stat(directory)
        assert stat.S_IMODE(info.st_mode) in (0o700, 0o711), (directory, oct(info.st_mode))
        assert info.st_uid == 0
    # 0711 lets others traverse but not list: nobody cannot see what the daemon keeps.
    listing = as_nobody("ls", str(daemon.root))
    assert listing.returncode != 0 and "Permission denied" in listing.stderr


def test_probe_as_nobody_works():
    """The user switch itself works (otherwise the refusals below would prove nothing)."""
    result = as_nobody("id", "-u")
    if result.returncode != 0:
        pytest.skip(f"cannot switch to uid {NOBODY}: {result.stderr.strip()}")
    assert result.stdout.strip() == str(NOBODY)


@pytest.mark.skipif(CTR is None, reason="ctr (containerd's client) is not installed")
def test_grpc_client_as_nobody_is_refused(reachable_daemon):
    address = str(reachable_daemon.socket_path)
    as_root = subprocess.run(
        [CTR, "--address", address, "version"], capture_output=True, text=True, timeout=30
    )
    assert as_root.returncode == 0, as_root.stderr
    assert "Server:" in as_root.stdout

    refused = as_nobody(CTR, "--address", address, "--timeout", "5s", "version")
    assert refused.returncode != 0
    assert "permission denied" in refused.stderr.lower(), refused.stderr
    assert "Server:" not in refused.stdout


@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="no system python3 runnable by other users")
def test_raw_connect_as_nobody_is_refused(reachable_daemon):
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "try:\n"
        "    s.connect(sys.argv[1])\n"
        "except PermissionError as exc:\n"
        "    print('EACCES', exc.errno); sys.exit(3)\n"
        "print('connected')\n"
    )
    result = as_nobody(SYSTEM_PYTHON, "-c", probe, str(reachable_daemon.socket_path))
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert "EACCES 13" in result.stdout
    # The path itself was reachable: the refusal is the socket's own mode, not a directory's.
    assert as_nobody("test", "-e", str(reachable_daemon.socket_path)).returncode == 0
    assert Path(reachable_daemon.socket_path).exists()
