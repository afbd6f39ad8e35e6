"""A backend's statistics as containerd's cgroups Metrics, for Tasks.Metrics (`ctr tasks metrics`).

ctr decodes types.Metric.data by its type URL: io.containerd.cgroups.v1.Metrics on a cgroup v1
(or hybrid) host, io.containerd.cgroups.v2.Metrics on a unified one. The runc backend's statistics
are `runc events --stats` documents (runc's libcontainer types: "cpu", "memory", "pids", "blkio",
"hugetlb"); on cgroup v2 runc puts memory.stat's keys in memory.raw, CPU times in nanoseconds
and io.stat in blkio's service bytes/serviced lists, which is what the v2 mapping reads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2

from runtimed.api.containerd.cgroups.v1 import metrics_pb2 as v1
from runtimed.api.containerd.cgroups.v2 import metrics_pb2 as v2

RUNC_STATS = "runc.v1.stats"
V1_TYPE_URL = "io.containerd.cgroups.v1.Metrics"
V2_TYPE_URL = "io.containerd.cgroups.v2.Metrics"
UNLIMITED = 2**64 - 1  # runc reports "max" (no limit) as the largest uint64 on v2


@functools.cache
def cgroup_version(root: str = "/sys/fs/cgroup") -> int:
    return 2 if (Path(root) / "cgroup.controllers").exists() else 1


def _u64(value: Any) -> int:
    try:
        number = int(value or 0)
    except (TypeError, ValueError):
        return 0
    return min(max(number, 0), UNLIMITED)


def _get(document: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(document, dict):
            return None
        document = document.get(key)
    return document


def runc_to_any(stats_type: str, data: dict[str, Any], version: int | None = None) -> any_pb2.Any | None:
    """containerd's Metrics for a runc stats document, or None for a type this does not know."""
    if stats_type != RUNC_STATS:
        return None
    if (version or cgroup_version()) == 2:
        return any_pb2.Any(type_url=V2_TYPE_URL, value=runc_to_v2(data).SerializeToString())
    return any_pb2.Any(type_url=V1_TYPE_URL, value=runc_to_v1(data).SerializeToString())


# -- cgroup v1 -----------------------------------------------------------------------------------

_V1_MEMORY_RAW = {
    "cache": "cache",
    "rss": "rss",
    "rss_huge": "rss_huge",
    "mapped_file": "mapped_file",
    "dirty": "dirty",
    "writeback": "writeback",
    "pg_pg_in": "pgpgin",
    "pg_pg_out": "pgpgout",
    "pg_fault": "pgfault",
    "pg_maj_fault": "pgmajfault",
    "inactive_anon": "inactive_anon",
    "active_anon": "active_anon",
    "inactive_file": "inactive_file",
    "active_file": "active_file",
    "unevictable": "unevictable",
    "hierarchical_memory_limit": "hierarchical_memory_limit",
    "hierarchical_swap_limit": "hierarchical_memsw_limit",
}
_V1_MEMORY_RAW.update({f"total_{k}": f"total_{v}" for k, v in list(_V1_MEMORY_RAW.items())[:15]})

_V1_BLKIO = {
    "io_service_bytes_recursive": "ioServiceBytesRecursive",
    "io_serviced_recursive": "ioServicedRecursive",
    "io_queued_recursive": "ioQueueRecursive",
    "io_service_time_recursive": "ioServiceTimeRecursive",
    "io_wait_time_recursive": "ioWaitTimeRecursive",
    "io_merged_recursive": "ioMergedRecursive",
    "io_time_recursive": "ioTimeRecursive",
    "sectors_recursive": "sectorsRecursive",
}


def _memory_entry(entry: Any) -> v1.MemoryEntry:
    entry = entry if isinstance(entry, dict) else {}
    return v1.MemoryEntry(
        limit=_u64(entry.get("limit")),
        usage=_u64(entry.get("usage")),
        max=_u64(entry.get("max")),
        failcnt=_u64(entry.get("failcnt")),
    )


def runc_to_v1(data: dict[str, Any]) -> v1.Metrics:
    metrics = v1.Metrics()
    pids = _get(data, "pids") or {}
    metrics.pids.CopyFrom(v1.PidsStat(current=_u64(pids.get("current")), limit=_u64(pids.get("limit"))))

    usage = _get(data, "cpu", "usage") or {}
    throttling = _get(data, "cpu", "throttling") or {}
    metrics.cpu.CopyFrom(
        v1.CPUStat(
            usage=v1.CPUUsage(
                total=_u64(usage.get("total")),
                kernel=_u64(usage.get("kernel")),
                user=_u64(usage.get("user")),
                per_cpu=[_u64(v) for v in usage.get("percpu") or []],
            ),
            throttling=v1.Throttle(
                periods=_u64(throttling.get("periods")),
                throttled_periods=_u64(throttling.get("throttledPeriods")),
                throttled_time=_u64(throttling.get("throttledTime")),
            ),
        )
    )

    memory = _get(data, "memory") or {}
    raw = memory.get("raw") or {}
    stat = v1.MemoryStat(
        usage=_memory_entry(memory.get("usage")),
        swap=_memory_entry(memory.get("swap")),
        kernel=_memory_entry(memory.get("kernel")),
        kernel_tcp=_memory_entry(memory.get("kernelTCP")),
        **{field: _u64(raw.get(key)) for field, key in _V1_MEMORY_RAW.items()},
    )
    if not stat.cache:
        stat.cache = _u64(memory.get("cache"))
    metrics.memory.CopyFrom(stat)

    blkio = _get(data, "blkio") or {}
    for field, key in _V1_BLKIO.items():
        entries = getattr(metrics.blkio, field)
        for entry in blkio.get(key) or []:
            entries.add(
                op=str(entry.get("op") or ""),
                major=_u64(entry.get("major")),
                minor=_u64(entry.get("minor")),
                value=_u64(entry.get("value")),
            )

    for pagesize, entry in sorted((_get(data, "hugetlb") or {}).items()):
        metrics.hugetlb.add(
            pagesize=pagesize,
            usage=_u64(entry.get("usage")),
            max=_u64(entry.get("max")),
            failcnt=_u64(entry.get("failcnt")),
        )
    return metrics


# -- cgroup v2 -----------------------------------------------------------------------------------

_V2_MEMORY_RAW = [
    "anon", "file", "kernel_stack", "slab", "sock", "shmem", "file_mapped", "file_dirty",
    "file_writeback", "anon_thp", "inactive_anon", "active_anon", "inactive_file", "active_file",
    "unevictable", "slab_reclaimable", "slab_unreclaimable", "pgfault", "pgmajfault",
    "workingset_refault", "workingset_activate", "workingset_nodereclaim", "pgrefill", "pgscan",
    "pgsteal", "pgactivate", "pgdeactivate", "pglazyfree", "pglazyfreed", "thp_fault_alloc",
    "thp_collapse_alloc",
]  # fmt: skip


def _limit(value: Any) -> int:
    number = _u64(value)
    return 0 if number == UNLIMITED else number


def runc_to_v2(data: dict[str, Any]) -> v2.Metrics:
    metrics = v2.Metrics()
    pids = _get(data, "pids") or {}
    metrics.pids.CopyFrom(v2.PidsStat(current=_u64(pids.get("current")), limit=_limit(pids.get("limit"))))

    usage = _get(data, "cpu", "usage") or {}
    throttling = _get(data, "cpu", "throttling") or {}
    usec: Callable[[Any], int] = lambda ns: _u64(ns) // 1000  # noqa: E731
    metrics.cpu.CopyFrom(
        v2.CPUStat(
            usage_usec=usec(usage.get("total")),
            user_usec=usec(usage.get("user")),
            system_usec=usec(usage.get("kernel")),
            nr_periods=_u64(throttling.get("periods")),
            nr_throttled=_u64(throttling.get("throttledPeriods")),
            throttled_usec=usec(throttling.get("throttledTime")),
        )
    )

    memory = _get(data, "memory") or {}
    raw = memory.get("raw") or {}
    used = memory.get("usage") or {}
    swap = memory.get("swap") or {}
    metrics.memory.CopyFrom(
        v2.MemoryStat(
            usage=_u64(used.get("usage")),
            usage_limit=_limit(used.get("limit")),
            max_usage=_u64(used.get("max")),
            swap_usage=_u64(swap.get("usage")),
            swap_limit=_limit(swap.get("limit")),
            swap_max_usage=_u64(swap.get("max")),
            **{key: _u64(raw.get(key)) for key in _V2_MEMORY_RAW},
        )
    )

    # runc reports io.stat as v1-style lists: bytes and operations per device and direction.
    devices: dict[tuple[int, int], v2.IOEntry] = {}
    blkio = _get(data, "blkio") or {}
    for key, kind in (("ioServiceBytesRecursive", "bytes"), ("ioServicedRecursive", "ios")):
        for entry in blkio.get(key) or []:
            device = (_u64(entry.get("major")), _u64(entry.get("minor")))
            io = devices.setdefault(device, v2.IOEntry(major=device[0], minor=device[1]))
            op = str(entry.get("op") or "").lower()
            if op in ("read", "write"):
                field = f"{op[0]}{kind}"
                setattr(io, field, getattr(io, field) + _u64(entry.get("value")))
    metrics.io.usage.extend(devices[d] for d in sorted(devices))

    for pagesize, entry in sorted((_get(data, "hugetlb") or {}).items()):
        metrics.hugetlb.add(pagesize=pagesize, current=_u64(entry.get("usage")), max=_limit(entry.get("max")))
    return metrics
