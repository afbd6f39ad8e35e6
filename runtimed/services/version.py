"""Version service: the daemon's version and revision."""

from __future__ import annotations

from runtimed import __version__
from runtimed.api.containerd.services.version.v1 import version_pb2, version_pb2_grpc
from runtimed.services.base import grpc_plugin

REVISION = "runtimed"


class VersionServicer(version_pb2_grpc.VersionServicer):
    async def Version(self, request, context):
        return version_pb2.VersionResponse(version=__version__, revision=REVISION)


PLUGINS = [
    grpc_plugin(
        "version",
        "containerd.services.version.v1.Version",
        lambda ctx: VersionServicer(),
        version_pb2_grpc.add_VersionServicer_to_server,
    )
]
