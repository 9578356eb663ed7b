"""Wire format: exact round trips, strict rejection of malformed messages, never pickle."""

from __future__ import annotations

import pickle

import msgpack
import pytest
import torch

from secdfd.common.errors import ProtocolError
from secdfd.common.net.wire import (
    MESSAGE_KINDS,
    WIRE_VERSION,
    Limits,
    Message,
    MessageKind,
    MessageKinds,
    error_message,
    pack,
    unpack,
)

EDGE = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 2**62, -(2**62) + 3], dtype=torch.int64)


def _open(*tensors: torch.Tensor, step: str = "relu/3") -> Message:
    return Message("open", sid="s1", seq=7, step=step, tensors=tensors)


def _envelope(frames) -> dict:
    return msgpack.unpackb(frames[0], raw=False)


def _reframe(env: dict, frames) -> list:
    return [msgpack.packb(env, use_bin_type=True), *frames[1:]]


def test_round_trip_is_exact():
    g = torch.Generator().manual_seed(1)  # test data only
    tensors = [
        EDGE,
        torch.randint(-(2**63), 2**63 - 1, (3, 5, 7), dtype=torch.int64, generator=g),
        torch.randint(0, 256, (129,), dtype=torch.uint8, generator=g),
        torch.tensor(-5, dtype=torch.int64),  # 0-d
        torch.zeros((0, 4), dtype=torch.int64),  # empty
        torch.arange(24, dtype=torch.int64).reshape(4, 6).t(),  # non-contiguous
        torch.tensor([-(2**15), -1, 0, 2**15 - 1], dtype=torch.int16),  # openings mod 2^16
        torch.tensor([-(2**31), -1, 0, 2**31 - 1], dtype=torch.int32),  # openings mod 2^k, k <= 32
    ]
    frames = pack(_open(*tensors))
    assert len(frames) == 1 + len(tensors)
    assert [len(f) for f in frames[1:]] == [56, 840, 129, 8, 0, 192, 8, 16]
    got = unpack(frames, "server_b")
    assert (got.kind, got.sid, got.seq, got.step, dict(got.meta)) == ("open", "s1", 7, "relu/3", {})
    for a, b in zip(tensors, got.tensors, strict=True):
        assert b.dtype == a.dtype and b.shape == a.shape and torch.equal(a, b)


def test_meta_round_trip_and_error_message():
    m = Message("bundle", sid="x", seq=2, step="bundle",
                meta={"bundle": 41, "batch": 1, "epoch": "e", "seconds": 0.25},
                tensors=[torch.arange(10, dtype=torch.uint8)])
    got = unpack(pack(m), "dealer")
    assert dict(got.meta) == {"bundle": 41, "batch": 1, "epoch": "e", "seconds": 0.25}
    err = unpack(pack(error_message(ProtocolError("bad thing\nsecond line"), "x", 3, "relu")), "server_a")
    assert dict(err.meta) == {"error": "ProtocolError", "message": "bad thing"}


def test_envelope_is_msgpack_not_pickle():
    frames = pack(_open(EDGE))
    env = _envelope(frames)
    assert env == {"v": WIRE_VERSION, "sid": "s1", "seq": 7, "step": "relu/3", "kind": "open",
                   "dtypes": ["int64"], "shapes": [[7]], "meta": {}}
    assert bytes(frames[1]) == EDGE.numpy().astype("<i8").tobytes()
    # a pickle in the envelope position is refused before anything is unpickled
    evil = [pickle.dumps({"v": 1, "kind": "open"}), *frames[1:]]
    with pytest.raises(ProtocolError, match="server_b"):
        unpack(evil, "server_b")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda e: e.update(v=2), "wire version 2"),
        (lambda e: e.update(kind="exec"), "unknown message kind 'exec'"),
        (lambda e: e.update(dtypes=["float64"]), "dtype 'float64'"),
        (lambda e: e.update(shapes=[[8]]), "frame has 56 bytes, shape \\[8\\] int64 needs 64"),
        (lambda e: e.update(shapes=[[-7]]), "shape must be"),
        (lambda e: e.update(shapes=[[1] * 9]), "shape must be"),
        (lambda e: e.update(seq=True), "seq"),
        (lambda e: e.update(meta={"x": 1}), "meta fields"),
        (lambda e: e.pop("sid"), "missing \\['sid'\\]"),
        (lambda e: e.update(extra=1), "unexpected \\['extra'\\]"),
        (lambda e: e.update(dtypes=["int64", "int64"], shapes=[[7], [7]]), "declares 2 tensors but 1"),
    ],
)
def test_malformed_envelopes_are_rejected(change, match):
    frames = pack(_open(EDGE))
    env = _envelope(frames)
    change(env)
    with pytest.raises(ProtocolError, match=match) as info:
        unpack(_reframe(env, frames), "server_b")
    text = str(info.value)
    assert "server_b" in text and "relu/3" in text
    assert str(2**63 - 1) not in text  # never a tensor value


def test_frame_level_faults():
    frames = pack(_open(EDGE))
    with pytest.raises(ProtocolError, match="frame has 48 bytes"):
        unpack([frames[0], bytes(frames[1])[:-8]], "server_a")
    with pytest.raises(ProtocolError, match="declares 1 tensors but 2"):
        unpack([*frames, b"\0" * 8], "server_a")
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        unpack([b"\xc1garbage", *frames[1:]], "server_a")
    with pytest.raises(ProtocolError, match="not a map"):
        unpack([msgpack.packb([1, 2, 3])], "server_a")
    with pytest.raises(ProtocolError, match="empty message"):
        unpack([], "server_a", step="trunc/1")
    # extension types (a route to arbitrary objects in some decoders) are refused
    env = _envelope(frames)
    env["meta"] = msgpack.ExtType(1, b"x")
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        unpack([msgpack.packb(env), *frames[1:]], "server_a")


def test_limits():
    frames = pack(_open(EDGE, EDGE, EDGE))
    with pytest.raises(ProtocolError, match="allowed 0..2"):
        unpack(frames, "peer", limits=Limits(max_tensors=2))
    with pytest.raises(ProtocolError, match="exceeds 100 bytes"):
        unpack(frames, "peer", limits=Limits(max_bytes=100))
    with pytest.raises(ProtocolError, match="envelope of"):
        unpack(frames, "peer", limits=Limits(max_envelope=16))
    # per-kind tensor counts and dtypes
    bad = pack(Message("open", tensors=[EDGE]))
    env = _envelope(bad)
    env["kind"] = "detect"
    env["dtypes"] = ["uint8"]
    env["shapes"] = [[56]]
    with pytest.raises(ProtocolError, match="dtype 'uint8'"):
        unpack(_reframe(env, bad), "client")
    no_share = {**_envelope(pack(Message("info"))), "kind": "detect"}
    with pytest.raises(ProtocolError, match="carries 0 tensors, allowed 1..1"):
        unpack([msgpack.packb(no_share)], "client")


def test_pack_refuses_what_cannot_travel():
    with pytest.raises(ValueError, match="float32"):
        pack(_open(torch.zeros(3)))
    with pytest.raises(ValueError, match="unknown message kind"):
        pack(Message("nope"))
    with pytest.raises(ProtocolError, match="bundle"):
        pack(Message("session", meta={"bundle": "3"}))


def test_registry_rejects_duplicates():
    with pytest.raises(ValueError, match="registered twice"):
        MessageKinds([MessageKind("a", "x"), MessageKind("a", "y")])
    with pytest.raises(ValueError, match="unknown dtypes"):
        MessageKinds([MessageKind("a", "x", dtypes=frozenset({"float32"}))])
    assert "open" in MESSAGE_KINDS and len(MESSAGE_KINDS) == len(set(MESSAGE_KINDS))


def test_received_tensors_are_independent_copies_when_unaligned():
    # a bytes frame (read-only) is copied into a writable tensor; the sender's tensor is untouched
    t = torch.arange(5, dtype=torch.int64)
    frames = [bytes(f) for f in pack(_open(t))]
    got = unpack(frames, "peer").tensors[0]
    got += 1
    assert torch.equal(t, torch.arange(5, dtype=torch.int64))
    assert torch.equal(got, torch.arange(1, 6, dtype=torch.int64))
