"""server_a's entry point: `python -m secdfd.server_a` (also `secdfd-server --party a`).

Its container configuration is server.env in this folder (environment variables SECDFD_SERVER_*),
which the compose file uses (`secdfd up` passes options instead); options on the command line take
precedence.
"""

from __future__ import annotations

from secdfd.common.cli.server import server_command
from secdfd.server_a.leader import Leader

main = server_command(Leader)

if __name__ == "__main__":
    main()
