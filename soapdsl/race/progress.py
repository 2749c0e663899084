"""A small progress bar on stderr: carriage-return redraws on a terminal, a few plain lines elsewhere."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """One run's progress. ``update(step, **info)`` after each step, ``close(summary)`` at the end.

    On a TTY the bar is redrawn in place (at most ten times a second). When the stream is not a
    terminal (CI, a pipe, a log file) it prints one line at every fifth of the run instead.
    """

    width = 24

    def __init__(self, label: str, total: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.label = label
        self.total = max(1, total)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._next_line = 0
        self._drawn = False
        if enabled and not self.tty:
            self._write(f"{self.label}: {self.total} steps\n")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not stop the race
            self.enabled = False

    def _info(self, info: dict[str, float | None]) -> str:
        parts = []
        for k, v in info.items():
            if v is not None:
                parts.append(f"{k} {v:.3f}")
        return "  ".join(parts)

    def update(self, step: int, **info: float | None) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        elapsed = now - self.start
        if self.tty:
            if now - self._last_draw < 0.1 and step < self.total:
                return
            self._last_draw = now
            filled = int(self.width * step / self.total)
            bar = "#" * filled + "-" * (self.width - filled)
            eta = elapsed / step * (self.total - step) if step else 0.0
            line = f"\r{self.label} |{bar}| {step}/{self.total}  {self._info(info)}  {elapsed:.0f}s<{eta:.0f}s"
            self._write(line + "\x1b[K")
            self._drawn = True
        else:
            if step * 5 >= self._next_line * self.total and step > 0:
                while step * 5 >= self._next_line * self.total:
                    self._next_line += 1
                if step < self.total:
                    self._write(f"{self.label}: {step}/{self.total}  {self._info(info)}  {elapsed:.1f}s\n")

    def close(self, summary: str = "") -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        prefix = "\r" if self.tty and self._drawn else ""
        end = "\x1b[K\n" if self.tty else "\n"
        self._write(f"{prefix}{self.label}: done in {elapsed:.1f}s  {summary}{end}")
