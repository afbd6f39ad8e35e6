"""Call a containerd-compatible daemon through the PyPI `containerd` client stubs.

Runs under the interop virtualenv (.venv-interop: containerd==1.5.3, protobuf==3.20.3), never
under the project's own venv, whose protobuf is too new for these old-style stubs. Tests call it
through the `run_pyclient` fixture in tests/interop/conftest.py.

    .venv-interop/bin/python tests/interop/pyclient_probe.py --address SOCKET [--namespace NS] OP [ARGS]

Operations:
    version
    namespaces-list
    namespace-create NAME [KEY=VALUE ...]
    namespace-get NAME
    namespace-delete NAME
    containers-list [FILTER ...]
    container-create ID IMAGE [KEY=VALUE ...]
    container-get ID
    container-delete ID

Prints exactly one JSON object on stdout. A gRPC error is a result too: it prints
{"error": {"code": "NOT_FOUND", "details": "..."}} and exits 0, so tests can assert on codes.
Bad usage exits 2.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from datetime import UTC, datetime
from typing import Any

import grpc
from containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from containerd.services.namespaces.v1 import namespace_pb2, namespace_pb2_grpc
from containerd.services.version.v1 import version_pb2_grpc
from google.protobuf import any_pb2, empty_pb2

NAMESPACE_KEY = "containerd-namespace"
RUNTIME_NAME = "io.containerd.runc.v2"
SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"

# What `ctr containers create` would send, trimmed to the essentials.
SPEC = {
    "ociVersion": "1.0.2-dev",
    "process": {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": ["/bin/sh"],
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "cwd": "/",
    },
    "root": {"path": "rootfs"},
    "linux": {
        "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network")],
    },
}


def _timestamp(ts: Any) -> str | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    when = datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{when}.{ts.nanos:09d}Z"


def _any(message: Any) -> dict[str, Any]:
    """An Any as {"type_url", "value"}: the value parsed as JSON when it is JSON, else base64."""
    try:
        value: Any = json.loads(message.value.decode())
    except (UnicodeDecodeError, ValueError):
        value = base64.b64encode(message.value).decode()
    return {"type_url": message.type_url, "value": value}


def _namespace(ns: Any) -> dict[str, Any]:
    return {"name": ns.name, "labels": dict(ns.labels)}


def _container(c: Any) -> dict[str, Any]:
    return {
        "id": c.id,
        "labels": dict(c.labels),
        "image": c.image,
        "runtime": {
            "name": c.runtime.name,
            "options": _any(c.runtime.options) if c.runtime.HasField("options") else None,
        },
        "spec": _any(c.spec) if c.HasField("spec") else None,
        "snapshotter": c.snapshotter,
        "snapshot_key": c.snapshot_key,
        "created_at": _timestamp(c.created_at),
        "updated_at": _timestamp(c.updated_at),
        "extensions": {k: _any(v) for k, v in c.extensions.items()},
    }


def _labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"pyclient_probe: label {pair!r} is not KEY=VALUE")
        labels[key] = value
    return labels


def _args(args: list[str], minimum: int, maximum: int | None, usage: str) -> list[str]:
    if len(args) < minimum or (maximum is not None and len(args) > maximum):
        raise SystemExit(f"pyclient_probe: usage: {usage}")
    return args


def run(channel: grpc.Channel, op: str, args: list[str], metadata: list[tuple[str, str]], timeout: float):
    kw = {"metadata": metadata, "timeout": timeout}
    namespaces = namespace_pb2_grpc.NamespacesStub(channel)
    containers = containers_pb2_grpc.ContainersStub(channel)

    if op == "version":
        _args(args, 0, 0, "version")
        resp = version_pb2_grpc.VersionStub(channel).Version(empty_pb2.Empty(), **kw)
        return {"version": resp.version, "revision": resp.revision}
    if op == "namespaces-list":
        _args(args, 0, 0, "namespaces-list")
        resp = namespaces.List(namespace_pb2.ListNamespacesRequest(), **kw)
        return {"namespaces": [_namespace(ns) for ns in resp.namespaces]}
    if op == "namespace-create":
        name, *pairs = _args(args, 1, None, "namespace-create NAME [KEY=VALUE ...]")
        ns = namespace_pb2.Namespace(name=name, labels=_labels(pairs))
        resp = namespaces.Create(namespace_pb2.CreateNamespaceRequest(namespace=ns), **kw)
        return {"namespace": _namespace(resp.namespace)}
    if op == "namespace-get":
        (name,) = _args(args, 1, 1, "namespace-get NAME")
        resp = namespaces.Get(namespace_pb2.GetNamespaceRequest(name=name), **kw)
        return {"namespace": _namespace(resp.namespace)}
    if op == "namespace-delete":
        (name,) = _args(args, 1, 1, "namespace-delete NAME")
        namespaces.Delete(namespace_pb2.DeleteNamespaceRequest(name=name), **kw)
        return {"deleted": name}
    if op == "containers-list":
        resp = containers.List(containers_pb2.ListContainersRequest(filters=args), **kw)
        return {"containers": [_container(c) for c in resp.containers]}
    if op == "container-create":
        cid, image, *pairs = _args(args, 2, None, "container-create ID IMAGE [KEY=VALUE ...]")
        container = containers_pb2.Container(
            id=cid,
            image=image,
            labels=_labels(pairs),
            runtime=containers_pb2.Container.Runtime(name=RUNTIME_NAME),
            spec=any_pb2.Any(type_url=SPEC_TYPE_URL, value=json.dumps(SPEC).encode()),
        )
        resp = containers.Create(containers_pb2.CreateContainerRequest(container=container), **kw)
        return {"container": _container(resp.container)}
    if op == "container-get":
        (cid,) = _args(args, 1, 1, "container-get ID")
        resp = containers.Get(containers_pb2.GetContainerRequest(id=cid), **kw)
        return {"container": _container(resp.container)}
    if op == "container-delete":
        (cid,) = _args(args, 1, 1, "container-delete ID")
        containers.Delete(containers_pb2.DeleteContainerRequest(id=cid), **kw)
        return {"deleted": cid}
    raise SystemExit(f"pyclient_probe: unknown operation {op!r}")


OPERATIONS = (
    "version",
    "namespaces-list",
    "namespace-create",
    "namespace-get",
    "namespace-delete",
    "containers-list",
    "container-create",
    "container-get",
    "container-delete",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", required=True, help="the daemon's unix socket path")
    parser.add_argument("--namespace", default="default", help="sent as containerd-namespace metadata")
    parser.add_argument("--timeout", type=float, default=30.0, help="RPC deadline in seconds")
    parser.add_argument("op", choices=OPERATIONS)
    parser.add_argument("args", nargs="*")
    opts = parser.parse_args(argv)

    target = opts.address if opts.address.startswith("unix:") else "unix:" + opts.address
    metadata = [(NAMESPACE_KEY, opts.namespace)]
    with grpc.insecure_channel(target) as channel:
        try:
            result = run(channel, opts.op, opts.args, metadata, opts.timeout)
        except SystemExit as exc:
            print(exc.code, file=sys.stderr)
            return 2
        except grpc.RpcError as exc:
            result = {"error": {"code": exc.code().name, "details": exc.details()}}
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
