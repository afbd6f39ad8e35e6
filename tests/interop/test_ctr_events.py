"""`ctr events` against runtimed: containerd's envelopes, bare type URLs, filters."""

from __future__ import annotations

import json
import os
import subprocess
import time

import grpc
from google.protobuf import any_pb2

from runtimed.api.containerd.events import namespace_pb2
from runtimed.api.containerd.services.containers.v1 import containers_pb2
from runtimed.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc


def start_ctr_events(ctr_bin: str, address: str, *filters: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
    env["CONTAINERD_SUPPRESS_DEPRECATION_WARNINGS"] = "1"
    return subprocess.Popen(
        [ctr_bin, "--address", address, "events", *filters],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_subscribed() -> None:
    # Subscribe has no acknowledgement: give ctr a moment to open its stream.
    time.sleep(0.5)


def collect(process: subprocess.Popen) -> tuple[str, str]:
    process.terminate()
    return process.communicate(timeout=10)


def test_ctr_events_prints_container_and_namespace_events(daemon, ctr_bin, run_ctr, client):
    events = start_ctr_events(ctr_bin, daemon.address)
    try:
        wait_subscribed()
        run_ctr(daemon.address, "namespaces", "create", "evns")
        client.create_container(
            containers_pb2.Container(
                id="ev1",
                image="busybox:latest",
                runtime=containers_pb2.Container.Runtime(name="io.containerd.runc.v2"),
                spec=any_pb2.Any(
                    type_url="types.containerd.io/opencontainers/runtime-spec/1/Spec", value=b"{}"
                ),
            )
        )
        run_ctr(daemon.address, "containers", "rm", "ev1")
        time.sleep(0.5)
    finally:
        out, err = collect(events)
    lines = [line for line in out.splitlines() if line.strip()]
    topics = [line.split()[5] for line in lines]
    assert topics == ["/namespaces/create", "/containers/create", "/containers/delete"], (out, err)
    # "<date> <time> +0000 UTC <namespace> <topic> <event JSON>"
    namespace_line = lines[0].split(maxsplit=6)
    assert namespace_line[4] == "evns"
    assert json.loads(namespace_line[6])["name"] == "evns"
    create = json.loads(lines[1].split(maxsplit=6)[6])
    assert create["id"] == "ev1" and create["runtime"]["name"] == "io.containerd.runc.v2"
    assert "cannot unmarshal" not in err


def test_ctr_events_filters_by_topic_and_namespace(daemon, ctr_bin, run_ctr):
    events = start_ctr_events(ctr_bin, daemon.address, 'topic=="/namespaces/delete"', "namespace==keep")
    try:
        wait_subscribed()
        for name in ("keep", "drop"):
            run_ctr(daemon.address, "namespaces", "create", name)
        for name in ("keep", "drop"):
            run_ctr(daemon.address, "namespaces", "rm", name)
        time.sleep(0.5)
    finally:
        out, _ = collect(events)
    lines = [line for line in out.splitlines() if line.strip()]
    assert [tuple(line.split()[4:6]) for line in lines] == [
        ("keep", "/namespaces/create"),
        ("keep", "/namespaces/delete"),
        ("drop", "/namespaces/delete"),
    ]


def test_ctr_publish_reaches_subscribers(daemon, ctr_bin, run_ctr):
    # ctr has no publish command; publish through the RPC and watch ctr receive it.
    events = start_ctr_events(ctr_bin, daemon.address, "topic~=/custom/")
    try:
        wait_subscribed()
        with grpc.insecure_channel(f"unix://{daemon.address}") as channel:
            stub = events_pb2_grpc.EventsStub(channel)
            payload = namespace_pb2.NamespaceCreate(name="hello")
            stub.Publish(
                events_pb2.PublishRequest(
                    topic="/custom/thing",
                    event=any_pb2.Any(
                        type_url=payload.DESCRIPTOR.full_name, value=payload.SerializeToString()
                    ),
                ),
                metadata=[("containerd-namespace", "pub")],
                timeout=10,
            )
            try:
                stub.Publish(events_pb2.PublishRequest(topic="no-slash"), timeout=10)
                raise AssertionError("a topic without a leading slash was accepted")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        time.sleep(0.5)
    finally:
        out, _ = collect(events)
    fields = out.strip().split(maxsplit=6)
    assert fields[4:6] == ["pub", "/custom/thing"]
    assert json.loads(fields[6]) == {"name": "hello"}
