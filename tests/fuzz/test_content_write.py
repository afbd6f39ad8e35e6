"""Fuzzing Content.Write's lockstep protocol: sequences of STAT/WRITE/COMMIT on one ref with
right and wrong offsets, totals and digests.

Properties: never INTERNAL/UNKNOWN/hang; a COMMIT that succeeded made exactly the committed bytes
visible under their digest; a failed call leaves no empty ingest it created; an ingest that is
left holds what was written so far (a resume continues from there).
"""

from __future__ import annotations

import hashlib

import grpc
from google.protobuf import empty_pb2
from harness import FORBIDDEN
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from runtimed.api.containerd.services.content.v1 import content_pb2 as pb

SERVICE = "containerd.services.content.v1.Content"
ACTIONS = st.sampled_from([pb.STAT, pb.WRITE, pb.WRITE, pb.COMMIT, 7])


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@st.composite
def sessions(draw):
    """(ref, [requests], bytes a successful COMMIT must have stored)."""
    ref = draw(st.sampled_from(["w1", "w2"]))
    chunks = draw(st.lists(st.binary(min_size=0, max_size=64), min_size=1, max_size=4))
    payload = b"".join(chunks)
    total_choice = draw(st.sampled_from(["none", "right", "wrong", "negative"]))
    total = {"none": 0, "right": len(payload), "wrong": len(payload) + 1, "negative": -5}[total_choice]
    expected = draw(st.sampled_from(["", sha256(payload), sha256(payload + b"x"), "sha256:zz"]))
    requests, offset = [], 0
    for i, chunk in enumerate(chunks):
        action = (
            draw(ACTIONS) if i < len(chunks) - 1 else draw(st.sampled_from([pb.COMMIT, pb.WRITE, pb.STAT]))
        )
        at = draw(st.sampled_from([offset, offset, 0, offset + 3, -1]))
        requests.append(
            pb.WriteContentRequest(
                action=action, ref=ref, offset=at, data=chunk, total=total if i == 0 else 0, expected=expected
            )
        )
        if action in (pb.WRITE, pb.COMMIT):
            offset = at + len(chunk) if at > 0 else (len(chunk) if at == 0 and chunk else offset + len(chunk))
        if action == pb.COMMIT:
            break
    return ref, requests, expected


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(session=sessions())
@example(session=("w1", [pb.WriteContentRequest(action=pb.WRITE, ref="w1", offset=4096, data=b"!")], ""))
def test_fuzz_content_write(fuzz, session):
    ref, requests, _expected = session
    md_ns = "fuzz"
    write = fuzz.method(SERVICE, "Write", pb.WriteContentRequest, pb.WriteContentResponse, "ss")
    statuses = fuzz.method(SERVICE, "ListStatuses", pb.ListStatusesRequest, pb.ListStatusesResponse, "uu")
    info = fuzz.method(SERVICE, "Info", pb.InfoRequest, pb.InfoResponse, "uu")
    abort = fuzz.method(SERVICE, "Abort", pb.AbortRequest, empty_pb2.Empty, "uu")
    before = {s.ref: s for s in fuzz.call(statuses, pb.ListStatusesRequest(), md_ns).responses[0].statuses}

    outcome = fuzz.call(write, requests, md_ns, streaming_in=True, streaming_out=True)
    fuzz.alive()
    what = f"Write {[(r.action, r.offset, len(r.data), r.total, r.expected[:12]) for r in requests]}"
    assert outcome.code not in FORBIDDEN, f"{what} -> {outcome.code.name}: {outcome.details}"
    after = {s.ref: s for s in fuzz.call(statuses, pb.ListStatusesRequest(), md_ns).responses[0].statuses}
    try:
        if outcome.ok and outcome.responses and requests[-1].action == pb.COMMIT:
            digest = outcome.responses[-1].digest
            found = fuzz.call(info, pb.InfoRequest(digest=digest), md_ns)
            assert found.ok, f"{what}: committed {digest} but Info says {found.code.name}"
            assert found.responses[0].info.size == outcome.responses[-1].offset
            assert ref not in after, f"{what}: the committed ingest stayed"
        elif not outcome.ok and ref not in before and ref in after:
            assert after[ref].offset > 0, f"{what} failed ({outcome.details}) and left an empty ingest"
        if outcome.code == grpc.StatusCode.ALREADY_EXISTS:
            assert ref not in after or ref in before
    finally:
        if ref in after:
            fuzz.call(abort, pb.AbortRequest(ref=ref), md_ns)
