"""The shim's JSON-lines log format (file:///path?format=jsonl): docker json-file records per line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_shim_server import Rig

from runtimed import errors
from shim import api
from shim.stdio import LOG_LINE_MAX

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    base = Path(tempfile.mkdtemp(prefix="rtd-log-", dir="/tmp"))  # short: socket paths
    shims = Rig(base)
    yield shims
    await shims.close()
    for path in sorted(base.rglob("*"), reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir() if path.is_dir() else path.unlink()
    base.rmdir()


async def records(path: Path, count: int, timeout: float = 10) -> list[dict]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or asyncio.get_running_loop().time() > deadline:
            return [json.loads(line) for line in lines]
        await asyncio.sleep(0.05)


async def run(shims: Rig, client, argv: list[str], stdio: api.Stdio, exec_id: str = "") -> int:
    await shims.spawn(client, argv, exec_id=exec_id, stdio=stdio)
    info = await client.call("wait", api.ProcessKey(container_id="c1", exec_id=exec_id), api.ExitInfo)
    return info.exit_status


async def test_jsonl_records_per_line_and_stream(rig):
    _, client, bundle = await rig.shim()
    log = bundle / "logs" / "c1.log"
    uri = f"file://{log}?format=jsonl"
    script = "echo out; sleep 0.1; echo err >&2; sleep 0.1; printf 'a\\nb'; sleep 0.1; printf 'c'"
    assert await run(rig, client, ["sh", "-c", script], api.Stdio(stdout=uri, stderr=uri)) == 0
    found = await records(log, 4)
    assert [(r["stream"], r["log"]) for r in found] == [
        ("stdout", "out\n"),
        ("stderr", "err\n"),
        ("stdout", "a\n"),
        ("stdout", "bc"),  # the last, unterminated line is written at EOF
    ]
    assert all(TIME.match(r["time"]) for r in found)
    assert [r["time"] for r in found] == sorted(r["time"] for r in found)


async def test_long_lines_are_split_and_plain_files_stay_plain(rig):
    _, client, bundle = await rig.shim()
    log = bundle / "long.log"
    uri = f"file://{log}?format=jsonl"
    size = LOG_LINE_MAX + 100
    argv = ["sh", "-c", f"head -c {size} /dev/zero | tr '\\0' x; echo"]
    assert await run(rig, client, argv, api.Stdio(stdout=uri)) == 0
    found = await records(log, 2)
    assert [len(r["log"]) for r in found] == [LOG_LINE_MAX, size - LOG_LINE_MAX + 1]
    assert not found[0]["log"].endswith("\n") and found[1]["log"].endswith("\n")

    plain = bundle / "plain.log"
    await client.call("forget", api.ProcessKey(container_id="c1"), api.ExitInfo)
    argv = ["sh", "-c", "echo out; echo err >&2"]
    stdio = api.Stdio(stdout=f"file://{plain}", stderr=f"file://{plain}")
    assert await run(rig, client, argv, stdio, exec_id="e1") == 0
    assert plain.read_text() == "out\nerr\n"


async def test_unknown_formats_are_refused(rig):
    _, client, bundle = await rig.shim()
    with pytest.raises(errors.InvalidArgument, match="unknown format"):
        await rig.spawn(client, ["true"], stdio=api.Stdio(stdout=f"file://{bundle}/x.log?format=xml"))
    assert not (bundle / "x.log").exists()
