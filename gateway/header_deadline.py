"""A deadline on each request's head (request line and headers), which aiohttp's server does not have.

Without it a client that trickles header bytes (slowloris) holds a connection, and a file descriptor,
for as long as it likes: aiohttp's keep-alive timeout only closes connections that send nothing. The
body already has its deadline (``--body-timeout-s``, in ``gateway.http``).

Each connection's aiohttp protocol is wrapped in ``HeaderDeadline``, which forwards everything and
keeps one timer: armed when the connection opens and at the first byte of each next request (on a
kept-alive connection, or pipelined), never by a request's own body. aiohttp has parsed a head when
the request reaches the middleware, which calls ``head_received`` (timer off); the request is in hand
until aiohttp's task for it, which also writes the response, is done and its body is fully in. If
the timer fires with no request in hand, a client that sent part of a head gets a 408 in the OpenAI
error shape and the connection is closed; one that never sent a byte is closed without an answer (a
408 there could be read as the answer to a request sent at that moment). With a request in hand the
timer looks again later: a 408 is never written over a response.

After a 408 the connection lingers (as Apache's and nginx's lingering close do): the gateway shuts its
side for writing and reads and drops what the client still sends, until the client closes or
``LINGER_S`` passes. Closing a socket with unread input makes the kernel send a reset, which can
destroy the 408 in the client's buffers before it is read (seen with a client still sending headers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from gateway.errors import ApiError

LINGER_S = 2.0  # after a 408: the client's further bytes are read and dropped for at most this long


class HeaderDeadline(asyncio.Protocol):
    """Forwards a connection to aiohttp's protocol; closes it with a 408 if a head takes too long."""

    def __init__(self, inner: asyncio.Protocol, seconds: float, loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner
        self._seconds = seconds
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        # the request in hand: its aiohttp task (handler, then its response written) and its body
        self._running = False
        self._payload: object | None = None  # aiohttp's StreamReader of the body; None: no request in hand
        self._spoke = False  # bytes of a next head have arrived
        self._linger: asyncio.TimerHandle | None = None  # set once a 408 is out: input is dropped until close

    # -- asyncio.Protocol, forwarded ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._arm()  # first: a connection whose aiohttp connection_made raises is still closed in time
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:
            return  # after the 408: read, so that closing sends no reset, and dropped
        if self._payload is None or self._payload.is_eof():  # type: ignore[attr-defined]
            self._spoke = True  # not the body of the request in hand: a next head
            if self._timer is None:
                self._arm()  # its first byte (on a kept-alive connection, or pipelined)
        self._inner.data_received(data)

    def _idle(self) -> bool:
        """No request in hand: its task (handler, response written) is done and its body fully in."""
        if self._payload is not None and (self._running or not self._payload.is_eof()):  # type: ignore[attr-defined]
            return False
        self._payload = None
        return True

    def eof_received(self) -> bool | None:
        if self._linger is not None:
            return False  # the client is done after our 408: the transport closes
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._linger is not None:
            self._linger.cancel()
        self._payload = None
        self._inner.connection_lost(exc)

    # -- the deadline ---------------------------------------------------------------------------------
    def head_received(self, request: web.BaseRequest) -> None:
        """From the middleware, in the task that handles ``request`` (aiohttp's task also writes its response)."""
        self._disarm()
        self._running = True
        self._spoke = False
        self._payload = request.content
        task = asyncio.current_task()
        assert task is not None
        task.add_done_callback(self._finished)  # no reference kept: the done task holds the response

    def _finished(self, _task: object) -> None:
        self._running = False
        if self._timer is not None:  # a pipelined head came in meanwhile: it could not be handled before
            self._disarm()           # now, so its deadline starts now (aiohttp dispatches a complete one at once)
            self._arm()

    def _arm(self) -> None:
        self._timer = self._loop.call_later(self._seconds, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if not self._idle():
            self._arm()  # a response is still going out: never answer over it; look again later
            return
        t = self._transport
        if t is None or t.is_closing():
            return
        if not self._spoke:
            t.close()
            return
        err = ApiError(408, f"request headers not received within {self._seconds:g} s (--header-timeout-s)",
                       code="header_timeout")
        body = err.to_bytes()
        t.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        if not t.can_write_eof():
            t.close()
            return
        t.write_eof()  # sent once the 408 is: the client reads it, then the end of the stream
        self._linger = self._loop.call_later(LINGER_S, t.close)


def watch(request: web.BaseRequest) -> HeaderDeadline | None:
    """The deadline of the connection ``request`` came on (None when served without one, as in tests
    that use aiohttp's own test server)."""
    t = request.transport
    p = t.get_protocol() if t is not None else None
    return p if isinstance(p, HeaderDeadline) else None


def protocol_factory(runner: web.AppRunner, seconds: float) -> Callable[[], asyncio.Protocol]:
    """For ``loop.create_server``: aiohttp's protocol for ``runner``, each wrapped in a deadline."""
    server = runner.server
    assert server is not None, "runner.setup() first"
    loop = asyncio.get_running_loop()
    return lambda: HeaderDeadline(server(), seconds, loop)
