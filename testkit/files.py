"""Random test files written and hashed in blocks, never held whole in memory."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def write_random(path: Path, size: int) -> str:
    """Write `size` random bytes to `path`; return their sha256 hex."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 8 << 20))
            h.update(block)
            f.write(block)
            left -= len(block)
    return h.hexdigest()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()
