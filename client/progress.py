"""A one-line progress bar on a terminal: `[#######.......]  7/20  35%  1.2 s/file  name`.

Drawn on `stream` (stderr) only when it is a terminal; elsewhere (a pipe, a file, a CI log) every
call is a no-op, so output meant for programs stays clean. Lines printed through `echo` appear
above the bar, which is redrawn below them.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

WIDTH = 24  # characters of the bar itself


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool | None = None,
                 out: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.out = out
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.done = 0
        self.t0 = time.monotonic()
        self.shown = False
        self.current = ""

    def line(self, current: str = "") -> str:
        """The bar as text, fitted to the terminal's width."""
        frac = self.done / self.total if self.total else 1.0
        filled = round(WIDTH * frac)
        rate = f"  {(time.monotonic() - self.t0) / self.done:.1f} s/file" if self.done else ""
        text = f"[{'#' * filled}{'.' * (WIDTH - filled)}] {self.done:>{len(str(self.total))}}/{self.total} " \
               f"{frac:4.0%}{rate}"
        if current:
            text += f"  {current}"
        cols = shutil.get_terminal_size((80, 24)).columns - 1
        return text if len(text) <= cols else text[:max(0, cols - 3)] + "..."

    def show(self, current: str | None = None) -> None:
        """Draw the bar (with the file now being worked on; by default the last one named)."""
        if current is not None:
            self.current = current
        if self.enabled:
            self.stream.write("\r\x1b[2K" + self.line(self.current))
            self.stream.flush()
            self.shown = True

    def advance(self, current: str = "") -> None:
        """One more file done; `current` names the next one."""
        self.done += 1
        self.show(current)

    def clear(self) -> None:
        if self.enabled and self.shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self.shown = False

    def echo(self, text: str, err: bool = False) -> None:
        """Print a line (to stdout, or to the bar's stream with `err`) without breaking the bar."""
        was = self.shown
        self.clear()
        target = self.stream if err else (self.out if self.out is not None else sys.stdout)
        target.write(text + "\n")
        target.flush()
        if was:
            self.show()

    def close(self) -> None:
        """Remove the bar, leaving the terminal as it was."""
        self.clear()
