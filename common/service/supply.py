"""Bundle ids that are never reused, and the servers' bounded queue of ready bundles.

A bundle is the correlated randomness of one inference; using one twice leaks inputs (two
openings masked by the same Beaver triple). Three pieces keep ids unique, even across restarts:

- `IdLedger`: a persisted high-water mark. The dealer draws each new id from it; a server claims an
  id before using the bundle. The file is replaced atomically (write, fsync, rename, fsync the
  folder) *before* the id is handed out or used, so a crash can skip ids but never repeat one.
- `BundleBook` (dealer): makes both halves of bundle k at once and hands each half out once, in id
  order, to the server it belongs to; so both servers see the same sequence of ids.
- `BundleQueue` (server): a bounded queue refilled in the background. server_a takes the oldest
  ready bundle and announces its id; server_b takes that id, dropping any older ones (server_a
  never goes back), and fails if the id can no longer arrive.
- `PrepareAhead` (server): keeps the next bundle of the queue already expanded (the engine's
  input-independent `prepare`), so that a request runs the online phase only. It takes bundles in
  id order, like server_a, so server_b's guess of the next id is right unless a bundle was skipped.

Background work (fetching, preparing) waits while `idle` is clear, i.e. while a session is online,
so that it never competes with the online phase for the CPU.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from secdfd.common.errors import RandomnessError

log = logging.getLogger(__name__)


class IdLedger:
    """A persisted, strictly increasing bundle-id counter (one file holding the last id used)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.last = int(self.path.read_text().strip())
        except FileNotFoundError:
            self.last = -1
        except ValueError:
            raise RandomnessError(f"bundle-id ledger {self.path} is corrupt; it must hold one integer. "
                                  "Do not delete it: set it above every id used so far") from None

    def claim(self, bundle_id: int) -> None:
        """Record `bundle_id` as used; refuses any id not above every id used before."""
        with self._lock:
            if bundle_id <= self.last:
                raise RandomnessError(f"bundle {bundle_id} was already used (ledger {self.path} is at "
                                      f"{self.last}); a bundle is never used twice")
            self._record(bundle_id, f"record bundle {bundle_id} as used")
            self.last = bundle_id

    def next(self) -> int:
        """A fresh id, above every id handed out before (dealer)."""
        with self._lock:
            bundle_id = self.last + 1
            self._record(bundle_id, f"record bundle id {bundle_id} as handed out")
            self.last = bundle_id
            return bundle_id

    def _record(self, value: int, what: str) -> None:
        """Write the ledger; RandomnessError (the id is then not used) if the disk refuses."""
        try:
            self._write(value)
        except OSError as e:
            raise RandomnessError(f"cannot {what} in {self.path} ({e.strerror}); the bundle is not used. Free "
                                  "space (or fix the folder's permissions) and try again") from None

    def _write(self, value: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write(f"{value}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class BundleBook:
    """Dealer side: each bundle id's two halves, each handed out once to its own server, in order.

    `make(bundle_id)` returns (half for server_a, half for server_b), each a bytes-like object. A half
    waits here until its server asks. The halves waiting for one server take at most `max_bytes`
    (and at most `cap` halves): beyond that the oldest is dropped (logged), and that server reports
    the id as unavailable if it is ever announced, so the dealer's memory is bounded in bytes however
    long one server does not fetch.
    """

    def __init__(self, make: Callable[[int], tuple[Any, Any]], ledger: IdLedger, cap: int = 64,
                 max_bytes: int = 2 << 30) -> None:
        self._make = make
        self._ledger = ledger
        self._cap = cap
        self._max_bytes = max_bytes
        self._waiting: tuple[deque[tuple[int, Any]], deque[tuple[int, Any]]] = (deque(), deque())
        self._bytes = [0, 0]

    def next_for(self, party: int) -> tuple[int, Any]:
        """The next (id, half) for server `party` (0 = server_a, 1 = server_b)."""
        mine = self._waiting[party]
        if mine:
            bundle_id, half = mine.popleft()
            self._bytes[party] -= len(half)
            return bundle_id, half
        bundle_id = self._ledger.next()
        halves = self._make(bundle_id)
        o = 1 - party
        other = self._waiting[o]
        other.append((bundle_id, halves[o]))
        self._bytes[o] += len(halves[o])
        while len(other) > 1 and (len(other) > self._cap or self._bytes[o] > self._max_bytes):
            dropped, half = other.popleft()
            self._bytes[o] -= len(half)
            log.warning("dropping bundle %d for server %d: it has not fetched its bundles", dropped, o)
        return bundle_id, halves[party]

    def waiting(self, party: int) -> int:
        return len(self._waiting[party])

    def waiting_bytes(self, party: int) -> int:
        return self._bytes[party]


class BatchBook:
    """Dealer side: bundles for a batch of several inputs, made when server_a asks for one.

    A batch bundle is as large as that many bundles, so none is kept ready: server_a asks for the
    batch size its request holds, gets its half and a fresh id (from a ledger of its own, so the
    one-input bundles' ids are never skipped), and announces the id to server_b, which asks for its
    half of that id once. server_a runs one session at a time, so a half older than the newest has
    lost its session: at most `cap` (1) halves wait for server_b, the oldest dropped beyond that.
    """

    def __init__(self, make: Callable[[int, int], tuple[Any, Any]], ledger: IdLedger, cap: int = 1) -> None:
        self._make = make
        self._ledger = ledger
        self._cap = cap
        self._waiting: dict[int, Any] = {}

    def make(self, batch: int) -> tuple[int, Any]:
        """A new batch bundle: (id, server_a's half); server_b's half waits for `take(id)`."""
        bundle_id = self._ledger.next()
        half_a, half_b = self._make(bundle_id, batch)
        self._waiting[bundle_id] = half_b
        while len(self._waiting) > self._cap:
            dropped = min(self._waiting)
            del self._waiting[dropped]
            log.warning("dropping batch bundle %d for server_b: it did not ask for it", dropped)
        return bundle_id, half_a

    def take(self, bundle_id: int) -> Any:
        """server_b's half of batch bundle `bundle_id`, once."""
        half = self._waiting.pop(bundle_id, None)
        if half is None:
            raise RandomnessError(f"the dealer holds no half of batch bundle {bundle_id} for server_b (handed out "
                                  "already, dropped, or made before the dealer restarted)")
        return half

    def waiting(self) -> int:
        return len(self._waiting)


@dataclass(frozen=True)
class Ready:
    """A bundle ready for use: its id, the dealer run it belongs to, and the party's half."""

    bundle_id: int
    epoch: str
    bundle: Any
    dealer_seconds: float = 0.0  # the dealer's time to make this bundle (both halves)
    nbytes: int = 0  # what the dealer sent this party for it


class _Worker:
    """A daemon thread running `self._work` with a condition and a stop flag: start, stop, errors."""

    def __init__(self, name: str, stop_timeout: float) -> None:
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._last_error: str | None = None
        self._stop_timeout = stop_timeout
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)

    def _work(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(self._stop_timeout if timeout is None else timeout)


class BundleQueue(_Worker):
    """A bounded queue of ready bundles, refilled by a background thread calling `fetch()`.

    `fetch` runs in that thread only (it may own a socket). Fetch errors are kept and reported
    by `take*` when no bundle arrives in time; the thread retries after `retry` seconds.
    """

    def __init__(self, fetch: Callable[[], Ready], depth: int, owner: str, retry: float = 1.0,
                 idle: threading.Event | None = None) -> None:
        if depth < 1:
            raise ValueError("bundle queue depth must be at least 1")
        self._fetch = fetch
        self.depth = depth
        self.owner = owner
        self._retry = retry
        self._idle = idle
        self._items: deque[Ready] = deque()
        super().__init__(f"{owner}-bundles", stop_timeout=5.0)

    def _work(self) -> None:
        self._refill()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def last_error(self) -> str | None:
        """Why the last fetch failed (None after a success)."""
        return self._last_error

    def starved(self) -> bool:
        """Nothing queued and the last fetch failed: no bundle is on its way."""
        with self._cond:
            return not self._items and self._last_error is not None

    def take_next(self, timeout: float) -> Ready:
        """The oldest ready bundle (server_a); waits up to `timeout`, never proceeds without one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._items:
                self._wait(deadline, timeout, "no bundle")
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def take(self, bundle_id: int, timeout: float) -> Ready:
        """Bundle `bundle_id` (server_b): older ones are dropped; a newer head means it is gone."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                while self._items and self._items[0].bundle_id < bundle_id:
                    self._items.popleft()  # server_a skipped it (restart); it is never used
                    self._cond.notify_all()
                if self._items:
                    head = self._items[0]
                    if head.bundle_id > bundle_id:
                        raise RandomnessError(f"{self.owner} no longer holds bundle {bundle_id} (lost when it "
                                              "restarted, or dropped by the dealer while it was not fetching); "
                                              "server_a uses its next one")
                    self._cond.notify_all()
                    return self._items.popleft()
                self._wait(deadline, timeout, f"no bundle {bundle_id}")

    def _wait(self, deadline: float, timeout: float, what: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0 or self._stop.is_set():
            why = f" (last fetch failed: {self._last_error})" if self._last_error else ""
            raise RandomnessError(f"{self.owner} had {what} ready within {timeout:g} s{why}; "
                                  "check that the dealer is running")
        self._cond.wait(left)

    def _refill(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while len(self._items) >= self.depth and not self._stop.is_set():
                    self._cond.wait()
            if not _wait_idle(self._idle, self._stop):
                return
            try:
                item = self._fetch()
            except Exception as e:  # noqa: BLE001 - the thread must survive a failed fetch
                if self._stop.is_set():
                    return  # shutting down: the socket may be gone
                with self._cond:
                    self._last_error = str(e)
                    self._cond.notify_all()
                log.warning("%s: bundle fetch failed: %s", self.owner, e)
                self._stop.wait(self._retry)
                continue
            with self._cond:
                self._last_error = None
                self._items.append(item)
                self._cond.notify_all()


def _wait_idle(idle: threading.Event | None, stop: threading.Event) -> bool:
    """Wait until no session is online; False once `stop` is set."""
    while not stop.is_set():
        if idle is None or idle.wait(0.2):
            return not stop.is_set()
    return False


@dataclass(frozen=True)
class Prepared:
    """A bundle with this party's randomness already expanded (`rands`) and the time that took."""

    ready: Ready
    rands: Any
    seconds: float

    @property
    def bundle_id(self) -> int:
        return self.ready.bundle_id


class PrepareAhead(_Worker):
    """The next bundle of `queue`, prepared in a background thread with `prepare(bundle)`.

    One prepared bundle is kept (it is as large as the expanded randomness of a whole inference).
    `take_next` (server_a) and `take(bundle_id)` (server_b) hand it out and clear `idle`: the caller
    is going online, and must set `idle` again when its session ends; the thread then prepares the
    next one. A failed preparation loses that bundle (it is never used) and is reported by the next
    `take*` that times out.
    """

    def __init__(self, queue: BundleQueue, prepare: Callable[[Any], Any], idle: threading.Event | None = None,
                 owner: str = "server") -> None:
        self._queue = queue
        self._prepare = prepare
        self._idle = idle
        self.owner = owner
        self._slot: Prepared | None = None
        self._preparing = False  # a bundle taken from the queue is being expanded
        super().__init__(f"{owner}-prepare", stop_timeout=30.0)

    def _work(self) -> None:
        self._run()

    def hold(self, timeout: float = 600.0) -> None:
        """A session goes online without a bundle of this queue (a batch): clear `idle` and wait for a
        preparation under way to finish, so that none runs beside the session. The caller sets `idle`
        again when its session ends."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._idle is not None:
                self._idle.clear()
            while self._preparing and not self._stop.is_set() and time.monotonic() < deadline:
                self._cond.wait(0.5)

    @property
    def ready(self) -> bool:
        """Whether a prepared bundle is waiting."""
        with self._cond:
            return self._slot is not None

    def take_next(self, timeout: float) -> Prepared:
        """The prepared bundle (server_a); waits up to `timeout`, never proceeds without one."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._slot is None:
                self._wait(deadline, timeout, "prepared bundle")
            return self._pop()

    def take(self, bundle_id: int, timeout: float) -> Prepared:
        """Bundle `bundle_id` prepared (server_b): older ones are dropped; a newer one means it is gone."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._slot is not None and self._slot.bundle_id < bundle_id:
                    log.info("%s: dropping prepared bundle %d, server_a skipped it", self.owner, self._slot.bundle_id)
                    self._pop(online=False)
                    continue
                if self._slot is not None:
                    if self._slot.bundle_id > bundle_id:
                        raise RandomnessError(f"{self.owner} no longer holds bundle {bundle_id} (lost when it "
                                              "restarted, or dropped by the dealer while it was not fetching); "
                                              "server_a uses its next one")
                    return self._pop()
                self._wait(deadline, timeout, f"bundle {bundle_id} prepared")

    def _pop(self, online: bool = True) -> Prepared:
        item = self._slot
        assert item is not None
        self._slot = None
        if online and self._idle is not None:
            self._idle.clear()  # under the lock: the thread sees the session before it sees the free slot
        self._cond.notify_all()
        return item

    def _wait(self, deadline: float, timeout: float, what: str) -> None:
        left = deadline - time.monotonic()
        if not self._preparing and self._queue.starved():  # nothing coming: fail now, not at the deadline
            raise RandomnessError(f"{self.owner} has no bundle ready and the dealer cannot be reached (last "
                                  f"failure: {self._queue.last_error}); requests are served again once it is back")
        if left <= 0 or self._stop.is_set():
            last = self._last_error or self._queue.last_error
            why = f" (last failure: {last})" if last else ""
            raise RandomnessError(f"{self.owner} had no {what} within {timeout:g} s{why}; "
                                  "check that the dealer is running")
        self._cond.wait(min(left, 0.5))

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while self._slot is not None and not self._stop.is_set():
                    self._cond.wait()
            if not _wait_idle(self._idle, self._stop):
                return
            try:
                ready = self._queue.take_next(1.0)
            except RandomnessError:
                continue  # nothing fetched yet; the queue keeps the reason
            with self._cond:
                self._preparing = True
            t0 = time.perf_counter()
            try:
                rands = self._prepare(ready.bundle)
            except Exception as e:  # noqa: BLE001 - a bad bundle must not stop the server
                with self._cond:
                    self._preparing = False
                    self._last_error = f"bundle {ready.bundle_id} could not be prepared: {e}"
                    self._cond.notify_all()
                log.warning("%s: %s", self.owner, self._last_error)
                continue
            with self._cond:
                self._preparing = False
                self._last_error = None
                self._slot = Prepared(ready, rands, time.perf_counter() - t0)
                self._cond.notify_all()
