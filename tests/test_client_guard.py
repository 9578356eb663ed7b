"""The client against servers that answer badly: a malformed report, an output share of the wrong
shape, a result that is not a probability. Each is one line and exit status 1, never a traceback
and never a verdict.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from secdfd.client.main import main as client_main
from secdfd.common.engine.figures import Report
from secdfd.common.engine.ring import FixedPoint
from secdfd.common.errors import RangeError
from secdfd.common.net.keys import load_party
from secdfd.common.net.transport import Node, Responder
from secdfd.common.service import deployment

pytestmark = pytest.mark.sockets

SIZE = 32
Answer = Callable[[int, Any], tuple[dict[str, Any], list[torch.Tensor]]]


def good_report(request: str = "r1") -> dict[str, Any]:
    return {**Report(0.1, 0.2, 1000, 10, []).to_dict(), "request": request, "party": "x", "dealer_seconds": 0.3,
            "dealer_bytes": 99}


def shares_of(p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two shares whose sum decodes to p (what honest servers would send for probability p)."""
    y = FixedPoint(16).encode(torch.tensor([[p]], dtype=torch.float64))
    r = torch.tensor([[123456789]], dtype=torch.int64)
    return r, y - r


@pytest.fixture
def fake_servers(keys) -> Iterator[Callable[[Answer], tuple[str, str]]]:
    """Start two fake servers with the real servers' keys; `answer(role, request)` builds each
    detect reply. Yields a function that installs the answer and returns both endpoints."""
    stop = threading.Event()
    threads = []
    holder: dict[str, Answer] = {}

    def serve(role: int, name: str, ready: threading.Event, endpoint: list[str]) -> None:
        with Node(load_party(keys, name)) as node:
            front = Responder(node, "tcp://127.0.0.1:*", "clients")
            endpoint.append(front.endpoint)
            ready.set()
            while not stop.is_set():
                req = front.recv(0.1)
                if req is None:
                    continue
                if req.message.kind == "info":
                    front.reply(req, "info_reply", {"party": name, "model": "dfdnet-s", "input_size": SIZE,
                                                    "frac_bits": 16, "max_batch": 1})
                else:
                    meta, tensors = holder["answer"](role, req)
                    front.reply(req, "result", meta, tensors)

    def start(answer: Answer) -> tuple[str, str]:
        holder["answer"] = answer
        eps = []
        for role, name in enumerate(("server_a", "server_b")):
            ready, ep = threading.Event(), []
            t = threading.Thread(target=serve, args=(role, name, ready, ep), daemon=True)
            t.start()
            threads.append(t)
            assert ready.wait(10)
            eps.append(ep[0])
        return eps[0], eps[1]

    yield start
    stop.set()
    for t in threads:
        t.join(5)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "face.png"
    Image.new("RGB", (40, 40), (180, 120, 90)).save(path)
    return path


def _detect(keys: Path, eps: tuple[str, str], image: Path) -> str:
    r = CliRunner().invoke(client_main, ["detect", "--no-crop", str(image), "--keys", str(keys), "--server-a", eps[0],
                                         "--server-b", eps[1], "--timeout", "10"])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and ": real (" not in r.output and ": fake (" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.output
    return lines[0]


@pytest.mark.parametrize("case", ["empty", "missing field", "wrong type", "steps not figures"])
def test_a_malformed_report_is_one_line(fake_servers, keys, image, case):
    def answer(role: int, req: Any) -> tuple[dict[str, Any], list[torch.Tensor]]:
        report: Any = good_report()
        if role == 1:
            if case == "empty":  # (a report that is not a map at all is refused by the wire format)
                report = {}
            elif case == "missing field":
                del report["rounds"]
            elif case == "wrong type":
                report["bytes"] = "many"
            else:
                report["steps"] = [["conv", "linear", 1, 1, 0.1]]
        return {"report": report}, [shares_of(0.25)[role]]

    line = _detect(keys, fake_servers(answer), image)
    assert "server_b sent a malformed report" in line


def test_an_output_share_of_the_wrong_shape_is_refused(fake_servers, keys, image):
    def answer(role: int, req: Any) -> tuple[dict[str, Any], list[torch.Tensor]]:
        t = shares_of(0.25)[role] if role == 0 else torch.zeros(1, 5, dtype=torch.int64)
        return {"report": good_report()}, [t]

    assert "server_b sent an output share of shape [1, 5]" in _detect(keys, fake_servers(answer), image)


def test_answers_for_two_different_requests_are_refused(fake_servers, keys, image):
    def answer(role: int, req: Any) -> tuple[dict[str, Any], list[torch.Tensor]]:
        return {"report": good_report(f"r{role}")}, [shares_of(0.25)[role]]

    assert "answered for different requests" in _detect(keys, fake_servers(answer), image)


@pytest.mark.parametrize("p", [-16358.0, -0.01, 1.01, 4096.5])
def test_a_result_out_of_range_gives_no_verdict(fake_servers, keys, image, p):
    def answer(role: int, req: Any) -> tuple[dict[str, Any], list[torch.Tensor]]:
        return {"report": good_report()}, [shares_of(p)[role]]

    line = _detect(keys, fake_servers(answer), image)
    assert "out of range" in line and "no verdict" in line


def test_probabilities_within_rounding_are_clamped():
    info = deployment.ModelInfo("dfdnet-s", SIZE)
    assert deployment.fake_probability(*shares_of(-0.0004), info) == 0.0
    assert deployment.fake_probability(*shares_of(1.0004), info) == 1.0
    assert abs(deployment.fake_probability(*shares_of(0.7), info) - 0.7) < 1e-4
    with pytest.raises(RangeError):
        deployment.fake_probability(*shares_of(1.002), info)
