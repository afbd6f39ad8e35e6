"""The fuzz harness: a seeded daemon's channel, a call helper, and the state a failed call must not
change (tests/fuzz/conftest.py makes one per test module as the `fuzz` fixture).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import pkgutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2, empty_pb2, message_factory
from strategies import SEED_DIGEST, VALID_NAMESPACE

import runtimed.api.containerd.services as containerd_services
import runtimed.api.runtimed.services as runtimed_services
from runtimed.api.containerd.services.containers.v1 import containers_pb2
from runtimed.api.containerd.services.content.v1 import content_pb2
from runtimed.api.containerd.services.images.v1 import images_pb2
from runtimed.api.containerd.services.leases.v1 import leases_pb2
from runtimed.api.containerd.services.namespaces.v1 import namespace_pb2
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2
from runtimed.api.containerd.types import descriptor_pb2
from runtimed.wire import MAX_MESSAGE_SIZE, NAMESPACE_KEY

# The Daemon helper of tests/conftest.py, loaded under its own name ("conftest" is ambiguous).
_ROOT_CONFTEST = "runtimed_tests_root_conftest"
if _ROOT_CONFTEST not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_ROOT_CONFTEST, Path(__file__).parents[1] / "conftest.py")
    sys.modules[_ROOT_CONFTEST] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_ROOT_CONFTEST])
_root = sys.modules[_ROOT_CONFTEST]
Daemon, make_base = _root.Daemon, _root.make_base

SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
SNAPSHOTTERS = ("overlayfs", "native")
CALL_TIMEOUT = 10.0
# Codes that are never a precise answer to a client's input.
FORBIDDEN = {
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DATA_LOSS,
}
SEED_BLOB = b"fuzz seed blob"
assert "sha256:" + hashlib.sha256(SEED_BLOB).hexdigest() == SEED_DIGEST


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list[Any]

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


class Fuzz:
    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.channel = grpc.insecure_channel(
            f"unix://{daemon.address}",
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
                ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
            ],
        )

    def close(self) -> None:
        self.channel.close()

    def method(self, service: str, name: str, request_class: type, response_class: type, kind: str):
        path = f"/{service}/{name}"
        make = {
            "uu": self.channel.unary_unary,
            "us": self.channel.unary_stream,
            "su": self.channel.stream_unary,
            "ss": self.channel.stream_stream,
        }[kind]
        return make(
            path,
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )

    def call(
        self,
        multicallable: Any,
        request: Any,
        namespace: str | None = VALID_NAMESPACE,
        *,
        streaming_in: bool = False,
        streaming_out: bool = False,
        timeout: float = CALL_TIMEOUT,
    ) -> Outcome:
        metadata = [] if namespace is None else [(NAMESPACE_KEY, namespace)]
        argument = iter(request) if streaming_in else request
        try:
            result = multicallable(argument, metadata=metadata, timeout=timeout)
            responses = list(result) if streaming_out else [result]
        except grpc.RpcError as exc:
            return Outcome(exc.code(), exc.details() or "", [])
        return Outcome(grpc.StatusCode.OK, "", responses)

    def alive(self) -> None:
        """The daemon still answers Version (and its process is still there)."""
        assert self.daemon.process.poll() is None, f"daemon died:\n{self.daemon.log()[-4000:]}"
        version = self.method(
            "containerd.services.version.v1.Version", "Version", empty_pb2.Empty, empty_pb2.Empty, "uu"
        )
        version(empty_pb2.Empty(), timeout=10)

    # -- the observable state a failed call must leave unchanged ---------------------------------

    def state(self) -> dict[str, Any]:
        def listing(service, name, request, response, field, namespace, kind="uu"):
            outcome = self.call(
                self.method(service, name, type(request), response, kind),
                request,
                namespace,
                streaming_out=kind == "us",
            )
            assert outcome.ok, (name, outcome)
            items = [item for r in outcome.responses for item in getattr(r, field)]
            return sorted(item.SerializeToString(deterministic=True) for item in items)

        state: dict[str, Any] = {}
        state["namespaces"] = listing(
            "containerd.services.namespaces.v1.Namespaces",
            "List",
            namespace_pb2.ListNamespacesRequest(),
            namespace_pb2.ListNamespacesResponse,
            "namespaces",
            None,
        )
        for ns in (VALID_NAMESPACE, "default"):
            state[ns, "containers"] = listing(
                "containerd.services.containers.v1.Containers",
                "List",
                containers_pb2.ListContainersRequest(),
                containers_pb2.ListContainersResponse,
                "containers",
                ns,
            )
            state[ns, "images"] = listing(
                "containerd.services.images.v1.Images",
                "List",
                images_pb2.ListImagesRequest(),
                images_pb2.ListImagesResponse,
                "images",
                ns,
            )
            state[ns, "leases"] = listing(
                "containerd.services.leases.v1.Leases",
                "List",
                leases_pb2.ListRequest(),
                leases_pb2.ListResponse,
                "leases",
                ns,
            )
            state[ns, "content"] = listing(
                "containerd.services.content.v1.Content",
                "List",
                content_pb2.ListContentRequest(),
                content_pb2.ListContentResponse,
                "info",
                ns,
                "us",
            )
            state[ns, "ingests"] = listing(
                "containerd.services.content.v1.Content",
                "ListStatuses",
                content_pb2.ListStatusesRequest(),
                content_pb2.ListStatusesResponse,
                "statuses",
                ns,
            )
            for snapshotter in SNAPSHOTTERS:
                state[ns, snapshotter] = listing(
                    "containerd.services.snapshots.v1.Snapshots",
                    "List",
                    snapshots_pb2.ListSnapshotsRequest(snapshotter=snapshotter),
                    snapshots_pb2.ListSnapshotsResponse,
                    "info",
                    ns,
                    "us",
                )
        return state

    # -- seeds ------------------------------------------------------------------------------------

    def seed(self) -> None:
        md = [(NAMESPACE_KEY, VALID_NAMESPACE)]
        ch = self.channel

        def uu(service, name, req, resp):
            return self.method(service, name, type(req), resp, "uu")(req, metadata=md, timeout=30)

        lease = uu(
            "containerd.services.leases.v1.Leases",
            "Create",
            leases_pb2.CreateRequest(id="lease1"),
            leases_pb2.CreateResponse,
        )
        assert lease.lease.id == "lease1"
        write = self.method(
            "containerd.services.content.v1.Content",
            "Write",
            content_pb2.WriteContentRequest,
            content_pb2.WriteContentResponse,
            "ss",
        )
        list(
            write(
                iter(
                    [
                        content_pb2.WriteContentRequest(
                            action=content_pb2.COMMIT,
                            ref="seed",
                            data=SEED_BLOB,
                            total=len(SEED_BLOB),
                            expected=SEED_DIGEST,
                            labels={"containerd.io/gc.root": "seed"},
                        )
                    ]
                ),
                metadata=md,
                timeout=30,
            )
        )
        target = descriptor_pb2.Descriptor(
            media_type="application/octet-stream", digest=SEED_DIGEST, size=len(SEED_BLOB)
        )
        uu(
            "containerd.services.images.v1.Images",
            "Create",
            images_pb2.CreateImageRequest(image=images_pb2.Image(name="img", target=target)),
            images_pb2.CreateImageResponse,
        )
        for snapshotter in SNAPSHOTTERS:
            uu(
                "containerd.services.snapshots.v1.Snapshots",
                "Prepare",
                snapshots_pb2.PrepareSnapshotRequest(
                    snapshotter=snapshotter, key="base-active", labels={"containerd.io/gc.root": "seed"}
                ),
                snapshots_pb2.PrepareSnapshotResponse,
            )
            uu(
                "containerd.services.snapshots.v1.Snapshots",
                "Commit",
                snapshots_pb2.CommitSnapshotRequest(
                    snapshotter=snapshotter,
                    name="base",
                    key="base-active",
                    labels={"containerd.io/gc.root": "seed"},
                ),
                snapshots_pb2.CommitSnapshotResponse
                if hasattr(snapshots_pb2, "CommitSnapshotResponse")
                else empty_pb2.Empty,
            )
            uu(
                "containerd.services.snapshots.v1.Snapshots",
                "Prepare",
                snapshots_pb2.PrepareSnapshotRequest(
                    snapshotter=snapshotter,
                    key="active1",
                    parent="base",
                    labels={"containerd.io/gc.root": "seed"},
                ),
                snapshots_pb2.PrepareSnapshotResponse,
            )
        specs = {
            "c-ok": json.dumps({"ociVersion": "1.0.2", "process": {"args": ["/bin/true"], "cwd": "/"}}),
            "c-badspec": "not json",
            "c-listspec": "[]",
            "c-noruntime": "{}",
        }
        for container_id, document in specs.items():
            runtime = "io.nope.v1" if container_id == "c-noruntime" else "io.containerd.runc.v2"
            container = containers_pb2.Container(
                id=container_id,
                labels={"a": "a" * 40, "app": "web"},
                image="img",
                runtime=containers_pb2.Container.Runtime(name=runtime),
                spec=any_pb2.Any(type_url=SPEC_URL, value=document.encode()),
            )
            uu(
                "containerd.services.containers.v1.Containers",
                "Create",
                containers_pb2.CreateContainerRequest(container=container),
                containers_pb2.CreateContainerResponse,
            )
        del ch


# -- the properties every fuzzed call must keep -----------------------------------------------

READ_ONLY = {
    "Get",
    "List",
    "ListStream",
    "Info",
    "Read",
    "Status",
    "ListStatuses",
    "Stat",
    "Mounts",
    "Usage",
    "ListResources",
    "Plugins",
    "Server",
    "Version",
    "Wait",
    "Metrics",
    "ListPids",
    "Subscribe",
    "Publish",
    "Forward",
    "Export",
}
MAX_DETAILS = 4096


def _services() -> dict[str, Any]:
    """Service full name -> its descriptor, for every generated *_pb2 module (volumes too, if present)."""
    found = {}
    for package in (containerd_services, runtimed_services):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("_pb2") and not info.name.endswith("_grpc_pb2"):
                module = importlib.import_module(info.name)
                for service in module.DESCRIPTOR.services_by_name.values():
                    found[service.full_name] = service
    return found


SERVICES = _services()


def _short(service: str) -> str:
    return service.rsplit(".", 1)[1]


class Checker:
    """Sends one case and checks the properties; caches the state between failed mutations."""

    def __init__(self, fuzz) -> None:
        self.fuzz = fuzz
        self.known_state: dict[str, Any] | None = None
        self.service = ""
        self.history: list[str] = []  # the last calls, for failure messages
        self.seen: Counter[tuple[str, str]] = Counter()  # (method, code) -> count, for the summary
        self.sample: dict[tuple[str, str], str] = {}  # (method, code) -> the first message

    def run(self, service_name: str, case: tuple[str, Any, str | None]) -> None:
        name, request, namespace = case
        method = SERVICES[service_name].methods_by_name[name]
        kind = ("s" if method.client_streaming else "u") + ("s" if method.server_streaming else "u")
        multicallable = self.fuzz.method(
            service_name,
            name,
            message_factory.GetMessageClass(method.input_type),
            message_factory.GetMessageClass(method.output_type),
            kind,
        )
        mutating = name not in READ_ONLY
        if service_name != self.service:  # another test ran in between: state may have moved
            self.service, self.known_state = service_name, None
        if mutating and self.known_state is None:
            self.known_state = self.fuzz.state()
        long_poll = name == "Subscribe"
        outcome = self.fuzz.call(
            multicallable,
            request,
            namespace,
            streaming_in=method.client_streaming,
            streaming_out=method.server_streaming,
            timeout=0.5 if long_poll else 10.0,
        )
        what = f"{service_name}/{name} ns={namespace!r} request={_describe(request)}"
        self.seen[f"{_short(service_name)}.{name}", outcome.code.name] += 1
        self.history = [*self.history[-4:], f"{what} -> {outcome.code.name}"]
        self.sample.setdefault((f"{_short(service_name)}.{name}", outcome.code.name), outcome.details[:150])
        self.fuzz.alive()
        if long_poll and outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return  # a valid subscription simply waits for events
        assert outcome.code not in FORBIDDEN, f"{what} -> {outcome.code.name}: {outcome.details}"
        if outcome.ok:
            if mutating:
                self.known_state = None
            return
        assert outcome.details.strip(), f"{what} -> {outcome.code.name} with no message"
        assert len(outcome.details) <= MAX_DETAILS, f"{what} -> a {len(outcome.details)}-character message"
        if mutating:
            after = self.fuzz.state()
            before = self.known_state

            def before_all(key: Any) -> list[bytes]:
                return before.get(key, [])

            changed = {k for k in after if after[k] != before.get(k)}
            self.known_state = None  # re-read before the next mutation, whatever happens here
            if name == "Write" and _short(service_name) == "Content":
                # Data a failed write stored stays for a resume (as in containerd); only an
                # ingest the failed call created without writing a byte would be debris.
                new = [x for k in after if k[-1:] == ("ingests",) for x in after[k] if x not in before_all(k)]
                if all(content_pb2.Status.FromString(x).offset > 0 for x in new):
                    for k in list(changed):
                        if k[-1:] == ("ingests",):
                            changed.discard(k)
            if _short(service_name) != "Namespaces":
                # A write that begins (a lease, an ingest) creates its namespace, as containerd's
                # do; the namespace staying after the failure is containerd's behaviour too.
                changed.discard("namespaces")
            diff = {
                k: (
                    [x for x in before.get(k, []) if x not in after[k]][:2],
                    [x for x in after[k] if x not in before.get(k, [])][:2],
                )
                for k in changed
            }
            assert not changed, (
                f"{what} failed ({outcome.code.name}: {outcome.details}) but changed {diff}; "
                f"last calls: {self.history}"
            )


def _describe(request: Any) -> str:
    text = repr(request)
    return text if len(text) < 600 else text[:600] + "..."
