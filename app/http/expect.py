"""``Expect: 100-continue`` (RFC 9110 section 10.1.1), answered only once a request is accepted."""

from __future__ import annotations

from aiohttp import HttpVersion11, web

from .. import errors
from .json import error_response

# Expect: 100-continue. aiohttp answers it before any middleware runs, which
# would invite the body of a request about to be refused (no key, rate
# limited, no such model, too large). Routes that take a body use
# ``defer_expect`` instead, and the handler calls ``invite_body`` once every
# check has passed, right before it reads.
_INVITED = web.RequestKey("body_invited", bool)


def _expects_continue(request: web.BaseRequest) -> bool:
    return request.version >= HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue"


async def defer_expect(request: web.Request) -> web.StreamResponse | None:
    """A route's expect handler: 417 for an unknown expectation, else nothing yet."""
    expect = request.headers.get("Expect", "")
    if request.version >= HttpVersion11 and expect.lower() != "100-continue":
        # Middlewares do not run on this path, so build the error body here.
        response = error_response(errors.EXPECTATION_FAILED, f"unsupported Expect: {expect[:100]!r}")
        response.force_close()
        return response
    return None


async def invite_body(request: web.Request) -> None:
    """Send ``100 Continue`` if the client waits for it; call right before reading the body."""
    if _expects_continue(request) and not request.get(_INVITED):
        request[_INVITED] = True
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        # The interim answer is not part of the response's size.
        request.writer.output_size = 0


def body_not_invited(request: web.BaseRequest) -> bool:
    return _expects_continue(request) and not request.get(_INVITED)
