"""/v1/chat/completions and /v1/completions, tokenized at the gateway.

The gateway renders the chat template, tokenizes, runs a ``TokenGeneration`` (SGLang /generate with
input_ids on the workers, retried or migrated across pairs), detokenizes incrementally, applies stop
strings, and writes OpenAI's response shapes itself. Without a tokenizer these routes fall back to
pass-through (``gateway.passthrough``).
"""

from __future__ import annotations

import contextlib
import time

import orjson
from aiohttp import web

from gateway.auth import Principal
from gateway.context import Gateway
from gateway.errors import ApiError, invalid, sse_error_event
from gateway.generation import TokenGeneration
from gateway.http import CLIENT_GONE, start_sse
from gateway.openai_format import Formatter, usage
from gateway.sse import DONE
from gateway.stops import StopMatcher
from gateway.tokenizer import GatewayTokenizer, IncrementalDetokenizer, TokenizerUnavailable
from gateway.validation import ChatRequest, CompletionRequest, OpenAIRequest


def check_model(gw: Gateway, name: str) -> None:
    if not gw.model.accepts(name):
        raise ApiError(404, f"the model '{name}' does not exist; available: {', '.join(gw.model.ids)}",
                       param="model", code="model_not_found")


def prompt_ids(tok: GatewayTokenizer, req: OpenAIRequest) -> list[int]:
    if isinstance(req, ChatRequest):
        try:
            ids = tok.encode_chat(req.messages)
        except TokenizerUnavailable as e:
            raise invalid(str(e), "messages", "no_chat_template") from e
        except Exception as e:  # a template's raise_exception (e.g. role order it does not accept)
            raise invalid(f"the chat template rejected these messages: {e}", "messages") from e
        return ids
    assert isinstance(req, CompletionRequest)
    if isinstance(req.prompt, list):
        if any(t >= tok.vocab_size for t in req.prompt):
            raise invalid(f"'prompt' holds a token id outside the vocabulary (size {tok.vocab_size})", "prompt")
        return list(req.prompt)
    return tok.encode(req.prompt)


def check_logit_bias_vocab(tok: GatewayTokenizer, req: OpenAIRequest) -> None:
    """A logit_bias token id outside the vocabulary is the client's error (400 here, as SGLang's), not a worker's."""
    bad = next((t for t in req.sampling.get("logit_bias", {}) if int(t) >= tok.vocab_size), None)
    if bad is not None:
        raise invalid(f"'logit_bias' holds token id {bad}, outside the vocabulary (size {tok.vocab_size})",
                      "logit_bias")


def token_budget(gw: Gateway, req: OpenAIRequest, n_prompt: int) -> int:
    """max_tokens, defaulted and checked against the context length (400 naming the field)."""
    ctx = gw.model.context_length
    field = "messages" if isinstance(req, ChatRequest) else "prompt"
    if ctx is not None and n_prompt >= ctx:
        raise invalid(f"the prompt is {n_prompt} tokens, at or over the model's context length {ctx}", field,
                      "context_length_exceeded")
    if req.max_tokens is None:
        budget = gw.cfg.default_max_tokens
        return budget if ctx is None else min(budget, ctx - n_prompt)
    if ctx is not None and n_prompt + req.max_tokens > ctx:
        raise invalid(f"prompt ({n_prompt} tokens) + max_tokens ({req.max_tokens}) exceeds the context length "
                      f"{ctx}", "max_tokens", "context_length_exceeded")
    return req.max_tokens


async def serve_openai(request: web.Request, gw: Gateway, req: OpenAIRequest, kind: str, route: str,
                       t0: float, principal: Principal) -> web.StreamResponse:
    tok = gw.tokenizer
    assert tok is not None
    check_model(gw, req.model)
    ids = prompt_ids(tok, req)
    check_logit_bias_vocab(tok, req)
    budget = token_budget(gw, req, len(ids))
    await gw.auth.charge(principal, len(ids) + budget)
    gen = TokenGeneration(gw, ids, req.sampling, budget, req.logprobs)
    fmt = Formatter(kind, req.model, tok)
    echo = ""
    if isinstance(req, CompletionRequest) and req.echo:
        echo = req.prompt if isinstance(req.prompt, str) else tok.decode(req.prompt)
    if req.stream:
        return await _stream(request, gw, gen, fmt, req, route, t0, echo)
    return await _whole(gw, gen, fmt, req, route, t0, echo)


async def _whole(gw: Gateway, gen: TokenGeneration, fmt: Formatter, req: OpenAIRequest, route: str,
                 t0: float, echo: str) -> web.Response:
    detok = IncrementalDetokenizer(fmt.tok)
    stops = StopMatcher(req.stop)
    parts = [echo]
    t_first = None
    async with contextlib.aclosing(gen.tokens()) as tokens:
        async for ids in tokens:
            t_first = t_first or time.perf_counter()
            parts.append(stops.feed(detok.push(ids)))
            if stops.matched is not None:
                break
    if stops.matched is None:
        parts.append(stops.feed(detok.finish()))
        parts.append(stops.flush())
    finish = "stop" if stops.matched is not None else (gen.finish_reason or "stop")
    n_out = len(gen.output_ids)
    _observe(gw, route, t0, t_first, n_out)
    body = fmt.full("".join(parts), finish, usage(len(gen.prompt_ids), n_out), fmt.logprobs(gen.output_logprobs))
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _stream(request: web.Request, gw: Gateway, gen: TokenGeneration, fmt: Formatter, req: OpenAIRequest,
                  route: str, t0: float, echo: str) -> web.StreamResponse:
    detok = IncrementalDetokenizer(fmt.tok)
    stops = StopMatcher(req.stop)
    resp: web.StreamResponse | None = None
    t_first = None
    lp_sent = 0

    async def begin() -> web.StreamResponse:
        nonlocal t_first
        out = await start_sse(request)
        gen.delivered = True
        t_first = time.perf_counter()
        if fmt.kind == "chat":
            await out.write(fmt.chunk("", role=True))
        if echo:
            await out.write(fmt.chunk(echo))
        return out

    try:
        async with contextlib.aclosing(gen.tokens()) as tokens:
            try:
                async for ids in tokens:
                    if resp is None:
                        resp = await begin()
                    text = stops.feed(detok.push(ids))
                    lps = None
                    if req.logprobs is not None and len(gen.output_logprobs) > lp_sent:
                        lps = fmt.logprobs(gen.output_logprobs[lp_sent:])
                        lp_sent = len(gen.output_logprobs)
                    if text or lps:
                        await resp.write(fmt.chunk(text, logprobs=lps))
                    if stops.matched is not None:
                        break
            except ApiError as e:
                if resp is None:
                    raise  # nothing sent yet: the client gets a proper status
                request["final_status"] = e.status
                await resp.write(sse_error_event(e))
                await resp.write(DONE)
                return resp
        if resp is None:
            resp = await begin()
        rest = ""
        if stops.matched is None:
            rest = stops.feed(detok.finish())
            rest += stops.flush()
        finish = "stop" if stops.matched is not None else (gen.finish_reason or "stop")
        await resp.write(fmt.chunk(rest, finish_reason=finish))
        if req.include_usage:
            await resp.write(fmt.usage_chunk(usage(len(gen.prompt_ids), len(gen.output_ids))))
        await resp.write(DONE)
        await resp.write_eof()
    except CLIENT_GONE:
        # The client went away: aclosing() has already closed both upstream legs.
        request["final_status"] = 499
        return resp or web.Response(status=499)
    _observe(gw, route, t0, t_first, len(gen.output_ids))
    return resp


def _observe(gw: Gateway, route: str, t0: float, t_first: float | None, n_out: int) -> None:
    now = time.perf_counter()
    m = gw.metrics
    m.observe(m.e2e, route, now - t0)
    if t_first is not None:
        m.observe(m.ttft, route, t_first - t0)
        if n_out > 1:
            m.observe(m.tpot, route, (now - t_first) / (n_out - 1))
        gw.workload.timed_span(t_first - t0, now - t0, n_out)
