"""Fifty containers created, started, waited for and deleted at once (root only; real runc)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fixtures.tasks import (
    TASK_STATE,
    TaskRig,
    cgroups_of,
    mounts_under,
    reap_leftovers,
    shim_processes,
    unique_namespace,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, mounts)"),
]

COUNT = 50


def test_fifty_containers_at_once(daemon, tmp_path):
    namespace = unique_namespace("s")
    rig = TaskRig(daemon.address, namespace, tmp_path)
    try:
        rig.base_snapshot()
        started = time.monotonic()
        with ThreadPoolExecutor(COUNT) as pool:
            results = list(
                pool.map(
                    lambda i: rig.run(f"c{i:02d}", ["sh", "-c", f"echo c{i:02d}; exit {i % 7}"]), range(COUNT)
                )
            )
        elapsed = time.monotonic() - started
        assert results == [(i % 7, f"c{i:02d}\n") for i in range(COUNT)]
        deadline = time.monotonic() + 10
        while shim_processes(daemon.state) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not shim_processes(daemon.state)
        assert not mounts_under(daemon.state / TASK_STATE)
        assert not list((daemon.state / TASK_STATE).glob(f"{namespace}/*"))
        for cgroup in cgroups_of(namespace):
            assert not [d for d in os.scandir(cgroup) if d.is_dir()], cgroup
        print(f"{COUNT} containers in {elapsed:.1f}s")
    finally:
        rig.close()
        leftovers = reap_leftovers(daemon.state, [namespace])
    assert not leftovers, f"test left {leftovers}"
