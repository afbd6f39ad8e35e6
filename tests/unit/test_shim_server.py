"""The shim process (shim.server through shim.zygote) with plain host processes: no runc, no root.

Each test starts shims through the daemon's own launcher and talks to them with the daemon's
client. Whatever a test spawns is killed by pid at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from runtimed import errors
from runtimed.tasks.client import ShimClient
from runtimed.tasks.launcher import ShimLauncher
from shim import api


class Rig:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.launcher = ShimLauncher()
        self.shims: list[tuple[int, ShimClient]] = []
        self.pids: list[int] = []  # processes the tests started inside shims

    async def shim(self, name: str = "c1") -> tuple[int, ShimClient, Path]:
        bundle = self.base / name
        bundle.mkdir()
        pid, address = await self.launcher.spawn(
            {
                "namespace": "test",
                "id": name,
                "socket": str(self.base / f"{name}.sock"),
                "record": str(bundle / "shim.json"),
                "record_data": {"bundle": str(bundle)},
                "log": str(bundle / "shim.log"),
            }
        )
        client = ShimClient(address, f"test/{name}")
        await client.connect()
        self.shims.append((pid, client))
        return pid, client, bundle

    def fifo(self, name: str) -> str:
        path = str(self.base / name)
        os.mkfifo(path)
        return path

    async def spawn(self, client: ShimClient, argv: list[str], exec_id: str = "", **kwargs) -> int:
        request = api.SpawnRequest(container_id="c1", exec_id=exec_id, argv=argv, **kwargs)
        pid = (await client.call("spawn", request, api.Pid)).pid
        self.pids.append(pid)
        return pid

    async def close(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid, client in self.shims:
            await client.close()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await self.launcher.close()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    base = Path(tempfile.mkdtemp(prefix="rtd-shim-", dir="/tmp"))  # short: socket paths
    rig = Rig(base)
    yield rig
    await rig.close()
    for path in sorted(base.rglob("*"), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir() if path.is_dir() else path.unlink()
    base.rmdir()


def read_fifo_async(path: str) -> asyncio.Future[bytes]:
    """Open a FIFO for reading the way ctr does (before the process starts); collect to EOF."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)

    def collect() -> bytes:
        import select

        data = b""
        try:
            while True:
                ready, _, _ = select.select([fd], [], [], 1)
                if not ready:  # before a writer came, a FIFO reads as EOF: wait for readiness
                    continue
                try:
                    chunk = os.read(fd, 4096)
                except BlockingIOError:
                    continue
                if not chunk:
                    return data
                data += chunk
        finally:
            os.close(fd)

    return asyncio.ensure_future(asyncio.to_thread(collect))


async def test_a_spawned_process_s_output_exit_and_event(rig):
    shim_pid, client, bundle = await rig.shim()
    events: list[api.Event] = []
    client.on_event = events.append
    out = rig.fifo("out")
    output = read_fifo_async(out)
    pid = await rig.spawn(client, ["sh", "-c", "echo hi; exit 3"], stdio=api.Stdio(stdout=out, stderr=out))
    info = await client.call("wait", api.ProcessKey(container_id="c1"), api.ExitInfo)
    assert (info.pid, info.exit_status) == (pid, 3) and info.exited_at > 0
    assert await asyncio.wait_for(output, 5) == b"hi\n"  # EOF: the shim let go of the FIFO
    await asyncio.sleep(0.1)
    assert [(e.topic, e.pid, e.exit_status) for e in events] == [("exit", pid, 3)]
    record = json.loads((bundle / "shim.json").read_text())
    assert (
        record["pid"] == shim_pid and record["bundle"] == str(bundle) and record["address"] == client.address
    )


async def test_run_answers_a_command_s_status_and_leaves_no_process(rig):
    _, client, bundle = await rig.shim()
    events: list[api.Event] = []
    client.on_event = events.append
    marker = bundle / "ran"
    request = api.RunRequest(container_id="c1", argv=["sh", "-c", f"touch {marker}; echo oops >&2; exit 5"])
    assert (await client.call("run", request, api.RunResult)).status == 5
    assert marker.exists() and "oops" in (bundle / "shim.log").read_text()  # stderr: the shim's log
    ok = api.RunRequest(container_id="c1", argv=["true"])
    results = await asyncio.gather(*(client.call("run", ok, api.RunResult) for _ in range(4)))
    assert [r.status for r in results] == [0] * 4
    slow = api.RunRequest(container_id="c1", argv=["sleep", "30"], timeout=0.2)
    assert (await client.call("run", slow, api.RunResult)).status == 128 + signal.SIGKILL
    with pytest.raises(errors.InvalidArgument, match="cannot run"):
        await client.call("run", api.RunRequest(container_id="c1", argv=["/nonexistent"]), api.RunResult)
    assert (await client.call("connect", api.Empty(), api.ShimInfo)).processes == []
    await asyncio.sleep(0.1)
    assert events == []  # a command run to its end is no process of the shim's


async def test_a_process_left_by_its_launcher_is_adopted(rig):
    """runc's pattern: the command starts the process, writes its pid, exits; the shim adopts it."""
    shim_pid, client, bundle = await rig.shim()
    pid_file = bundle / "proc.pid"
    launcher = f"sleep 30 & echo $! > {pid_file}"
    pid = await rig.spawn(client, ["sh", "-c", launcher], pid_file=str(pid_file))
    assert pid == int(pid_file.read_text())
    status = Path(f"/proc/{pid}/status").read_text()
    assert f"PPid:\t{shim_pid}\n" in status  # re-parented to the shim, its subreaper
    await client.call("signal", api.SignalRequest(container_id="c1", signal=signal.SIGTERM), api.Empty)
    info = await client.call("wait", api.ProcessKey(container_id="c1"), api.ExitInfo)
    assert info.exit_status == 128 + signal.SIGTERM


async def test_a_launcher_failure_is_reported_and_forgotten(rig):
    _, client, bundle = await rig.shim()
    request = api.SpawnRequest(
        container_id="c1", exec_id="", argv=["sh", "-c", "exit 1"], pid_file=str(bundle / "none.pid")
    )
    with pytest.raises(errors.RuntimedError, match="exited with status 1") as failure:
        await client.call("spawn", request, api.Pid)
    assert type(failure.value) is errors.RuntimedError  # UNKNOWN: the command's failure, not the shim's
    with pytest.raises(errors.NotFound):
        await client.call("wait", api.ProcessKey(container_id="c1"), api.ExitInfo)
    bad = api.SpawnRequest(container_id="c1", exec_id="", argv=["/no/such/command"])
    with pytest.raises(errors.InvalidArgument, match="cannot run"):
        await client.call("spawn", bad, api.Pid)


async def test_stdin_is_copied_and_close_io_ends_it(rig):
    _, client, _ = await rig.shim()
    stdin, out = rig.fifo("in"), rig.fifo("out")
    output = read_fifo_async(out)
    writer = os.open(stdin, os.O_RDWR)  # the client's end (RDWR: no blocking on open)
    await rig.spawn(client, ["cat"], stdio=api.Stdio(stdin=stdin, stdout=out))
    os.write(writer, b"one\n")
    await asyncio.sleep(0.3)
    await client.call("close_io", api.ProcessKey(container_id="c1"), api.Empty)
    info = await client.call("wait", api.ProcessKey(container_id="c1"), api.ExitInfo)
    assert info.exit_status == 0
    assert await asyncio.wait_for(output, 5) == b"one\n"
    os.close(writer)


async def test_the_client_closing_its_stdin_fifo_is_eof(rig):
    _, client, _ = await rig.shim()
    stdin, out = rig.fifo("in"), rig.fifo("out")
    output = read_fifo_async(out)
    await rig.spawn(client, ["cat"], stdio=api.Stdio(stdin=stdin, stdout=out))
    writer = await asyncio.to_thread(os.open, stdin, os.O_WRONLY)
    os.write(writer, b"bye\n")
    os.close(writer)
    info = await client.call("wait", api.ProcessKey(container_id="c1"), api.ExitInfo)
    assert info.exit_status == 0 and await asyncio.wait_for(output, 5) == b"bye\n"


async def test_errors_and_forget(rig):
    _, client, _ = await rig.shim()
    pid = await rig.spawn(client, ["sleep", "30"])
    with pytest.raises(errors.AlreadyExists):
        await rig.spawn(client, ["true"])
    with pytest.raises(errors.NotFound, match="process does not exist e9"):
        await client.call("signal", api.SignalRequest(container_id="c1", exec_id="e9"), api.Empty)
    with pytest.raises(errors.FailedPrecondition, match="running"):
        await client.call("forget", api.ProcessKey(container_id="c1"), api.ExitInfo)
    with pytest.raises(errors.InvalidArgument, match="no terminal"):
        await client.call("resize", api.ResizeRequest(container_id="c1", width=80, height=24), api.Empty)
    with pytest.raises(errors.NotImplementedYet):
        await client.call("bogus", api.Empty(), api.Empty)
    os.kill(pid, signal.SIGKILL)
    await client.call("wait", api.ProcessKey(container_id="c1"), api.ExitInfo)
    with pytest.raises(errors.NotFound, match="process already finished"):
        await client.call("signal", api.SignalRequest(container_id="c1"), api.Empty)
    info = await client.call("forget", api.ProcessKey(container_id="c1"), api.ExitInfo)
    assert (info.pid, info.exit_status) == (pid, 137)
    with pytest.raises(errors.NotFound):
        await client.call("wait", api.ProcessKey(container_id="c1"), api.ExitInfo)


async def test_exits_while_no_daemon_listens_are_kept_and_delivered(rig):
    shim_pid, client, _ = await rig.shim()
    pid = await rig.spawn(client, ["sh", "-c", "sleep 0.3; exit 5"])
    await client.close()  # the daemon goes away
    await asyncio.sleep(0.8)
    again = ShimClient(client.address, "test/c1")
    events: list[api.Event] = []
    again.on_event = events.append
    info = await again.connect()
    assert info.pid == shim_pid
    assert [(p.pid, p.exited, p.exit_status) for p in info.processes] == [(pid, True, 5)]
    await asyncio.sleep(0.1)
    assert [(e.topic, e.pid, e.exit_status) for e in events] == [("exit", pid, 5)]
    rig.shims.append((shim_pid, again))


async def test_the_shim_outlives_the_zygote_and_exits_when_told(rig):
    shim_pid, client, bundle = await rig.shim()
    zygote_pid = rig.launcher.pid
    assert zygote_pid is not None
    status = Path(f"/proc/{shim_pid}/status").read_text()
    assert f"PPid:\t{zygote_pid}\n" not in status  # double-forked away
    # A session of its own (its parent made it and left): no terminal or signal of ours reaches it.
    assert os.getsid(shim_pid) not in (os.getsid(0), os.getsid(zygote_pid))
    await rig.launcher.close()
    await asyncio.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(zygote_pid, 0)
    os.kill(shim_pid, 0)  # still there
    await client.call("connect", api.Empty(), api.ShimInfo)
    await client.shutdown()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{shim_pid}").exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(shim_pid, os.WNOHANG)
    assert not (bundle / "shim.json").exists()
    assert not Path(client.address).exists()
    # A new spawn starts a new zygote.
    await rig.shim("c2")
    assert rig.launcher.pid not in (None, zygote_pid)


async def test_many_shims_at_once(rig):
    shims = await asyncio.gather(*(rig.shim(f"c{i}") for i in range(8)))
    pids = await asyncio.gather(
        *(rig.spawn(client, ["sh", "-c", f"exit {i}"]) for i, (_, client, _) in enumerate(shims))
    )
    statuses = await asyncio.gather(
        *(client.call("wait", api.ProcessKey(container_id="c1"), api.ExitInfo) for _, client, _ in shims)
    )
    assert [s.exit_status for s in statuses] == list(range(8))
    assert len(set(pids)) == 8
