"""Conversions between protobuf messages (the gRPC edge) and runtimed's core values."""

from __future__ import annotations

from google.protobuf import any_pb2, timestamp_pb2

from runtimed.api.containerd.services.containers.v1 import containers_pb2
from runtimed.api.containerd.services.images.v1 import images_pb2
from runtimed.api.containerd.services.namespaces.v1 import namespace_pb2
from runtimed.api.containerd.types import descriptor_pb2
from runtimed.types import AnyValue, Container, Descriptor, Image, Namespace, RuntimeInfo


def timestamp(ns: int) -> timestamp_pb2.Timestamp | None:
    """A Timestamp for ns since the epoch; None (left unset) for 0, which Go reads as zero time."""
    if not ns:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(ns)
    return stamp


def any_to_core(message: any_pb2.Any, present: bool) -> AnyValue | None:
    return AnyValue(type_url=message.type_url, value=message.value) if present else None


def any_to_pb(value: AnyValue | None) -> any_pb2.Any | None:
    return None if value is None else any_pb2.Any(type_url=value.type_url, value=value.value)


def namespace_to_pb(namespace: Namespace) -> namespace_pb2.Namespace:
    return namespace_pb2.Namespace(name=namespace.name, labels=namespace.labels)


def namespace_to_core(message: namespace_pb2.Namespace) -> Namespace:
    return Namespace(name=message.name, labels=dict(message.labels))


def descriptor_to_pb(descriptor: Descriptor) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(
        media_type=descriptor.media_type,
        digest=descriptor.digest,
        size=descriptor.size,
        annotations=descriptor.annotations,
    )


def descriptor_to_core(message: descriptor_pb2.Descriptor) -> Descriptor:
    return Descriptor(
        media_type=message.media_type,
        digest=message.digest,
        size=message.size,
        annotations=dict(message.annotations),
    )


def container_to_pb(container: Container) -> containers_pb2.Container:
    return containers_pb2.Container(
        id=container.id,
        labels=container.labels,
        image=container.image,
        runtime=containers_pb2.Container.Runtime(
            name=container.runtime.name, options=any_to_pb(container.runtime.options)
        ),
        spec=any_to_pb(container.spec),
        snapshotter=container.snapshotter,
        snapshot_key=container.snapshot_key,
        sandbox=container.sandbox,
        extensions={
            k: any_pb2.Any(type_url=v.type_url, value=v.value) for k, v in container.extensions.items()
        },
        created_at=timestamp(container.created_at),
        updated_at=timestamp(container.updated_at),
    )


def container_to_core(message: containers_pb2.Container) -> Container:
    runtime = message.runtime
    return Container(
        id=message.id,
        labels=dict(message.labels),
        image=message.image,
        runtime=RuntimeInfo(
            name=runtime.name, options=any_to_core(runtime.options, runtime.HasField("options"))
        ),
        spec=any_to_core(message.spec, message.HasField("spec")),
        snapshotter=message.snapshotter,
        snapshot_key=message.snapshot_key,
        sandbox=message.sandbox,
        extensions={k: AnyValue(type_url=v.type_url, value=v.value) for k, v in message.extensions.items()},
    )


def image_to_pb(image: Image) -> images_pb2.Image:
    return images_pb2.Image(
        name=image.name,
        labels=image.labels,
        target=descriptor_to_pb(image.target),
        created_at=timestamp(image.created_at),
        updated_at=timestamp(image.updated_at),
    )


def image_to_core(message: images_pb2.Image) -> Image:
    return Image(name=message.name, labels=dict(message.labels), target=descriptor_to_core(message.target))
