"""runc missing or failing: Tasks.Create fails with a clear error and leaves nothing behind.

* the runc plugin configured with a binary that does not exist: the plugin is skipped (with the
  reason, visible through Introspection) and a task of a runc container fails FAILED_PRECONDITION
  or NOT_FOUND naming the runtime, with no shim, mount, bundle directory or cgroup left, and the
  container and its snapshot still usable/removable;
* runc replaced by a wrapper that fails (`runc create` exits 1 with a message): Tasks.Create
  fails naming runc's message; nothing leaks; the store is intact.

(A shim killed with SIGKILL is covered by tests/integration/test_tasks_restart.py:
test_a_killed_shim_leaves_a_stopped_task_and_nothing_else.)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import grpc
import pytest
from crash.invariants import check_store, cleanup, leaks
from fixtures.tasks import TaskRig, reap_leftovers, unique_namespace

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, mounts)"),
]

RUNC_SECTION = '[plugins."io.runtimed.runtime.v1.runc"]'


def daemon_with_runc(daemon_factory, tmp_path: Path, binary: str):
    config = tmp_path / "config.toml"
    config.write_text(f'version = 1\n\n{RUNC_SECTION}\nbinary = "{binary}"\n')
    return daemon_factory(config=config).start()


def attempt_task(daemon, tmp_path: Path, namespace: str) -> grpc.RpcError:
    rig = TaskRig(daemon.address, namespace, tmp_path)
    try:
        rig.container("c1", ["true"])
        with pytest.raises(grpc.RpcError) as failure:
            rig.create_task("c1", rig.fifos("c1"))
        # The container and its snapshot stay usable: removable through the API.
        rig.remove_container("c1")
        return failure.value
    finally:
        rig.close()


def assert_clean(daemon, namespace: str) -> None:
    problems = check_store(daemon)
    assert not problems, "\n".join(problems)
    cleanup(daemon, [namespace])
    found = leaks(daemon, [namespace])
    reap_leftovers(daemon.state, [namespace])
    assert not found, f"left behind: {found}"


def test_runc_binary_missing(daemon_factory, tmp_path):
    daemon = daemon_with_runc(daemon_factory, tmp_path, "/nonexistent/bin/runc")
    namespace = unique_namespace("norunc")
    error = attempt_task(daemon, tmp_path, namespace)
    print(error.code(), error.details())
    assert error.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND), error.details()
    assert "runc" in error.details()
    assert "internal error" not in error.details()
    assert_clean(daemon, namespace)


def failing_runc(tmp_path: Path, *, log: bool = True) -> Path:
    """A runc whose `create` fails as runc does: an error line in its --log (JSON; log=False:
    only on stderr, as a crashing runc or a wrapper would), exit 1."""
    wrapper = tmp_path / "bin" / "runc"
    wrapper.parent.mkdir()
    real = shutil.which("runc")
    assert real
    # Everything but `create` goes to the real runc (state, delete...), so clean-up still works.
    record = '    [ -n "$log" ] && printf \'{"level":"error","msg":"%s"}\\n\' "$msg" >> "$log"\n'
    wrapper.write_text(
        "#!/bin/sh\n"
        'log=""; prev=""\n'
        'for arg in "$@"; do\n'
        '  [ "$prev" = --log ] && log="$arg"\n'
        '  if [ "$arg" = create ]; then\n'
        f"    msg='{MESSAGE}'\n" + (record if log else "") + '    echo "$msg" >&2; exit 1\n'
        "  fi\n"
        '  prev="$arg"\n'
        "done\n"
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


MESSAGE = "container_linux.go:380: starting container process caused: refused by the test"


def test_runc_that_fails(daemon_factory, tmp_path):
    daemon = daemon_with_runc(daemon_factory, tmp_path, str(failing_runc(tmp_path)))
    namespace = unique_namespace("badrunc")
    error = attempt_task(daemon, tmp_path, namespace)
    print(error.code(), error.details())
    assert error.code() != grpc.StatusCode.OK
    assert "OCI runtime create failed" in error.details() and "refused by the test" in error.details()
    assert_clean(daemon, namespace)


def test_runc_failing_with_its_message_on_stderr_only(daemon_factory, tmp_path):
    """A crashing runc (or a wrapper) logs nothing: the call fails UNKNOWN, as runc's own failures
    do, and what runc printed reaches the process's stderr, where ctr shows it (as with containerd)."""
    daemon = daemon_with_runc(daemon_factory, tmp_path, str(failing_runc(tmp_path, log=False)))
    namespace = unique_namespace("msgrunc")
    rig = TaskRig(daemon.address, namespace, tmp_path)
    try:
        rig.container("c1", ["true"])
        io = rig.fifos("c1")
        with pytest.raises(grpc.RpcError) as failure:
            rig.create_task("c1", io)
        error = failure.value
        assert error.code() == grpc.StatusCode.UNKNOWN, error.details()
        assert "OCI runtime create failed" in error.details() and "exited with status 1" in error.details()
        assert "stderr" in error.details()
        assert "refused by the test" in io.output(stream="stderr")
        rig.remove_container("c1")
    finally:
        rig.close()
    assert_clean(daemon, namespace)
