"""The shim's wire protocol and values: framing, JSON round trips, error classes."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from runtimed import errors
from runtimed.tasks.client import runtimed_error
from shim import api, protocol

REPO = Path(__file__).resolve().parents[2]


def test_frames_round_trip_over_a_socket():
    left, right = socket.socketpair()
    with left, right:
        messages = [
            {"id": 1, "method": "wait", "params": {"container_id": "c1"}},
            {"event": {"topic": "exit"}},
        ]
        for message in messages:
            left.sendall(protocol.encode(message))
        left.shutdown(socket.SHUT_WR)
        assert [protocol.recv_frame(right), protocol.recv_frame(right)] == messages
        assert protocol.recv_frame(right) is None  # a clean end of stream


def test_frames_round_trip_over_a_pipe():
    read_end, write_end = os.pipe()
    try:
        protocol.write_all_fd(write_end, protocol.encode({"pid": 42, "address": "/run/x.sock"}))
        os.close(write_end)
        assert protocol.read_frame_fd(read_end) == {"pid": 42, "address": "/run/x.sock"}
        assert protocol.read_frame_fd(read_end) is None
    finally:
        os.close(read_end)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (struct.pack(">I", protocol.MAX_FRAME + 1), "exceeds"),
        (struct.pack(">I", 4) + b"[1]\n", "not a JSON object"),
        (struct.pack(">I", 3) + b"{no", "not JSON"),
        (struct.pack(">I", 10) + b"{}", "middle of a frame"),
    ],
)
def test_malformed_frames_are_protocol_errors(data, error):
    left, right = socket.socketpair()
    with left, right:
        left.sendall(data)
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(protocol.ProtocolError, match=error):
            protocol.recv_frame(right)


def test_oversized_messages_are_refused_before_sending():
    with pytest.raises(protocol.ProtocolError):
        protocol.encode({"blob": "x" * protocol.MAX_FRAME})


def test_values_round_trip_and_ignore_unknown_keys():
    request = api.SpawnRequest(
        container_id="c1",
        exec_id="e1",
        argv=["runc", "exec", "{console-socket}"],
        stdio=api.Stdio(stdin="/f/in", stdout="/f/out", terminal=True),
        pid_file="/b/e1.pid",
    )
    wire = request.to_wire()
    assert wire["stdio"] == {"stdin": "/f/in", "stdout": "/f/out", "stderr": "", "terminal": True}
    assert api.SpawnRequest.from_wire({**wire, "from_a_newer_peer": 1}) == request
    info = api.ShimInfo(
        version=1, pid=7, processes=[api.ProcessRecord("c1", "", 9, exited=True, exit_status=3)]
    )
    assert api.ShimInfo.from_wire(protocol.decode_body(protocol.encode(info.to_wire())[4:])) == info


def test_bad_values_are_invalid_arguments():
    with pytest.raises(api.InvalidArgument, match="ProcessKey"):
        api.ProcessKey.from_wire({"exec_id": "e1"})  # container_id missing
    with pytest.raises(api.InvalidArgument, match="expected an object"):
        api.Empty.from_wire(["not", "an", "object"])


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("not_found", errors.NotFound),
        ("already_exists", errors.AlreadyExists),
        ("invalid_argument", errors.InvalidArgument),
        ("failed_precondition", errors.FailedPrecondition),
        ("unavailable", errors.Unavailable),
        ("not_implemented", errors.NotImplementedYet),
        ("internal", errors.Internal),
        ("unknown", errors.RuntimedError),  # a command the shim ran failed: UNKNOWN
        ("something-new", errors.Internal),
    ],
)
def test_shim_errors_keep_their_class_through_the_daemon(code, cls):
    shim_error = api.error_from_wire({"code": code, "message": "process does not exist e1"})
    error = runtimed_error(shim_error)
    assert type(error) is cls
    assert error.reason == "process does not exist e1"


def test_exit_codes_follow_the_shell():
    assert api.exit_code(3 << 8) == 3
    assert api.exit_code(9) == 137  # killed by SIGKILL
    assert api.exit_code(15) == 143


def test_the_shim_imports_nothing_heavy():
    """What the zygote loads must stay lean: no grpc, protobuf, asyncio, structlog, runtimed."""
    code = (
        "import sys; import shim.zygote, shim.server;"
        "heavy = {'grpc', 'google', 'asyncio', 'structlog', 'runtimed', 'dataclasses_json'};"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", f"import sys; sys.path[:0] = [{str(REPO)!r}]; {code}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "[]"
