"""Small HTTP helpers shared by the route handlers: bounded body reads and the SSE response head."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.config import GatewayConfig
from gateway.errors import ApiError

CLIENT_GONE = ConnectionError  # writing to a client that closed its connection (resets included)
SSE_STARTED = "sse_started"  # request key: the committed event stream, if any
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def read_body(request: web.Request, cfg: GatewayConfig) -> bytes:
    """The whole body within the size limit (413) and the body deadline (408, slow senders).

    A declared Content-Length over the limit is refused before reading a byte; a chunked body is cut
    off by aiohttp's ``client_max_size`` as it grows. A client that trickles its body is dropped at the
    deadline, which costs the server one idle coroutine until then, not a thread or a worker.
    """
    length = request.content_length
    if length is not None and length > cfg.max_body_bytes:
        raise ApiError(413, f"request body is {length} bytes, over the {cfg.max_body_bytes}-byte limit",
                       code="body_too_large")
    try:
        if request.content.is_eof():  # the whole body came with the headers: no deadline needed
            return await request.read()
        async with asyncio.timeout(cfg.body_timeout_s):
            return await request.read()
    except TimeoutError as e:
        raise ApiError(408, f"request body not received within {cfg.body_timeout_s:g} s",
                       code="body_timeout") from e
    except web.HTTPRequestEntityTooLarge as e:
        raise ApiError(413, f"request body is over the {cfg.max_body_bytes}-byte limit",
                       code="body_too_large") from e


async def start_sse(request: web.Request) -> web.StreamResponse:
    """Commit a 200 event stream (no Content-Length: the body length is not known)."""
    resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
    await resp.prepare(request)
    request[SSE_STARTED] = resp
    return resp
