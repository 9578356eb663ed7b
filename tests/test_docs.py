"""README.md and MODEL.md, tested as written: every shell block is run in a scratch folder against
real processes (dealer and servers started by the documented commands), so that a documented
command that stops working fails here.

How a block is read:

- Fenced blocks are labelled: ```sh (also bash, shell, console) holds commands, ```text holds
  output, layouts or messages. An unlabelled block is taken as commands if its first line is one
  (the Benchmarks and Performance sections keep their own fences); any other unlabelled block fails
  the test, so that nothing new goes unread.
- Each command (continuation lines joined, comment lines dropped) runs with bash in the scratch
  folder, which holds a copy of examples/ and the files the docs name (photo.jpg, clip.mp4,
  mynet.py, ...). It must exit 0; EXPECT checks a few outputs.
- Nothing is rewritten except what CI cannot afford or where the docs name a machine: SIZES (fewer
  images, epochs, elements; smaller inputs) and, for the by-hand recipe, the hosts, the fixed ports
  and the `.../` of a file copied between machines. Each rewrite must still match, or the test
  fails. `secdfd up` and the client get free ports through their environment variables
  (SECDFD_UP_*, SECDFD_CLIENT_SERVER_*), as a user on a busy machine would; SECDFD_UP_DEPTH=1 keeps
  the servers from preparing bundles the test does not use, SECDFD_CLIENT_DETECT_FRAMES=2 keeps
  videos to 2 frames.
- `<!-- doc-test: servers up -->` before a block that needs the parties running: `secdfd up` first.
- PROBES check four of Troubleshooting's messages against what the processes print (a port in use,
  a server not reachable, no face, a key not admitted).
- SKIPPED lists what is not run, with the reason; a listed command that no longer appears fails. A
  block whose first command is listed is skipped whole (the docker compose blocks).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image

from secdfd.common.service import health
from secdfd.common.service.local import free_ports

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "MODEL.md")
SHELL_LABELS = {"sh", "bash", "shell", "console"}
TEXT_LABELS = {"text"}
COMMANDS = ("secdfd", "secdfd-client", "secdfd-dealer", "secdfd-server", "python", "bash", "docker", "pip", "mkdir",
            "printf")
ANNOTATIONS = {"servers up"}

# Command prefixes not run here, and why. Each must still match a documented command.
SKIPPED: dict[str, str] = {
    "bash scripts/demo.sh": "makes .venv with pip from the package index and uses the default ports; its steps "
                            "(secdfd up, secdfd-client detect, secdfd down) are the 'On one machine' block, run here",
    "bash scripts/test.sh": "is CI itself: lint, types and the whole suite, this test included",
    "mkdir -p .secdfd && chown 10001:10001 .secdfd": "docker compose set-up: tests/test_docker.py (marker docker)",
    "docker ": "docker compose and docker build: tests/test_docker.py (marker docker) runs them on an engine",
    "printf 'SECDFD_UID=": "docker compose as another user: tests/test_docker.py",
    "mkdir -p .secdfd": "docker compose as another user: tests/test_docker.py",
    "bash scripts/docker_offline.sh": "root, debootstrap and a package index: tests/test_docker.py runs it",
    "python -m pytest tests/test_docker.py": "the Docker test itself (marker docker)",
    "pip install -e '.[data]'": "installs scikit-image from the package index into the environment (network); "
                                "data synth without it is tested in tests/test_cli_model.py",
    "secdfd bench e2e --model dfdnet-s --size 128 --images 3 --lan": "network namespaces and tc need root and "
                                                                      "minutes: tests/test_lan.py (marker lan)",
    "secdfd bench e2e --model dfdnet --size 128 --images 2 --lan": "as above: tests/test_lan.py (marker lan)",
}

# (document, text, replacement): sizes for CI. Every entry must match at least once.
SIZES: tuple[tuple[str, str, str], ...] = (
    ("README.md", "--elements 1000000", "--elements 1000"),
    # full-width dfdnet takes 45 s even at 32 px in one process: the small width, smaller
    ("README.md", "examples/models.py:dfdnet --input-shape 1,3,128,128",
     "examples/models.py:dfdnet_s --input-shape 1,3,64,64"),
    ("README.md", "--model dfdnet-s --size 128 --images 3", "--model dfdnet-s --size 64 --images 1"),
    # a 16-crop batch of dfdnet-s at 128 px needs 20 GB: two small crops at 32 px
    ("README.md", "--size 128 --images 2 --batch 1,4,16", "--size 32 --images 1 --batch 1,2"),
    ("README.md", "--model dfdnet --size 128 --images 2", "--model dfdnet-s --size 64 --images 1"),
    ("README.md", "--images 3", "--images 1"),
    ("README.md", "--clients 4 --requests 16", "--clients 2 --requests 2 --size 32"),
    ("README.md", "--clients 4 --duration 10m", "--clients 2 --duration 20s --size 32"),
    ("MODEL.md", "--count 4000", "--count 40 --size 64"),
    ("MODEL.md", "--epochs 5", "--epochs 1 --size 64 --batch-size 8"),
)

# (command prefix, text its stdout must hold)
EXPECT: tuple[tuple[str, str], ...] = (
    ("secdfd up", "SecDFD is up"),
    ("secdfd-client detect examples/face.png", "p_fake"),
    ("secdfd-client detect a.jpg b.png --json", '"file": "b.png"'),
    ("secdfd-client detect clip.mp4", "frame"),
    ("secdfd-client detect --keys client-keys", "p_fake"),
    ("secdfd detect photo.jpg holiday/ --json", '"kind": "image"'),
    ("secdfd up --model runs/model.pt", "runs/model.pt"),
)

BACKGROUND = ("secdfd-dealer ", "secdfd-server ")

# Troubleshooting's messages, produced by the real processes: after the documented command (prefix),
# run the probe (None: look at that command's own output) and match the output against the message
# that starts with `message`, numbers free and `file` standing for the file the docs name.
PROBES: tuple[tuple[str, str | None, str, dict[str, str]], ...] = (
    ("secdfd up # keys", "secdfd up --state other-state", "Error: port in use", {}),
    ("secdfd down", "secdfd-client detect examples/face.png --timeout 2", "Error: could not reach server_a", {}),
    ("secdfd-client detect holiday/ more/ a.png", None, "photo.jpg: no face found", {"photo.jpg": "a.png"}),
    ("secdfd-client detect photo.jpg #",
     "secdfd keys new client --out stranger && "
     "secdfd keys admit .secdfd/keys/public/server_a.key --keys stranger --party client && "
     "secdfd keys admit .secdfd/keys/public/server_b.key --keys stranger --party client && "
     "secdfd-client detect --keys stranger examples/face.png", "Error: server_a at", {}),
)
NUMBER = r"\d+(?:\.\d+)?"


def documented_message(start: str, names: dict[str, str]) -> re.Pattern[str]:
    """The Troubleshooting message that starts with `start`, as a pattern (numbers may differ)."""
    text = next(b.commands[0] for b in blocks("README.md") if b.label == "text" and b.commands
                and b.commands[0].startswith(start))
    for doc_name, name in names.items():
        text = text.replace(doc_name, name)
    return re.compile(NUMBER.join(re.escape(part) for part in re.split(NUMBER, text)))


@dataclass
class Block:
    doc: str
    line: int  # of the opening fence
    label: str
    commands: list[str]
    annotations: set[str] = field(default_factory=set)


def blocks(doc: str) -> list[Block]:
    """Every fenced block of `doc`, with its commands (continuations joined, comment lines dropped)."""
    out: list[Block] = []
    lines = (ROOT / doc).read_text().splitlines()
    i = 0
    notes: set[str] = set()
    while i < len(lines):
        m = re.match(r"<!-- doc-test: (.+?) -->", lines[i])
        if m:
            notes.add(m.group(1).strip())
        fence = re.match(r"^```(\S*)\s*$", lines[i])
        if not fence:
            if lines[i].strip() and not m:
                notes = set()
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        out.append(Block(doc, start, fence.group(1), commands(body), notes))
        notes = set()
    return out


def commands(body: list[str]) -> list[str]:
    out: list[str] = []
    current = ""
    for raw in body:
        text = raw[2:] if raw.startswith("$ ") else raw
        if not current and (not text.strip() or text.lstrip().startswith("#")):
            continue
        if text.rstrip().endswith("\\"):
            current += text.rstrip()[:-1] + " "
            continue
        out.append(" ".join((current + text).split()))
        current = ""
    return out


def is_shell(b: Block) -> bool:
    if b.label in SHELL_LABELS:
        return True
    if b.label in TEXT_LABELS:
        return False
    if not b.label and b.commands and b.commands[0].split()[0] in COMMANDS:
        return True
    raise AssertionError(f"{b.doc}:{b.line}: label this block ```sh (commands) or ```text (anything else)")


def skip_reason(command: str) -> str | None:
    return next((why for prefix, why in SKIPPED.items() if command.startswith(prefix)), None)


def all_blocks() -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc)]


def test_every_block_is_labelled_and_every_listing_is_current() -> None:
    """Runs without processes: the block inventory, the skip list and the size table still match."""
    shell = [b for b in all_blocks() if is_shell(b)]
    cmds = [c for b in shell for c in b.commands]
    assert len(shell) >= 10 and len(cmds) >= 40, (len(shell), len(cmds))
    for prefix in SKIPPED:
        assert any(c.startswith(prefix) for c in cmds), f"SKIPPED lists {prefix!r}, which no block holds any more"
    for doc, old, _ in SIZES:
        assert any(old in c for b in shell if b.doc == doc for c in b.commands), f"SIZES: {old!r} not in {doc}"
    for b in all_blocks():
        assert b.annotations <= ANNOTATIONS, f"{b.doc}:{b.line}: unknown doc-test annotation {b.annotations}"


# --- the scratch folder ---------------------------------------------------------------------------


def no_face(path: Path, seed: int) -> None:
    """A picture without a face (a gradient with a stripe)."""
    img = Image.linear_gradient("L").resize((200, 150)).convert("RGB")
    img.paste((40 + seed * 60, 90, 160), (20, 20, 60 + seed * 30, 130))
    img.save(path)


def write_video(path: Path, face: Image.Image, frames: int = 4) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = face.width, face.height, "yuv420p"
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_image(face)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


MYNET = '''"""A small detector of the owner's own: conv, BatchNorm, ReLU, pooling, two logits."""
import torch.nn as nn


def build() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
'''


def scratch(root: Path) -> None:
    """The files the docs name, in a fresh folder."""
    shutil.copytree(ROOT / "examples", root / "examples")
    face = Image.open(ROOT / "examples" / "face.png").convert("RGB")
    face.save(root / "face.png")
    face.save(root / "photo.jpg", quality=92)
    face.save(root / "a.jpg", quality=92)
    face.crop((40, 30, 180, 190)).save(root / "crop.png")
    no_face(root / "b.png", 0)
    no_face(root / "a.png", 1)
    for folder in ("holiday", "more", "photos"):
        (root / folder).mkdir()
    face.save(root / "holiday" / "beach.jpg")
    no_face(root / "more" / "wall.png", 2)
    no_face(root / "photos" / "garden.png", 0)
    write_video(root / "clip.mp4", face)
    (root / "mynet.py").write_text(MYNET)
    owner: dict[str, object] = {}
    exec(compile(MYNET, "mynet.py", "exec"), owner)  # noqa: S102 - the test's own model file, as its owner runs it
    torch.manual_seed(0)  # weights of a test model
    torch.save(owner["build"]().state_dict(), root / "mynet.ckpt")  # type: ignore[operator]


# --- running -------------------------------------------------------------------------------------


class Runner:
    def __init__(self, root: Path) -> None:
        self.root = root
        up = [f"tcp://127.0.0.1:{p}" for p in free_ports(4)]
        hand = free_ports(4)  # the by-hand recipe's dealer, server_a, server_b, peer
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SECDFD_")}
        self.env.update({
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "SECDFD_UP_DEALER": up[0], "SECDFD_UP_SERVER_A": up[1], "SECDFD_UP_SERVER_B": up[2],
            "SECDFD_UP_PEER": up[3], "SECDFD_CLIENT_SERVER_A": up[1], "SECDFD_CLIENT_SERVER_B": up[2],
            "SECDFD_UP_DEPTH": "1", "SECDFD_CLIENT_DETECT_FRAMES": "2", "OMP_NUM_THREADS": "1",
        })
        self.hosts = [
            ("tcp://0.0.0.0:7300", f"tcp://127.0.0.1:{hand[0]}"), ("tcp://DEALER:7300", f"tcp://127.0.0.1:{hand[0]}"),
            ("tcp://0.0.0.0:7301", f"tcp://127.0.0.1:{hand[1]}"), ("tcp://SERVER_A:7301", f"tcp://127.0.0.1:{hand[1]}"),
            ("tcp://0.0.0.0:7302", f"tcp://127.0.0.1:{hand[2]}"), ("tcp://SERVER_B:7302", f"tcp://127.0.0.1:{hand[2]}"),
            ("tcp://0.0.0.0:7310", f"tcp://127.0.0.1:{hand[3]}"), ("tcp://SERVER_A:7310", f"tcp://127.0.0.1:{hand[3]}"),
            (".../dealer.key", "dealer-keys/dealer.key"), (".../server_a.key", "a-keys/server_a.key"),
            (".../server_b.key", "b-keys/server_b.key"), (".../client.key", "client-keys/client.key"),
        ]
        self.background: list[tuple[subprocess.Popen[bytes], Path | None]] = []
        self.log: list[str] = []
        self.used: set[tuple[str, str]] = set()
        self.probed: set[str] = set()

    def rewrite(self, doc: str, command: str) -> str:
        for d, old, new in SIZES:
            if d == doc and old in command:
                command = command.replace(old, new)
                self.used.add((d, old))
        for old, new in self.hosts:  # only the by-hand recipe names them
            command = command.replace(old, new)
        return command

    def run(self, doc: str, command: str) -> None:
        cmd = self.rewrite(doc, command)
        if cmd.startswith(BACKGROUND):
            state = re.search(r"--state (\S+)", cmd)
            log = (self.root / f"bg{len(self.background)}.log").open("wb")
            proc = subprocess.Popen(["bash", "-c", "exec " + cmd], cwd=self.root, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            self.background.append((proc, self.root / state.group(1) if state else None))
            self.log.append(f"[background] {cmd}")
            return
        self.wait_background()
        t0 = time.monotonic()
        r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=self.root, env=self.env, capture_output=True,
                           text=True, timeout=600)
        self.log.append(f"{time.monotonic() - t0:6.1f} s  {cmd}")
        assert r.returncode == 0, (f"{doc}: `{command}` (run as `{cmd}`) exited {r.returncode}\n"
                                   f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}")
        if cmd.startswith("secdfd up"):  # the free ports came through the environment, not the defaults
            assert self.env["SECDFD_UP_SERVER_A"] in r.stdout, r.stdout
        for prefix, text in EXPECT:
            if command.startswith(prefix):
                assert text in r.stdout, f"{doc}: `{command}` printed no {text!r}:\n{r.stdout[-3000:]}"
        self.probe(command, r.stdout + r.stderr)

    def probe(self, command: str, output: str) -> None:
        for prefix, probe, message, names in PROBES:
            if not command.startswith(prefix) or prefix in self.probed:
                continue
            self.probed.add(prefix)
            if probe is not None:
                r = subprocess.run(["bash", "-c", probe], cwd=self.root, env=self.env, capture_output=True, text=True,
                                   timeout=300)
                assert r.returncode == 1, (probe, r.returncode, r.stdout, r.stderr)
                output = r.stdout + r.stderr
                self.log.append(f"[probe] {probe}")
            pattern = documented_message(message, names)
            assert pattern.search(output), f"Troubleshooting's `{pattern.pattern}` not in:\n{output[-3000:]}"

    def wait_background(self, timeout: float = 300.0) -> None:
        """Until each background party's health file says it serves (a party that exits fails)."""
        deadline = time.monotonic() + timeout
        for proc, state in self.background:
            while state is not None:
                assert proc.poll() is None, f"{proc.args} exited {proc.returncode}"
                h = health.read(state)
                if h is not None and h.get("state") == "serving":
                    break
                assert time.monotonic() < deadline, f"{proc.args} not serving after {timeout:g} s: {h}"
                time.sleep(0.5)

    def stop_background(self) -> None:
        """Stop the parties a block started in the background (they would keep preparing bundles)."""
        for proc, _ in self.background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in self.background:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        self.background = []

    def stop(self) -> None:
        self.stop_background()
        subprocess.run(["secdfd", "down"], cwd=self.root, env=self.env, capture_output=True, timeout=120)


def test_the_documented_commands_run_as_written(tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    root.mkdir()
    scratch(root)
    runner = Runner(root)
    ran, skipped = 0, []
    t0 = time.monotonic()
    try:
        for b in all_blocks():
            if not is_shell(b):
                continue
            whole = skip_reason(b.commands[0])  # a block whose first command is skipped is skipped whole
            if whole is not None:
                skipped.append(f"{b.doc}:{b.line} block of {len(b.commands)} commands: {whole}")
                continue
            if "servers up" in b.annotations:
                runner.run(b.doc, "secdfd up")
            for command in b.commands:
                why = skip_reason(command)
                if why is not None:
                    skipped.append(f"{b.doc}:{b.line} `{command}`: {why}")
                    continue
                runner.run(b.doc, command)
                ran += 1
            runner.stop_background()
    finally:
        runner.stop()
        print(f"\n{ran} commands run, {len(skipped)} skipped, {time.monotonic() - t0:.0f} s")
        print("\n".join(runner.log + skipped))
    unused = {(d, o) for d, o, _ in SIZES} - runner.used
    assert runner.probed == {prefix for prefix, *_ in PROBES}, f"probes not run: {runner.probed}"
    assert not unused, f"SIZES entries that matched no command: {unused}"
    assert (root / "seen.png").is_file() and (root / "out.csv").is_file() and (root / "runs" / "model.pt").is_file()
