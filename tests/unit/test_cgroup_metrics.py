"""runc statistics as containerd's cgroups Metrics (v1 and v2), and OOM kill counting."""

from __future__ import annotations

from pathlib import Path

from runtimed.api.containerd.cgroups.v1 import metrics_pb2 as cgroups_v1
from runtimed.api.containerd.cgroups.v2 import metrics_pb2 as cgroups_v2
from runtimed.tasks import metrics, oom

# Shaped as `runc events --stats` reports them (libcontainer types), abridged.
RUNC_V1 = {
    "cpu": {
        "usage": {"total": 5000, "percpu": [2000, 3000], "kernel": 1000, "user": 4000},
        "throttling": {"periods": 10, "throttledPeriods": 2, "throttledTime": 700},
    },
    "memory": {
        "cache": 4096,
        "usage": {"limit": 8388608, "usage": 1048576, "max": 2097152, "failcnt": 3},
        "swap": {"limit": 8388608, "usage": 1048576},
        "raw": {"rss": 8192, "pgfault": 12, "total_rss": 8192, "hierarchical_memsw_limit": 8388608},
    },
    "pids": {"current": 2, "limit": 64},
    "blkio": {"ioServiceBytesRecursive": [{"major": 8, "minor": 0, "op": "Read", "value": 512}]},
    "hugetlb": {"2MB": {"usage": 0, "max": 0, "failcnt": 0}},
}

RUNC_V2 = {
    "cpu": {
        "usage": {"total": 5_000_000, "kernel": 1_000_000, "user": 4_000_000},
        "throttling": {"periods": 10, "throttledPeriods": 2, "throttledTime": 7000},
    },
    "memory": {
        "usage": {"limit": 2**64 - 1, "usage": 1048576, "max": 0},
        "swap": {"limit": 8388608, "usage": 4096},
        "raw": {"anon": 8192, "file": 4096, "pgfault": 12, "oom_kill": 1},
    },
    "pids": {"current": 2, "limit": 2**64 - 1},
    "blkio": {
        "ioServiceBytesRecursive": [
            {"major": 8, "minor": 0, "op": "Read", "value": 512},
            {"major": 8, "minor": 0, "op": "Write", "value": 1024},
        ],
        "ioServicedRecursive": [{"major": 8, "minor": 0, "op": "Read", "value": 1}],
    },
}


def test_runc_v1_stats_become_cgroups_v1_metrics():
    value = metrics.runc_to_any(metrics.RUNC_STATS, RUNC_V1, version=1)
    assert value is not None and value.type_url == "io.containerd.cgroups.v1.Metrics"
    decoded = cgroups_v1.Metrics.FromString(value.value)
    assert (decoded.pids.current, decoded.pids.limit) == (2, 64)
    assert decoded.cpu.usage.total == 5000 and list(decoded.cpu.usage.per_cpu) == [2000, 3000]
    assert (decoded.cpu.usage.kernel, decoded.cpu.usage.user) == (1000, 4000)
    assert decoded.cpu.throttling.throttled_periods == 2 and decoded.cpu.throttling.throttled_time == 700
    assert decoded.memory.usage.limit == 8388608 and decoded.memory.usage.failcnt == 3
    assert (decoded.memory.cache, decoded.memory.rss, decoded.memory.pg_fault) == (4096, 8192, 12)
    assert decoded.memory.hierarchical_swap_limit == 8388608 and decoded.memory.total_rss == 8192
    entry = decoded.blkio.io_service_bytes_recursive[0]
    assert (entry.major, entry.minor, entry.op, entry.value) == (8, 0, "Read", 512)
    assert [h.pagesize for h in decoded.hugetlb] == ["2MB"]


def test_runc_v2_stats_become_cgroups_v2_metrics():
    value = metrics.runc_to_any(metrics.RUNC_STATS, RUNC_V2, version=2)
    assert value is not None and value.type_url == "io.containerd.cgroups.v2.Metrics"
    decoded = cgroups_v2.Metrics.FromString(value.value)
    assert (decoded.pids.current, decoded.pids.limit) == (2, 0)  # "max": no limit
    assert (decoded.cpu.usage_usec, decoded.cpu.user_usec, decoded.cpu.system_usec) == (5000, 4000, 1000)
    assert (decoded.cpu.nr_periods, decoded.cpu.nr_throttled, decoded.cpu.throttled_usec) == (10, 2, 7)
    assert (decoded.memory.usage, decoded.memory.usage_limit) == (1048576, 0)
    assert (decoded.memory.swap_usage, decoded.memory.swap_limit) == (4096, 8388608)
    assert (decoded.memory.anon, decoded.memory.file, decoded.memory.pgfault) == (8192, 4096, 12)
    [io] = decoded.io.usage
    assert (io.major, io.minor, io.rbytes, io.wbytes, io.rios, io.wios) == (8, 0, 512, 1024, 1, 0)


def test_unknown_stats_types_are_left_to_the_caller():
    assert metrics.runc_to_any("native.v1.stats", {}) is None


def test_oom_kill_counts_are_read_from_v1_and_v2_files(tmp_path: Path):
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 5\noom 2\noom_kill 1\n")
    assert oom.oom_kills(tmp_path, 1) == 3
    assert oom.oom_kills(tmp_path, 2) == 1
    assert oom.oom_kills(tmp_path / "gone", 1) is None


def test_a_watch_reports_each_new_oom_kill_once(tmp_path: Path):
    control = tmp_path / "memory.events"
    control.write_text("oom_kill 1\n")
    reported = []
    watch = oom.OomWatch(tmp_path, 2, lambda: reported.append(1))
    assert watch.check() and reported == []  # kills before the watch started are not news
    control.write_text("oom_kill 2\n")
    assert watch.check() and watch.check() and reported == [1]
    control.unlink()
    assert not watch.check()
