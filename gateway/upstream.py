"""One attempt at a (prefill, decode) pair, dispatched as SGLang's router does.

The same body goes to both workers back to back, without waiting between them (decode pre-allocates
KV and bootstraps to prefill, so sequential dispatch would deadlock). A transport failure or error
status on either leg cancels the other, so no leg is left waiting for a bootstrap that will never come
(smg #831, sglang #29482). Decode's status is checked first; prefill's body is always drained (HTTP/1.1
correctness, sglang #9281) by the connection itself, and its completion releases prefill's load at once
(sglang #39951). If prefill fails at any point, decode's response is failed and closed, so the request
moves on instead of waiting out decode's KV timeout. No task is created per request: both legs are
callbacks on keep-alive connections (``gateway.upstream_http``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

import orjson

from gateway.metrics import GatewayMetrics
from gateway.routing import Pair
from gateway.upstream_http import UpstreamIOError, UpstreamPool, UpstreamResponse
from gateway.workers import Worker

log = logging.getLogger("gateway.upstream")

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class UpstreamError(Exception):
    """An attempt failed at a worker. ``retryable``: another pair may succeed where this one did not."""

    def __init__(
        self,
        message: str,
        *,
        worker: Worker | None = None,
        status: int | None = None,
        retryable: bool = True,
        timeout: bool = False,
        body: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.worker = worker
        self.status = status
        self.retryable = retryable
        self.timeout = timeout
        self.body = body


def new_room() -> int:
    """A bootstrap room: random in [0, 2^63 - 1], as Python's random.randint(0, 2**63 - 1)."""
    return random.getrandbits(63)


def bootstrap_fields(pair: Pair) -> dict[str, Any]:
    return {"bootstrap_host": pair.prefill.host, "bootstrap_port": pair.bootstrap_port, "bootstrap_room": new_room()}


def splice_bootstrap(body: bytes, pair: Pair) -> bytes:
    """Add the bootstrap fields to a JSON object body without re-serialising it.

    The fields are appended before the closing brace; JSON parsers keep the last of duplicate keys,
    so ours win over any the client sent. The caller has checked ``body`` is a non-empty JSON object.
    """
    if pair.colocated:
        return body
    end = body.rstrip().rindex(b"}")
    extra = orjson.dumps(bootstrap_fields(pair))  # b'{"bootstrap_host":...}'
    return body[:end] + b"," + extra[1:-1] + body[end:]


def error_message(body: bytes) -> str:
    """The message of an error body from a worker (OpenAI, SGLang or plain text)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode(errors="replace").strip()[:500] or "no body"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
        if isinstance(data.get("message"), str):
            return data["message"]
    return body.decode(errors="replace")[:500]


def error_param(body: bytes) -> str | None:
    """The field a worker's error body names (OpenAI's ``param``), if any."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    err = data.get("error", data) if isinstance(data, dict) else None
    param = err.get("param") if isinstance(err, dict) else None
    return param if isinstance(param, str) else None


def _status_error(worker: Worker, status: int, body: bytes) -> UpstreamError:
    retryable = status in RETRYABLE_STATUSES
    return UpstreamError(
        f"{worker.role} worker {worker.name} answered {status}: {error_message(body)}",
        worker=worker, status=status, retryable=retryable, body=body,
    )


def io_error(worker: Worker, exc: UpstreamIOError) -> UpstreamError:
    """A transport failure of one leg, attributed to its worker."""
    if exc.refused:
        worker.mark_unreachable()
    return UpstreamError(f"{worker.role} worker {worker.name}: {exc}", worker=worker, timeout=exc.timeout)


class Exchange:
    """The live legs of one attempt. ``response`` is decode's (or the colocated worker's) response."""

    def __init__(self, pool: UpstreamPool, pair: Pair, path: bytes, tokens: int, metrics: GatewayMetrics | None,
                 read_timeout: float) -> None:
        self.pool = pool
        self.pair = pair
        self.path = path
        self.tokens = tokens
        self.metrics = metrics
        self.read_timeout = read_timeout
        self.response: UpstreamResponse | None = None
        self.prefill_response: UpstreamResponse | None = None
        self.prefill_error: UpstreamError | None = None
        self._prefill_held = False
        self._decode_held = False
        self._done = False

    # -- opening -------------------------------------------------------------------------------------
    async def open(self, body: bytes) -> UpstreamResponse:
        """Send both legs back to back; return decode's response once its status is 2xx. Raises UpstreamError."""
        pair = self.pair
        decode = pair.decode
        decode.acquire(self.tokens)
        self._decode_held = True
        for w in pair.workers:
            w.inflight.add(self)
        try:
            if not pair.colocated:
                prefill = pair.prefill
                prefill.acquire(self.tokens)
                self._prefill_held = True
                try:
                    self.prefill_response = await self._post(prefill, body)
                except UpstreamError as e:
                    self.prefill_error = e
                    self._release_prefill(False)
                    raise
                self.prefill_response.add_done_callback(self._prefill_done)
            self.response = resp = await self._post(decode, body)
            if self.prefill_error is not None:  # prefill failed while decode's request went out
                raise self.prefill_error
            try:
                status = await resp.head()
            except UpstreamIOError as e:
                raise self.prefill_error or io_error(decode, e) from e
            if status >= 300:
                try:
                    err_body = await resp.read()
                except UpstreamIOError:
                    err_body = b""
                raise _status_error(decode, status, err_body)
        except UpstreamError as e:
            await self.close(ok=(not e.retryable) if e.worker is decode else None)
            raise
        except BaseException:
            await self.close(ok=None)
            raise
        return resp

    async def _post(self, worker: Worker, body: bytes) -> UpstreamResponse:
        try:
            return await self.pool.post(worker.addr, self.path, body, self.read_timeout)
        except UpstreamIOError as e:
            raise io_error(worker, e) from e

    def _prefill_done(self, resp: UpstreamResponse) -> None:
        """Prefill's answer is complete (drained) or failed: release its load at once, judge it, and if it
        failed, fail decode's response too so nobody waits out decode's KV timeout."""
        worker = self.pair.prefill
        err = resp.error
        if err is not None:
            if err.aborted:  # we closed it ourselves
                self._release_prefill(None)
                return
            self.prefill_error = io_error(worker, err)
            self._release_prefill(False)
        elif resp.status >= 300:
            self.prefill_error = _status_error(worker, resp.status, resp.peek())
            self._release_prefill(not self.prefill_error.retryable)
        else:
            self._release_prefill(True)
            return
        if self.metrics is not None:
            self.metrics.upstream_failures.labels("prefill", _reason(self.prefill_error)).inc()
        if self.response is not None and not self._done:
            self.response.close()  # its reader sees the failure and attributes it to prefill

    def _release_prefill(self, ok: bool | None) -> None:
        if self._prefill_held:
            self._prefill_held = False
            self.pair.prefill.release(self.tokens)
            if ok is not None:
                self.pair.prefill.record(ok)

    async def prefill_body(self) -> bytes:
        """Prefill's drained body (for logprob merging); empty if prefill failed."""
        resp = self.prefill_response
        if resp is None:
            return b""
        await resp.wait_done()
        return resp.peek() if resp.complete else b""

    def worker_down(self, worker: Worker, reason: str) -> None:
        """``worker`` failed its health checks mid-attempt: fail its leg now (a hung node sends no reset)."""
        error = UpstreamIOError(f"{worker.role} worker {worker.name} {reason}", timeout=True)
        if worker is self.pair.decode and self.response is not None and not self.response.done:
            self.response.abort(error)
        elif worker is self.pair.prefill and self.prefill_response is not None and not self.prefill_response.done:
            self.prefill_response.abort(error)  # _prefill_done then fails the decode leg too

    # -- closing -------------------------------------------------------------------------------------
    def failure(self, exc: BaseException) -> UpstreamError:
        """Attribute a failure while reading decode's body: to prefill if prefill broke it, else decode."""
        if isinstance(exc, UpstreamError):
            return exc
        if self.prefill_error is not None:
            return self.prefill_error
        if isinstance(exc, UpstreamIOError):
            return io_error(self.pair.decode, exc)
        return UpstreamError(f"decode worker {self.pair.decode.name}: {exc}", worker=self.pair.decode)

    async def close(self, ok: bool | None) -> None:
        """End the attempt. ``ok`` is decode's outcome for its breaker (None: not the worker's doing).

        Closing an unfinished response drops its connection, which is how a worker learns to abort.
        After a success the prefill leg is given a moment to finish draining before it is cut.
        """
        if self._done:
            return
        self._done = True
        for w in self.pair.workers:
            w.inflight.discard(self)
        resp = self.response
        if resp is not None:
            if ok and not resp.done:  # a finished stream has only its terminator left: keep the connection
                with contextlib.suppress(TimeoutError, UpstreamIOError):
                    async with asyncio.timeout(1.0):
                        await resp.wait_done()
            resp.close()
        prefill = self.prefill_response
        if prefill is not None and not prefill.done:
            if ok:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await prefill.wait_done()
            prefill.close()
        self._release_prefill(None)  # still held only if the leg never got going (cancelled)
        if self._decode_held:
            self._decode_held = False
            self.pair.decode.release(self.tokens)
            if ok is not None:
                self.pair.decode.record(ok)
        if ok is False and self.metrics is not None:
            self.metrics.upstream_failures.labels(self.pair.decode.role, "decode").inc()


def _reason(err: UpstreamError) -> str:
    if err.timeout:
        return "timeout"
    return "transport" if err.status is None else f"status_{err.status}"
