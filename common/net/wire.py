"""The wire format: one msgpack envelope frame plus one raw frame per tensor. Never pickle.

A message is one ZeroMQ multipart message::

    frame 0      envelope, a msgpack map with exactly these keys:
                   "v"      int   wire version (WIRE_VERSION); any other version is refused
                   "sid"    str   session id (<= 64 chars): one inference, or one request
                   "seq"    int   message counter within the session (>= 0): the n-th round of
                                  an inference, or the request number on a request socket
                   "step"   str   step label (<= 128 chars), e.g. the plan step a round opens
                   "kind"   str   a name from the registry `MESSAGE_KINDS` below
                   "dtypes" [str] one per tensor frame: "int64", "int32", "int16" or "uint8"
                   "shapes" [[int]] one per tensor frame: at most 8 dims, each >= 0
                   "meta"   map   the kind's fields, exactly as the kind declares them
    frame 1..n   tensor payloads, C order, little-endian, numel * itemsize bytes each

Ring elements travel as int64, openings mod 2^k (k <= 32) as int32 or int16, serialised bundles and
bit strings as uint8. Tensor frames are sent
without copying (the tensor's memory is handed to ZeroMQ) and received without copying when the
buffer is suitably aligned (`torch.frombuffer` on the received frame).

Validation of every received message is strict, and happens before any tensor is built: the
envelope must decode with msgpack's size limits and without extension types, carry exactly the keys
above with the right types, name a registered kind whose meta fields and dtypes it matches, and be
followed by exactly one frame per declared tensor of exactly the declared length; the tensor count
and total payload are bounded by `Limits`. Any violation raises `ProtocolError` naming the peer and
the step; error messages describe shapes and fields, never values of tensors.

Message kinds are data: an explicit registry (`MessageKinds`) that rejects duplicate names; the
receiver dispatches on the registered name, never with `getattr` on a string from the network.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import msgpack
import numpy as np
import torch

from secdfd.common.errors import ProtocolError

WIRE_VERSION = 1

# dtype name on the wire -> (torch dtype, little-endian numpy dtype)
DTYPES: Mapping[str, tuple[torch.dtype, np.dtype]] = MappingProxyType(
    {
        "int64": (torch.int64, np.dtype("<i8")),
        "int32": (torch.int32, np.dtype("<i4")),
        "int16": (torch.int16, np.dtype("<i2")),
        "uint8": (torch.uint8, np.dtype("u1")),
    }
)
_DTYPE_NAMES: Mapping[torch.dtype, str] = MappingProxyType({t: n for n, (t, _) in DTYPES.items()})
_ENVELOPE_KEYS = frozenset({"v", "sid", "seq", "step", "kind", "dtypes", "shapes", "meta"})
_MAX_SID = 64
_MAX_STEP = 128
_MAX_DIM = 1 << 40


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what a peer may send; checked before anything is allocated."""

    max_tensors: int = 16384  # a round batches every opening of every step that is ready
    max_dims: int = 8
    max_bytes: int = 1 << 31  # total tensor payload of one message
    max_envelope: int = 1 << 20  # the msgpack frame (per-step reports travel in meta)

    @property
    def max_frame(self) -> int:
        """The largest frame a socket with these limits accepts (ZeroMQ drops the connection of a
        peer that sends a larger one, before buffering it)."""
        return max(self.max_envelope, self.max_bytes)


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class MessageKind:
    """A message kind: its meta fields (name -> accepted types), tensor count and dtypes."""

    name: str
    doc: str
    meta: Mapping[str, tuple[type, ...]] = field(default_factory=dict)
    min_tensors: int = 0
    max_tensors: int = 0
    dtypes: frozenset[str] = frozenset()


class MessageKinds(Mapping[str, MessageKind]):
    """An explicit, immutable table of message kinds; a duplicate name is a programming error."""

    def __init__(self, kinds: Iterable[MessageKind]) -> None:
        table: dict[str, MessageKind] = {}
        for k in kinds:
            if k.name in table:
                raise ValueError(f"message kind {k.name!r} registered twice")
            unknown = k.dtypes - DTYPES.keys()
            if unknown:
                raise ValueError(f"message kind {k.name!r} names unknown dtypes {sorted(unknown)}")
            table[k.name] = k
        self._table = table

    def __getitem__(self, name: str) -> MessageKind:
        return self._table[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


_INT = (int,)
_STR = (str,)
_NUM = (int, float)
_RING = frozenset({"int64"})
_BYTES = frozenset({"uint8"})
_LOW = frozenset({"int16", "int32"})  # openings mod 2^k (k <= 32) in the smallest type that holds them

MESSAGE_KINDS = MessageKinds(
    [
        # server <-> server
        MessageKind("open", "one protocol round: this party's openings, batched into one message",
             max_tensors=1 << 30, dtypes=_RING | _LOW | _BYTES),  # bounded by Limits.max_tensors
        MessageKind("session", "server_a -> server_b: start session `sid` with bundle `bundle` for the "
             "client session `client` of the client with public key `key` (bundle -1: the set-up session), "
             "known in logs and replies as `request`; `batch` crops (> 1: `bundle` is a batch bundle)",
             meta={"bundle": _INT, "client": _STR, "key": _STR, "request": _STR, "batch": _INT}),
        MessageKind("have", "server_b -> server_a, outside any session: server_b holds its share of client "
             "session `client` of the client with public key `key`, a share of `crops` crops",
             meta={"client": _STR, "key": _STR, "crops": _INT}),
        MessageKind("ready", "server_b -> server_a: the client's share and the bundle are in hand"),
        MessageKind("split", "either server, at set-up: the split id and architecture digest of its weight share",
                    meta={"share": _STR, "model": _STR}),
        # client <-> server
        MessageKind("info", "ask a server what it serves"),
        MessageKind("info_reply", "model name, input size, fixed-point format, party of a server and the most "
             "crops one request may hold",
             meta={"party": _STR, "model": _STR, "input_size": _INT, "frac_bits": _INT, "max_batch": _INT}),
        MessageKind("detect", "client -> server: this server's share of one image (or of several crops, one session)",
             min_tensors=1, max_tensors=1, dtypes=_RING),
        MessageKind("cancel", "client -> server: drop the request of this client session (best effort)"),
        MessageKind("cancelled", "server -> client: the request is dropped (or was not held)"),
        MessageKind("result", "server -> client: this server's share of the output and its report",
             meta={"report": (dict,)}, min_tensors=1, max_tensors=1, dtypes=_RING),
        # server <-> dealer
        MessageKind("provision_request", "server -> dealer: provisioning material for the weight masks"),
        MessageKind("provision", "dealer -> server: serialised provisioning material and the model it deals for",
             meta={"epoch": _STR, "model": _STR, "input_size": _INT, "frac_bits": _INT, "split": _STR,
                   "digest": _STR, "max_batch": _INT, "layout": _INT},
             min_tensors=1, max_tensors=1, dtypes=_BYTES),
        MessageKind("bundle_request", "server -> dealer: the next correlated-randomness bundle"),
        MessageKind("batch_request", "server_a -> dealer: a new bundle for a batch of `batch` crops",
             meta={"batch": _INT}),
        MessageKind("batch_fetch", "server_b -> dealer: its half of batch bundle `bundle` (announced by server_a)",
             meta={"bundle": _INT, "batch": _INT}),
        MessageKind("bundle", "dealer -> server: one serialised bundle with its id and batch size, in consecutive "
             "frames", meta={"bundle": _INT, "batch": _INT, "epoch": _STR, "seconds": _NUM},
             min_tensors=1, max_tensors=1 << 14, dtypes=_BYTES),  # frames of <= 1 MiB (see dealer)
        # any direction
        MessageKind("error", "the sender failed: exception class name and a one-line message",
             meta={"error": _STR, "message": _STR}),
    ]
)


@dataclass(frozen=True)
class Message:
    """A decoded (or to-be-encoded) message."""

    kind: str
    sid: str = ""
    seq: int = 0
    step: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)
    tensors: Sequence[torch.Tensor] = ()


def pack(msg: Message, kinds: MessageKinds = MESSAGE_KINDS) -> list[Any]:
    """Encode `msg` as frames: the envelope bytes, then one zero-copy buffer per tensor.

    The message is validated against its kind on the way out as well, so a bug on this side
    surfaces here and not as a confusing error at the peer.
    """
    kind = kinds.get(msg.kind)
    if kind is None:
        raise ValueError(f"unknown message kind {msg.kind!r}")
    buffers = []
    dtypes = []
    shapes = []
    for t in msg.tensors:
        name = _DTYPE_NAMES.get(t.dtype)
        if name is None:
            raise ValueError(f"{msg.kind} at step {msg.step}: dtype {t.dtype} cannot travel; "
                             "use int64, int32, int16 or uint8")
        arr = t.detach().cpu().contiguous().numpy()
        if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
            arr = arr.astype(DTYPES[name][1])  # the wire is little-endian
        buffers.append(memoryview(arr.reshape(-1)).cast("B") if arr.size else b"")  # type: ignore[arg-type]
        dtypes.append(name)
        shapes.append(list(t.shape))
    envelope = {
        "v": WIRE_VERSION,
        "sid": msg.sid,
        "seq": msg.seq,
        "step": msg.step,
        "kind": msg.kind,
        "dtypes": dtypes,
        "shapes": shapes,
        "meta": dict(msg.meta),
    }
    _check_envelope(envelope, kind, len(buffers), "this side", msg.step, Limits(max_tensors=1 << 30))
    return [msgpack.packb(envelope, use_bin_type=True), *buffers]


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError("msgpack extension types are not part of the wire format")


def unpack(
    frames: Sequence[Any],
    peer: str,
    step: str = "?",
    limits: Limits = DEFAULT_LIMITS,
    kinds: MessageKinds = MESSAGE_KINDS,
) -> Message:
    """Decode and validate one received message; `step` is what the receiver expects (for errors).

    `frames` are `bytes` or `zmq.Frame` objects (anything with the buffer protocol or `.buffer`).
    Raises ProtocolError, naming `peer` and the step, for anything malformed.
    """
    if not frames:
        raise ProtocolError(f"empty message from {peer} at step {step}")
    head = _buffer(frames[0])
    if len(head) > limits.max_envelope:
        raise _bad(peer, step, f"envelope of {len(head)} bytes exceeds {limits.max_envelope}")
    try:
        envelope = msgpack.unpackb(
            head,
            raw=False,
            strict_map_key=True,
            ext_hook=_no_ext,
            max_str_len=limits.max_envelope,
            max_bin_len=0,
            max_array_len=max(limits.max_tensors, 4096),
            max_map_len=4096,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises ValueError, TypeError, ExtraData, FormatError, StackError
        raise _bad(peer, step, f"envelope is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(envelope, dict):
        raise _bad(peer, step, "envelope is not a map")
    if isinstance(envelope.get("step"), str) and len(envelope["step"]) <= _MAX_STEP:
        step = envelope["step"]  # name the step the peer says it is at
    version = envelope.get("v")
    if version != WIRE_VERSION:
        raise ProtocolError(
            f"{peer} speaks wire version {version!r} at step {step}, this side speaks {WIRE_VERSION}: "
            "run the same SecDFD release on every party"
        )
    name = envelope.get("kind")
    kind = kinds.get(name) if isinstance(name, str) else None
    if kind is None:
        raise _bad(peer, step, f"unknown message kind {str(envelope.get('kind'))[:40]!r}")
    _check_envelope(envelope, kind, len(frames) - 1, peer, step, limits)
    tensors = []
    total = 0
    for i, (dname, shape) in enumerate(zip(envelope["dtypes"], envelope["shapes"], strict=True)):
        torch_dtype, np_dtype = DTYPES[dname]
        n = math.prod(shape)
        total += n * np_dtype.itemsize
        if total > limits.max_bytes:
            raise _bad(peer, step, f"tensor payload exceeds {limits.max_bytes} bytes")
        buf = _buffer(frames[1 + i])
        if len(buf) != n * np_dtype.itemsize:
            raise _bad(peer, step, f"tensor {i} frame has {len(buf)} bytes, shape {shape} {dname} needs "
                                   f"{n * np_dtype.itemsize}")
        tensors.append(_tensor(buf, np_dtype, torch_dtype, shape))
    return Message(
        kind=kind.name,
        sid=envelope["sid"],
        seq=envelope["seq"],
        step=envelope["step"],
        meta=envelope["meta"],
        tensors=tensors,
    )


def _check_envelope(env: dict[str, Any], kind: MessageKind, nframes: int, peer: str, step: str, limits: Limits) -> None:
    keys = set(env)
    if keys != _ENVELOPE_KEYS:
        missing, extra = sorted(_ENVELOPE_KEYS - keys), sorted(str(k)[:20] for k in keys - _ENVELOPE_KEYS)
        raise _bad(peer, step, f"envelope keys wrong (missing {missing}, unexpected {extra})")
    if not (isinstance(env["sid"], str) and len(env["sid"]) <= _MAX_SID):
        raise _bad(peer, step, f"session id must be a string of at most {_MAX_SID} characters")
    if not (isinstance(env["step"], str) and len(env["step"]) <= _MAX_STEP):
        raise _bad(peer, step, f"step must be a string of at most {_MAX_STEP} characters")
    if not (_is_int(env["seq"]) and env["seq"] >= 0):
        raise _bad(peer, step, "seq must be a non-negative integer")
    dtypes, shapes = env["dtypes"], env["shapes"]
    if not (isinstance(dtypes, list) and isinstance(shapes, list) and len(dtypes) == len(shapes)):
        raise _bad(peer, step, "dtypes and shapes must be lists of equal length")
    n = len(dtypes)
    if n != nframes:
        raise _bad(peer, step, f"envelope declares {n} tensors but {nframes} tensor frames followed")
    if not kind.min_tensors <= n <= min(kind.max_tensors, limits.max_tensors):
        raise _bad(peer, step, f"{kind.name} carries {n} tensors, allowed {kind.min_tensors}.."
                               f"{min(kind.max_tensors, limits.max_tensors)}")
    for i, (d, s) in enumerate(zip(dtypes, shapes, strict=True)):
        if d not in kind.dtypes:
            raise _bad(peer, step, f"tensor {i} of {kind.name} has dtype {str(d)[:20]!r}, allowed "
                                   f"{sorted(kind.dtypes)}")
        dims_ok = isinstance(s, list) and len(s) <= limits.max_dims
        if not (dims_ok and all(_is_int(x) and 0 <= x <= _MAX_DIM for x in s)):
            raise _bad(peer, step, f"tensor {i} shape must be at most {limits.max_dims} "
                                   f"integers in [0, 2^40]")
    _check_meta(env["meta"], kind, peer, step)


def _check_meta(meta: Any, kind: MessageKind, peer: str, step: str) -> None:
    """The meta map has exactly the kind's fields, each of an accepted type."""
    if not isinstance(meta, dict) or set(meta) != set(kind.meta):
        got = sorted(str(k)[:20] for k in meta) if isinstance(meta, dict) else "not a map"
        raise _bad(peer, step, f"{kind.name} meta fields must be {sorted(kind.meta)}, got {got}")
    for name, types in kind.meta.items():
        v = meta[name]
        if isinstance(v, bool) or not isinstance(v, types):
            wanted = "/".join(t.__name__ for t in types)
            raise _bad(peer, step, f"{kind.name} field {name!r} must be {wanted}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _bad(peer: str, step: str, what: str) -> ProtocolError:
    return ProtocolError(f"malformed message from {peer} at step {step}: {what}; "
                         "check that every party runs the same SecDFD release")


def _buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes its data as .buffer
    return memoryview(buf).cast("B")


def _tensor(buf: memoryview, np_dtype: np.dtype, torch_dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if len(buf) == 0:
        return torch.empty(shape, dtype=torch_dtype)
    arr = np.frombuffer(buf, dtype=np_dtype)
    if arr.ctypes.data % np_dtype.itemsize or buf.readonly or not np_dtype.isnative:
        # small frames live inline in the ZeroMQ message and may be unaligned; copy those
        arr = arr.astype(np_dtype.newbyteorder("="), copy=True)
    return torch.from_numpy(arr).reshape(shape)


def error_message(exc: BaseException, sid: str = "", seq: int = 0, step: str = "") -> Message:
    """The `error` message that reports `exc` to a peer by class name and one-line text."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return Message("error", sid=sid, seq=seq, step=step,
                   meta={"error": type(exc).__name__, "message": text[:500]})
