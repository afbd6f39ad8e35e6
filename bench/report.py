"""The outputs of a run: the console table, bench/results/latest.md and bench/results/latest.png."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.daemons import CONTAINERD, CTR, REGISTRY, REPO
from bench.measure import Row, fmt_num

HEADERS = ("row", "runtimed", "containerd", "ratio", "target", "verdict")


def _first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"? ({exc})"
    return (out.stdout.strip() or out.stderr.strip()).splitlines()[0] if (out.stdout or out.stderr) else "?"


def machine_facts(temp_dir: Path) -> dict[str, str]:
    cpu = "?"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as info:
        mem_kib = int(info.readline().split()[1])
    fs = _first_line(["findmnt", "-n", "-o", "FSTYPE,SOURCE,TARGET", "-T", str(temp_dir)])
    git = _first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"])
    import grpc

    import runtimed

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": f"{os.cpu_count()} x {cpu}",
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "temp dir filesystem": f"{fs} (temp dir {temp_dir})",
        "runtimed": f"{runtimed.__version__} (git {git}), Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}",
        "containerd": _first_line([CONTAINERD, "--version"]),
        "ctr": _first_line([CTR, "--version"]),
        "runc": _first_line(["runc", "--version"]),
        "registry": _first_line([REGISTRY, "--version"]),
        "unpigz": shutil.which("unpigz") or "not on PATH (containerd gunzips in-process)",
    }


def _ratio(row: Row) -> str:
    ratio = row.ratio()
    return f"{ratio:.2f}x" if ratio is not None else "—"


def _target(row: Row) -> str:
    return f"≤ {row.target:.1f}x" if row.target is not None else ""


def console_table(rows: Sequence[Row]) -> str:
    cells = [HEADERS] + [
        (row.title, row.cell("runtimed"), row.cell("containerd"), _ratio(row), _target(row), row.verdict())
        for row in rows
    ]
    limits = (62, 34, 34, 8, 8, 7)  # n/a reasons can be long: the full text is in latest.md
    cells = [tuple(_clip(c, w) for c, w in zip(line, limits, strict=True)) for line in cells]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADERS))]
    out = []
    for n, line in enumerate(cells):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(
    rows: Sequence[Row],
    facts: dict[str, str],
    notes: Sequence[str],
    command: str,
    elapsed: float,
    images: Sequence[str],
    plot: str | None,
) -> str:
    lines = [
        "# runtimed vs containerd: side-by-side benchmark",
        "",
        f"`{command}` — {facts['date']}, {elapsed:.0f} s. Medians, with (min-max, n) per daemon; the "
        "ratio is runtimed/containerd (lower is better for every row: time or memory); the target is "
        "the issue's.",
        "",
        "| row | runtimed | containerd | ratio | target | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        title = row.title + (f" — {row.note.rstrip('; ')}" if row.note else "")
        lines.append(
            f"| {_md(title)} | {_md(row.cell('runtimed', True))} | {_md(row.cell('containerd', True))} "
            f"| {_ratio(row)} | {_target(row)} | {row.verdict()} |"
        )
    if plot:
        lines += ["", f"![runtimed/containerd ratios]({plot})"]
    lines += ["", "## Machine", ""] + [f"- **{key}**: {value}" for key, value in facts.items()]
    lines += ["", "## Images", ""] + [f"- {image}" for image in images]
    lines += [
        "",
        "## Method",
        "",
        "- Both daemons run side by side in one private mount namespace (a tmpfs over /run, since ctr and "
        "containerd's shims hard-code /run/containerd), each on its own temp root, state and socket; "
        "containerd 1.6 with a generated config (CRI disabled, debug off), runtimed with a `--config` "
        "of its own.",
        "- The same client drives both: containerd's `ctr`, or one Python gRPC client on runtimed's "
        "generated stubs (Containers rows). Repetitions alternate which daemon goes first.",
        "- Pull and import: a fresh namespace per repetition, then `ctr images rm --sync` (not timed, except "
        "in its own row); registry on 127.0.0.1 (docker-registry, plain HTTP, warm page cache).",
        "- Memory: RSS of the daemon process (/proc/PID/status); shims: the sum of PSS "
        "(/proc/PID/smaps_rollup) of every shim process divided by the number of running containers.",
        "",
        "## Notes from this run",
        "",
    ]
    lines += [f"- {_md(note)}" for note in notes] or ["- none"]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Row], path: Path, title: str) -> str | None:
    """A bar per row with a ratio, against the 1.0 line. Returns why not, or None when written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no plot this run"
    measured = [row for row in rows if row.ratio() is not None]
    if not measured:
        return "no row has a ratio: no plot"
    labels = [_clip(row.title, 70) for row in measured]
    ratios = [row.ratio() or 0.0 for row in measured]
    colours = [
        "#c0392b" if row.verdict() == "FAIL" else "#27ae60" if row.verdict() == "pass" else "#7f8c8d"
        for row in measured
    ]
    fig, ax = plt.subplots(figsize=(12, 0.42 * len(measured) + 1.8))
    # Bars grow from the 1.0 line (parity) towards the ratio, on a log axis: 2x and 0.5x look alike.
    lefts = [min(1.0, r) for r in ratios]
    widths = [abs(r - 1.0) or 0.002 for r in ratios]
    ax.barh(range(len(measured)), widths, left=lefts, color=colours)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(measured)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    low, high = min([*ratios, 0.8]), max([*ratios, 1.25])
    ax.set_xlim(low / 1.6, high * 4)  # room for the labels right of the longest bar
    ticks = [
        t for t in (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 50, 100) if low / 1.6 <= t <= high * 4
    ]
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(
        "runtimed / containerd, medians (log scale; left of 1x: runtimed better)\n"
        "green: meets the issue's target, red: misses it, grey: no target in the issue"
    )
    ax.set_title(title, fontsize=10)
    for i, (row, ratio) in enumerate(zip(measured, ratios, strict=True)):
        ours, theirs = row.median("runtimed"), row.median("containerd")
        detail = f"{fmt_num(ours or 0, row.unit)} vs {fmt_num(theirs or 0, row.unit)} {row.unit}"
        ax.text(max(ratio, 1.0) * 1.03, i, f"{ratio:.2f}x ({detail})", va="center", fontsize=7.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def as_json(rows: Sequence[Row], facts: dict[str, str], notes: Sequence[str], command: str) -> str:
    """Every sample, for comparing runs or re-plotting without re-measuring."""
    document = {
        "command": command,
        "machine": facts,
        "notes": list(notes),
        "rows": [
            {
                "group": row.group,
                "title": row.title,
                "unit": row.unit,
                "target": row.target,
                "samples": row.samples,
                "na": row.na,
                "note": row.note,
                "ratio": row.ratio(),
                "verdict": row.verdict(),
            }
            for row in rows
        ],
    }
    return json.dumps(document, indent=1, ensure_ascii=False) + "\n"


def command_line() -> str:
    return "bench/run " + " ".join(sys.argv[1:]) if sys.argv[1:] else "bench/run"
