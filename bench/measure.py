"""What a row is (samples per daemon, a median, a ratio, a verdict) and how memory is read from /proc."""

from __future__ import annotations

import hashlib
import os
import stat
import statistics
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("runtimed", "containerd")


@dataclass
class Row:
    """One line of the table. Every measured value is lower-is-better (time or memory)."""

    group: str  # the --rows name that selects it
    title: str
    unit: str  # "s" | "ms" | "MiB"
    target: float | None = None  # the largest acceptable runtimed/containerd ratio, if the issue sets one
    samples: dict[str, list[float]] = field(default_factory=lambda: {d: [] for d in DAEMONS})
    na: dict[str, str] = field(default_factory=dict)  # daemon -> why it has no figure
    note: str = ""
    optional: bool = False  # containerd may lack this feature here (a runtime backend not installed)

    def add(self, daemon: str, value: float) -> None:
        self.samples[daemon].append(value)

    def median(self, daemon: str) -> float | None:
        values = self.samples[daemon]
        return statistics.median(values) if values and daemon not in self.na else None

    def ratio(self) -> float | None:
        ours, theirs = self.median("runtimed"), self.median("containerd")
        if ours is None or theirs is None or theirs <= 0:
            return None
        return ours / theirs

    def verdict(self) -> str:
        ratio = self.ratio()
        if self.target is None:
            return ""
        if ratio is None:
            return "n/a"
        return "pass" if ratio <= self.target else "FAIL"

    def cell(self, daemon: str, detail: bool = False) -> str:
        if daemon in self.na:
            return f"n/a ({self.na[daemon]})"
        median = self.median(daemon)
        if median is None:
            return "—"
        text = fmt(median, self.unit)
        values = self.samples[daemon]
        if detail and len(values) > 1:
            text += f" ({fmt_num(min(values), self.unit)}-{fmt_num(max(values), self.unit)}, n={len(values)})"
        return text


def fmt_num(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.1f}" if value < 100 else f"{value:.0f}"
    if unit == "s":
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return f"{value:.1f}"


def fmt(value: float, unit: str) -> str:
    return f"{fmt_num(value, unit)} {unit}"


def _status_kib(pid: int, key: str, path: str = "status") -> float:
    with open(f"/proc/{pid}/{path}") as source:
        for line in source:
            if line.startswith(key + ":"):
                return float(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/{path}")


def rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmRSS") / 1024


def pss_mib(pid: int) -> float:
    """Proportional set size: shared pages split between their users (the fair per-process cost)."""
    return _status_kib(pid, "Pss", "smaps_rollup") / 1024


def disk_usage(path: Path) -> int:
    """Bytes allocated under path, not crossing into other filesystems (mounted snapshots)."""
    try:
        device = path.stat().st_dev
    except FileNotFoundError:
        return 0
    total = 0
    seen: set[int] = set()
    for directory, subdirs, files in os.walk(path):
        for name in (*files, *subdirs):
            try:
                info = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            if info.st_dev == device and not (info.st_nlink > 1 and info.st_ino in seen):
                seen.add(info.st_ino)
                total += info.st_blocks * 512
        subdirs[:] = [d for d in subdirs if os.lstat(os.path.join(directory, d)).st_dev == device]
    return total


def cpu_seconds(pid: int) -> float:
    """User + system time of pid and of the children it has waited for (helpers such as unpigz)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_signature(root: Path) -> dict[str, tuple[object, ...]]:
    """path -> (type, mode, uid, gid, size, mtime, nlink, link target, sha256) for a whole tree."""
    out: dict[str, tuple[object, ...]] = {}
    for directory, subdirs, files in os.walk(root):
        for name in (*subdirs, *files):
            path = os.path.join(directory, name)
            info = os.lstat(path)
            link = os.readlink(path) if stat.S_ISLNK(info.st_mode) else ""
            digest = ""
            if stat.S_ISREG(info.st_mode):
                with open(path, "rb") as source:
                    digest = hashlib.file_digest(source, "sha256").hexdigest()
            out[os.path.relpath(path, root)] = (
                stat.S_IFMT(info.st_mode),
                stat.S_IMODE(info.st_mode),
                info.st_uid,
                info.st_gid,
                info.st_size if not stat.S_ISDIR(info.st_mode) else 0,
                int(info.st_mtime),
                info.st_nlink if stat.S_ISREG(info.st_mode) else 0,
                link,
                digest,
            )
    return out
