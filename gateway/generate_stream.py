"""SGLang-native /generate streams given as ``input_ids``: relayed event by event, and resumable.

Such a stream carries everything migration needs (the prompt ids, and the output ids in each event),
so it gets the same treatment as the OpenAI routes: a failure after the first byte resumes on a new
pair with ``input_ids = prompt + output so far``. Until a migration the worker's events go out as
they came; after one, each event is rewritten so the client still sees one answer: cumulative
``output_ids``, ``text`` and output logprobs over the whole answer, and the original prompt length.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import orjson
from aiohttp import web

from gateway.context import Gateway
from gateway.errors import ApiError, sse_error_event
from gateway.generation import Step, TokenGeneration
from gateway.http import CLIENT_GONE, start_sse
from gateway.sse import DONE
from gateway.validation import GenerateRequest

# Fields the gateway sets on every attempt itself; the rest of the client's body goes along unchanged.
_OWN_FIELDS = frozenset({"input_ids", "text", "sampling_params", "stream", "bootstrap_host", "bootstrap_port",
                         "bootstrap_room"})


class _Rewriter:
    """Makes a resumed attempt's events read as the continuation of the first attempt's."""

    def __init__(self, gw: Gateway, gen: TokenGeneration) -> None:
        self.gw = gw
        self.gen = gen
        self.offset = 0
        self.last_text = ""
        self.base_text = ""
        self.last_lps: list[Any] = []
        self.base_lps: list[Any] = []

    def __call__(self, step: Step) -> bytes:
        chunk = step.chunk
        meta = chunk.get("meta_info") if isinstance(chunk.get("meta_info"), dict) else None
        if step.offset != self.offset:  # the first event of a resumed attempt
            self.offset = step.offset
            self.base_text, self.base_lps = self.last_text, self.last_lps
        if step.offset == 0:
            out = step.raw
        else:
            if step.cumulative:
                chunk["output_ids"] = list(self.gen.output_ids)
                tok = self.gw.tokenizer
                text = chunk.get("text")
                if isinstance(text, str):
                    chunk["text"] = tok.decode(self.gen.output_ids) if tok is not None else self.base_text + text
                if meta is not None and isinstance(meta.get("output_token_logprobs"), list):
                    meta["output_token_logprobs"] = self.base_lps + meta["output_token_logprobs"]
            if meta is not None:
                meta["prompt_tokens"] = len(self.gen.prompt_ids)
                meta["completion_tokens"] = len(self.gen.output_ids)
            out = orjson.dumps(chunk)
        if step.cumulative:
            if isinstance(chunk.get("text"), str):
                self.last_text = chunk["text"]
            if meta is not None and isinstance(meta.get("output_token_logprobs"), list):
                self.last_lps = meta["output_token_logprobs"]
        return b"data: " + out + b"\n\n"


async def serve_generate_stream(request: web.Request, gw: Gateway, body: dict[str, Any], req: GenerateRequest,
                                route: str, t0: float) -> web.StreamResponse:
    assert req.input_ids is not None
    sampling = dict(body.get("sampling_params") or {})
    sampling.pop("max_new_tokens", None)
    extra = {k: v for k, v in body.items() if k not in _OWN_FIELDS}
    gen = TokenGeneration(gw, list(req.input_ids), sampling, req.max_new_tokens, extra=extra)
    rewrite = _Rewriter(gw, gen)
    resp: web.StreamResponse | None = None
    t_first: float | None = None
    try:
        async with contextlib.aclosing(gen.steps()) as steps:
            try:
                async for step in steps:
                    if resp is None:
                        resp = await start_sse(request)
                        gen.delivered = True
                        t_first = time.perf_counter()
                        gw.metrics.observe(gw.metrics.ttft, route, t_first - t0)
                    await resp.write(rewrite(step))
            except ApiError as e:
                if resp is None:
                    raise
                request["final_status"] = e.status
                await resp.write(sse_error_event(e))
                await resp.write(DONE)
                return resp
        if resp is None:
            resp = await start_sse(request)
        await resp.write(DONE)
        await resp.write_eof()
    except CLIENT_GONE:
        request["final_status"] = 499
        return resp or web.Response(status=499)
    now = time.perf_counter()
    gw.metrics.observe(gw.metrics.e2e, route, now - t0)
    if t_first is not None:
        gw.workload.timed_span(t_first - t0, now - t0, len(gen.output_ids))
    return resp
