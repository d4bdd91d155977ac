"""The engine's HTTP API, as SGLang serves it (see the research notes, §3 and the checklist §3.10).

Native: /generate (stream: cumulative ``text``/``output_ids`` per event, then ``data: [DONE]``).
OpenAI: /v1/completions, /v1/chat/completions, /v1/models. Control and introspection: /health,
/health_generate, /model_info, /server_info (and the older get_* spellings), /flush_cache, /metrics,
/v1/loads, /get_load, /pd_role_switch, /abort_request. Every error is an OpenAI-style JSON body.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from replicas.engine import responses as R
from replicas.engine.engine import Engine
from replicas.engine.errors import ApiError, bad_request, error_body, error_response, sse_error_event
from replicas.engine.metrics import CONTENT_TYPE
from replicas.engine.protocol import ParsedRequest, parse_chat, parse_completion, parse_generate
from replicas.engine.sequence import Sequence

log = logging.getLogger("replicas.engine.server")
MAX_BODY_BYTES = 64 * 1024 * 1024
Parser = Callable[[Any, Any, int], ParsedRequest]


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json")


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        raise bad_request("request body is empty; send a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e}") from None


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
    """Unknown routes, wrong methods and unexpected failures answer in JSON too, never with a traceback."""
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _json(error_body(e.status, f"{request.method} {request.path}: {e.reason}"), e.status)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as e:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _json(error_body(500, f"internal error: {e!r}"), 500)


class EngineServer:
    """Routes -> Engine. One instance per process."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def app(self) -> web.Application:
        app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY_BYTES)
        r = app.router
        for path in ("/health", "/ping"):
            r.add_get(path, self.health)
        r.add_get("/health_generate", self.health_generate)
        r.add_get("/v1/models", self.models)
        r.add_get("/v1/models/{model:.+}", self.model)
        for path in ("/model_info", "/get_model_info"):
            r.add_get(path, self.model_info)
        for path in ("/server_info", "/get_server_info"):
            r.add_get(path, self.server_info)
        r.add_post("/generate", self.generate)
        r.add_put("/generate", self.generate)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.chat)
        r.add_route("*", "/flush_cache", self.flush_cache)
        r.add_get("/metrics", self.metrics)
        r.add_get("/v1/loads", self.loads)
        r.add_get("/get_load", self.get_load)
        r.add_post("/pd_role_switch", self.pd_role_switch)
        r.add_post("/abort_request", self.abort_request)
        return app

    # -- health and info -----------------------------------------------------------------------------
    async def health(self, _: web.Request) -> web.Response:
        e = self.engine
        if e.ready and not e.unhealthy and not e.closing:
            return web.Response(status=200)
        state = "shutting down" if e.closing else ("unhealthy" if e.unhealthy else "starting")
        return _json(error_body(503, f"the server is {state}"), 503)

    async def health_generate(self, request: web.Request) -> web.Response:
        resp = await self.health(request)
        if resp.status != 200:
            return resp
        ok = await self.engine.health_generate()
        return web.Response(status=200) if ok else _json(error_body(503, "health generation failed"), 503)

    def _model_card(self) -> dict[str, Any]:
        e = self.engine
        return {"id": e.cfg.name, "object": "model", "created": int(e.started_at), "owned_by": "sglang",
                "root": e.backend.model_path if e.backend else e.cfg.model,
                "max_model_len": e.context_length if e.backend else None}

    async def models(self, _: web.Request) -> web.Response:
        return _json({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name != self.engine.cfg.name:
            raise ApiError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return _json(self._model_card())

    async def model_info(self, _: web.Request) -> web.Response:
        return _json(self.engine.model_info())

    async def server_info(self, _: web.Request) -> web.Response:
        return _json(self.engine.server_info())

    async def metrics(self, _: web.Request) -> web.Response:
        self.engine.refresh_gauges()
        return web.Response(body=self.engine.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def loads(self, _: web.Request) -> web.Response:
        return _json(self.engine.loads())

    async def get_load(self, _: web.Request) -> web.Response:
        load = self.engine.loads()["loads"][0]
        return _json([{"dp_rank": 0, "num_reqs": load["num_running_reqs"] + load["num_waiting_reqs"],
                       "num_waiting_reqs": load["num_waiting_reqs"], "num_tokens": load["num_used_tokens"]}])

    # -- control -------------------------------------------------------------------------------------
    async def flush_cache(self, _: web.Request) -> web.Response:
        if not self.engine.idle:
            return web.Response(status=400, text="Cache not flushed: there are running or waiting requests.")
        return web.Response(text="Cache flushed.\nPlease check backend logs for more details. "
                                 "(When there are running or waiting requests, the operation will not be performed.)")

    async def pd_role_switch(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object like {\"new_role\": \"decode\"}", "new_role")
        started = time.perf_counter()
        status, answer = await self.engine.switch_role(body)
        answer["elapsed_ms"] = round((time.perf_counter() - started) * 1000, 3)
        return _json(answer, status)

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object")
        s = self.engine.scheduler
        if s is None:
            return web.Response(status=200)
        rid, everything = body.get("rid"), bool(body.get("abort_all"))
        for seq in [*s.waiting, *s.running.values()]:
            if everything or seq.item.rid == rid:
                self.engine.abort(seq, "aborted by /abort_request")
        return web.Response(status=200)

    # -- generation ----------------------------------------------------------------------------------
    async def generate(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, parse_generate, "generate")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, parse_completion, "completion")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, parse_chat, "chat")

    async def _generation(self, request: web.Request, parse: Parser, kind: str) -> web.StreamResponse:
        e = self.engine
        e.check_serving()
        parsed = parse(await read_json(request), e.tokenizer, e.context_length)
        seqs: list[Sequence] = []
        e.active += 1
        try:
            results = await asyncio.gather(*(e.start(item) for item in parsed.items), return_exceptions=True)
            seqs = [r for r in results if isinstance(r, Sequence)]
            failures = [r for r in results if not isinstance(r, Sequence)]
            if failures:
                raise failures[0]
            if parsed.stream:
                return await self._stream(request, kind, parsed, seqs)
            for seq in seqs:
                await seq.wait_finished()
            failed = next((s.error for s in seqs if s.error is not None), None)
            if failed is not None:
                raise failed
            return _json(self._final(kind, parsed, seqs))
        finally:
            for seq in seqs:
                e.abort(seq)
            e.active -= 1

    def _final(self, kind: str, parsed: ParsedRequest, seqs: list[Sequence]) -> Any:
        tok, name = self.engine.tokenizer, self.engine.cfg.name
        if kind == "generate":
            objs = [R.generate_object(s, tok) for s in seqs]
            return objs if parsed.batch else objs[0]
        rid = parsed.items[0].rid
        if kind == "completion":
            return R.completion_object(rid, name, seqs, tok)
        return R.chat_object(rid, name, seqs[0], tok)

    async def _stream(self, request: web.Request, kind: str, parsed: ParsedRequest, seqs: list[Sequence]
                      ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        writer = _StreamWriter(kind, parsed, seqs, self.engine)
        pending = list(seqs)
        try:
            await resp.write(writer.opening())
            while pending:
                await _any_changed(pending)
                out = []
                for seq in list(pending):
                    out.append(writer.update(seq))
                    if seq.finished:
                        pending.remove(seq)
                if out:
                    await resp.write(b"".join(out))
            await resp.write(writer.closing() + R.DONE)
            await resp.write_eof()
        except ConnectionError:  # the client went away: the caller aborts what is still running
            log.debug("client disconnected from a stream")
        return resp


async def _any_changed(seqs: list[Sequence]) -> None:
    if any(s.finished for s in seqs):
        return
    if len(seqs) == 1:
        await seqs[0].changed()
        return
    tasks = [asyncio.ensure_future(s.changed()) for s in seqs]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


class _StreamWriter:
    """SSE chunks for one streamed request: what is new in each sequence since the last chunk."""

    def __init__(self, kind: str, parsed: ParsedRequest, seqs: list[Sequence], engine: Engine) -> None:
        self.kind, self.parsed, self.seqs = kind, parsed, seqs
        self.tok, self.name = engine.tokenizer, engine.cfg.name
        self.rid = parsed.items[0].rid
        self.sent_tokens = {s.key: 0 for s in seqs}
        self.sent_chars = {s.key: 0 for s in seqs}
        self.index = {s.key: i for i, s in enumerate(seqs)}

    def opening(self) -> bytes:
        if self.kind == "chat":
            return _sse(R.chat_chunk(self.rid, self.name, {"role": "assistant", "content": ""}, None))
        return b""

    def update(self, seq: Sequence) -> bytes:
        if seq.error is not None:
            return sse_error_event(seq.error)
        n_tok, n_chr = self.sent_tokens[seq.key], self.sent_chars[seq.key]
        if len(seq.output_ids) == n_tok and not seq.finished:
            return b""
        self.sent_tokens[seq.key] = len(seq.output_ids)
        self.sent_chars[seq.key] = max(n_chr, len(seq.text))
        delta = seq.text[n_chr:]
        finish = R.finish_reason_name(seq)
        matched = R.matched_stop(seq)
        if self.kind == "generate":
            return _sse(R.generate_object(seq, self.tok, self.index[seq.key] if self.parsed.batch else None))
        if self.kind == "completion":
            lp = R.completion_logprobs(seq, self.tok, n_tok)
            return _sse(R.completion_chunk(self.rid, self.name, self.index[seq.key], delta, finish, lp, matched))
        lp = R.chat_logprobs(seq, self.tok, n_tok)
        out = b""
        if delta or lp:
            out += _sse(R.chat_chunk(self.rid, self.name, {"content": delta}, None, lp))
        if finish is not None:
            out += _sse(R.chat_chunk(self.rid, self.name, {}, finish, None, matched))
        return out

    def closing(self) -> bytes:
        if self.kind != "generate" and self.parsed.include_usage:
            obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
            return _sse(R.usage_chunk(self.rid, self.name, obj, self.seqs))
        return b""
