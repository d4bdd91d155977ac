"""A deadline on each request's head (request line and headers), which aiohttp's server does not have.

Without it a client that trickles header bytes (slowloris) holds a connection, and a file descriptor,
for as long as it likes: aiohttp's keep-alive timeout only closes connections that send nothing. The
body already has its deadline (``--body-timeout-s``, in ``gateway.http``).

Each connection's aiohttp protocol is wrapped in ``HeaderDeadline``, which forwards everything and
keeps one timer: armed when the connection opens and, on a kept-alive connection, at the first byte
of each next request (an idle keep-alive connection is aiohttp's to close, as before). aiohttp has
parsed a head when the request reaches the middleware, which calls ``head_received`` (timer off) and,
once the handler is done, ``request_done``. If the timer fires first the client gets a 408 in the
OpenAI error shape and the connection is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from gateway.errors import ApiError

# the wrapper of each live connection, by the aiohttp protocol the request carries (request.protocol)
_BY_HANDLER: dict[object, HeaderDeadline] = {}


class HeaderDeadline(asyncio.Protocol):
    """Forwards a connection to aiohttp's protocol; closes it with a 408 if a head takes too long."""

    def __init__(self, inner: asyncio.Protocol, seconds: float, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner
        self._seconds = seconds
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._busy = False  # a request is being handled: bytes now are its body or a pipelined next head

    # -- asyncio.Protocol, forwarded ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        _BY_HANDLER[self._inner] = self
        self._inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._timer is None and not self._busy:
            self._arm()  # the first byte of a next request on a kept-alive connection
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        _BY_HANDLER.pop(self._inner, None)
        self._inner.connection_lost(exc)

    # -- the deadline ---------------------------------------------------------------------------------
    def head_received(self) -> None:
        self._disarm()
        self._busy = True

    def request_done(self) -> None:
        self._busy = False

    def _arm(self) -> None:
        self._timer = self._loop.call_later(self._seconds, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        t = self._transport
        if t is None or t.is_closing():
            return
        err = ApiError(408, f"request headers not received within {self._seconds:g} s (--header-timeout-s)",
                       code="header_timeout")
        body = err.to_bytes()
        t.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        t.close()


def watch(request: web.BaseRequest) -> HeaderDeadline | None:
    """The deadline of the connection ``request`` came on (None when served without one, as in tests
    that use aiohttp's own test server)."""
    return _BY_HANDLER.get(request.protocol)


def protocol_factory(runner: web.AppRunner, seconds: float) -> Callable[[], asyncio.Protocol]:
    """For ``loop.create_server``: aiohttp's protocol for ``runner``, each wrapped in a deadline."""
    server = runner.server
    assert server is not None, "runner.setup() first"
    loop = asyncio.get_running_loop()
    return lambda: HeaderDeadline(server(), seconds, loop)
