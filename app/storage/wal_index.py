"""Whether an SQLite database in WAL mode has had a commit, told without a statement.

Every commit, by any connection of any process, rewrites the WAL-index header
at the start of the database's ``-shm`` file (https://www.sqlite.org/walformat.html,
"The WAL-Index Header"): its change counter, the last valid frame, the salts.
SQLite writes the header's second copy, then the first; a reader that finds the
two copies equal holds one header, as SQLite's own readers do. Equal headers at
two times mean no commit in between; anything else (copies that differ, a
header not yet initialised, a file too short) answers None: "look for real".

Reading 96 bytes of a shared mapping costs a fraction of a microsecond; the
shortest statement costs microseconds (a read transaction takes and drops
locks on the same file). SQLite truncates the file only when the first
connection opens the database, so it is mapped only while the caller keeps a
connection open.
"""

from __future__ import annotations

import mmap
import os

_HEADER = 48  # bytes of one copy of the header
_IS_INIT = 12  # its isInit byte: 0 until a connection has built the index


class WalIndexHeader:
    """The WAL-index header of the database at ``path``, readable while a connection to it is open."""

    def __init__(self, path: str) -> None:
        fd = os.open(f"{path}-shm", os.O_RDONLY)
        try:
            self._map: mmap.mmap | None = mmap.mmap(fd, 2 * _HEADER, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def current(self) -> bytes | None:
        """The header as it stands, or None when it cannot be read whole right now."""
        m = self._map
        if m is None:
            return None
        first = m[:_HEADER]
        second = m[_HEADER:2 * _HEADER]
        return first if first == second and first[_IS_INIT] else None

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def open_header(path: str) -> WalIndexHeader | None:
    """The header of ``path``'s WAL index, or None if it has none to map (not in WAL mode, not built yet)."""
    try:
        return WalIndexHeader(path)
    except (OSError, ValueError):
        return None
