"""Progress that fits where it runs: a bar on a terminal, a line per milestone elsewhere.

A bar redrawn at every step is what a person at a terminal wants; written into a file or a CI log, the
same redraws become hundreds of kilobytes of lines. So the bar is drawn only when the stream is a
terminal and tqdm is installed. Everywhere else only :meth:`Progress.line` output appears: one line per
finished unit of work worth reading later (a batch size, say).

``FASTSGD_PROGRESS`` overrides the choice: ``bar``, ``lines`` or ``off``.
"""
from __future__ import annotations

import os
import sys
from typing import IO, Optional

MODES = ("bar", "lines", "off")


def progress_mode(stream: IO, enabled: bool = True) -> str:
    """'bar', 'lines' or 'off' for ``stream``: the environment's choice, else a bar on a terminal."""
    if not enabled:
        return "off"
    forced = os.environ.get("FASTSGD_PROGRESS", "").strip().lower()
    if forced:
        if forced not in MODES:
            raise ValueError(f"FASTSGD_PROGRESS={forced!r}: expected one of {', '.join(MODES)}")
        return forced
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


class Progress:
    """A progress bar over ``total`` units, or plain lines where a bar does not belong.

    status(text):  transient detail (shown in the bar only)
    grow(n):       n more units of work became known
    advance(n):    n more units done (bar only)
    line(text):    a lasting line; with a bar it is printed only when ``always`` is set (the bar already
                   shows the same), so terminal users are not flooded
    """

    def __init__(self, total: int, *, unit: str, enabled: bool = True, stream: Optional[IO] = None,
                 desc: str = ""):
        self.stream = sys.stderr if stream is None else stream
        self.mode = progress_mode(self.stream, enabled)
        self.bar = None
        if self.mode == "bar":
            try:
                from tqdm import tqdm
            except ImportError:
                self.mode = "lines"
            else:
                self.bar = tqdm(total=total, unit=unit, desc=desc or None, file=self.stream, dynamic_ncols=True)

    def status(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def grow(self, n: int) -> None:
        """``n`` more units of work became known (the total is not always known up front)."""
        if self.bar is not None and n:
            self.bar.total += n
            self.bar.refresh()

    def advance(self, n: int = 1) -> None:
        if self.bar is not None and n:
            self.bar.update(n)

    def line(self, text: str, *, always: bool = False) -> None:
        if self.mode == "off":
            return
        if self.bar is None:
            print(text, file=self.stream, flush=True)
        elif always:
            self.bar.write(text, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
