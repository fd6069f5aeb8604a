"""A one-line progress bar for a terminal: percentage, bytes, rate and ETA."""

from __future__ import annotations

import shutil
import sys
import time
from collections import deque
from typing import TextIO

_UNITS = ("B", "kB", "MB", "GB", "TB")


def format_bytes(n: float) -> str:
    """Decimal units, as the service's sizes are: 45.7 MB."""
    for unit in _UNITS:
        if abs(n) < 1000 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """Call it with (done, total) as bytes move; it redraws at most ``fps`` times a second."""

    def __init__(self, label: str, stream: TextIO | None = None, fps: float = 10.0) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.interval = 1.0 / fps
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._samples: deque[tuple[float, int]] = deque()
        self._done = 0
        self._total = 0
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        self._done, self._total = done, total
        now = time.monotonic()
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > 3.0:
            self._samples.popleft()
        if now - self._last_draw >= self.interval or done >= total:
            self._last_draw = now
            self._draw(now)

    def _rate(self, now: float) -> float:
        t0, d0 = self._samples[0]
        if now - t0 <= 0.2:
            elapsed = now - self.started
            return self._done / elapsed if elapsed > 0 else 0.0
        return (self._done - d0) / (now - t0)

    def _draw(self, now: float) -> None:
        done, total = self._done, self._total
        rate = self._rate(now)
        frac = done / total if total else 1.0
        eta = format_duration((total - done) / rate) if rate > 0 and done < total else "--:--"
        if done >= total:
            eta = format_duration(now - self.started)
        tail = f" {frac * 100:5.1f}% {format_bytes(done)}/{format_bytes(total)} {format_bytes(rate)}/s {eta}"
        width = shutil.get_terminal_size((80, 20)).columns - 1
        label = self.label[: max(10, width // 3)]
        bar_width = max(5, width - len(label) - len(tail) - 4)
        filled = int(bar_width * frac)
        line = f"{label} [{'#' * filled}{'.' * (bar_width - filled)}]{tail}"
        self.stream.write("\r" + line[:width])
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
