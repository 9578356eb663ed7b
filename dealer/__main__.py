"""The dealer's entry point: `python -m secdfd.dealer` is `secdfd-dealer`."""

from __future__ import annotations

from secdfd.dealer.main import main

if __name__ == "__main__":
    main()
