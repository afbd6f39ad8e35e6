"""Introspection service: every plugin with its status, and the daemon's stable UUID."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from google.rpc import status_pb2

from runtimed import filters
from runtimed.api.containerd.services.introspection.v1 import introspection_pb2 as pb
from runtimed.api.containerd.services.introspection.v1 import introspection_pb2_grpc as pb_grpc
from runtimed.api.containerd.types import platform_pb2
from runtimed.errors import status_of
from runtimed.plugin import InitContext, Plugin, PluginSet
from runtimed.services.base import grpc_plugin
from runtimed.storage import write_atomic


def load_or_create_uuid(path: Path) -> str:
    """The daemon's UUID, created once and kept under its root across restarts."""
    try:
        existing = path.read_text().strip()
        uuid.UUID(existing)
        return existing
    except (FileNotFoundError, ValueError):
        value = str(uuid.uuid4())
        write_atomic(path, value.encode())
        return value


def _plugin_to_pb(plugin: Plugin) -> pb.Plugin:
    registration = plugin.registration
    message = pb.Plugin(
        type=registration.type,
        id=registration.id,
        requires=list(registration.requires),
        platforms=[
            platform_pb2.Platform(os=p.os, architecture=p.architecture, variant=p.variant)
            for p in registration.platforms
        ],
        exports=plugin.exports,
        capabilities=list(registration.capabilities),
    )
    if plugin.error is not None:
        code, text = status_of(plugin.error)
        message.init_err.CopyFrom(status_pb2.Status(code=code.value[0], message=text))
    return message


class IntrospectionServicer(pb_grpc.IntrospectionServicer):
    def __init__(self, plugins: PluginSet, server_uuid: str) -> None:
        self._plugins = plugins
        self._uuid = server_uuid

    async def Plugins(self, request, context):
        matcher = filters.parse_all(list(request.filters))
        found = [
            _plugin_to_pb(p)
            for p in self._plugins
            if matcher.match(filters.adaptor_for({"type": p.registration.type, "id": p.registration.id}))
        ]
        return pb.PluginsResponse(plugins=found)

    async def Server(self, request, context):
        pidns = os.stat("/proc/self/ns/pid").st_ino
        return pb.ServerResponse(uuid=self._uuid, pid=os.getpid(), pidns=pidns)


def _make(ctx: InitContext) -> IntrospectionServicer:
    ctx.ensure_dirs()
    return IntrospectionServicer(ctx.plugins, load_or_create_uuid(ctx.root / "uuid"))


PLUGINS = [
    grpc_plugin(
        "introspection",
        "containerd.services.introspection.v1.Introspection",
        _make,
        pb_grpc.add_IntrospectionServicer_to_server,
    )
]
