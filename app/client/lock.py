"""An inter-process file lock (``flock``) that asyncio code can wait on.

``flock`` locks belong to an open file description, so two processes, two
threads or two tasks of one process that each open the path exclusively wait
for each other. The kernel drops the lock when its holder dies, however it
dies, so a killed process never leaves a stale lock behind.

Waiting polls with ``LOCK_NB`` instead of blocking a thread in ``flock``: a
poll can be cancelled like any other await. A lock file may be removed by the
holder (``release(unlink=True)``); whoever was waiting on the removed file
notices that the path no longer names the file it locked, and starts over.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path


class LockTimeout(TimeoutError):
    pass


class FileLock:
    def __init__(self, path: str | os.PathLike[str], poll: float = 0.05) -> None:
        self.path = Path(path)
        self.poll = poll
        self.fd: int | None = None

    @property
    def locked(self) -> bool:
        return self.fd is not None

    def _try_once(self) -> bool:
        """Open and lock the path without waiting; True if the lock is now ours."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            if self._same_file(fd):
                self.fd = fd
                return True
            # Removed (and maybe recreated) by the previous holder: not the lock any more.
            os.close(fd)
            return False
        except BaseException:
            if self.fd != fd:
                os.close(fd)
            raise

    def _same_file(self, fd: int) -> bool:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    async def acquire(self, timeout: float | None = None) -> None:
        if self.fd is not None:
            raise RuntimeError(f"{self.path} is already locked by this FileLock")
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = self.poll
        while not self._try_once():
            if deadline is not None and time.monotonic() >= deadline:
                raise LockTimeout(f"timed out waiting for the lock on {self.path}")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def release(self, unlink: bool = False) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if unlink:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
        finally:
            os.close(fd)  # closing drops the flock

    # The lock file doubles as a small state file for whoever holds it.

    def read(self) -> bytes:
        assert self.fd is not None
        size = os.fstat(self.fd).st_size
        return os.pread(self.fd, size, 0) if size else b""

    def write(self, data: bytes) -> None:
        assert self.fd is not None
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    async def __aenter__(self) -> "FileLock":
        await self.acquire()
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()
