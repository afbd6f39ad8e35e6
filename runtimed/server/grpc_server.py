"""Builds the grpc.aio server on the daemon's unix socket from the initialised plugins."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import grpc
import structlog

from runtimed.api.containerd.services.content.v1 import content_pb2_grpc
from runtimed.api.containerd.services.diff.v1 import diff_pb2_grpc
from runtimed.api.containerd.services.events.v1 import events_pb2_grpc
from runtimed.api.containerd.services.leases.v1 import leases_pb2_grpc
from runtimed.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc
from runtimed.api.containerd.services.tasks.v1 import tasks_pb2_grpc
from runtimed.config import GrpcConfig
from runtimed.errors import InvalidArgument, StartupError, q
from runtimed.plugin import PluginSet, PluginType
from runtimed.server.interceptors import EdgeRegistrar
from runtimed.services.base import GrpcService

log = structlog.get_logger("runtimed.server")

# Services of containerd's v1 API that answer UNIMPLEMENTED until a plugin serves them.
API_SERVICES = {
    "containerd.services.content.v1.Content": (
        content_pb2_grpc.ContentServicer,
        content_pb2_grpc.add_ContentServicer_to_server,
    ),
    "containerd.services.leases.v1.Leases": (
        leases_pb2_grpc.LeasesServicer,
        leases_pb2_grpc.add_LeasesServicer_to_server,
    ),
    "containerd.services.snapshots.v1.Snapshots": (
        snapshots_pb2_grpc.SnapshotsServicer,
        snapshots_pb2_grpc.add_SnapshotsServicer_to_server,
    ),
    "containerd.services.diff.v1.Diff": (
        diff_pb2_grpc.DiffServicer,
        diff_pb2_grpc.add_DiffServicer_to_server,
    ),
    "containerd.services.tasks.v1.Tasks": (
        tasks_pb2_grpc.TasksServicer,
        tasks_pb2_grpc.add_TasksServicer_to_server,
    ),
    "containerd.services.events.v1.Events": (
        events_pb2_grpc.EventsServicer,
        events_pb2_grpc.add_EventsServicer_to_server,
    ),
}


def parse_address(address: str) -> Path:
    """A unix socket path from "unix:///path" or "/path"."""
    path = address.removeprefix("unix://")
    if not path.startswith("/"):
        raise InvalidArgument(f"address {q(address)} must be an absolute unix socket path (unix:///PATH)")
    # sun_path is 108 bytes including the terminating NUL.
    if len(path.encode()) > 107:
        raise InvalidArgument(f"address {q(address)} is longer than a unix socket path can be (107 bytes)")
    return Path(path)


def claim_socket(path: Path) -> None:
    """Refuse an address a live daemon answers on; remove a stale socket file."""
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise StartupError(f"address {path} is in use by another running daemon")


async def start(config: GrpcConfig, plugins: PluginSet) -> grpc.aio.Server:
    path = parse_address(config.address)
    path.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    claim_socket(path)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_recv_message_size),
            ("grpc.max_send_message_length", config.max_send_message_size),
            ("grpc.so_reuseport", 0),
        ],
    )
    # Every handler is wrapped by the edge (namespace, lease, errors, logs) as it is registered.
    edge = EdgeRegistrar(server)
    served: set[str] = set()
    for service in plugins.get_by_type(PluginType.GRPC).values():
        if isinstance(service, GrpcService):
            service.register(edge)
            served.add(service.name)
    for name, (servicer_class, add) in API_SERVICES.items():
        if name not in served:
            add(servicer_class(), edge)
    server.add_insecure_port(f"unix://{path}")
    # The socket must never be reachable by others, not even between bind and chmod.
    old_umask = os.umask(0o177)
    try:
        await server.start()
    finally:
        os.umask(old_umask)
    os.chown(path, config.uid, config.gid)
    os.chmod(path, 0o660 if config.gid else 0o600)
    log.info("serving", address=str(path))
    return server


async def stop(server: grpc.aio.Server, address: str, grace: float = 5.0) -> None:
    await server.stop(grace)
    with contextlib.suppress(FileNotFoundError):
        parse_address(address).unlink()
