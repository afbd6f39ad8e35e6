"""The daemon process: start-up, locking, socket, shutdown, config, plugins, errors."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib

import grpc
import pytest
from google.protobuf import any_pb2

from runtimed.api.containerd.services.containers.v1 import containers_pb2
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from runtimed.client import Client

SPEC = any_pb2.Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec", value=b"{}")


def new_container(cid: str) -> containers_pb2.Container:
    return containers_pb2.Container(
        id=cid, runtime=containers_pb2.Container.Runtime(name="io.containerd.runc.v2"), spec=SPEC
    )


def test_socket_is_private_to_root(daemon):
    mode = os.stat(daemon.socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_version_and_stable_uuid_across_restarts(daemon):
    with daemon.client() as client:
        assert client.version().version
        first = client.server_info()
    assert first.uuid and first.pid == daemon.process.pid
    daemon.restart()
    with daemon.client() as client:
        second = client.server_info()
    assert second.uuid == first.uuid
    assert second.pid != first.pid


def test_two_daemons_side_by_side_and_same_root_refused(daemon_factory):
    first = daemon_factory().start()
    second = daemon_factory().start()
    with first.client() as a, second.client() as b:
        a.create_container(new_container("only-in-first"))
        assert [c.id for c in a.containers()] == ["only-in-first"]
        assert b.containers() == []
        assert a.server_info().uuid != b.server_info().uuid
    intruder = daemon_factory()
    cmd = intruder.command()
    cmd[cmd.index("--root") + 1] = str(first.root)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"root {first.root} is in use by another runtimed (pid {first.process.pid})" in result.stderr
    # The refused daemon touched nothing: the first still serves.
    with first.client() as a:
        assert [c.id for c in a.containers()] == ["only-in-first"]


def test_address_of_a_live_daemon_is_refused(daemon, daemon_factory):
    other = daemon_factory()
    cmd = other.command()
    cmd[cmd.index("--address") + 1] = f"unix://{daemon.socket_path}"
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "is in use by another running daemon" in result.stderr
    with daemon.client() as client:
        client.version()


def test_sigterm_shuts_down_cleanly_and_data_persists(daemon):
    with daemon.client() as client:
        client.create_container(new_container("persisted"))
    assert daemon.stop() == 0
    assert not daemon.socket_path.exists()
    daemon.start()
    with daemon.client() as client:
        assert client.container("persisted").runtime.name == "io.containerd.runc.v2"


def test_kill_minus_nine_leaves_a_usable_store(daemon):
    with daemon.client() as client:
        for i in range(20):
            client.create_container(new_container(f"c{i}"))
    daemon.kill()
    daemon.start()  # the stale socket file is replaced
    with daemon.client() as client:
        assert len(client.containers()) == 20


def test_missing_namespace_header_means_default(daemon):
    with daemon.client() as client:
        client.create_container(new_container("c1"))
        stub = client.containers_stub
        response = stub.List(containers_pb2.ListContainersRequest(), timeout=10)
        assert [c.id for c in response.containers] == ["c1"]


def test_invalid_namespace_header_is_invalid_argument(daemon):
    with daemon.client(namespace="not valid!") as client, pytest.raises(grpc.RpcError) as info:
        client.containers()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "namespace" in info.value.details()


def test_services_of_later_issues_answer_unimplemented(daemon):
    with grpc.insecure_channel(f"unix://{daemon.socket_path}") as channel:
        # Tasks landed with issue 4; what it leaves out (checkpoint/restore) still says so.
        checkpoint = tasks_pb2.CheckpointTaskRequest(container_id="c1")
        for call in (lambda: tasks_pb2_grpc.TasksStub(channel).Checkpoint(checkpoint),):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_builtin_plugins_are_reported_ok(daemon):
    with daemon.client() as client:
        plugins = {(p.type, p.id): p for p in client.plugins()}
        for key in [
            ("io.containerd.event.v1", "exchange"),
            ("io.containerd.metadata.v1", "sqlite"),
            ("io.containerd.grpc.v1", "containers"),
            ("io.containerd.grpc.v1", "introspection"),
        ]:
            assert key in plugins and not plugins[key].HasField("init_err")
        metadata = plugins[("io.containerd.metadata.v1", "sqlite")]
        assert list(metadata.requires) == ["io.containerd.event.v1"]
        assert metadata.exports["path"].endswith("meta.db")
        only = client.plugins(["type==io.containerd.grpc.v1,id==images"])
        assert [(p.type, p.id) for p in only] == [("io.containerd.grpc.v1", "images")]


def test_bad_plugin_config_is_reported_not_fatal(daemon_factory, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('version = 1\n[plugins."io.containerd.metadata.v1.sqlite"]\nsync = "sometimes"\n')
    daemon = daemon_factory(config=config).start()
    with daemon.client() as client:
        plugins = {(p.type, p.id): p for p in client.plugins()}
        metadata = plugins[("io.containerd.metadata.v1", "sqlite")]
        assert "sync must be one of" in metadata.init_err.message
        containers = plugins[("io.containerd.grpc.v1", "containers")]
        assert "skip plugin" in containers.init_err.message
        # What needs no metadata still works.
        assert client.version().version
        with pytest.raises(grpc.RpcError) as info:
            client.containers()
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_required_plugin_failure_stops_the_daemon(daemon_factory, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(
        'version = 1\nrequired_plugins = ["io.containerd.metadata.v1.sqlite"]\n'
        '[plugins."io.containerd.metadata.v1.sqlite"]\nsync = "sometimes"\n'
    )
    daemon = daemon_factory(config=config)
    result = subprocess.run(daemon.command(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "required plugin io.containerd.metadata.v1.sqlite failed to load" in result.stderr


def test_unreadable_config_is_a_clear_error(daemon_factory, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("version = 1\nroot = [\n")
    daemon = daemon_factory(config=config)
    result = subprocess.run(daemon.command(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert str(config) in result.stderr
    config.write_text("version = 1\nbogus = 3\n")
    result = subprocess.run(daemon.command(), capture_output=True, text=True, timeout=30)
    assert "unknown keys: bogus" in result.stderr


def test_config_default_is_valid_toml_the_daemon_accepts(daemon_factory, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "runtimed.daemon.main", "config", "default"],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    document = tomllib.loads(result.stdout)
    assert document["grpc"]["address"] == "/run/runtimed/runtimed.sock"
    assert document["plugins"]["io.containerd.metadata.v1.sqlite"] == {"sync": "full"}
    config = tmp_path / "config.toml"
    config.write_text(result.stdout)
    daemon = daemon_factory(config=config).start()  # flags override root/state/address
    with Client(daemon.address) as client:
        assert client.version().version
