"""`runtimectl volume ...` as a user runs it: a subprocess against a real daemon."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import any_pb2

from runtimed.api.containerd.services.containers.v1 import containers_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"


def run(*args: str, address: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "runtimed.cli.main"]
    if address is not None:
        cmd += ["-a", address]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNTIMED_")}
    return subprocess.run(
        cmd + list(args), input=stdin, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=env
    )


def ok(*args: str, **kwargs) -> str:
    result = run(*args, **kwargs)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def table(text: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()]


@pytest.fixture
def rtctl(daemon):
    def call(*args: str, **kwargs) -> subprocess.CompletedProcess:
        return run(*args, address=daemon.address, **kwargs)

    return call


def test_help_for_every_volume_command_without_a_daemon():
    assert "manage volumes" in ok("--help")
    for command in ("volume", "volume create", "volume ls", "volume inspect", "volume rm", "volume prune"):
        assert "usage: runtimectl volume" in ok(*command.split(), "--help")
    assert "usage: runtimectl volume" in ok("volumes", "list", "--help")
    result = run("volume", "create", "--label", "no-equals", "x")
    assert result.returncode == 2 and "invalid label 'no-equals'" in result.stderr
    assert run("volume", "rm").returncode == 2  # NAME is required


def test_create_ls_inspect_rm(daemon, rtctl):
    assert ok(
        "volume", "create", "--label", "app=web", "--label", "tier=", "data", address=daemon.address
    ) == ("data\n")
    generated = ok("volume", "create", address=daemon.address).strip()
    assert re.fullmatch(r"[0-9a-f]{64}", generated)

    rows = table(ok("volume", "ls", address=daemon.address))
    assert rows[0] == ["VOLUME NAME", "CREATED", "USED BY", "LABELS"]
    assert sorted(r[0] for r in rows[1:]) == sorted(["data", generated])
    data_row = next(r for r in rows if r[0] == "data")
    assert data_row[1].endswith("ago") and data_row[2:] == ["-", "app=web,tier="]
    assert ok("volume", "ls", "-q", "--filter", "label=app=web", address=daemon.address) == "data\n"
    assert ok("volume", "ls", "-q", "--filter", "label=app", address=daemon.address) == "data\n"
    assert ok("volume", "ls", "-q", "--filter", 'labels."app"==web', address=daemon.address) == "data\n"
    assert ok("volume", "ls", "-q", "--filter", "name=at", address=daemon.address) == "data\n"
    assert ok("volume", "ls", "-q", "--filter", "label!=app=web", address=daemon.address) == generated + "\n"
    listed = json.loads(
        ok("volume", "ls", "--format", "json", "--filter", "name==data", address=daemon.address)
    )
    assert [(v["name"], v["labels"]) for v in listed] == [("data", {"app": "web", "tier": ""})]

    inspected = json.loads(ok("volume", "inspect", "data", address=daemon.address))
    mountpoint = str(daemon.root / "io.runtimed.volume.v1.local" / "default" / "data" / "_data")
    assert inspected == [
        {
            "CreatedAt": inspected[0]["CreatedAt"],
            "Driver": "local",
            "Labels": {"app": "web", "tier": ""},
            "Mountpoint": mountpoint,
            "Name": "data",
            "Options": {},
            "Scope": "local",
            "UsedBy": [],
        }
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", inspected[0]["CreatedAt"])

    result = rtctl("volume", "inspect", "data", "missing")
    assert result.returncode == 125
    assert [v["Name"] for v in json.loads(result.stdout)] == ["data"]
    assert result.stderr == 'runtimectl: volume "missing": not found\n'

    assert ok("volume", "rm", "data", generated, address=daemon.address) == f"data\n{generated}\n"
    assert ok("volume", "ls", "-q", address=daemon.address) == ""
    result = rtctl("volume", "rm", "data")
    assert (result.returncode, result.stderr) == (125, 'runtimectl: volume "data": not found\n')
    assert ok("volume", "rm", "-f", "data", address=daemon.address) == "data\n"


def test_errors_are_one_line_with_status_125(daemon, rtctl):
    result = rtctl("volume", "create", "a/b")
    assert result.returncode == 125 and result.stdout == ""
    assert result.stderr.startswith('runtimectl: volume name "a/b": must match [a-zA-Z0-9][a-zA-Z0-9_.-]+')
    ok("volume", "create", "dup", address=daemon.address)
    result = rtctl("volume", "create", "dup")
    assert (result.returncode, result.stderr) == (125, 'runtimectl: volume "dup": already exists\n')
    result = rtctl("volume", "ls", "--filter", "label=")
    assert result.returncode == 125 and "invalid filter 'label='" in result.stderr
    result = rtctl("volume", "ls", "--filter", "name==x,")
    assert result.returncode == 125 and "filters: parse error" in result.stderr
    result = run("volume", "ls", address="/nonexistent/runtimed.sock")
    assert result.returncode == 125 and "cannot connect to runtimed" in result.stderr


def test_rm_of_a_volume_in_use_names_the_container(daemon, rtctl):
    ok("volume", "create", "busy", address=daemon.address)
    mountpoint = json.loads(ok("volume", "inspect", "busy", address=daemon.address))[0]["Mountpoint"]
    spec = {"ociVersion": "1.0.2", "mounts": [{"destination": "/data", "type": "bind", "source": mountpoint}]}
    container = containers_pb2.Container(
        id="web",
        runtime=containers_pb2.Container.Runtime(name="io.containerd.runc.v2"),
        spec=any_pb2.Any(type_url=SPEC_URL, value=json.dumps(spec).encode()),
    )
    with daemon.client() as client:
        client.call(client.containers_stub.Create, containers_pb2.CreateContainerRequest(container=container))
        result = rtctl("volume", "rm", "busy")
        assert result.returncode == 125
        assert (
            result.stderr == 'runtimectl: volume "busy" is in use by container "web": failed precondition\n'
        )
        assert json.loads(ok("volume", "inspect", "busy", address=daemon.address))[0]["UsedBy"] == ["web"]
        assert table(ok("volume", "ls", address=daemon.address))[1][2] == "web"
        assert ok("volume", "prune", "-f", address=daemon.address) == "Total reclaimed space: 0B\n"
        client.call(client.containers_stub.Delete, containers_pb2.DeleteContainerRequest(id="web"))
    assert ok("volume", "rm", "busy", address=daemon.address) == "busy\n"


def test_prune_asks_first_and_reports_what_it_freed(daemon, rtctl):
    for name, label in (("old1", "tmp=1"), ("old2", "tmp=1"), ("keep", "keep=yes")):
        ok("volume", "create", "--label", label, name, address=daemon.address)
    mountpoint = json.loads(ok("volume", "inspect", "old1", address=daemon.address))[0]["Mountpoint"]
    Path(mountpoint, "blob").write_bytes(b"z" * 1536)

    result = rtctl("volume", "prune", stdin="n\n")
    assert result.returncode == 0 and "Are you sure you want to continue? [y/N]" in result.stdout
    assert "WARNING! This will remove all volumes not used by at least one container." in result.stdout
    assert "Deleted Volumes" not in result.stdout
    result = rtctl("volume", "prune", stdin="")  # no answer is no
    assert result.returncode == 0 and "Deleted Volumes" not in result.stdout
    assert ok("volume", "ls", "-q", address=daemon.address) == "keep\nold1\nold2\n"

    result = rtctl("volume", "prune", "--filter", "label=tmp=1", stdin="y\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("Deleted Volumes:\nold1\nold2\n\nTotal reclaimed space: 1.536kB\n")
    assert ok("volume", "ls", "-q", address=daemon.address) == "keep\n"
    assert ok("volume", "prune", "-f", address=daemon.address) == (
        "Deleted Volumes:\nkeep\n\nTotal reclaimed space: 0B\n"
    )


def test_volumes_follow_the_namespace_option(daemon):
    ok("-n", "team-a", "volume", "create", "mine", address=daemon.address)
    assert ok("-n", "team-b", "volume", "ls", "-q", address=daemon.address) == ""
    assert ok("-n", "team-a", "volume", "ls", "-q", address=daemon.address) == "mine\n"
    result = run("-n", "team-b", "volume", "rm", "mine", address=daemon.address)
    assert result.returncode == 125 and "not found" in result.stderr
    assert ok("-n", "team-a", "volume", "rm", "mine", address=daemon.address) == "mine\n"
