"""Overlapping storage reads with socket writes.

``prefetch`` runs the storage reader one step ahead in its own task, so the
next chunk is being fetched from the database (or disk) while the previous one
is being sent. The queue is bounded, so a slow client holds at most ``depth``
pieces in memory; closing the iterator cancels the producer, which closes the
reader (and with it the database cursor) at once.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

_DONE = object()


class _Failed:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc


async def prefetch(source: AsyncIterator[bytes], depth: int = 2) -> AsyncIterator[bytes]:
    queue: asyncio.Queue = asyncio.Queue(maxsize=depth)

    async def produce() -> None:
        try:
            async for piece in source:
                await queue.put(piece)
            await queue.put(_DONE)
        except Exception as e:
            await queue.put(_Failed(e))
        finally:
            await source.aclose()

    producer = asyncio.create_task(produce())
    try:
        while True:
            piece = await queue.get()
            if piece is _DONE:
                return
            if isinstance(piece, _Failed):
                raise piece.exc
            yield piece
    finally:
        producer.cancel()
        try:
            await producer
        except asyncio.CancelledError:
            # Swallow the producer's cancellation, never our own.
            if asyncio.current_task().cancelling():
                raise
