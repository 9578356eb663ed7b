"""The client's entry point: `python -m secdfd.client` is `secdfd-client`."""

from __future__ import annotations

from secdfd.client.main import main

if __name__ == "__main__":
    main()
