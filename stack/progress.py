"""One progress line for long-running commands, readable on a terminal and in a log.

On a terminal the line is redrawn in place (``\\r``) at most every ``tty_every``
seconds. When the stream is not a terminal (CI logs, ``| tee``, a file), ``\\r``
would glue every update into one unreadable line: there each update that is
shown becomes its own line, at most every ``log_every`` seconds. The final
update is always shown and ends the line.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["ProgressLine"]


class ProgressLine:
    def __init__(self, stream: TextIO | None = None, *, tty_every: float = 0.5,
                 log_every: float = 10.0) -> None:  # fmt: skip
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.every = tty_every if self.tty else log_every
        self._last: float | None = None
        self._width = 0

    def update(self, text: str | Callable[[], str], *, final: bool = False) -> bool:
        """Show ``text`` if it is time to (always when ``final``); True when shown.
        A callable is called only then, so a hot loop pays nothing between lines."""
        now = time.monotonic()
        if not (final or self._last is None or now - self._last >= self.every):
            return False
        self._last = now
        if callable(text):
            text = text()
        if self.tty:
            pad = " " * max(self._width - len(text), 0)  # wipe a longer previous line
            self.stream.write(f"\r{text}{pad}" + ("\n" if final else ""))
            self._width = 0 if final else len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        return True
