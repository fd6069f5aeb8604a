"""Byte ranges (RFC 9110 section 14): parsing ``Range`` and shaping the answer.

A malformed header is ignored (the whole file is served), as the RFC requires;
a well-formed one whose ranges all lie past the end is unsatisfiable (416).
Overlapping or adjacent ranges are coalesced, and more than MAX_RANGES ranges
are refused as excessive, so a request can never ask for more bytes than the
file holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_RANGES = 100

_SPEC_RE = re.compile(r"^[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)[ \t]*$")
# Positions beyond this are "past any file": parsing 5000 digits is refused by
# int() (and pointless), so longer numbers are read as this.
_HUGE = 10**19


def _number(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 19 else _HUGE


@dataclass(frozen=True)
class ByteRange:
    start: int  # first byte
    end: int  # last byte, inclusive, as in Content-Range

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


class Unsatisfiable(Exception):
    """No requested range overlaps the file, or too many were asked for (416)."""


def parse(header: str | None, size: int) -> list[ByteRange] | None:
    """The ranges to serve, or None to serve the whole file.

    Raises Unsatisfiable for a valid header that selects nothing.
    """
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = spec.split(",")
    if len(parts) > MAX_RANGES:
        raise Unsatisfiable(f"more than {MAX_RANGES} ranges")
    wanted: list[ByteRange] = []
    for part in parts:
        if not part.strip():
            continue  # RFC 9110 allows empty list elements
        m = _SPEC_RE.match(part)
        if not m:
            return None
        first, last = m.groups()
        if first == "" and last == "":
            return None
        if first == "":
            suffix = _number(last)
            if suffix == 0:
                continue
            if size == 0:
                # Satisfiable (RFC 9110 14.1.1) yet selecting no bytes, which
                # Content-Range cannot express: answer with the whole, empty file.
                return None
            wanted.append(ByteRange(max(0, size - suffix), size - 1))
            continue
        start = _number(first)
        if last != "" and _number(last) < start:
            return None  # invalid syntax, not merely unsatisfiable
        if start >= size:
            continue
        end = size - 1 if last == "" else min(_number(last), size - 1)
        wanted.append(ByteRange(start, end))
    if not wanted:
        # A header with no range-spec at all ("bytes=,") is malformed, not unsatisfiable.
        if not any(p.strip() for p in parts):
            return None
        raise Unsatisfiable("no requested range overlaps the file")
    return coalesce(wanted)


def coalesce(ranges: list[ByteRange]) -> list[ByteRange]:
    """Merge overlapping and adjacent ranges, keeping the first one's position.

    Ranges that do not touch keep the order the client asked for.
    """
    if len(ranges) == 1:
        return ranges
    merged: list[ByteRange] = []
    for r in ranges:
        for i, m in enumerate(merged):
            if r.start <= m.end + 1 and m.start <= r.end + 1:
                merged[i] = ByteRange(min(m.start, r.start), max(m.end, r.end))
                break
        else:
            merged.append(r)
    # One merge can make earlier survivors touch; repeat until stable.
    return merged if len(merged) == len(ranges) else coalesce(merged)
