"""Reading request bodies within a limit, and the error a stalled body raises."""

from __future__ import annotations

from .. import errors
from ..errors import ApiError


class BodyTimeout(TimeoutError):
    """The client stopped sending a request body the service was waiting for (BODY_TIMEOUT).

    Raised into whatever reads the body (app/connections.py sets it on the
    request's payload), so an upload unwinds as on any other failure and its
    partial file is discarded. A TimeoutError, so aiohttp's lingering read of an
    unfinished body treats it as the end of that body.
    """


async def read_limited(read, what: str, limit: int) -> bytes:
    """Everything ``read(n)`` yields until EOF; 413 once it passes ``limit``.

    Reads at most one byte past the limit, so a chunked body that never ends
    costs no more than that.
    """
    buf = bytearray()
    while True:
        piece = await read(limit + 1 - len(buf))
        if not piece:
            return bytes(buf)
        buf += piece
        if len(buf) > limit:
            raise ApiError(errors.PAYLOAD_TOO_LARGE, f"{what} is larger than {limit} bytes")
