"""Property-based fuzzing of every gRPC service against one live daemon (per module).

For each service, hypothesis draws a method and a hostile request (tests/fuzz/strategies.py) and
sends it with the fuzz namespace, no namespace, or an invalid one. Properties:

* the daemon never dies and answers Version afterwards;
* an error is never INTERNAL, UNKNOWN, DEADLINE_EXCEEDED (a hang), CANCELLED or DATA_LOSS: client
  input gets a precise code, with a message that says what was wrong and fits in gRPC trailers;
* a failed mutating call changes nothing that any List shows: namespaces, containers, images,
  leases, content, ingests and the snapshots of both snapshotters, in the fuzz and default
  namespaces.

Reproducible: derandomize=True, a fixed number of examples per service. Regressions of bugs found
this way are pinned with @example.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import grpc
import pytest
import strategies as fs
from google.protobuf import message_factory
from harness import SERVICES, Checker, _short
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runtimed import reference as references
from runtimed.api.containerd.services.containers.v1 import containers_pb2
from runtimed.api.containerd.services.content.v1 import content_pb2
from runtimed.api.containerd.services.diff.v1 import diff_pb2
from runtimed.api.containerd.services.introspection.v1 import introspection_pb2
from runtimed.api.containerd.services.namespaces.v1 import namespace_pb2
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2
from runtimed.api.containerd.types import mount_pb2
from runtimed.errors import InvalidArgument

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)

# -- per-service field overrides: keep the daemon away from the network and the host's files ----

SAFE_PATHS = st.sampled_from(["", "/nonexistent/fuzz", "../x", "a\x00b", "x" * 5000, "/dev/null/x"])
SAFE_MOUNTS = {
    "type": st.sampled_from(["bind", "overlay", "tmpfs", "proc", "", "nope", "a\x00b"]),
    "source": SAFE_PATHS,
    "target": SAFE_PATHS,
    "options": st.lists(
        st.sampled_from(["ro", "rbind", "lowerdir=/nonexistent", "upperdir=../../", "x" * 5000, "\x00"]),
        max_size=3,
    ),
}


def _offline(text: str) -> str:
    """A reference that, if it parses, points at a closed loopback port instead of a real registry."""
    try:
        parsed = references.parse(text)
    except InvalidArgument:
        return text
    except Exception:  # the client-side parser is not under test here
        return text
    return f"127.0.0.1:1/{parsed.repository}:{parsed.tag or 'latest'}"


REFERENCES = fs.identifiers().map(_offline)
TASK_IDS = st.one_of(
    fs.hostile_text, st.sampled_from(["c-badspec", "c-listspec", "c-noruntime", "nosuch", "c-ok"])
)

OVERRIDES: Mapping[str, Mapping[str, st.SearchStrategy[Any]]] = {
    "Tasks": {
        "container_id": TASK_IDS,
        "stdin": SAFE_PATHS,
        "stdout": SAFE_PATHS,
        "stderr": SAFE_PATHS,
        "runtime_path": SAFE_PATHS,
        **SAFE_MOUNTS,
    },
    "Diff": SAFE_MOUNTS,
    "Transfer": {"reference": REFERENCES, "remote": REFERENCES, "data": st.binary(max_size=600)},
    "Content": {"data": st.binary(max_size=200)},
}


def cases(service_name: str) -> st.SearchStrategy[tuple[str, Any, str | None]]:
    service = SERVICES[service_name]
    overrides = OVERRIDES.get(_short(service_name), {})

    def for_method(method) -> st.SearchStrategy[tuple[str, Any, str | None]]:
        request_class = message_factory.GetMessageClass(method.input_type)
        one = fs.requests(request_class, overrides)
        body = st.lists(one, min_size=1, max_size=3) if method.client_streaming else one
        return st.tuples(st.just(method.name), body, fs.metadata_namespaces)

    return st.sampled_from(list(service.methods)).flatmap(for_method)


@pytest.fixture(scope="module")
def checker(fuzz) -> Iterator[Checker]:
    checker = Checker(fuzz)
    yield checker
    print("\nfuzz outcomes (method, code: count):")
    for (method, code), count in sorted(checker.seen.items()):
        print(f"  {method:32} {code:20} {count:4}  {checker.sample[method, code]}")


def _service_test(service_name: str, *examples: tuple[str, Any, str | None], max_examples: int = 100):
    @settings(FUZZ, max_examples=max_examples)
    @given(case=cases(service_name))
    def test(checker, case):
        checker.run(service_name, case)

    for case in examples:
        test = example(case=case)(test)
    test.__name__ = f"test_fuzz_{_short(service_name).lower()}"
    return test


test_fuzz_version = _service_test("containerd.services.version.v1.Version", max_examples=5)
test_fuzz_namespaces = _service_test(
    "containerd.services.namespaces.v1.Namespaces",
    (
        "Create",
        namespace_pb2.CreateNamespaceRequest(namespace=namespace_pb2.Namespace(name="x" * 70_000)),
        None,
    ),
)
test_fuzz_introspection = _service_test(
    "containerd.services.introspection.v1.Introspection",
    ("Plugins", introspection_pb2.PluginsRequest(filters=["id~=(a|a)*b"]), None),
    max_examples=20,
)
test_fuzz_containers = _service_test(
    "containerd.services.containers.v1.Containers",
    # A backtracking regex against the seeded label a="a"*40: exponential in Python's re.
    ("List", containers_pb2.ListContainersRequest(filters=["labels.a~=(a|a)*b"]), "fuzz"),
    ("List", containers_pb2.ListContainersRequest(filters=["labels.a~=(a*)*b"]), "fuzz"),
)
test_fuzz_images = _service_test("containerd.services.images.v1.Images")
test_fuzz_content = _service_test(
    "containerd.services.content.v1.Content",
    (
        "Write",
        [content_pb2.WriteContentRequest(action=content_pb2.WRITE, ref="../../escape", data=b"x")],
        "fuzz",
    ),
    # A first message failing (OUT_OF_RANGE) left an empty ingest behind.
    (
        "Write",
        [content_pb2.WriteContentRequest(action=content_pb2.WRITE, ref="7m", offset=4096, data=b"!")],
        "fuzz",
    ),
)
test_fuzz_leases = _service_test("containerd.services.leases.v1.Leases")
test_fuzz_snapshots = _service_test("containerd.services.snapshots.v1.Snapshots")
test_fuzz_diff = _service_test(
    "containerd.services.diff.v1.Diff",
    # A bind mount without a source was the daemon's working directory: Diff walked the whole
    # repository (a hang), Apply would have extracted into it.
    ("Diff", diff_pb2.DiffRequest(right=[mount_pb2.Mount(type="bind")]), "fuzz"),
    ("Apply", diff_pb2.ApplyRequest(mounts=[mount_pb2.Mount(type="bind", source="relative")]), "fuzz"),
    # mount(8)'s failure quoted the 70000-character option: more than gRPC's metadata limit, so
    # the client saw RESOURCE_EXHAUSTED "Stream removed" instead of the error.
    (
        "Diff",
        diff_pb2.DiffRequest(
            right=[mount_pb2.Mount(type="tmpfs", source="/nonexistent/fuzz", options=["x" * 70_000])]
        ),
        "fuzz",
    ),
    max_examples=25,
)
test_fuzz_tasks = _service_test(
    "containerd.services.tasks.v1.Tasks",
    ("Create", tasks_pb2.CreateTaskRequest(container_id="c-badspec"), "fuzz"),
)
test_fuzz_events = _service_test("containerd.services.events.v1.Events", max_examples=25)
test_fuzz_transfer = _service_test("runtimed.services.transfer.v1.Transfer", max_examples=25)
if "runtimed.services.volumes.v1.Volumes" in SERVICES:
    test_fuzz_volumes = _service_test("runtimed.services.volumes.v1.Volumes")


# Found by this fuzzing: it answered INTERNAL (AttributeError on spec.setdefault); fixed in 9b1fb11.
def test_task_create_with_a_spec_that_is_not_an_object(fuzz):
    create = fuzz.method(
        "containerd.services.tasks.v1.Tasks",
        "Create",
        tasks_pb2.CreateTaskRequest,
        tasks_pb2.CreateTaskResponse,
        "uu",
    )
    request = tasks_pb2.CreateTaskRequest(
        container_id="c-listspec", rootfs=[mount_pb2.Mount(type="bind", source="/nonexistent/fuzz")]
    )
    outcome = fuzz.call(create, request)
    fuzz.alive()
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, (outcome.code, outcome.details)
