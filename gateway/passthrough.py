"""Pass-through dispatch: the client's body goes to both workers with only the bootstrap fields added.

Used for SGLang-native /generate, and for the OpenAI routes when the gateway has no tokenizer. The
body is never re-serialised (the fields are spliced in); a non-stream answer is returned as decode
sent it (with prefill's prompt logprobs merged in when asked for, as SGLang's router does); a stream is
relayed chunk by chunk as it arrives. Failures before the first byte are retried on a new pair; after
it a pass-through stream cannot be resumed (the gateway does not know the tokens), so the client gets
an SSE error event. OpenAI routes with a tokenizer, and /generate streams given as ``input_ids``,
migrate instead (``gateway.generation``, ``gateway.generate_stream``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from aiohttp import web

from gateway.context import Gateway
from gateway.errors import ApiError, sse_error_event
from gateway.generation import upstream_to_api
from gateway.http import CLIENT_GONE, start_sse
from gateway.sse import DONE
from gateway.upstream import Exchange, UpstreamError, splice_bootstrap
from gateway.upstream_http import UpstreamIOError, UpstreamResponse
from gateway.workload_meter import StreamTail

log = logging.getLogger("gateway.passthrough")

_READ_ERRORS = (UpstreamIOError,)


def _input_logprobs(prefill_body: bytes) -> list[Any] | None:
    """Prefill's meta_info.input_token_logprobs from its JSON body or its first SSE event."""
    data = prefill_body.strip()
    if data.startswith(b"data:"):
        data = data[5:].split(b"\n", 1)[0].strip()
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if isinstance(obj, list):
        obj = obj[0] if obj else None
    if not isinstance(obj, dict):
        return None
    meta = obj.get("meta_info")
    return meta.get("input_token_logprobs") if isinstance(meta, dict) else None


def _prepend(obj: Any, prompt_lps: list[Any]) -> bool:
    items = obj if isinstance(obj, list) else [obj]
    changed = False
    for item in items:
        meta = item.get("meta_info") if isinstance(item, dict) else None
        if isinstance(meta, dict) and isinstance(meta.get("input_token_logprobs"), list):
            meta["input_token_logprobs"] = prompt_lps + meta["input_token_logprobs"]
            changed = True
    return changed


def merge_logprobs(prefill_body: bytes, decode_body: bytes) -> bytes:
    """decode's body with prefill's prompt logprobs first (SGLang router semantics); unchanged if either lacks them."""
    prompt_lps = _input_logprobs(prefill_body)
    if not prompt_lps:
        return decode_body
    try:
        obj = orjson.loads(decode_body)
    except orjson.JSONDecodeError:
        return decode_body
    return orjson.dumps(obj) if _prepend(obj, prompt_lps) else decode_body


def merge_logprobs_event(line: bytes, prompt_lps: list[Any]) -> bytes:
    """One SSE line with prefill's prompt logprobs merged in (non-data lines and [DONE] untouched)."""
    if not line.startswith(b"data:"):
        return line
    payload = line[5:].strip()
    if payload == b"[DONE]":
        return line
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return line
    return b"data: " + orjson.dumps(obj) + b"\n" if _prepend(obj, prompt_lps) else line


async def serve_passthrough(request: web.Request, gw: Gateway, raw: bytes, path: str, *, stream: bool,
                            tokens: int, want_logprobs: bool, route: str, t0: float) -> web.StreamResponse:
    attempts = 0
    avoid: set = set()
    path_bytes = path.encode()
    while True:
        pair = await gw.choose_pair(avoid)  # 503 no_workers when none comes
        ex = gw.exchange(pair, path_bytes, tokens, stream)
        try:
            up = await ex.open(splice_bootstrap(raw, pair))
            if not stream:
                data = await up.read()
                if want_logprobs and not pair.colocated:
                    data = merge_logprobs(await ex.prefill_body(), data)
                await ex.close(True)
                gw.metrics.observe(gw.metrics.e2e, route, time.perf_counter() - t0)
                if up.status == 200:
                    gw.workload.record_answer(data)
                return web.Response(body=data, status=up.status, content_type="application/json")
            first = await up.readany()
            if not first:
                raise UpstreamError(f"decode worker {pair.decode.name} closed the stream before any byte",
                                    worker=pair.decode)
        except UpstreamError as e:
            err = e
            await ex.close(False if e.worker is pair.decode else None)
        except _READ_ERRORS as e:
            err = ex.failure(e)
            await ex.close(False if err.worker is pair.decode else None)
        except BaseException:
            await ex.close(None)
            raise
        else:
            return await _relay(request, gw, ex, up, first, want_logprobs, route, t0)
        if err.worker is not None:
            avoid.add(err.worker)
        attempts += 1
        if not err.retryable or attempts >= gw.cfg.max_attempts:
            raise upstream_to_api(err)
        gw.metrics.retries.inc()
        log.warning("retrying on a new pair (%s)", err.message)
        await asyncio.sleep(gw.retry_backoff_s(attempts))


async def _relay(request: web.Request, gw: Gateway, ex: Exchange, up: UpstreamResponse, first: bytes,
                 want_logprobs: bool, route: str, t0: float) -> web.StreamResponse:
    """Copy decode's stream to the client as it comes; the status line goes out with the first chunk."""
    outcome: bool | None = None
    resp = await start_sse(request)
    try:
        ttft = time.perf_counter() - t0
        gw.metrics.observe(gw.metrics.ttft, route, ttft)
        if want_logprobs and not ex.pair.colocated:
            await _relay_merged(resp, ex, up, first)
        else:
            await resp.write(first)
            tail = StreamTail()
            tail.add(first)
            while chunk := await up.readany():
                await resp.write(chunk)
                tail.add(chunk)
            gw.workload.record_answer(tail.data(), ttft, time.perf_counter() - t0)
        outcome = True
        await resp.write_eof()
        gw.metrics.observe(gw.metrics.e2e, route, time.perf_counter() - t0)
    except CLIENT_GONE:
        request["final_status"] = 499
    except _READ_ERRORS as e:
        err = ex.failure(e)
        outcome = False if err.worker is ex.pair.decode else None
        request["final_status"] = 502
        log.warning("pass-through stream broke after the first byte, cannot resume: %s", err.message)
        try:
            await resp.write(sse_error_event(ApiError(502, f"upstream failed mid-stream: {err.message}",
                                                      code="upstream_error")))
            await resp.write(DONE)
        except CLIENT_GONE:
            pass
    finally:
        await ex.close(outcome)
    return resp


async def _relay_merged(resp: web.StreamResponse, ex: Exchange, up: UpstreamResponse, first: bytes) -> None:
    prompt_lps = _input_logprobs(await ex.prefill_body()) or []
    buf = first
    while True:
        *lines, buf = buf.split(b"\n")
        for line in lines:
            await resp.write(merge_logprobs_event(line + b"\n", prompt_lps) if prompt_lps else line + b"\n")
        chunk = await up.readany()
        if not chunk:
            break
        buf += chunk
    if buf:
        await resp.write(buf)
