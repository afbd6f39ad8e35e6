"""Child processes of the shim: spawning without inheritance, and reaping as a subreaper.

The shim is a child subreaper (prctl PR_SET_CHILD_SUBREAPER): the container processes whose
parent (runc) exits early are re-parented to it, so it alone learns their exit statuses. On
SIGCHLD its loop collects every exited child with waitpid(-1, WNOHANG), so nothing else in the
shim may wait for children.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Mapping, Sequence

from shim.api import exit_code

PR_SET_CHILD_SUBREAPER = 36
# Python ignores these two; a child must not inherit SIG_IGN for them (exec keeps ignored signals).
RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# Resolved at import, in the zygote: building a ctypes function costs each shim ~280 KiB of
# copy-on-write pages, calling one almost nothing.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def set_child_subreaper() -> None:
    """Become the reaper of our orphaned descendants (Linux >= 3.4)."""
    if _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(errno)}")


def reap() -> list[tuple[int, int]]:
    """Every exited child as (pid, exit code; 128+signal when signalled)."""
    exits = []
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        exits.append((pid, exit_code(wait_status)))
    return exits


def spawn(
    argv: Sequence[str],
    stdio: Sequence[int | None],
    env: Mapping[str, str] | None = None,
) -> int:
    """Start argv with stdio[0..2] as its fds 0-2 (None: /dev/null); it inherits nothing else
    (every other fd of ours is close-on-exec)."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        actions = [
            (os.POSIX_SPAWN_DUP2, devnull if fd is None else fd, target) for target, fd in enumerate(stdio)
        ]
        environment = {"PATH": os.environ.get("PATH", DEFAULT_PATH), **(env or {})}
        return os.posix_spawnp(
            argv[0], list(argv), environment, file_actions=actions, setsigdef=RESET_SIGNALS
        )
    finally:
        os.close(devnull)
