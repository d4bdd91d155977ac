"""The gateway's lean upstream HTTP client against a real aiohttp server on loopback.

These test the HTTP/1.1 mechanics (keep-alive, a server closing idle connections, silence timeouts,
aborts, backpressure, refused connections), so the server here is a plain aiohttp app, not a worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from gateway.upstream_http import HIGH_WATER, Address, UpstreamIOError, UpstreamPool
from replicas.process import free_port

PATH = b"/echo"


class Server:
    def __init__(self) -> None:
        self.aborted = asyncio.Event()
        self.requests = 0

    async def echo(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.Response(body=await request.read())

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="late")

    async def forever(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            while True:
                await resp.write(b"data: tick\n\n")
                await asyncio.sleep(0.01)
        except (ConnectionResetError, asyncio.CancelledError):
            self.aborted.set()
            raise

    async def flood(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(128):
            await resp.write(b"x" * 65536)
        await resp.write_eof()
        return resp


@pytest.fixture
async def server() -> AsyncIterator[tuple[Server, Address]]:
    srv = Server()
    app = web.Application()
    for name in ("echo", "slow", "forever", "flood"):
        app.router.add_post(f"/{name}", getattr(srv, name))
    runner = web.AppRunner(app, keepalive_timeout=0.3, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield srv, ("127.0.0.1", port, False)
    await runner.cleanup()


async def test_keep_alive_reuse_and_idle_connections_closed_by_the_server(
        server: tuple[Server, Address]) -> None:
    srv, addr = server
    pool = UpstreamPool()
    for i in range(30):
        resp = await pool.post(addr, PATH, b"hello %d" % i, 5.0)
        assert await resp.head() == 200 and await resp.read() == b"hello %d" % i
    assert pool.connects == 1
    await asyncio.sleep(0.6)  # the server closes the idle connection (keepalive_timeout 0.3 s)
    resp = await pool.post(addr, PATH, b"again", 5.0)
    assert await resp.read() == b"again"
    assert pool.connects == 2 and srv.requests == 31
    many = [await pool.post(addr, PATH, b"%d" % i, 5.0) for i in range(20)]  # concurrent: 20 connections
    assert [await r.read() for r in many] == [b"%d" % i for i in range(20)]
    pool.close()


async def test_silence_fails_fast_and_refused_is_flagged(server: tuple[Server, Address]) -> None:
    _, addr = server
    pool = UpstreamPool()
    resp = await pool.post(addr, b"/slow", b"{}", 0.3)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(UpstreamIOError) as err:
        await resp.head()
    assert err.value.timeout and loop.time() - t0 < 1.5
    with pytest.raises(UpstreamIOError) as err:
        await pool.post(("127.0.0.1", free_port(), False), PATH, b"{}", 1.0)
    assert err.value.refused
    pool.close()


async def test_closing_an_unfinished_response_aborts_it_at_the_server(server: tuple[Server, Address]) -> None:
    srv, addr = server
    pool = UpstreamPool()
    resp = await pool.post(addr, b"/forever", b"{}", 5.0)
    assert await resp.head() == 200
    assert await resp.readline() == b"data: tick\n"
    assert await resp.readline() == b"\n"
    resp.close()
    await asyncio.wait_for(srv.aborted.wait(), 5)
    with pytest.raises(UpstreamIOError) as err:
        await resp.readany()
    assert err.value.aborted
    pool.close()


async def test_a_reader_that_falls_behind_pauses_the_socket(server: tuple[Server, Address]) -> None:
    _, addr = server
    pool = UpstreamPool()
    resp = await pool.post(addr, b"/flood", b"{}", 5.0)
    assert await resp.head() == 200
    await asyncio.sleep(0.5)  # not reading: the connection stops reading at the high-water mark
    assert resp._conn is not None and resp._conn.paused
    assert resp._buffered < HIGH_WATER + 256 * 1024
    total = 0
    while chunk := await resp.readany():
        total += len(chunk)
    assert total == 128 * 65536 and resp.complete
    pool.close()
