"""A small synchronous client for runtimed's API, used by runtimectl and tests.

It speaks only the wire API (containerd's v1 services plus ours), so it works
against any containerd-compatible daemon as well.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import empty_pb2, field_mask_pb2

from runtimed.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from runtimed.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from runtimed.api.containerd.services.introspection.v1 import introspection_pb2, introspection_pb2_grpc
from runtimed.api.containerd.services.namespaces.v1 import namespace_pb2, namespace_pb2_grpc
from runtimed.api.containerd.services.version.v1 import version_pb2_grpc
from runtimed.wire import (
    ADDRESS_ENV,
    DEFAULT_ADDRESS,
    DEFAULT_NAMESPACE,
    MAX_MESSAGE_SIZE,
    NAMESPACE_ENV,
    NAMESPACE_KEY,
)


def default_address() -> str:
    return os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


def default_namespace() -> str:
    return os.environ.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE


def _target(address: str) -> str:
    if address.startswith("unix://"):
        return address
    if address.startswith("/"):
        return "unix://" + address
    return address


class Client:
    def __init__(
        self, address: str | None = None, namespace: str | None = None, timeout: float = 30.0
    ) -> None:
        self.address = _target(address or default_address())
        self.namespace = namespace or default_namespace()
        self.timeout = timeout
        self.channel = grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
                ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
            ],
        )
        self.version_stub = version_pb2_grpc.VersionStub(self.channel)
        self.namespaces_stub = namespace_pb2_grpc.NamespacesStub(self.channel)
        self.introspection_stub = introspection_pb2_grpc.IntrospectionStub(self.channel)
        self.containers_stub = containers_pb2_grpc.ContainersStub(self.channel)
        self.images_stub = images_pb2_grpc.ImagesStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: Any, request: Any, *, namespace: str | None = None) -> Any:
        """Call a unary method with the namespace header and the client's timeout."""
        return method(
            request,
            metadata=[(NAMESPACE_KEY, namespace or self.namespace)],
            timeout=self.timeout,
            wait_for_ready=False,
        )

    # Version / Introspection
    def version(self) -> Any:
        return self.call(self.version_stub.Version, empty_pb2.Empty())

    def server_info(self) -> Any:
        return self.call(self.introspection_stub.Server, empty_pb2.Empty())

    def plugins(self, filters: Sequence[str] = ()) -> list[Any]:
        request = introspection_pb2.PluginsRequest(filters=list(filters))
        return list(self.call(self.introspection_stub.Plugins, request).plugins)

    # Namespaces
    def namespaces(self, filter_expr: str = "") -> list[Any]:
        request = namespace_pb2.ListNamespacesRequest(filter=filter_expr)
        return list(self.call(self.namespaces_stub.List, request).namespaces)

    def get_namespace(self, name: str) -> Any:
        return self.call(self.namespaces_stub.Get, namespace_pb2.GetNamespaceRequest(name=name)).namespace

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> Any:
        request = namespace_pb2.CreateNamespaceRequest(
            namespace=namespace_pb2.Namespace(name=name, labels=labels)
        )
        return self.call(self.namespaces_stub.Create, request).namespace

    def update_namespace_labels(self, name: str, labels: dict[str, str]) -> Any:
        """Set (or, with an empty value, remove) the given labels, leaving others alone."""
        request = namespace_pb2.UpdateNamespaceRequest(
            namespace=namespace_pb2.Namespace(name=name, labels={k: v for k, v in labels.items() if v}),
            update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]),
        )
        return self.call(self.namespaces_stub.Update, request).namespace

    def delete_namespace(self, name: str) -> None:
        self.call(self.namespaces_stub.Delete, namespace_pb2.DeleteNamespaceRequest(name=name))

    # Containers
    def containers(self, filters: Sequence[str] = ()) -> list[Any]:
        request = containers_pb2.ListContainersRequest(filters=list(filters))
        return list(self.call(self.containers_stub.List, request).containers)

    def container(self, container_id: str) -> Any:
        request = containers_pb2.GetContainerRequest(id=container_id)
        return self.call(self.containers_stub.Get, request).container

    def create_container(self, container: Any) -> Any:
        request = containers_pb2.CreateContainerRequest(container=container)
        return self.call(self.containers_stub.Create, request).container

    def delete_container(self, container_id: str) -> None:
        self.call(self.containers_stub.Delete, containers_pb2.DeleteContainerRequest(id=container_id))

    # Images
    def images(self, filters: Sequence[str] = ()) -> list[Any]:
        request = images_pb2.ListImagesRequest(filters=list(filters))
        return list(self.call(self.images_stub.List, request).images)

    def image(self, name: str) -> Any:
        return self.call(self.images_stub.Get, images_pb2.GetImageRequest(name=name)).image

    def create_image(self, image: Any) -> Any:
        return self.call(self.images_stub.Create, images_pb2.CreateImageRequest(image=image)).image

    def delete_image(self, name: str, sync: bool = False) -> None:
        self.call(self.images_stub.Delete, images_pb2.DeleteImageRequest(name=name, sync=sync))


def fifo_parent() -> str | None:
    """Where a client on this host makes the FIFOs of a process's stdio (as ctr uses /run/containerd/
    fifo): runtimed's own run directory, else the temp dir; None when neither is writable."""
    for candidate in ("/run/runtimed/fifo", tempfile.gettempdir()):
        try:
            os.makedirs(candidate, mode=0o700, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            return candidate
    return None
