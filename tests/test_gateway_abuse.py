"""A burst of bad requests while good traffic flows: each bad one gets its 4xx, no good one fails.

Bad: malformed JSON, wrong types, huge bodies (declared and chunked), unknown routes and methods,
missing and wrong keys, unknown model, and slowloris-style slow bodies and slow headers on raw sockets.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest

from gateway.launcher import GatewayProcess
from replicas.process import EngineProcess

KEY = "good-key"
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def gateway() -> GatewayProcess:
    engines = [EngineProcess("emulated", role="prefill"), EngineProcess("emulated", role="decode")]
    for e in engines:
        e.start()
    p, d = engines
    gw = GatewayProcess(["--prefill", p.url, str(p.bootstrap_port), "--decode", d.url, "--api-key", KEY,
                         "--max-body-bytes", str(LIMIT), "--body-timeout-s", "1", "--header-timeout-s", "1"])
    try:
        gw.start()
        gw.wait_ready()
        yield gw
    finally:
        gw.stop()
        for e in engines:
            e.stop()


async def slow_body(url: str) -> tuple[int, float]:
    """Send headers promising 100 bytes, then trickle one byte every 0.2 s; return (status, seconds)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    t0 = time.perf_counter()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{")
    await writer.drain()

    async def trickle() -> None:
        for _ in range(99):
            await asyncio.sleep(0.2)
            writer.write(b" ")
            await writer.drain()

    task = asyncio.create_task(trickle())
    try:
        status_line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        task.cancel()
        writer.close()
    return int(status_line.split()[1]), time.perf_counter() - t0


async def slow_headers(url: str, every_s: float = 0.2, read_after_s: float = 0.0) -> tuple[int, float, dict]:
    """Send a request line, then trickle a header's value a byte every ``every_s`` (slowloris), reading
    from ``read_after_s`` on; return (status, seconds, JSON body) once the server has answered and
    closed the connection. The clock starts before connecting: the server's deadline runs from its
    accept, and this task may resume from the connect well after it when the loop is busy."""
    parts = urlsplit(url)
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    await writer.drain()

    async def trickle() -> None:
        for _ in range(round(5 / every_s)):
            await asyncio.sleep(every_s)
            writer.write(b"y")
            await writer.drain()

    task = asyncio.create_task(trickle())
    try:
        await asyncio.sleep(read_after_s)
        status_line = await asyncio.wait_for(reader.readline(), 10)
        seconds = time.perf_counter() - t0
        rest = await asyncio.wait_for(reader.read(), 5)  # EOF: the server closed it
    finally:
        task.cancel()
        writer.close()
    body = orjson.loads(rest.split(b"\r\n\r\n", 1)[1])
    return int(status_line.split()[1]), seconds, body


async def test_bad_requests_get_their_4xx_while_good_traffic_flows(gateway: GatewayProcess) -> None:
    url = gateway.url
    auth = {"Authorization": f"Bearer {KEY}"}
    chat = {"model": "emulated", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    stop = asyncio.Event()
    good: list[int] = []

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def good_traffic(i: int) -> None:
            while not stop.is_set():
                if i % 2:
                    req = session.post(url + "/v1/chat/completions", json=chat, headers=auth)
                else:
                    req = session.post(url + "/generate", headers=auth,
                                       json={"text": "hello", "sampling_params": {"max_new_tokens": 4}})
                async with req as r:
                    await r.read()
                    good.append(r.status)

        async def bad(method: str, path: str, expect: int, param: str | None = None, **kw: object) -> None:
            async with session.request(method, url + path, **kw) as r:  # type: ignore[arg-type]
                body = await r.json(content_type=None)
                assert r.status == expect, (path, kw, body)
                assert set(body["error"]) == {"message", "type", "param", "code"}
                if param is not None:
                    assert body["error"]["param"] == param

        async def chunked_huge() -> None:
            async def gen():
                for _ in range(64):
                    yield b"x" * 4096

            try:
                await bad("POST", "/generate", 413, headers=auth, data=gen())
            except aiohttp.ClientError:
                pass  # the server cut the upload off before the client read the 413: refused either way

        workers = [asyncio.create_task(good_traffic(i)) for i in range(4)]
        await asyncio.sleep(0.3)
        burst = []
        for _ in range(5):
            burst += [
                bad("POST", "/v1/chat/completions", 400, None, data=b"{not json", headers=auth),
                bad("POST", "/v1/chat/completions", 400, "messages", json={"model": "emulated", "messages": 5},
                    headers=auth),
                bad("POST", "/v1/chat/completions", 400, "max_tokens", json={**chat, "max_tokens": "many"},
                    headers=auth),
                bad("POST", "/v1/completions", 400, "prompt", json={"model": "emulated", "prompt": [1, "a"]},
                    headers=auth),
                bad("POST", "/generate", 400, "sampling_params.max_new_tokens",
                    json={"text": "a", "sampling_params": {"max_new_tokens": -5}}, headers=auth),
                bad("POST", "/v1/chat/completions", 413, None, data=b"x" * (LIMIT + 1), headers=auth),
                bad("POST", "/v1/chat/completions", 404, "model", json={**chat, "model": "nope"}, headers=auth),
                bad("GET", "/v1/nothing", 404),
                bad("GET", "/v1/chat/completions", 405),
                bad("POST", "/v1/chat/completions", 401, None, json=chat),
                bad("POST", "/v1/chat/completions", 401, None, json=chat, headers={"Authorization": "Bearer bad"}),
                bad("POST", "/generate", 400, None, data=b"", headers=auth),
            ]
        slow = [slow_body(url) for _ in range(10)]
        heads = [slow_headers(url) for _ in range(10)]
        results = await asyncio.gather(*burst, *slow, *heads, chunked_huge())
        stop.set()
        await asyncio.gather(*workers)

    slow_results = [r for r in results if isinstance(r, tuple) and len(r) == 2]
    assert [s for s, _ in slow_results] == [408] * 10
    assert all(0.9 < t < 5 for _, t in slow_results)  # cut off at the 1 s body deadline, not served
    head_results = [r for r in results if isinstance(r, tuple) and len(r) == 3]
    assert [s for s, *_ in head_results] == [408] * 10
    assert all(0.9 < t < 5 for _, t, *_ in head_results)  # the 1 s head deadline, though bytes kept coming
    assert all(b["error"]["code"] == "header_timeout" and b["error"]["type"] == "timeout_error"
               for _, _, b in head_results)
    assert len(good) > 20 and set(good) == {200}


async def test_an_idle_kept_alive_connection_outlives_the_head_deadline(gateway: GatewayProcess) -> None:
    """The head deadline runs from a request's first byte: a client that keeps its connection open and
    idle for longer (here 1.5 s against 1 s) still gets its next request served on it."""
    auth = {"Authorization": f"Bearer {KEY}"}
    chat = {"model": "emulated", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    events: list[str] = []
    trace = aiohttp.TraceConfig()

    async def created(*_: object) -> None:
        events.append("new")

    async def reused(*_: object) -> None:
        events.append("reused")

    trace.on_connection_create_end.append(created)
    trace.on_connection_reuseconn.append(reused)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), trace_configs=[trace]) as session:
        for pause in (0.0, 1.5):
            await asyncio.sleep(pause)
            async with session.post(gateway.url + "/v1/chat/completions", json=chat, headers=auth) as r:
                assert r.status == 200
                await r.read()
    assert events == ["new", "reused"]  # the same connection both times


async def test_a_body_that_arrives_after_its_answer_does_not_start_the_head_deadline(gateway: GatewayProcess) -> None:
    """A 401 goes out before the body is in; the body's late bytes are not a next request's head, so the
    idle kept-alive connection gets no 408 and stays open past the deadline."""
    parts = urlsplit(gateway.url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    body = b"{}" + b" " * 98
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 401")
    writer.write(body)
    await asyncio.sleep(1.5)  # past the 1 s head deadline
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    rest = b""
    while b'{"status":"ok"}' not in rest and b"header_timeout" not in rest:
        chunk = await asyncio.wait_for(reader.read(4096), 5)
        if not chunk:
            break
        rest += chunk
    writer.close()
    assert b"HTTP/1.1 408" not in rest and b"HTTP/1.1 200" in rest


async def test_a_connection_that_never_speaks_is_closed_without_an_answer(gateway: GatewayProcess) -> None:
    """No byte within the head deadline: closed, and no 408 (a client sending its first request at that
    moment would read it as the answer)."""
    parts = urlsplit(gateway.url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    t0 = time.perf_counter()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data == b"" and 0.9 < time.perf_counter() - t0 < 4


async def test_a_head_still_streaming_in_when_its_deadline_fires_reads_the_whole_408(gateway: GatewayProcess) -> None:
    """The 408 reaches a client that is still sending header bytes when the deadline fires and reads its
    answer only later: closing a socket with unread input makes the kernel send a reset, which destroys
    an answer not read yet, so the gateway stops writing, drops what still comes in, and closes when the
    client does (or ``LINGER_S`` later)."""
    results = await asyncio.gather(*(slow_headers(gateway.url, every_s=0.005, read_after_s=1.6) for _ in range(10)))
    assert [status for status, *_ in results] == [408] * 10
    assert all(b["error"]["code"] == "header_timeout" for *_, b in results)
