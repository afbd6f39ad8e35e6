"""`runtimectl logs [-f] [--tail N] [-t] NAME`: a container's output, as docker logs shows it.

runtimectl reads the log file directly, on the daemon's host: like nerdctl, it runs there (as root)
and finds the file through the container's `runtimed/log-uri` label, which names a file under the
log_dir the daemon's task plugin exports. The file is written by the container's shim (see
shim.stdio): JSON lines {"log", "stream", "time"} (docker's json-file records), or raw text for a
process with a terminal. stdout records go to our stdout, stderr records to our stderr. The file
outlives daemon restarts and is removed with the container (`rm`, `run --rm`). Attached runs
(`run` without -d or --rm, `start -a`) are logged too: runtimectl appends what it copies.

-f follows the file until the container's task has exited (and everything it wrote is shown).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, BinaryIO

from runtimed.cli.common import CLIError, Context

FOLLOW_INTERVAL = 0.1


def register(subparsers: argparse._SubParsersAction) -> None:
    logs = subparsers.add_parser(
        "logs",
        help="show a container's output",
        description="Show a container's output (detached containers and `start`ed ones log to a file on "
        "the daemon's host, which runtimectl reads there).",
    )
    logs.add_argument(
        "-f", "--follow", action="store_true", help="follow the output until the container exits"
    )
    logs.add_argument("-n", "--tail", default="all", metavar="N", help="only the last N lines (default all)")
    logs.add_argument("-t", "--timestamps", action="store_true", help="prefix each line with its time")
    logs.add_argument(
        "--since", default="", help="only lines since a time (RFC 3339) or a duration ago (10m)"
    )
    logs.add_argument("--until", default="", help="only lines before a time (RFC 3339) or a duration ago")
    logs.add_argument("name", metavar="NAME")
    logs.set_defaults(func=logs_command)


def parse_record(line: bytes) -> tuple[str, str, str]:
    """(stream, time, text) of one line of a log file; raw lines are stdout with no time."""
    if line.startswith(b"{"):
        try:
            record = json.loads(line)
            return str(record.get("stream") or "stdout"), str(record.get("time") or ""), str(record["log"])
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
    return "stdout", "", line.decode(errors="replace")


def tail_lines(lines: list[bytes], tail: str) -> list[bytes]:
    if tail in ("all", "-1", ""):
        return lines
    try:
        count = int(tail)
    except ValueError:
        raise CLIError(f"invalid --tail {tail!r}: a number or all") from None
    return lines[-count:] if count > 0 else []


def parse_when(text: str) -> str:
    """An RFC 3339 UTC time (comparable as text with the records'), from a time or a duration ago."""
    import re

    from runtimed.cli.lifecycle import parse_time, rfc3339

    if not text:
        return ""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if match:
        seconds = float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]
        return rfc3339(time.time() - seconds)
    if text.replace(".", "", 1).isdigit():  # Unix seconds
        return rfc3339(float(text))
    stamp = parse_time(text if "T" in text else f"{text}T00:00:00Z")
    if stamp is None:
        raise CLIError(f"invalid time {text!r}: use RFC 3339 (2024-01-02T15:04:05Z), Unix seconds or 10m")
    return rfc3339(stamp)


class Printer:
    def __init__(self, timestamps: bool, since: str = "", until: str = "") -> None:
        self.timestamps = timestamps
        self.since, self.until = since, until
        self.out = sys.stdout.buffer
        self.err = sys.stderr.buffer

    def show(self, line: bytes) -> None:
        stream, stamp, text = parse_record(line)
        if stamp and ((self.since and stamp < self.since) or (self.until and stamp >= self.until)):
            return
        if self.timestamps:
            text = f"{stamp or '-'} {text}"
        target = self.err if stream == "stderr" else self.out
        target.write(text.encode())
        target.flush()


def running(ctx: Context, name: str) -> bool:
    from runtimed.cli.lifecycle import PAUSED, PAUSING, RUNNING, get_task
    from runtimed.cli.tasks import Stubs

    task = get_task(Stubs(ctx), name)
    return task is not None and task.status in (RUNNING, PAUSED, PAUSING)


def logs_command(ctx: Context, args: argparse.Namespace) -> int:
    from runtimed.cli.lifecycle import get_container
    from runtimed.cli.run import log_path_of

    container = get_container(ctx, args.name)
    path = log_path_of(container)
    if not path:
        raise CLIError(f"container {args.name} keeps no log (--null-io, or made by another client)")
    printer = Printer(args.timestamps, parse_when(args.since), parse_when(args.until))
    try:
        handle: BinaryIO = open(path, "rb")  # noqa: SIM115 - kept open while following
    except FileNotFoundError:
        if not args.follow:
            return 0  # nothing written yet
        handle = _wait_for(path, ctx, args.name)
    except PermissionError:
        raise CLIError(f"cannot read {path}: runtimectl logs must run as root on the daemon's host") from None
    with handle:
        data = handle.read()
        lines = data.splitlines(keepends=True)
        partial = b""
        if lines and not lines[-1].endswith(b"\n"):
            partial = lines.pop()  # a record being written: follow picks it up
        for line in tail_lines(lines, str(args.tail)):
            printer.show(line)
        if args.follow:
            _follow(handle, printer, partial, ctx, args.name)
    return 0


def _wait_for(path: str, ctx: Context, name: str) -> Any:
    while True:
        try:
            return open(path, "rb")
        except FileNotFoundError:
            if not running(ctx, name):
                return open(os.devnull, "rb")
            time.sleep(FOLLOW_INTERVAL)


def _follow(handle: Any, printer: Printer, partial: bytes, ctx: Context, name: str) -> None:
    """Print what is appended until the task is no longer running and the file stopped growing."""
    last_check = 0.0
    alive = True
    while True:
        data = handle.read()
        if data:
            partial += data
            *complete, partial = partial.split(b"\n")
            for line in complete:
                printer.show(line + b"\n")
            continue
        if not alive:
            if partial:
                printer.show(partial)
            return
        now = time.monotonic()
        if now - last_check >= 0.5:
            last_check = now
            alive = running(ctx, name)
            if not alive:
                time.sleep(FOLLOW_INTERVAL)  # the shim writes the last records at EOF
                continue
        time.sleep(FOLLOW_INTERVAL)
