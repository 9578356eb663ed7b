"""server_a's entry point: `python -m secdfd.server_a` is `secdfd-server --party a`.

Its configuration is server.env in this folder (environment variables SECDFD_SERVER_*), which the
compose file uses (`secdfd up` passes options instead); options on the command line take precedence.
"""

from __future__ import annotations

import sys

from secdfd.common.service.server import server_main


def main() -> None:
    server_main(["--party", "a", *sys.argv[1:]])


if __name__ == "__main__":
    main()
