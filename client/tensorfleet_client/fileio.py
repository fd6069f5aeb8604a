"""Writing received bytes into a part file at their place."""

from __future__ import annotations

import errno
import os


def write_at(fd: int, data, pos: int) -> None:
    """All of ``data`` into ``fd`` at ``pos``.

    ``pwrite`` may write less than it was given (a signal, a file system near
    full): what is left is written by the next call, which raises if the disk
    is out of room, rather than being lost from the middle of a file whose
    length says it is complete.
    """
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, pos)
        if not written:
            # Not a regular file's answer to a non-empty write; going round again would never end.
            raise OSError(errno.EIO, f"pwrite wrote nothing of {len(view)} bytes at offset {pos}")
        view = view[written:]
        pos += written
