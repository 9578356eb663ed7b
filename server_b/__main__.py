"""server_b's entry point: `python -m secdfd.server_b` (also `secdfd-server --party b`).

Its container configuration is server.env in this folder (environment variables SECDFD_SERVER_*),
which the compose file uses (`secdfd up` passes options instead); options on the command line take
precedence.
"""

from __future__ import annotations

from secdfd.common.cli.server import server_command
from secdfd.server_b.follower import Follower

main = server_command(Follower)

if __name__ == "__main__":
    main()
