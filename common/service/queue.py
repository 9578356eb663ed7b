"""The requests a server holds: bounded per client and in total, served fairly across clients.

A client sends one share of its image to each server under one session id. Each server keeps its
share here until the session runs. The bounds are what one hostile client cannot exceed: at most
`per_client` requests of one key and `total` requests in all wait; beyond that the request is
refused at once with Busy ("busy, retry"), never dropped in silence and never kept without limit.

server_a (the leader) marks a request as paired when server_b announces that it holds the other
share (`have`); only paired requests run, so no bundle is claimed and no server waits for a share
that has not arrived. The next request to run is the oldest paired one of the client served least
recently (round robin over keys), so one client's queue delays another client's request by at most
the inference that is running.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from secdfd.common.errors import Busy
from secdfd.common.net.transport import Request

Ticket = tuple[bytes, str]  # (client key, client session id): a client can only name its own requests


@dataclass
class Entry:
    """One held request."""

    request: Request
    since: float = field(default_factory=time.monotonic)
    paired: bool = False  # server_a: server_b holds the other share
    peer_crops: int = 0  # server_a: how many crops server_b's share holds (its `have` says)

    @property
    def ticket(self) -> Ticket:
        return self.request.key, self.request.message.sid


class RequestQueue:
    """Held requests of one server (see the module docstring)."""

    def __init__(self, owner: str, per_client: int, total: int, announced_cap: int | None = None) -> None:
        if per_client < 1 or total < per_client:
            raise ValueError("need 1 <= per_client <= total")
        self.owner = owner
        self.per_client = per_client
        self.total = total
        self._entries: OrderedDict[Ticket, Entry] = OrderedDict()
        # server_a: tickets server_b announced before this server got its own share (bounded)
        self._announced: OrderedDict[Ticket, tuple[float, int]] = OrderedDict()  # -> (when, crops)
        self._announced_cap = announced_cap or 2 * total
        self._served: dict[bytes, int] = {}  # client key -> when it was last served (a counter)
        self._clock = itertools.count(1)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, ticket: Ticket) -> bool:
        return ticket in self._entries

    def add(self, req: Request) -> Entry:
        """Hold `req`; Busy if its client or the server is at its bound (nothing is held then)."""
        ticket = (req.key, req.message.sid)
        if ticket in self._entries:
            raise Busy(f"{self.owner} already holds this request; wait for its answer")
        mine = sum(1 for t in self._entries if t[0] == req.key)
        if mine >= self.per_client:
            raise Busy(f"{self.owner} is busy: this client has {mine} requests waiting (at most "
                       f"{self.per_client}); retry when one is answered")
        if len(self._entries) >= self.total:
            raise Busy(f"{self.owner} is busy: {len(self._entries)} requests are waiting (at most {self.total}); "
                       "retry in a few seconds")
        entry = Entry(req)
        announced = self._announced.pop(ticket, None)
        if announced is not None:
            entry.paired, entry.peer_crops = True, announced[1]
        self._entries[ticket] = entry
        return entry

    def pop(self, ticket: Ticket) -> Entry | None:
        return self._entries.pop(ticket, None)

    def restore(self, entry: Entry) -> None:
        """Hold a popped request again, in its old place (a session for it could not start)."""
        self._entries[entry.ticket] = entry
        self._entries.move_to_end(entry.ticket, last=False)

    def has_ready(self) -> bool:
        """Whether a paired request waits (the leader then does not sleep between polls)."""
        return any(e.paired for e in self._entries.values())

    def announce(self, ticket: Ticket, crops: int = 1) -> None:
        """server_a: server_b holds its share of `ticket`, of `crops` crops (before or after this
        server got its own)."""
        entry = self._entries.get(ticket)
        if entry is not None:
            entry.paired, entry.peer_crops = True, crops
            return
        self._announced[ticket] = (time.monotonic(), crops)
        while len(self._announced) > self._announced_cap:
            self._announced.popitem(last=False)

    def unpair_all(self) -> list[Entry]:
        """server_b lost every share it held (it restarted): the paired requests cannot run. Removes
        and returns them."""
        self._announced.clear()
        lost = [e for e in self._entries.values() if e.paired]
        for e in lost:
            del self._entries[e.ticket]
        return lost

    def next_ready(self) -> Entry | None:
        """The next paired request to run (fair across clients), removed from the queue."""
        best: Entry | None = None
        for e in self._entries.values():  # oldest first
            if e.paired and (best is None or self._last(e) < self._last(best)):
                best = e
        if best is not None:
            del self._entries[best.ticket]
            self._served[best.request.key] = next(self._clock)
        return best

    def _last(self, e: Entry) -> int:
        """When `e`'s client was last served (0: never)."""
        return self._served.get(e.request.key, 0)

    def expired(self, unpaired_after: float, after: float) -> list[Entry]:
        """Requests held too long (unpaired ones after `unpaired_after` seconds, any after `after`),
        removed and returned."""
        now = time.monotonic()
        old = [e for e in self._entries.values()
               if now - e.since > after or (not e.paired and now - e.since > unpaired_after)]
        for e in old:
            del self._entries[e.ticket]
        cutoff = now - unpaired_after
        for t, (when, _) in list(self._announced.items()):
            if when < cutoff:
                del self._announced[t]
        return old
