"""The roster: who the parties are, where they listen by default, and what the verdict means.

One list for every module that names a party, a port or the threshold, so none of them drifts:

- `PARTIES`: every party that holds a key (dealer, server_a, server_b, client);
- `PROCESSES`: the long-running processes of a deployment (dealer, server_a, server_b);
- `SERVERS`: the two compute servers, in party order (party 0 = server_a, the leader; party 1 =
  server_b, the follower);
- `PORTS` and `endpoint()`: the default TCP ports (dealer 7300, server_a 7301, server_b 7302, and
  7310 between the servers, bound by server_a);
- `THRESHOLD` and `verdict()`: a fused fake probability at or above 0.5 is "fake".
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

DEALER: Final = "dealer"
SERVER_A: Final = "server_a"
SERVER_B: Final = "server_b"
CLIENT: Final = "client"

PARTIES: Final = (DEALER, SERVER_A, SERVER_B, CLIENT)
PROCESSES: Final = (DEALER, SERVER_A, SERVER_B)
SERVERS: Final = (SERVER_A, SERVER_B)


@dataclass(frozen=True)
class Server:
    """One compute server: its party index, the `--party` letter and the module that runs it."""

    name: str
    role: int  # 0: server_a, 1: server_b
    letter: str
    module: str  # `python -m MODULE` starts it

    @property
    def peer(self) -> str:
        return SERVERS[1 - self.role]


SERVER_ROLES: Final = MappingProxyType({
    "a": Server(SERVER_A, 0, "a", "secdfd.server_a"),
    "b": Server(SERVER_B, 1, "b", "secdfd.server_b"),
})

# Default TCP ports; `peer` is server_a's server-to-server endpoint.
PORTS: Final = MappingProxyType({DEALER: 7300, SERVER_A: 7301, SERVER_B: 7302, "peer": 7310})
LOOPBACK: Final = "127.0.0.1"


def server(name_or_letter: str) -> Server:
    """The server called `server_a`/`server_b` or `a`/`b`."""
    for s in SERVER_ROLES.values():
        if name_or_letter in (s.name, s.letter):
            return s
    raise ValueError(f"unknown server {name_or_letter!r}; servers are {', '.join(SERVERS)}")


def endpoint(name: str, host: str = LOOPBACK) -> str:
    """The default endpoint of a listening party (`dealer`, `server_a`, `server_b` or `peer`)."""
    return f"tcp://{host}:{PORTS[name]}"


THRESHOLD: Final = 0.5  # p_fake >= THRESHOLD is a "fake" verdict


def verdict(p_fake: float) -> str:
    """"fake" or "real" for a fused fake probability."""
    return "fake" if p_fake >= THRESHOLD else "real"
