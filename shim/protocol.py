"""The shim's wire protocol: length-prefixed JSON frames on a unix stream socket.

Why not gRPC or ttrpc: importing grpc costs a Python shim ~14 MiB PSS, protobuf several more;
json and struct are in every interpreter already, and the shim's traffic is a few small
messages per container life. A frame is a 4-byte big-endian length, then that many bytes of
UTF-8 JSON (at most MAX_FRAME, as ttrpc's 4 MiB). Three kinds of object travel:

    request   {"id": 7, "method": "start", "params": {"container_id": "c1", "exec_id": ""}}
    response  {"id": 7, "result": {"pid": 4242}}
              {"id": 7, "error": {"code": "not_found", "message": "process does not exist e1"}}
    event     {"event": {"topic": "exit", "container_id": "c1", "exec_id": "", "pid": 4242, ...}}

Requests on one connection are answered out of order (a `wait` can block for days while
other calls go on), so the client matches responses by id. Events are sent only to connections
that asked for them with `connect`; the shim queues them while no such connection exists.
Method names and their request/result values are shim.api.METHODS.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

HEADER = struct.Struct(">I")
MAX_FRAME = 4 << 20


class ProtocolError(Exception):
    """A malformed frame: the connection cannot be used any more."""


_encoder = json.JSONEncoder(separators=(",", ":"))  # one instance: no per-call construction


def encode(message: dict[str, Any]) -> bytes:
    body = _encoder.encode(message).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(body)) + body


def decode_length(header: bytes) -> int:
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return length


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body.decode())
    except ValueError as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("frame is not a JSON object")
    return message


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            if chunks:
                raise ProtocolError("connection closed in the middle of a frame")
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    """The next message, or None at a clean end of stream (blocking socket)."""
    header = _recv_exactly(sock, HEADER.size)
    if header is None:
        return None
    length = decode_length(header)
    body = _recv_exactly(sock, length) if length else b""
    if body is None:
        raise ProtocolError("connection closed in the middle of a frame")
    return decode_body(body)


def read_frame_fd(fd: int) -> dict[str, Any] | None:
    """Like recv_frame, on a pipe (the zygote's stdin)."""

    def exactly(size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = os.read(fd, size - len(data))
            if not chunk:
                if data:
                    raise ProtocolError("pipe closed in the middle of a frame")
                return None
            data += chunk
        return data

    header = exactly(HEADER.size)
    if header is None:
        return None
    length = decode_length(header)
    body = exactly(length) if length else b""
    if body is None:
        raise ProtocolError("pipe closed in the middle of a frame")
    return decode_body(body)


def write_all_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
