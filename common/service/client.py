"""The client session: share an image, ask both servers, reconstruct the verdict.

Per image: load with Pillow (any common format, converted to RGB, bombs refused), resize to the
servers' input size, encode in fixed point, split into two shares with the CSPRNG, send share i to
server i under one fresh session id (both requests in flight at once), add the two output shares
and decode the fused fake probability. Only this process ever sees the image or the verdict.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import zmq

from secdfd.common import roster
from secdfd.common.engine.figures import Report, merge
from secdfd.common.errors import PeerTimeout, ProtocolError, SecDFDError
from secdfd.common.ml.data import load_image
from secdfd.common.net.keys import load_party
from secdfd.common.net.transport import Node, Pending, Requester
from secdfd.common.net.wire import Message
from secdfd.common.service import deployment


@dataclass(frozen=True)
class ServerReport:
    """What one server says of an inference: its figures, the dealer's share of the work, and the
    opaque id both servers give the request."""

    figures: Report
    dealer_seconds: float
    dealer_bytes: int
    request: str

    @classmethod
    def read(cls, reply: Message, server: str) -> ServerReport:
        """The report in a `result` reply; ProtocolError (one line) if it is malformed."""
        try:
            d = reply.meta["report"]
            if not isinstance(d, dict):
                raise TypeError("report")
            return cls(Report.from_dict(d), float(d["dealer_seconds"]), int(d["dealer_bytes"]), str(d["request"]))
        except (KeyError, TypeError, ValueError, ProtocolError) as e:
            raise ProtocolError(f"{server} sent a malformed report ({type(e).__name__}: {str(e)[:80]}); check that "
                                "both servers run this SecDFD release") from None


def _output_share(reply: Message, server: str, crops: int) -> torch.Tensor:
    """A server's share of the fused probabilities: one ring element per crop."""
    t = reply.tensors[0]
    if t.dtype != torch.int64 or t.numel() != crops:
        raise ProtocolError(f"{server} sent an output share of shape {list(t.shape)}, expected {crops} ring "
                            "element(s); check that both servers run this SecDFD release")
    return t


@dataclass(frozen=True)
class ClientConfig:
    keys: Path
    server_a: str
    server_b: str
    timeout: float = 120.0


class Client:
    """A connection to both servers; `detect` one image at a time."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.node = Node(load_party(config.keys, "client"))
        try:
            self.servers = (Requester(self.node, config.server_a, "server_a", config.timeout),
                            Requester(self.node, config.server_b, "server_b", config.timeout))
            infos = [r.request("info", timeout=min(config.timeout, 10.0)).meta for r in self.servers]
        except BaseException:
            self.node.close()  # an open ZeroMQ context would block garbage collection
            raise
        a, b = ((i["model"], i["input_size"], i["frac_bits"]) for i in infos)
        if a != b:
            self.node.close()
            raise ProtocolError(f"server_a serves {a[0]} at {a[1]}, server_b {b[0]} at {b[1]}; "
                                "both must be provisioned from the same model")
        self.info = deployment.ModelInfo(a[0], a[1], a[2])
        # crops one request may hold: the smaller of the two servers' bounds
        self.max_batch = max(1, min(int(i["max_batch"]) for i in infos))

    def close(self) -> None:
        self.node.close()

    def detect(self, path: Path, breakdown: bool = False) -> dict[str, Any]:
        """Load, share and detect one image file (see `detect_tensor`)."""
        return self.detect_tensor(load_image(path, self.info.size), str(path), breakdown)

    def detect_tensor(self, x: torch.Tensor, name: str = "", breakdown: bool = False) -> dict[str, Any]:
        """The verdict for x, (1, 3, size, size) in [0, 1], with the figures of this inference.

        `seconds` is what this client waited (sharing excluded); `online_seconds` the servers'
        online phase; `offline_seconds` the dealer's generation plus the servers' preparation of
        the bundle, done before the request. With `breakdown`, `steps` lists each plan step's
        bytes per server, rounds and seconds.
        """
        if x.dim() != 4 or x.shape[0] != 1:
            raise ValueError(f"detect_tensor takes one crop, shape (1, 3, size, size), not {list(x.shape)}; "
                             "use detect_batch or detect_crops for several")
        return self.detect_batch(x, name, breakdown)[0]

    def detect_crops(self, crops: list[torch.Tensor], name: str = "") -> list[dict[str, Any]]:
        """The verdicts of several crops (each (1, 3, size, size)), in requests of up to `max_batch`
        crops: the crops of one request run as one secure session. One dict per crop, in order."""
        out: list[dict[str, Any]] = []
        for i in range(0, len(crops), self.max_batch):
            out += self.detect_batch(torch.cat(crops[i : i + self.max_batch]), name)
        return out

    def detect_batch(self, x: torch.Tensor, name: str = "", breakdown: bool = False) -> list[dict[str, Any]]:
        """The verdicts of the n crops of x, (n, 3, size, size) with n <= max_batch, as one request:
        one secure session, its rounds shared. One dict per crop (see `detect_tensor`); each carries
        the whole request's figures and `batch` = n (the same `request` id tells they were one)."""
        crops = int(x.shape[0])
        if not 1 <= crops <= self.max_batch:
            raise ProtocolError(f"{crops} crops in one request: the servers take 1 to {self.max_batch} in one "
                                "request (their --max-batch); send more in several requests (`detect_crops`)")
        x0, x1 = deployment.share_image(x, self.info)
        sid = secrets.token_hex(16)
        t0 = time.perf_counter()
        replies = self._request((x0, x1), sid)
        seconds = time.perf_counter() - t0
        shares = [_output_share(r, server, crops) for r, server in zip(replies, roster.SERVERS, strict=True)]
        ps = deployment.fake_probabilities(shares[0], shares[1], self.info)
        reports = [ServerReport.read(r, server) for r, server in zip(replies, roster.SERVERS, strict=True)]
        if reports[0].request != reports[1].request:
            raise ProtocolError("server_a and server_b answered for different requests; try again")
        figures = self._figures(reports, seconds, breakdown)
        return [{"file": name, "verdict": roster.verdict(p), "p_fake": p, **figures, "batch": crops} for p in ps]

    @staticmethod
    def _figures(reports: list[ServerReport], seconds: float, breakdown: bool) -> dict[str, Any]:
        dealer_s = max(r.dealer_seconds for r in reports)  # the first to ask waited for both halves
        prepare_s = [r.figures.prepare_seconds for r in reports]
        out: dict[str, Any] = {
            "seconds": seconds,
            "online_seconds": max(r.figures.seconds for r in reports),
            "bytes_per_server": [r.figures.bytes for r in reports],
            "rounds": reports[0].figures.rounds,
            "offline_seconds": dealer_s + max(prepare_s),
            "dealer_seconds": dealer_s,
            "prepare_seconds": prepare_s,
            "dealer_bytes": sum(r.dealer_bytes for r in reports),
            "request": reports[0].request,
        }
        if breakdown:
            out["steps"] = [s.to_dict() for s in merge(*(r.figures.steps for r in reports))]
        return out


    def _request(self, shares: tuple[torch.Tensor, torch.Tensor], sid: str) -> list[Message]:
        """Send share i to server i and return both replies, watching both servers at once.

        Each share goes as soon as its server's connection is up; the first failure (an error
        reply, a dropped connection, a refused key) ends the request, so a server that reports
        that its peer is down is heard even while the other server cannot be reached. At the
        deadline the error names the server(s) not reached or not answering.
        """
        pending: list[Pending | None] = [None, None]
        replies: list[Message | None] = [None, None]
        try:
            return self._exchange(shares, sid, pending, replies)
        except SecDFDError:
            self._cancel(sid, pending, replies)
            raise

    def _cancel(self, sid: str, pending: list[Pending | None], replies: list[Message | None]) -> None:
        """After a failure: ask each server still holding this request's share to drop it, so that
        it does not take one of this client's places until it expires (best effort, no waiting)."""
        for r, p, m in zip(self.servers, pending, replies, strict=True):
            if p is not None and m is None:
                with contextlib.suppress(SecDFDError):
                    r.start("cancel", sid=sid, timeout=0.2)

    def _exchange(self, shares: tuple[torch.Tensor, torch.Tensor], sid: str, pending: list[Pending | None],
                  replies: list[Message | None]) -> list[Message]:
        timeout = self.config.timeout
        deadline = time.monotonic() + timeout
        while True:
            for i, r in enumerate(self.servers):
                if pending[i] is None and r.link_up():
                    pending[i] = r.start("detect", tensors=[shares[i]], sid=sid,
                                         timeout=max(0.001, deadline - time.monotonic()))
                p = pending[i]
                if p is not None and replies[i] is None:
                    with contextlib.suppress(PeerTimeout):  # the deadline, reported below for both servers
                        replies[i] = r.poll(p, time.monotonic())  # what has arrived, without waiting
            if all(m is not None for m in replies):
                return [m for m in replies if m is not None]
            if time.monotonic() >= deadline:
                raise self._deadline_error(pending, replies, timeout)
            poller = zmq.Poller()
            for i, r in enumerate(self.servers):
                if replies[i] is None:  # a server that has answered is not watched any more
                    sock, monitor = r.sockets
                    poller.register(monitor, zmq.POLLIN)
                    poller.register(sock, zmq.POLLIN if pending[i] is not None else zmq.POLLOUT)
            poller.poll(max(1, int((deadline - time.monotonic()) * 1000)))

    def _deadline_error(self, pending: list[Pending | None], replies: list[Message | None],
                        timeout: float) -> PeerTimeout:
        late = [(r, p) for r, p, m in zip(self.servers, pending, replies, strict=True) if m is None]
        if len(late) == 2:
            verb = "reach" if all(p is None for _, p in late) else "get an answer from"
            return PeerTimeout(f"could not {verb} either server_a or server_b within {timeout:g} s at step detect; "
                               "check that both are running and reach each other")
        r, p = late[0]
        if p is None:
            return PeerTimeout(f"could not reach {r.server} at {r.endpoint} within {timeout:g} s at step detect; "
                               f"check that {r.server} is running and that it has this party's public key")
        return PeerTimeout(f"no answer from {r.server} at {r.endpoint} within {timeout:g} s at step detect; "
                           f"check that {r.server} is running")
