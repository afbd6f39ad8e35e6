"""One hostile field at a time: a valid request with a single field (at any depth) replaced.

The all-fields-random fuzzing of test_services.py mostly stops at the first invalid field. Here
each example starts from a request that succeeds (create a container, an image, a snapshot, a
lease, a namespace; update labels of seeded objects) and replaces one leaf field with a value from
tests/fuzz/strategies.py, so every field's own validation and the code past it are reached. Same
properties as test_services.py (harness.Checker).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import strategies as fs
from google.protobuf import any_pb2, field_mask_pb2
from google.protobuf import descriptor as gd
from harness import Checker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtimed.api.containerd.services.containers.v1 import containers_pb2 as c
from runtimed.api.containerd.services.content.v1 import content_pb2 as co
from runtimed.api.containerd.services.events.v1 import events_pb2 as ev
from runtimed.api.containerd.services.images.v1 import images_pb2 as im
from runtimed.api.containerd.services.leases.v1 import leases_pb2 as le
from runtimed.api.containerd.services.namespaces.v1 import namespace_pb2 as ns
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2 as sn
from runtimed.api.containerd.types import descriptor_pb2

SPEC_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


# (service, method, template(n) -> a request that succeeds with a fresh n)
TEMPLATES: list[tuple[str, str, Callable[[int], Any]]] = [
    (
        "containerd.services.containers.v1.Containers",
        "Create",
        lambda n: c.CreateContainerRequest(
            container=c.Container(
                id=f"m{n}",
                labels={"a": "b"},
                image="img",
                runtime=c.Container.Runtime(name="io.containerd.runc.v2"),
                spec=any_pb2.Any(type_url=SPEC_URL, value=b"{}"),
                snapshotter="native",
                snapshot_key=f"m{n}",
                extensions={"ext": any_pb2.Any(type_url="x", value=b"1")},
            )
        ),
    ),
    (
        "containerd.services.containers.v1.Containers",
        "Update",
        lambda n: c.UpdateContainerRequest(
            container=c.Container(id="c-ok", labels={"k": f"v{n}"}, image="img"), update_mask=mask("labels.k")
        ),
    ),
    (
        "containerd.services.images.v1.Images",
        "Create",
        lambda n: im.CreateImageRequest(
            image=im.Image(
                name=f"docker.io/library/m{n}:latest",
                labels={"a": "b"},
                target=descriptor_pb2.Descriptor(media_type=MANIFEST, digest=fs.SEED_DIGEST, size=14),
            )
        ),
    ),
    (
        "containerd.services.images.v1.Images",
        "Update",
        lambda n: im.UpdateImageRequest(
            image=im.Image(name="img", labels={"k": f"v{n}"}), update_mask=mask("labels.k")
        ),
    ),
    (
        "containerd.services.snapshots.v1.Snapshots",
        "Prepare",
        lambda n: sn.PrepareSnapshotRequest(
            snapshotter="native", key=f"m{n}", parent="base", labels={"containerd.io/gc.root": "x"}
        ),
    ),
    (
        "containerd.services.snapshots.v1.Snapshots",
        "Update",
        lambda n: sn.UpdateSnapshotRequest(
            snapshotter="native",
            info=sn.Info(name="base", labels={"k": f"v{n}"}),
            update_mask=mask("labels.k"),
        ),
    ),
    (
        "containerd.services.leases.v1.Leases",
        "Create",
        lambda n: le.CreateRequest(id=f"m{n}", labels={"a": "b"}),
    ),
    (
        "containerd.services.leases.v1.Leases",
        "AddResource",
        lambda n: le.AddResourceRequest(id="lease1", resource=le.Resource(id=fs.SEED_DIGEST, type="content")),
    ),
    (
        "containerd.services.namespaces.v1.Namespaces",
        "Create",
        lambda n: ns.CreateNamespaceRequest(namespace=ns.Namespace(name=f"m{n}", labels={"a": "b"})),
    ),
    (
        "containerd.services.namespaces.v1.Namespaces",
        "Update",
        lambda n: ns.UpdateNamespaceRequest(
            namespace=ns.Namespace(name="fuzz", labels={"k": f"v{n}"}), update_mask=mask("labels.k")
        ),
    ),
    (
        "containerd.services.content.v1.Content",
        "Update",
        lambda n: co.UpdateRequest(
            info=co.Info(digest=fs.SEED_DIGEST, labels={"k": f"v{n}"}), update_mask=mask("labels.k")
        ),
    ),
    (
        "containerd.services.events.v1.Events",
        "Publish",
        lambda n: ev.PublishRequest(
            topic=f"/fuzz/m{n}", event=any_pb2.Any(type_url="containerd.events.ContainerCreate", value=b"")
        ),
    ),
]


def leaves(descriptor: gd.Descriptor, prefix: tuple[str, ...] = (), depth: int = 0) -> Iterator[tuple]:
    """(path, field) of every leaf: scalars, repeated scalars and string maps, to depth 3."""
    for field in descriptor.fields:
        path = (*prefix, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].type == gd.FieldDescriptor.TYPE_STRING:
                yield path, field
        elif field.type == gd.FieldDescriptor.TYPE_MESSAGE:
            if depth < 3 and not field.is_repeated:
                yield from leaves(field.message_type, path, depth + 1)
        else:
            yield path, field


def value_for(field: gd.FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.message_type is not None:  # a string map
        return fs.label_maps()
    if field.name == "paths":
        return st.lists(fs.mask_paths(), min_size=1, max_size=3)
    one = fs._scalar(field, {})
    return st.lists(one, min_size=1, max_size=3) if field.is_repeated else one


def mutate(request: Any, path: tuple[str, ...], field: gd.FieldDescriptor, value: Any) -> Any:
    copy = type(request)()
    copy.CopyFrom(request)
    target = copy
    for name in path[:-1]:
        target = getattr(target, name)
    name = path[-1]
    if field.message_type is not None:
        getattr(target, name).clear()
        getattr(target, name).update(value)
    elif field.is_repeated:
        del getattr(target, name)[:]
        getattr(target, name).extend(value)
    else:
        setattr(target, name, value)
    return copy


@st.composite
def mutated(draw):
    service, method, template = draw(st.sampled_from(TEMPLATES))
    request = template(draw(st.integers(0, 10**9)))
    path, field = draw(st.sampled_from(list(leaves(request.DESCRIPTOR))))
    value = draw(value_for(field))
    namespace = draw(st.sampled_from([fs.VALID_NAMESPACE] * 5 + [None, "..", "x" * 77]))
    return service, (method, mutate(request, path, field, value), namespace), ".".join(path)


@pytest.fixture(scope="module")
def checker(fuzz) -> Iterator[Checker]:
    checker = Checker(fuzz)
    yield checker
    print("\none-field mutations (method, code: count):")
    for (method, code), count in sorted(checker.seen.items()):
        print(f"  {method:28} {code:20} {count:4}  {checker.sample[method, code]}")


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(case=mutated())
def test_fuzz_one_field_at_a_time(checker, case):
    service, call, _path = case
    checker.run(service, call)
