"""Bar charts as inline SVG geometry, computed here so the page needs no chart library."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bar:
    label: str
    value: int
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: list[Bar]
    label_width: int = 0


def horizontal(items: list[tuple[str, int]], width: int = 520, row: int = 26, label_width: int = 170) -> Chart:
    """One bar per (label, value), longest first as given; bars scale to the largest value."""
    top = max((v for _, v in items), default=0) or 1
    room = width - label_width - 60  # the value is written after the bar
    bars = [Bar(label, value, label_width, i * row + 4, max(room * value / top, 1 if value else 0), row - 8)
            for i, (label, value) in enumerate(items)]
    return Chart(width, max(len(items), 1) * row, bars, label_width)


def columns(items: list[tuple[str, int]], width: int = 720, height: int = 180) -> Chart:
    """One column per (label, value), left to right, with room below for labels."""
    top = max((v for _, v in items), default=0) or 1
    plot = height - 36
    step = width / max(len(items), 1)
    bars = []
    for i, (label, value) in enumerate(items):
        h = plot * value / top
        bars.append(Bar(label, value, i * step + 2, 14 + plot - h, step - 4, h))
    return Chart(width, height, bars)
