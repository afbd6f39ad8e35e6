"""containerd's own clients against runtimed's control plane: `ctr` and the PyPI stubs."""

from __future__ import annotations

import re

from google.protobuf import any_pb2

from runtimed.api.containerd.services.containers.v1 import containers_pb2
from runtimed.api.containerd.services.images.v1 import images_pb2
from runtimed.api.containerd.types import descriptor_pb2

SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
DIGEST = "sha256:" + "c" * 64


def rows(output: str) -> list[list[str]]:
    """ctr's tab-aligned table, header first, split into cells."""
    return [line.split() for line in output.strip().splitlines()]


def test_ctr_version_prints_server_version_and_uuid(daemon, run_ctr, client):
    result = run_ctr(daemon.address, "version")
    server = result.stdout.split("Server:")[1]
    assert re.search(r"Version:\s+0\.1\.0", server)
    assert f"UUID: {client.server_info().uuid}" in server


def test_ctr_namespaces_create_ls_label_rm(daemon, run_ctr):
    run_ctr(daemon.address, "namespaces", "create", "team-a", "owner=alice")
    run_ctr(daemon.address, "namespaces", "create", "team-b")
    assert rows(run_ctr(daemon.address, "namespaces", "ls").stdout) == [
        ["NAME", "LABELS"],
        ["team-a", "owner=alice"],
        ["team-b"],
    ]
    run_ctr(daemon.address, "namespaces", "label", "team-b", "tier=gold", "env=prod")
    listed = rows(run_ctr(daemon.address, "namespaces", "ls").stdout)
    assert listed[2][0] == "team-b" and sorted(listed[2][1].split(",")) == ["env=prod", "tier=gold"]
    run_ctr(daemon.address, "namespaces", "label", "team-b", "tier=")
    assert rows(run_ctr(daemon.address, "namespaces", "ls", "-q").stdout) == [["team-a"], ["team-b"]]
    assert "env=prod" in run_ctr(daemon.address, "namespaces", "ls").stdout
    assert "tier=gold" not in run_ctr(daemon.address, "namespaces", "ls").stdout
    duplicate = run_ctr(daemon.address, "namespaces", "create", "team-a", check=False)
    assert duplicate.returncode != 0 and "already exists" in duplicate.stderr
    run_ctr(daemon.address, "namespaces", "rm", "team-a", "team-b")
    assert run_ctr(daemon.address, "namespaces", "ls", "-q").stdout.strip() == ""


def test_ctr_refuses_to_remove_a_namespace_in_use(daemon, run_ctr, client):
    client.create_container(
        containers_pb2.Container(
            id="busy",
            runtime=containers_pb2.Container.Runtime(name="io.containerd.runc.v2"),
            spec=any_pb2.Any(type_url=SPEC_URL, value=b"{}"),
        )
    )
    result = run_ctr(daemon.address, "namespaces", "rm", "default", check=False)
    assert result.returncode != 0
    assert "must be empty" in result.stderr and "failed precondition" in result.stderr
    assert "default" in run_ctr(daemon.address, "namespaces", "ls", "-q").stdout


def test_ctr_plugins_ls_reports_status(daemon, run_ctr):
    table = rows(run_ctr(daemon.address, "plugins", "ls").stdout)
    assert table[0] == ["TYPE", "ID", "PLATFORMS", "STATUS"]
    status = {(r[0], r[1]): r[-1] for r in table[1:]}
    assert status[("io.containerd.metadata.v1", "sqlite")] == "ok"
    assert status[("io.containerd.grpc.v1", "containers")] == "ok"
    filtered = rows(run_ctr(daemon.address, "plugins", "ls", "type==io.containerd.metadata.v1").stdout)
    assert [r[:2] for r in filtered[1:]] == [["io.containerd.metadata.v1", "sqlite"]]


def test_ctr_containers_ls_info_and_filters(daemon, run_ctr, client):
    for cid, image in (("web", "docker.io/library/nginx:1"), ("db", "docker.io/library/postgres:16")):
        client.create_container(
            containers_pb2.Container(
                id=cid,
                image=image,
                labels={"app": cid},
                runtime=containers_pb2.Container.Runtime(name="io.containerd.runc.v2"),
                spec=any_pb2.Any(type_url=SPEC_URL, value=b'{"ociVersion":"1.0.2"}'),
            )
        )
    table = rows(run_ctr(daemon.address, "containers", "ls").stdout)
    assert table == [
        ["CONTAINER", "IMAGE", "RUNTIME"],
        ["db", "docker.io/library/postgres:16", "io.containerd.runc.v2"],
        ["web", "docker.io/library/nginx:1", "io.containerd.runc.v2"],
    ]
    assert rows(run_ctr(daemon.address, "containers", "ls", "-q", "labels.app==web").stdout) == [["web"]]
    info = run_ctr(daemon.address, "containers", "info", "web").stdout
    assert '"ociVersion": "1.0.2"' in info and '"app": "web"' in info
    # Another namespace sees none of them.
    assert rows(run_ctr(daemon.address, "containers", "ls", "-q", namespace="other").stdout) == []
    missing = run_ctr(daemon.address, "containers", "info", "nope", check=False)
    assert missing.returncode != 0 and "not found" in missing.stderr
    run_ctr(daemon.address, "containers", "rm", "web")
    assert rows(run_ctr(daemon.address, "containers", "ls", "-q").stdout) == [["db"]]


def test_ctr_images_ls(daemon, run_ctr, client):
    client.create_image(
        images_pb2.Image(
            name="docker.io/library/busybox:latest",
            labels={"k": "v"},
            target=descriptor_pb2.Descriptor(
                media_type="application/vnd.oci.image.manifest.v1+json", digest=DIGEST, size=528
            ),
        )
    )
    table = rows(run_ctr(daemon.address, "images", "ls").stdout)
    assert table[0] == ["REF", "TYPE", "DIGEST", "SIZE", "PLATFORMS", "LABELS"]
    assert table[1][:3] == [
        "docker.io/library/busybox:latest",
        "application/vnd.oci.image.manifest.v1+json",
        DIGEST,
    ]
    assert table[1][-1] == "k=v"
    assert run_ctr(daemon.address, "images", "ls", "-q").stdout.strip() == "docker.io/library/busybox:latest"
    run_ctr(daemon.address, "images", "rm", "docker.io/library/busybox:latest")
    assert run_ctr(daemon.address, "images", "ls", "-q").stdout.strip() == ""


def test_pypi_client_version_namespaces_containers(daemon, run_pyclient):
    version = run_pyclient(daemon.address, "version")
    assert version["version"] == "0.1.0"

    created = run_pyclient(daemon.address, "namespace-create", "py-ns", "a=1")
    assert created["namespace"] == {"name": "py-ns", "labels": {"a": "1"}}
    assert run_pyclient(daemon.address, "namespace-create", "py-ns")["error"]["code"] == "ALREADY_EXISTS"
    assert run_pyclient(daemon.address, "namespace-get", "py-ns")["namespace"]["labels"] == {"a": "1"}
    names = [n["name"] for n in run_pyclient(daemon.address, "namespaces-list")["namespaces"]]
    assert "py-ns" in names

    made = run_pyclient(daemon.address, "container-create", "c1", "busybox:latest", namespace="py-ns")
    assert made["container"]["id"] == "c1"
    got = run_pyclient(daemon.address, "container-get", "c1", namespace="py-ns")["container"]
    assert got["image"] == "busybox:latest" and got["runtime"]["name"] == "io.containerd.runc.v2"
    assert got["spec"]["type_url"] == SPEC_URL
    listed = run_pyclient(daemon.address, "containers-list", namespace="py-ns")["containers"]
    assert [c["id"] for c in listed] == ["c1"]
    assert run_pyclient(daemon.address, "containers-list")["containers"] == []
    assert run_pyclient(daemon.address, "container-get", "c1")["error"]["code"] == "NOT_FOUND"
    busy = run_pyclient(daemon.address, "namespace-delete", "py-ns")
    assert busy["error"]["code"] == "FAILED_PRECONDITION"
    run_pyclient(daemon.address, "container-delete", "c1", namespace="py-ns")
    assert "error" not in run_pyclient(daemon.address, "namespace-delete", "py-ns")
    assert run_pyclient(daemon.address, "namespace-get", "py-ns")["error"]["code"] == "NOT_FOUND"
