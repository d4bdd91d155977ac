"""The prefill/decode KV hand-over: rooms on the prefill side, its bootstrap server, the decode-side fetch.

SGLang pairs the two legs of a request on ``bootstrap_room``. Here the prefill worker keeps a room per
request: its HTTP handler attaches to the room, computes the prompt's KV + first token and publishes
them; the decode worker connects to the prefill's bootstrap server (``GET /kv/{room}``), waits there
until the KV is ready, and receives it in the wire format of ``kv_wire``. Either side may come first.
Timeouts on both sides turn a missing peer into a clear error and free the KV; a decode worker that
gives up tells the prefill side (``DELETE /kv/{room}``, SGLang's ABORT notice) so it stops waiting.

The bootstrap server also answers SGLang's own routes (``PUT/GET /route``, ``GET /health``,
``/register_dp_rank``, ``/query_dp_ranks``) with this worker's single-rank topology.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from replicas.engine import kv_wire
from replicas.engine.errors import ApiError, error_body

log = logging.getLogger("replicas.engine.pd")
FAKE_BOOTSTRAP_HOST = "2.2.2.2"  # SGLang: a request with this host is served without a peer (warmup, health)


class RoomClosed(Exception):
    """The other side of a room gave up; carries the HTTP status and message to report."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Room:
    room: int
    ready: asyncio.Future[kv_wire.KVPayload]
    fetched: asyncio.Future[None]
    attached: bool = False  # a prefill request owns this room
    claimed: bool = False  # a decode worker is receiving (or has received) its KV
    created: float = field(default_factory=time.monotonic)


def _quiet(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: a room may fail with nobody left to wait on it."""
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())


class RoomRegistry:
    """The rooms of one prefill worker, keyed by bootstrap_room."""

    def __init__(self) -> None:
        self.rooms: dict[int, Room] = {}

    def get(self, room: int) -> Room:
        entry = self.rooms.get(room)
        if entry is None:
            loop = asyncio.get_running_loop()
            entry = Room(room, loop.create_future(), loop.create_future())
            _quiet(entry.ready)
            _quiet(entry.fetched)
            self.rooms[room] = entry
        return entry

    def attach(self, room: int) -> Room:
        entry = self.get(room)
        if entry.attached:
            raise ApiError(400, f"bootstrap_room {room} is already in use by another request", "bootstrap_room")
        if entry.fetched.done() and entry.fetched.exception() is not None:
            exc = entry.fetched.exception()
            self.rooms.pop(room, None)
            status = getattr(exc, "status", 502)
            raise ApiError(400 if status == 499 else status,
                           f"bootstrap_room {room} was aborted by its decode worker: {exc}", "bootstrap_room")
        entry.attached = True
        return entry

    def close(self, entry: Room, status: int, message: str) -> None:
        """End a room from the prefill side: a waiting decode worker gets ``message``."""
        if not entry.ready.done():
            entry.ready.set_exception(RoomClosed(status, message))
        self.rooms.pop(entry.room, None)

    def discard(self, entry: Room) -> None:
        if self.rooms.get(entry.room) is entry:
            del self.rooms[entry.room]

    def fail_all(self, message: str) -> None:
        for entry in list(self.rooms.values()):
            self.close(entry, 503, message)
            if not entry.fetched.done():
                entry.fetched.set_exception(RoomClosed(503, message))

    @property
    def pending(self) -> int:
        return len(self.rooms)

    @property
    def aborted(self) -> int:
        """Rooms the decode side gave up on (kept briefly so a late prefill request fails fast)."""
        return sum(1 for r in self.rooms.values() if r.fetched.done() and r.fetched.exception() is not None)


class BootstrapServer:
    """The prefill worker's bootstrap HTTP server (SGLang's default port 8998)."""

    def __init__(self, rooms: RoomRegistry, host: str, port: int, http_port: int, fingerprint: str,
                 default_compression: str, bootstrap_timeout_s: float) -> None:
        self.rooms = rooms
        self.host, self.port, self.http_port = host, port, http_port
        self.fingerprint = fingerprint
        self.default_compression = default_compression
        self.bootstrap_timeout_s = bootstrap_timeout_s
        self.registered: dict[str, Any] = {}
        self._runner: web.AppRunner | None = None
        self.bytes_sent = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_put("/route", self._put_route)
        app.router.add_get("/route", self._get_route)
        app.router.add_post("/register_dp_rank", self._ok)
        app.router.add_post("/query_dp_ranks", self._query_dp_ranks)
        app.router.add_get("/kv/{room}", self._fetch)
        app.router.add_delete("/kv/{room}", self._abort)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, shutdown_timeout=0.1).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def running(self) -> bool:
        return self._runner is not None

    # -- SGLang-compatible routes --------------------------------------------------------------------
    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def _ok(self, _: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def _put_route(self, request: web.Request) -> web.Response:
        try:
            self.registered = await request.json(loads=orjson.loads)
        except (ValueError, orjson.JSONDecodeError):
            return _json_error(400, "PUT /route body must be JSON")
        return web.Response(text="OK")

    async def _get_route(self, request: web.Request) -> web.Response:
        names = ("prefill_dp_rank", "prefill_cp_rank", "target_tp_rank", "target_pp_rank")
        try:
            values = [int(request.query[n]) for n in names if n in request.query]
        except ValueError:
            return _json_error(400, "GET /route: rank parameters must be integers")
        if len(values) != len(names):
            return _json_error(400, f"GET /route needs {', '.join(names)}")
        if all(v == -1 for v in values):
            return _json({
                "attn_tp_size": 1, "attn_cp_size": 1, "dp_size": 1, "pp_size": 1, "page_size": 1,
                "kv_cache_dtype": "float32", "follow_bootstrap_room": True, "enable_dsa_cache_layer_split": False,
                "prefill_http_port": self.http_port, "model_fingerprint": self.fingerprint,
                "kv_wire_version": kv_wire.WIRE_VERSION,
            })
        if any(v != 0 for v in values):
            return _json_error(404, f"no prefill rank {values}: this worker has one rank")
        return _json({"rank_ip": self.host, "rank_port": self.port})

    async def _query_dp_ranks(self, request: web.Request) -> web.Response:
        try:
            body = await request.json(loads=orjson.loads)
            rooms = body["bootstrap_rooms"]
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            return _json_error(400, "POST /query_dp_ranks needs {bootstrap_rooms: [...]}")
        return _json({str(r): 0 for r in rooms})

    # -- the KV hand-over ------------------------------------------------------------------------------
    async def _fetch(self, request: web.Request) -> web.StreamResponse:
        try:
            room = int(request.match_info["room"])
            wait_s = float(request.query.get("wait_s", self.bootstrap_timeout_s))
        except ValueError:
            return _json_error(400, "bootstrap_room and wait_s must be numbers")
        compression = request.query.get("compression") or self.default_compression
        if compression not in kv_wire.COMPRESSIONS:
            return _json_error(400, f"unknown compression {compression!r}")
        entry = self.rooms.get(room)
        if entry.claimed:
            return _json_error(409, f"bootstrap_room {room}: its KV was already sent to a decode worker")
        entry.claimed = True
        try:
            payload = await asyncio.wait_for(asyncio.shield(entry.ready), wait_s)
        except TimeoutError:
            if not entry.attached:
                self.rooms.discard(entry)
                return _json_error(404, f"bootstrap_room {room} is unknown to the prefill worker at "
                                        f"{self.host}:{self.port}: no prefill request for it arrived in {wait_s:g} s")
            entry.claimed = False
            return _json_error(504, f"bootstrap_room {room}: the prefill worker did not finish its KV in {wait_s:g} s")
        except RoomClosed as e:
            return _json_error(e.status, e.message)
        except asyncio.CancelledError:
            entry.claimed = False
            raise
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(None, kv_wire.encode, payload, compression)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                           "X-KV-Compression": compression})
        resp.content_length = len(data)
        try:
            await resp.prepare(request)
            await resp.write(data)
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            if not entry.fetched.done():
                entry.fetched.set_exception(RoomClosed(502, "the decode worker disconnected during the KV transfer"))
            raise
        self.bytes_sent += len(data)
        if not entry.fetched.done():
            entry.fetched.set_result(None)
        return resp

    async def _abort(self, request: web.Request) -> web.Response:
        try:
            room = int(request.match_info["room"])
        except ValueError:
            return _json_error(400, "bootstrap_room must be an integer")
        reason = request.query.get("reason", "the decode worker aborted the request")
        entry = self.rooms.get(room)
        if not entry.fetched.done():
            entry.fetched.set_exception(RoomClosed(499, reason))
        if not entry.attached:
            # Remember the abort briefly so a prefill request arriving late fails fast instead of waiting.
            asyncio.get_running_loop().call_later(self.bootstrap_timeout_s, self.rooms.discard, entry)
        return web.Response(text="OK")


class KVFetcher:
    """Decode side: receive a room's KV from a prefill worker's bootstrap server."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self.bytes_received = 0

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, host: str, port: int, room: int, compression: str | None, timeout_s: float) -> bytes:
        url = f"{_base(host, port)}/kv/{room}"
        params = {"wait_s": f"{timeout_s:g}", "compression": compression or ""}
        where = f"the prefill bootstrap server at {host}:{port}"
        try:
            async with self.session.get(url, params=params,
                                        timeout=aiohttp.ClientTimeout(total=timeout_s + 10, sock_connect=5)) as r:
                if r.status == 200:
                    data = await r.read()
                    self.bytes_received += len(data)
                    return data
                message = await _error_message(r)
                if r.status == 404:
                    raise ApiError(400, message, "bootstrap_room", "unknown_bootstrap_room")
                if r.status == 499:
                    raise ApiError(400, f"bootstrap_room {room} was aborted: {message}", "bootstrap_room")
                if r.status == 400:
                    raise ApiError(400, f"{where} refused bootstrap_room {room}: {message}", "bootstrap_room")
                raise ApiError(r.status if r.status in (503, 504) else 502, f"{where}: {message}")
        except aiohttp.ClientError as e:
            raise ApiError(502, f"cannot reach {where} for bootstrap_room {room}: {e}") from e
        except TimeoutError as e:
            raise ApiError(504, f"timed out after {timeout_s:g} s waiting for the KV of bootstrap_room {room} "
                                f"from {where}") from e

    async def abort(self, host: str, port: int, room: int, reason: str) -> None:
        """Tell the prefill side we gave up on a room (best effort, never raises)."""
        with contextlib.suppress(Exception):
            async with self.session.delete(f"{_base(host, port)}/kv/{room}", params={"reason": reason},
                                           timeout=aiohttp.ClientTimeout(total=3)) as r:
                await r.read()


def _base(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host and not host.startswith("[") else f"http://{host}:{port}"


async def _error_message(r: aiohttp.ClientResponse) -> str:
    text = await r.text()
    try:
        return str(orjson.loads(text)["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return text[:500] or f"HTTP {r.status}"


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json")


def _json_error(status: int, message: str) -> web.Response:
    return _json(error_body(status, message), status)
