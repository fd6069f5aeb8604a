"""Where an upload's bytes are hashed and stored: threads beside the event loop.

The loop only receives. Pieces are collected, without copying, into batches of
BATCH bytes; while threads hash one batch (hashlib releases the GIL for
updates over 2047 bytes) and store it, the loop receives the next. At most one
batch per upload is in the threads' hands, so an upload holds about two
batches of memory besides what aiohttp buffers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from concurrent.futures import ThreadPoolExecutor

# A 256 MB PUT on the project's 2-core machine (shared, so noisy), medians over uploads
# alternating between sizes: 512 KiB 326 MB/s (12), 1 MiB 328 (24), 2 MiB 321 (24),
# 4 MiB 207 (12), 8 MiB 199 (12). A batch the threads take while it is still in the CPU's
# cache beats fewer hand-offs; and 8 concurrent uploads hold less.
BATCH = 1024 * 1024

# Hashing and storing one batch of each upload in flight: two threads per core keep
# every core busy while a thread waits for the disk.
threads = ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 2), thread_name_prefix="upload")


def hash_pieces(running, pieces: list[bytes]) -> None:
    for piece in pieces:
        running.update(piece)


def write_pieces(fd: int, pieces: list[bytes], offset: int) -> None:
    """Write the pieces at ``offset`` without joining them (pwritev may write less than asked)."""
    while pieces:
        written = os.pwritev(fd, pieces[:_IOV_MAX], offset)
        if not written:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += written
        while pieces and written >= len(pieces[0]):
            written -= len(pieces[0])
            pieces = pieces[1:]
        if written:
            pieces = [memoryview(pieces[0])[written:], *pieces[1:]]


_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024

# sync_file_range(2), which Python's os module lacks: it starts the writeback of a
# range without waiting for it, so the fsync at commit waits for little.
_SYNC_FILE_RANGE_WRITE = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if os.name == "posix" else None
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing [offset, offset+length) to disk; a no-op where it cannot."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # failure only means a longer fsync
