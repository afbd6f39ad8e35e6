"""What every gRPC service plugin is: a servicer plus the generated function that adds it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from runtimed.plugin import InitContext, PluginType, Registration


@dataclass
class GrpcService:
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    # Full gRPC service name, e.g. "containerd.services.containers.v1.Containers".
    name: str

    def register(self, server: grpc.aio.Server) -> None:
        self.add_to_server(self.servicer, server)


def grpc_plugin(
    id_: str,
    service_name: str,
    make_servicer: Callable[[InitContext], Any],
    add_to_server: Callable[[Any, grpc.aio.Server], None],
    requires: Sequence[str] = (),
) -> Registration:
    def init(ctx: InitContext) -> GrpcService:
        return GrpcService(make_servicer(ctx), add_to_server, service_name)

    return Registration(type=PluginType.GRPC, id=id_, init=init, requires=tuple(requires))


def field_paths(mask: Any) -> list[str]:
    """The paths of an optional google.protobuf.FieldMask."""
    return list(mask.paths)
