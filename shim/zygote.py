"""The shim zygote: a pre-loaded, frozen template process that forks one shim per container.

Why (docs/shim.md has the figures): a fresh interpreter that imports what a shim needs
(json, socket, threading, selectors, ctypes, ...) costs about 5.7 MiB PSS; asyncio would make it
10.8, grpc 15.6. A shim forked from a parent that imported everything and then called
gc.freeze() (so the collector never writes to the shared objects) shares those pages
copy-on-write: it pays only for the pages it writes itself. Forking is also much faster than
starting an interpreter (~2 ms against 30+).

One catch decides the shape: every page the *parent* writes after a fork becomes private to the
child (the parent gets the copy, the child keeps the original alone). A parent that parses
requests between forks would hand each shim its whole working set. So the zygote does nothing
between forks but read one byte and wait for a child: the daemon writes the spawn parameters
(a shim.protocol frame) into a pipe shared with the zygote, then one byte into its trigger
pipe; the zygote forks; the child reads the parameters, calls setsid() and forks the shim, waits
until the shim listens (or failed), relays its report (a frame: {"pid", "address"} or
{"error"}) into the shared ready pipe and exits. The shim is thereby re-parented away (to init
or the nearest subreaper) and outlives the zygote and the daemon. Spawns are serialised by the
daemon. At EOF on the trigger pipe (the daemon is gone) the zygote exits; shims carry on.

    python -I -S -c 'import sys; sys.path[:0] = [ROOT]; from shim.zygote import main; main()' \
        TRIGGER_FD PARAMS_FD READY_FD

Spawn parameters: {"namespace", "id", "socket", "record", "record_data", "log"} (shim.server).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import select
import sys
from typing import Any

from shim import protocol

READY_TIMEOUT = 30.0


def _wait_ready(fd: int) -> dict[str, Any]:
    data = b""
    while True:
        ready, _, _ = select.select([fd], [], [], READY_TIMEOUT)
        if not ready:
            return {"error": f"shim did not report ready within {READY_TIMEOUT}s"}
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    if not data:
        return {"error": "shim exited before it was ready"}
    return json.loads(data)


def _become_shim(params: dict[str, Any], ready_fd: int) -> None:
    from shim import server

    log_fd = os.open(params["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    # Nothing of the zygote's may leak into a long-lived shim, above all not its pipes to the
    # daemon, whose EOF tells the zygote that the daemon is gone.
    os.closerange(3, ready_fd)
    os.closerange(ready_fd + 1, os.sysconf("SC_OPEN_MAX"))
    os.chdir("/")
    os.umask(0o022)
    server.run(params, ready_fd)


def _spawn(params_fd: int, ready_fd: int) -> None:
    """In the zygote's child: read the parameters, start the shim, relay its report."""
    report: dict[str, Any]
    try:
        params = protocol.read_frame_fd(params_fd)
        if params is None:
            raise RuntimeError("no spawn parameters")
        private_r, private_w = os.pipe()
        os.setsid()
        if os.fork() == 0:
            os.close(private_r)
            try:
                _become_shim(params, private_w)
            finally:
                os._exit(1)
        os.close(private_w)
        report = _wait_ready(private_r)
    except BaseException as exc:
        report = {"error": f"zygote: {type(exc).__name__}: {exc}"}
    protocol.write_all_fd(ready_fd, protocol.encode(report))


def warm_up() -> None:
    """Run the shim's common code paths once before freezing. CPython specialises (rewrites)
    code objects as they run; better here, once, than in every shim's copy-on-write pages."""
    from shim import api, loop, reaper, stdio

    for _ in range(8):
        for request_type, result_type in api.METHODS.values():
            for cls in (request_type, result_type):
                values = {f: "" for f in cls.__dataclass_fields__}  # type: ignore[attr-defined]
                with contextlib.suppress(Exception):
                    message = {"id": 1, "result": cls.from_wire(values).to_wire()}
                    protocol.decode_body(protocol.encode(message)[protocol.HEADER.size :])
        events = loop.Loop()
        events.call_later(0, events.stop)
        events.run()
        stdio.ProcessIO(events, "warm-up", api.Stdio()).close()
    pid = reaper.spawn(["true"], [None, None, None])
    os.waitpid(pid, 0)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    trigger_fd, params_fd, ready_fd = (int(a) for a in argv[:3])
    importlib.import_module("shim.server")
    warm_up()
    gc.collect()
    gc.freeze()  # what is loaded now stays shared with every shim we fork
    # From here on, touch as little as possible (see the module docstring).
    read, fork, waitpid = os.read, os.fork, os.waitpid
    while read(trigger_fd, 1):
        pid = fork()
        if pid == 0:
            try:
                _spawn(params_fd, ready_fd)
            finally:
                os._exit(0)
        waitpid(pid, 0)
    os._exit(0)


if __name__ == "__main__":
    main()
