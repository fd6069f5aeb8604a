"""Bounds on how long a test, or one wait inside it, may take: a test that hangs fails instead."""

from __future__ import annotations

import asyncio
import functools
import time

import psutil


def bounded(seconds: float):
    """Decorate an async test so that it fails after ``seconds`` rather than hang."""
    def decorate(test):
        @functools.wraps(test)
        async def run(*args, **kwargs):
            async with asyncio.timeout(seconds):
                return await test(*args, **kwargs)

        return run

    return decorate


def listening_children(pid: int, port: int, count: int, timeout: float = 30.0) -> list[psutil.Process]:
    """The child processes of ``pid`` listening on ``port``, once ``count`` of them are (the workers of
    one service); AssertionError if that takes longer than ``timeout`` or ``pid`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        parent = psutil.Process(pid)
        listening = [c for c in parent.children()
                     if any(conn.laddr.port == port and conn.status == psutil.CONN_LISTEN
                            for conn in c.net_connections("tcp"))]
        if len(listening) >= count:
            return listening
        assert parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE, f"process {pid} exited"
        assert time.monotonic() < deadline, f"{len(listening)} of {count} workers listening on {port} after {timeout} s"
        time.sleep(0.1)
