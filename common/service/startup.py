"""One start-up path for every long-running process (dealer, server_a, server_b).

`run_process(name, threads, body)`:
- logs to stderr as "TIME NAME LEVEL message" at INFO (no secret is ever logged: messages name
  parties, steps, ids and sizes, never values);
- bounds torch's CPU threads (`threads` > 0; 0 keeps torch's default of every core). Processes that
  share a machine (dealer and both servers under `secdfd up`) each take one;
- turns SIGTERM and SIGINT into the `stop` event that `body(stop)` watches, so the process ends
  cleanly (sockets closed, background threads joined);
- returns the exit status: 0 after a clean stop, 1 after a SecDFD error (a missing file, a bad
  key, a peer that never came: one line on stderr that says what to do), 70 after an unexpected
  error (its traceback in the log).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import signal
import sys
import threading
from collections.abc import Callable

import torch

from secdfd.common.errors import SecDFDError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERNAL = 70  # EX_SOFTWARE

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None
    return fn


_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Give the heap's free memory back to the system (glibc `malloc_trim`; a no-op elsewhere).

    A session allocates and frees hundreds of MB of tensors in several threads (fetching, preparing,
    the online phase); glibc keeps freed memory in per-thread arenas, so a long-running server's
    resident size would creep up without it. Called between sessions: it takes milliseconds."""
    if _TRIM is not None:
        _TRIM(0)


def set_threads(threads: int) -> None:
    """torch's CPU threads for this process; 0 keeps torch's default (every core)."""
    if threads > 0:
        torch.set_num_threads(threads)


def run_process(name: str, threads: int, body: Callable[[threading.Event], None]) -> int:
    """Run `body(stop)` as process `name`; returns the exit status (see the module docstring)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    set_threads(threads)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        body(stop)
    except SecDFDError as e:
        print(f"Error: {e}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except Exception:  # noqa: BLE001 - the last word of a process: log it, exit non-zero
        log.exception("%s stopped on an unexpected error", name)
        return EXIT_INTERNAL
    log.info("%s stopped", name)
    return EXIT_OK
