"""runtimectl as a user runs it: a subprocess against a real daemon."""

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
from runtimed.api.containerd.services.images.v1 import images_pb2
from runtimed.api.containerd.types import descriptor_pb2

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
SPEC = {"ociVersion": "1.0.2", "process": {"args": ["/bin/sh"], "cwd": "/"}, "root": {"path": "rootfs"}}
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DIGEST = "sha256:" + "ab" * 32


def run(
    *args: str, address: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "runtimed.cli.main"]
    if address is not None:
        cmd += ["-a", address]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RUNTIMED_")} | (env or {})
    return subprocess.run(
        cmd + list(args), capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=full_env
    )


def ok(*args: str, **kwargs) -> str:
    result = run(*args, **kwargs)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def table(text: str) -> list[list[str]]:
    """Rows of an aligned table, cells split on runs of 2+ spaces (cells hold single spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()]


def new_container(cid: str, image: str = "") -> containers_pb2.Container:
    return containers_pb2.Container(
        id=cid,
        image=image,
        labels={"app": "web"},
        runtime=containers_pb2.Container.Runtime(name="io.containerd.runc.v2"),
        spec=any_pb2.Any(type_url=SPEC_URL, value=json.dumps(SPEC).encode()),
    )


def new_image(name: str) -> images_pb2.Image:
    target = descriptor_pb2.Descriptor(media_type=MANIFEST, digest=DIGEST, size=1536)
    return images_pb2.Image(name=name, labels={"tier": "base"}, target=target)


def test_help_everywhere_without_a_daemon():
    assert "namespace" in ok("--help")
    for command in ("version", "namespace ls", "ns create", "plugins ls", "c info", "images ls", "c"):
        assert "usage: runtimectl" in ok(*command.split(), "--help")
    result = run("namespace", "create", "x", "not-a-label")
    assert result.returncode == 2
    assert "invalid label 'not-a-label'" in result.stderr
    assert run("no-such-command").returncode == 2


def test_version(daemon):
    out = ok("version", address=daemon.address)
    uuid = daemon.client().server_info().uuid
    assert out.startswith("Client:\n  Version: 0.1.0")
    assert "Server:" in out and f"UUID:     {uuid}" in out
    data = json.loads(ok("version", "--format", "json", address=daemon.address))
    pid = daemon.process.pid
    assert data["server"] == {"version": "0.1.0", "revision": "runtimed", "uuid": uuid, "pid": pid}
    assert data["client"]["version"] == "0.1.0"


def test_namespace_lifecycle(daemon):
    a = daemon.address
    assert ok("namespace", "create", "team-a", "owner=alice", "tier=gold", address=a) == "team-a\n"
    ok("ns", "create", "team-b", address=a)
    rows = table(ok("ns", "ls", address=a))
    assert rows[0] == ["NAME", "LABELS"]
    assert ["team-a", "owner=alice,tier=gold"] in rows and ["team-b", "-"] in rows
    assert ok("namespaces", "label", "team-a", "owner=", "zone=eu", address=a) == "tier=gold\nzone=eu\n"
    assert ok("ns", "label", "team-a", address=a) == "tier=gold\nzone=eu\n"
    data = json.loads(ok("ns", "ls", "--format", "json", address=a))
    assert {"name": "team-a", "labels": {"tier": "gold", "zone": "eu"}} in data
    assert {"name": "team-b", "labels": {}} in data
    assert ok("ns", "ls", "-q", address=a).split() == sorted(n["name"] for n in data)

    result = run("ns", "create", "team-a", address=a)
    assert result.returncode == 125
    assert result.stderr.startswith("runtimectl: ") and "already exists" in result.stderr

    result = run("ns", "rm", "team-b", "ghost", address=a)
    assert result.returncode == 125
    assert result.stdout == "team-b\n"
    assert result.stderr.count("\n") == 1 and "ghost" in result.stderr and "not found" in result.stderr
    assert "team-b" not in ok("ns", "ls", "-q", address=a).split()


def test_rm_of_non_empty_namespace_fails(daemon):
    with daemon.client(namespace="busy") as client:
        client.create_container(new_container("keeper"))
    result = run("ns", "rm", "busy", address=daemon.address)
    assert result.returncode == 125
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("runtimectl: ")
    assert "busy" in line and ("not empty" in line or "failed precondition" in line), line
    assert "busy" in ok("ns", "ls", "-q", address=daemon.address).split()


def test_containers_ls_info_rm(daemon):
    a = daemon.address
    with daemon.client() as client:
        client.create_container(new_container("web-1", image="docker.io/library/nginx:1.27"))
        client.create_container(new_container("db-1"))
    rows = table(ok("containers", "ls", address=a))
    assert rows[0] == ["CONTAINER", "IMAGE", "RUNTIME", "CREATED"]
    assert rows[1][:3] == ["db-1", "-", "io.containerd.runc.v2"]
    assert rows[2][:3] == ["web-1", "docker.io/library/nginx:1.27", "io.containerd.runc.v2"]
    assert all(row[3].endswith(" ago") and "second" in row[3] for row in rows[1:])
    assert ok("c", "ls", "-q", address=a) == "db-1\nweb-1\n"
    assert ok("container", "ls", "-q", "id==web-1", address=a) == "web-1\n"

    listed = json.loads(ok("c", "ls", "--format", "json", address=a))
    assert [c["id"] for c in listed] == ["db-1", "web-1"]
    info = json.loads(ok("c", "info", "web-1", address=a))
    assert info == listed[1]
    assert info["spec"] == SPEC
    assert info["runtime"] == {"name": "io.containerd.runc.v2"}
    assert info["labels"] == {"app": "web"} and info["image"] == "docker.io/library/nginx:1.27"
    assert info["created_at"].endswith("Z")

    assert ok("c", "rm", "web-1", "db-1", address=a) == "web-1\ndb-1\n"
    assert ok("c", "ls", "-q", address=a) == ""
    assert table(ok("c", "ls", address=a)) == [["CONTAINER", "IMAGE", "RUNTIME", "CREATED"]]


def test_unknown_container(daemon):
    for command in (("c", "info", "ghost"), ("c", "rm", "ghost")):
        result = run(*command, address=daemon.address)
        assert result.returncode == 125
        assert result.stdout == ""
        line = result.stderr.strip()
        assert line.startswith("runtimectl: ") and "\n" not in line
        assert "ghost" in line and "not found" in line


def test_images_ls(daemon):
    with daemon.client() as client:
        client.create_image(new_image("docker.io/library/busybox:1.36"))
    rows = table(ok("images", "ls", address=daemon.address))
    assert rows[0] == ["REF", "DIGEST", "SIZE", "MEDIA TYPE", "CREATED", "LABELS"]
    ref, digest, size, media_type, created, labels = rows[1]
    assert (ref, digest, size, media_type, labels) == (
        "docker.io/library/busybox:1.36",
        DIGEST,
        "1.536kB",
        MANIFEST,
        "tier=base",
    )
    assert created.endswith(" ago")
    assert ok("i", "ls", "-q", address=daemon.address) == "docker.io/library/busybox:1.36\n"
    [image] = json.loads(ok("image", "ls", "--format", "json", address=daemon.address))
    assert image["name"] == "docker.io/library/busybox:1.36"
    assert image["target"] == {"media_type": MANIFEST, "digest": DIGEST, "size": "1536", "annotations": {}}
    assert ok("image", "rm", "docker.io/library/busybox:1.36", address=daemon.address)
    assert ok("i", "ls", "-q", address=daemon.address) == ""


def test_plugins_ls(daemon):
    rows = table(ok("plugins", "ls", address=daemon.address))
    assert rows[0] == ["TYPE", "ID", "PLATFORMS", "STATUS"]
    found = {(r[0], r[1]): r[3] for r in rows[1:]}
    for plugin in ("version", "namespaces", "introspection", "containers", "images"):
        assert found[("io.containerd.grpc.v1", plugin)] == "ok"
    assert found[("io.containerd.metadata.v1", "sqlite")] == "ok"
    grpc_only = table(ok("plugins", "ls", "type==io.containerd.grpc.v1", address=daemon.address))
    assert {r[0] for r in grpc_only[1:]} == {"io.containerd.grpc.v1"}
    data = json.loads(ok("plugins", "ls", "--format", "json", address=daemon.address))
    assert all(p["status"] == "ok" and "init_err" not in p for p in data)
    detailed = ok("plugins", "ls", "--detailed", address=daemon.address)
    assert "ID:            sqlite" in detailed and "Status:        ok" in detailed


def test_unreachable_daemon(tmp_path):
    missing = tmp_path / "nothing.sock"
    for command in (("version",), ("c", "ls"), ("ns", "rm", "a", "b")):
        result = run(*command, address=str(missing))
        assert result.returncode == 125
        assert result.stderr == (
            f"runtimectl: cannot connect to runtimed at unix://{missing}: is the daemon running?\n"
        )


def test_environment_variables(daemon):
    with daemon.client(namespace="envns") as client:
        client.create_container(new_container("from-env"))
    env = {"RUNTIMED_ADDRESS": f"unix://{daemon.address}", "RUNTIMED_NAMESPACE": "envns"}
    assert ok("c", "ls", "-q", env=env) == "from-env\n"
    # Flags win over the environment.
    assert ok("-n", "default", "c", "ls", "-q", env=env) == ""
    result = run("c", "ls", env={"RUNTIMED_ADDRESS": "unix:///nonexistent/runtimed.sock"})
    assert result.returncode == 125 and "unix:///nonexistent/runtimed.sock" in result.stderr


def test_default_address_matches_the_client(monkeypatch):
    from runtimed.cli.common import DEFAULT_ADDRESS
    from runtimed.client import default_address

    monkeypatch.delenv("RUNTIMED_ADDRESS", raising=False)
    assert default_address() == DEFAULT_ADDRESS


def test_namespace_isolation(daemon):
    with daemon.client(namespace="ns-a") as client:
        client.create_container(new_container("only-in-a"))
        client.create_image(new_image("docker.io/library/a:1"))
    a = daemon.address
    assert ok("-n", "ns-a", "c", "ls", "-q", address=a) == "only-in-a\n"
    assert ok("-n", "ns-b", "c", "ls", "-q", address=a) == ""
    assert ok("-n", "ns-b", "i", "ls", "-q", address=a) == ""
    result = run("-n", "ns-b", "c", "info", "only-in-a", address=a)
    assert result.returncode == 125 and "not found" in result.stderr
    result = run("-n", "ns-b", "c", "rm", "only-in-a", address=a)
    assert result.returncode == 125
    assert ok("-n", "ns-a", "c", "ls", "-q", address=a) == "only-in-a\n"


@pytest.mark.parametrize("alias", ["namespace", "namespaces", "ns"])
def test_group_alone_prints_its_help(alias):
    out = ok(alias)
    assert "ls" in out and "create" in out and "label" in out
