"""A lean HTTP/1.1 client for the dispatch legs: keep-alive connections to workers, parsed by httptools.

Why not aiohttp's client here: measured on this machine, one POST through ``aiohttp.ClientSession``
costs ~200 us of gateway CPU against ~45 us through a bare ``asyncio.Protocol`` with httptools (the
parser uvicorn uses), and every request makes two of them (prefill and decode). aiohttp stays for
everything off the hot path (health checks, model discovery) and for the server side.

What it does: one pool of keep-alive connections per worker address; a request is written in one
``transport.write`` as soon as a connection is at hand (no task is created), and its response is read
by the protocol callbacks into an ``UpstreamResponse`` that the caller awaits (head, whole body, any
chunk, or a line). A connection goes back to the pool the moment its response is complete; closing
an unfinished response closes the connection, which is how a worker learns to abort. A request that
fails on a reused idle connection before any byte came back (the worker closed it meanwhile) is
resent once on a new connection. Reading stops when a response buffers more than ``HIGH_WATER``
bytes the caller has not taken (backpressure to the worker), and a response that stays silent for
``read_timeout`` fails with a timeout. Workers behind ``https://`` get TLS with default verification.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 1 << 20
LOW_WATER = 1 << 18


class UpstreamIOError(Exception):
    """The worker could not be reached, closed the connection early, sent bad HTTP, or went silent."""

    def __init__(self, message: str, *, refused: bool = False, timeout: bool = False, aborted: bool = False) -> None:
        super().__init__(message)
        self.refused = refused  # the connection was refused: the worker process is gone
        self.timeout = timeout
        self.aborted = aborted  # the gateway closed it (the other leg failed, the client left): nobody's fault


Address = tuple[str, int, bool]  # host, port, TLS


def address(url: str) -> Address:
    """Where a worker URL points: (host, port, use TLS)."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    return parts.hostname or "127.0.0.1", parts.port or (443 if tls else 80), tls


class UpstreamResponse:
    """One response, filled by the connection's parser callbacks, read by one coroutine."""

    __slots__ = ("_buffered", "_chunks", "_conn", "_done_callbacks", "_error", "_line", "_request", "_waiter",
                 "complete", "read_timeout", "status")

    def __init__(self, request: bytes, read_timeout: float) -> None:
        self._request = request  # kept until the first byte, in case it must be resent on a fresh connection
        self.read_timeout = read_timeout  # longest silence before the response fails (0 = none)
        self._conn: _Connection | None = None
        self.status = 0
        self.complete = False
        self._error: UpstreamIOError | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._line = b""
        self._waiter: asyncio.Future[None] | None = None
        self._done_callbacks: list[Callable[[UpstreamResponse], None]] = []

    # -- filled by the connection ------------------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def _on_body(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _on_complete(self) -> None:
        self.complete = True
        self._conn = None
        self._wake()
        self._run_callbacks()

    def _fail(self, error: UpstreamIOError) -> None:
        if self.complete or self._error is not None:
            return
        self._error = error
        self._conn = None
        self._wake()
        self._run_callbacks()

    def _run_callbacks(self) -> None:
        callbacks, self._done_callbacks = self._done_callbacks, []
        for cb in callbacks:
            cb(self)

    # -- for the caller --------------------------------------------------------------------------------
    @property
    def error(self) -> UpstreamIOError | None:
        return self._error

    @property
    def done(self) -> bool:
        return self.complete or self._error is not None

    def add_done_callback(self, cb: Callable[[UpstreamResponse], None]) -> None:
        """Call ``cb(self)`` once the response is complete or failed (at once if it already is)."""
        if self.done:
            cb(self)
        else:
            self._done_callbacks.append(cb)

    async def _wait(self) -> None:
        conn = self._conn
        loop = conn.loop if conn is not None else asyncio.get_running_loop()
        self._waiter = loop.create_future()
        await self._waiter

    async def head(self) -> int:
        """Wait for the status line and headers; return the status."""
        while not self.status and not self.complete:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self.status

    async def wait_done(self) -> None:
        """Wait until the response is complete or has failed, without taking its body."""
        while not self.done:
            await self._wait()

    def peek(self) -> bytes:
        """The body received so far, left in place."""
        return b"".join(self._chunks)

    async def read(self) -> bytes:
        """The whole body."""
        while not self.complete:
            if self._error is not None:
                raise self._error
            await self._wait()
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    def _take(self) -> bytes:
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._conn is not None:
            self._conn.resume()
        return data

    async def readany(self) -> bytes:
        """Whatever body bytes have arrived (waiting for some); b"" at the end."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()
        return self._take()

    async def readline(self) -> bytes:
        """The next line including its b"\\n" (the rest of the body at the end); b"" at the end."""
        while True:
            i = self._line.find(b"\n")
            if i >= 0:
                line, self._line = self._line[:i + 1], self._line[i + 1:]
                return line
            chunk = await self.readany()
            if not chunk:
                line, self._line = self._line, b""
                return line
            self._line += chunk

    def abort(self, error: UpstreamIOError) -> None:
        """Fail the response with ``error`` (its reader and done-callbacks see it) and drop the connection."""
        conn = self._conn
        self._fail(error)
        if conn is not None:
            conn.abort()

    def close(self) -> None:
        """Done with this response: an unfinished one is aborted by closing its connection."""
        conn = self._conn
        if not self.done:
            self._fail(UpstreamIOError("closed by the gateway", aborted=True))
        if conn is not None:
            conn.abort()
        self._chunks.clear()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; serves one response at a time."""

    def __init__(self, pool: UpstreamPool, addr: Address) -> None:
        self.pool = pool
        self.addr = addr
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.closed = False
        self.reused = False
        self.got_bytes = False
        self.paused = False
        self.idle_since = 0.0
        self.last_io = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.last_io = self.loop.time()
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamIOError(f"malformed HTTP from {self.addr[0]}:{self.addr[1]}: {e}"))
            self.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        self.pool._discard(self)
        resp = self.response
        if resp is not None and not resp.complete:
            self.response = None
            if self.reused and not self.got_bytes and resp._error is None:
                self.pool._resend(resp, self.addr)  # the worker had closed the idle connection: try a fresh one
                return
            why = f": {exc}" if exc else ""
            resp._fail(UpstreamIOError(f"{self.addr[0]}:{self.addr[1]} closed the connection mid-response{why}"))

    # -- httptools callbacks (no on_header: nothing here needs the worker's headers) ---------------------
    def on_headers_complete(self) -> None:
        resp = self.response
        if resp is not None:
            resp.status = self.parser.get_status_code()
            resp._request = b""
            resp._wake()

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._on_body(body)

    def on_message_complete(self) -> None:
        resp, self.response = self.response, None
        self._disarm()
        keep = self.parser.should_keep_alive()
        if resp is not None:
            resp._on_complete()
        if keep and not self.closed:
            self.pool._release(self)
        else:
            self.abort()

    # -- use -------------------------------------------------------------------------------------------
    def send(self, resp: UpstreamResponse) -> None:
        assert self.transport is not None and self.response is None
        self.response = resp
        resp._conn = self
        self.got_bytes = False
        self.last_io = self.loop.time()
        self._arm()
        self.transport.write(resp._request)

    def abort(self) -> None:
        """Close the connection; a response still on it is left to whoever failed it."""
        self.response = None
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and self.response is not None \
                and self.response._buffered < LOW_WATER:
            self.paused = False
            self.last_io = self.loop.time()
            self.transport.resume_reading()

    # -- silence detection: one timer per response, re-armed only if it fires early -----------------
    def _arm(self) -> None:
        timeout = self.response.read_timeout if self.response is not None else 0
        if timeout:
            self._timer = self.loop.call_at(self.last_io + timeout, self._check_silence)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_silence(self) -> None:
        self._timer = None
        if self.response is None:
            return
        if self.paused:  # we stopped reading, not the worker: not silence
            self.last_io = self.loop.time()
        timeout = self.response.read_timeout
        deadline = self.last_io + timeout
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._check_silence)
            return
        self._fail(UpstreamIOError(f"{self.addr[0]}:{self.addr[1]} sent nothing for {timeout:g} s", timeout=True))
        self.abort()

    def _fail(self, error: UpstreamIOError) -> None:
        resp, self.response = self.response, None
        if resp is not None:
            resp._fail(error)


class UpstreamPool:
    """Keep-alive connections to every worker; one per gateway process."""

    def __init__(self, connect_timeout: float = 3.0, idle_ttl: float = 30.0, max_idle_per_worker: int = 512) -> None:
        self.connect_timeout = connect_timeout
        self.idle_ttl = idle_ttl
        self.max_idle = max_idle_per_worker
        self._idle: dict[Address, list[_Connection]] = {}
        self._heads: dict[tuple[Address, bytes], bytes] = {}
        self._resend_tasks: set[asyncio.Future[None]] = set()
        self._ssl_context: ssl.SSLContext | None = None
        self.connects = 0  # new connections made (for tests and the admin view)

    def request_bytes(self, addr: Address, path: bytes, body: bytes) -> bytes:
        key = (addr, path)
        head = self._heads.get(key)
        if head is None:
            head = (b"POST " + path + b" HTTP/1.1\r\nHost: " + f"{addr[0]}:{addr[1]}".encode()
                    + b"\r\nContent-Type: application/json\r\nAccept: */*\r\nContent-Length: ")
            self._heads[key] = head
        return b"".join((head, str(len(body)).encode(), b"\r\n\r\n", body))

    async def post(self, addr: Address, path: bytes, body: bytes, read_timeout: float) -> UpstreamResponse:
        """Send a POST on an idle connection (no yielding) or a new one; the response head is not awaited.

        ``read_timeout``: the longest the worker may stay silent on this response before it fails.
        """
        resp = UpstreamResponse(self.request_bytes(addr, path, body), read_timeout)
        conn = self._take_idle(addr) or await self._connect(addr)
        conn.send(resp)
        return resp

    def _take_idle(self, addr: Address) -> _Connection | None:
        idle = self._idle.get(addr)
        if not idle:
            return None
        horizon = idle[-1].loop.time() - self.idle_ttl
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if conn.idle_since < horizon:
                conn.abort()
                continue
            conn.reused = True
            return conn
        return None

    async def _connect(self, addr: Address) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(self, addr), addr[0], addr[1],
                                                       ssl=self._tls() if addr[2] else None)
        except TimeoutError as e:
            raise UpstreamIOError(f"connecting to {addr[0]}:{addr[1]} timed out", timeout=True) from e
        except OSError as e:
            raise UpstreamIOError(f"cannot connect to {addr[0]}:{addr[1]}: {e.strerror or e}",
                                  refused=isinstance(e, ConnectionRefusedError)) from e
        self.connects += 1
        return conn

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _release(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.addr, [])
        if len(idle) >= self.max_idle:
            conn.abort()
            return
        conn.idle_since = conn.loop.time()
        idle.append(conn)

    def _discard(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.addr)
        if idle and conn in idle:
            idle.remove(conn)

    def _resend(self, resp: UpstreamResponse, addr: Address) -> None:
        async def again() -> None:
            try:
                conn = await self._connect(addr)
            except UpstreamIOError as e:
                resp._fail(e)
                return
            if resp._error is None and not resp.complete and resp._request:
                conn.send(resp)
            else:
                self._release(conn)

        task = asyncio.ensure_future(again())
        self._resend_tasks.add(task)
        task.add_done_callback(self._resend_tasks.discard)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()
