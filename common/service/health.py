"""Each long-running party's health, written to its state folder (`STATE/status.json`).

What an operator needs and a client must not see (bundles ready, requests served and failed, the
last error) goes here instead of into replies to clients. The file is replaced atomically, so a
reader never sees half of it; `secdfd status` and the benchmarks read it. It holds counts, states
and error sentences only: never a key, a share, an image or a result.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FILE = "status.json"
STATES = ("starting", "setting up", "serving", "stopped", "failed")


@dataclass
class Health:
    """A party's health; `write` publishes it."""

    party: str
    state: str = "starting"
    pid: int = field(default_factory=os.getpid)
    started: float = field(default_factory=time.time)
    updated: float = 0.0
    requests_served: int = 0
    requests_failed: int = 0
    last_error: str = ""
    bundles_ready: int = 0  # servers: bundles in the queue, the prepared one included
    prepared: bool = False  # servers: the next bundle is expanded, a request runs the online phase only
    extra: dict[str, Any] = field(default_factory=dict)


class HealthFile:
    """Publishes one party's `Health` to FOLDER/status.json, at most every `every` seconds unless forced."""

    def __init__(self, folder: Path, party: str, every: float = 1.0) -> None:
        self.path = Path(folder) / FILE
        self.health = Health(party)
        self._every = every
        self._last = 0.0
        self._lock = threading.Lock()
        self._warned = False

    def follow(self, run: Callable[[], None], **when_stopped: Any) -> None:
        """Call `run` while this file says starting, then failed (with the error, which is re-raised)
        or stopped (with `when_stopped`)."""
        self.update(force=True, state="starting")
        try:
            run()
        except BaseException as e:
            self.update(force=True, state="failed", last_error=f"{type(e).__name__}: {e}"[:500])
            raise
        self.update(force=True, state="stopped", **when_stopped)

    def update(self, force: bool = False, **changes: Any) -> None:
        with self._lock:
            for k, v in changes.items():
                if not hasattr(self.health, k):
                    raise AttributeError(f"Health has no field {k!r}")
                setattr(self.health, k, v)
            now = time.monotonic()
            if not force and now - self._last < self._every:
                return
            self._last = now
            self.health.updated = time.time()
            data = json.dumps(asdict(self.health), sort_keys=True)
        try:
            write_atomic(self.path, data + "\n")
        except OSError as e:  # a full disk must not stop a party; the ledgers report it where it matters
            if not self._warned:
                log.warning("cannot write %s: %s", self.path, e.strerror)
                self._warned = True
        else:
            self._warned = False

    def served(self) -> None:
        self.update(force=True, requests_served=self.health.requests_served + 1)

    def failed(self, error: BaseException) -> None:
        self.update(force=True, requests_failed=self.health.requests_failed + 1,
                    last_error=f"{type(error).__name__}: {error}"[:500])


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` (write a temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read(folder: Path) -> dict[str, Any] | None:
    """A party's last published health, or None if it has published none (or it is unreadable)."""
    try:
        data = json.loads((Path(folder) / FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
