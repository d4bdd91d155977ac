"""Request parsing for /generate (SGLang's GenerateReqInput) and the OpenAI routes, with field-level errors.

Each parser returns a ``ParsedRequest``: one ``GenerateItem`` per prompt (token ids, sampling params,
logprob options, PD bootstrap fields), so the engine never sees route-specific shapes. Unknown fields
are ignored, as SGLang does (the Rust router adds defaults such as ``log_metrics``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from replicas.engine.errors import bad_request
from replicas.engine.sampling import (
    SamplingParams,
    check_bool,
    check_int,
    check_logit_bias,
    check_number,
    check_stop,
    parse_sampling_params,
)
from replicas.engine.sequence import GenerateItem
from replicas.engine.tokenizer import Tokenizer

MAX_ROOM = 2**64 - 1
MAX_TOP_LOGPROBS = 20
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass
class ParsedRequest:
    items: list[GenerateItem]
    batch: bool = False
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def check_prompt(ids: list[int], tok: Tokenizer, context_length: int, param: str) -> list[int]:
    if not ids:
        raise bad_request(f"{param}: the prompt is empty", param)
    bad = next((i for i in ids if not 0 <= i < tok.vocab_size), None)
    if bad is not None:
        raise bad_request(f"{param}: token id {bad} is outside the vocabulary [0, {tok.vocab_size})", param)
    if len(ids) >= context_length:
        raise bad_request(f"The input ({len(ids)} tokens) is longer than the model's context length "
                          f"({context_length} tokens).", param)
    return ids


def _per_item(body: dict[str, Any], key: str, n: int, batch: bool, check: Callable[[Any, str], Any],
              default: Any) -> list[Any]:
    """A field given once for all prompts or as a list with one value per prompt."""
    value = body.get(key)
    if value is None:
        return [default] * n
    if batch and isinstance(value, list):
        if len(value) != n:
            raise bad_request(f"{key} has {len(value)} entries for {n} prompts", key)
        return [default if v is None else check(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return [check(value, key)] * n


def _check_str(v: Any, param: str) -> str:
    if not isinstance(v, str):
        raise bad_request(f"{param} must be a string, got {v!r}", param)
    return v


def _check_port(v: Any, param: str) -> int:
    return check_int(v, param, low=1, high=65535)


def _check_room(v: Any, param: str) -> int:
    return check_int(v, param, low=0, high=MAX_ROOM)


def _check_compression(v: Any, param: str) -> str:
    if v not in ("none", "int8", "int4"):
        raise bad_request(f"{param} must be none, int8 or int4, got {v!r}", param)
    return v


def _bootstrap(body: dict[str, Any], n: int, batch: bool) -> tuple[list[Any], list[Any], list[Any]]:
    hosts = _per_item(body, "bootstrap_host", n, batch, _check_str, None)
    ports = _per_item(body, "bootstrap_port", n, batch, _check_port, None)
    room = body.get("bootstrap_room")
    if batch and room is not None and not isinstance(room, list):
        base = _check_room(room, "bootstrap_room")
        rooms = [(base + i) % (MAX_ROOM + 1) for i in range(n)]  # SGLang: a scalar room on a batch is room + i
    else:
        rooms = _per_item(body, "bootstrap_room", n, batch, _check_room, None)
    return hosts, ports, rooms


def parse_generate(body: Any, tok: Tokenizer, context_length: int) -> ParsedRequest:
    body = require_object(body)
    if body.get("input_embeds") is not None:
        raise bad_request("input_embeds is not supported by the reference engine", "input_embeds")
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise bad_request("give exactly one of text or input_ids", "text")
    if text is not None:
        param = "text"
        if isinstance(text, str):
            prompts, batch = [tok.encode(text)], False
        elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            prompts, batch = [tok.encode(t) for t in text], True
        else:
            raise bad_request(f"text must be a string or a non-empty list of strings, got {text!r:.80}", "text")
    else:
        param = "input_ids"
        if isinstance(ids, list) and ids and all(_is_int(i) for i in ids):
            prompts, batch = [list(ids)], False
        elif isinstance(ids, list) and ids and all(isinstance(x, list) and all(_is_int(i) for i in x) for x in ids):
            prompts, batch = [list(x) for x in ids], True
        else:
            raise bad_request("input_ids must be a non-empty list of token ids (or a list of such lists)", "input_ids")
    n = len(prompts)
    for i, p in enumerate(prompts):
        check_prompt(p, tok, context_length, f"{param}[{i}]" if batch else param)
    raw_sp = body.get("sampling_params")
    if isinstance(raw_sp, list):
        if len(raw_sp) != n:
            raise bad_request(f"sampling_params has {len(raw_sp)} entries for {n} prompts", "sampling_params")
        params = [parse_sampling_params(sp, f"sampling_params[{i}]") for i, sp in enumerate(raw_sp)]
    else:
        params = [parse_sampling_params(raw_sp)] * n
    for i, sp in enumerate(params):
        check_bias_vocab(sp, tok, f"sampling_params[{i}].logit_bias" if isinstance(raw_sp, list) else
                         "sampling_params.logit_bias")
    rids = _per_item(body, "rid", n, batch, _check_str, None)
    rids = [r or uuid.uuid4().hex for r in rids]
    stream = check_bool(body["stream"], "stream") if body.get("stream") is not None else False
    logprob = _per_item(body, "return_logprob", n, batch, check_bool, False)
    start = _per_item(body, "logprob_start_len", n, batch, lambda v, p: check_int(v, p, low=-1), -1)
    top = _per_item(body, "top_logprobs_num", n, batch,
                    lambda v, p: check_int(v, p, low=0, high=MAX_TOP_LOGPROBS), 0)
    with_text = check_bool(body["return_text_in_logprobs"], "return_text_in_logprobs") \
        if body.get("return_text_in_logprobs") is not None else False
    hosts, ports, rooms = _bootstrap(body, n, batch)
    compression = _check_compression(body["kv_compression"], "kv_compression") \
        if body.get("kv_compression") is not None else None
    items = [
        GenerateItem(input_ids=prompts[i], params=params[i], rid=rids[i], return_logprob=logprob[i],
                     logprob_start_len=start[i], top_logprobs_num=top[i], return_text_in_logprobs=with_text,
                     bootstrap_host=hosts[i], bootstrap_port=ports[i], bootstrap_room=rooms[i],
                     kv_compression=compression, input_field=param)
        for i in range(n)
    ]
    return ParsedRequest(items=items, batch=batch, stream=stream)


def check_bias_vocab(p: SamplingParams, tok: Tokenizer, param: str) -> None:
    """SGLang answers 400 for a logit_bias token id outside the vocabulary: so does the reference engine."""
    bad = next((t for t in p.logit_bias if t >= tok.vocab_size), None)
    if bad is not None:
        raise bad_request(f"{param}: token id {bad} is outside the vocabulary [0, {tok.vocab_size})", param)


def openai_sampling(body: dict[str, Any], default_max: int | None) -> SamplingParams:
    """OpenAI request fields (plus SGLang's extensions) -> SamplingParams; errors name the OpenAI field."""
    p = SamplingParams()
    n = body.get("n")
    if n is not None and check_int(n, "n", low=1) != 1:
        raise bad_request("n: only n=1 is supported by the reference engine", "n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if body.get(key) is not None:
        p.max_new_tokens = check_int(body[key], key, low=0)
    elif default_max is not None:
        p.max_new_tokens = default_max
    if body.get("min_tokens") is not None:
        p.min_new_tokens = check_int(body["min_tokens"], "min_tokens", low=0)
    if body.get("temperature") is not None:
        p.temperature = check_number(body["temperature"], "temperature", low=0.0, high=2.0)
    if body.get("top_p") is not None:
        p.top_p = check_number(body["top_p"], "top_p", low=0.0, high=1.0)
        if p.top_p <= 0:
            raise bad_request("top_p must be in (0, 1]", "top_p")
    if body.get("top_k") is not None:
        p.top_k = check_int(body["top_k"], "top_k")
        if p.top_k == 0 or p.top_k < -1:
            raise bad_request(f"top_k must be -1 (all) or >= 1, got {p.top_k}", "top_k")
    if body.get("min_p") is not None:
        p.min_p = check_number(body["min_p"], "min_p", low=0.0, high=1.0)
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) is not None:
            setattr(p, name, check_number(body[name], name, low=-2.0, high=2.0))
    if body.get("repetition_penalty") is not None:
        p.repetition_penalty = check_number(body["repetition_penalty"], "repetition_penalty", low=0.0)
        if p.repetition_penalty <= 0:
            raise bad_request("repetition_penalty must be > 0", "repetition_penalty")
    p.stop = check_stop(body.get("stop"), "stop")
    if body.get("stop_token_ids") is not None:
        ids = body["stop_token_ids"]
        if not isinstance(ids, list) or not all(_is_int(i) and i >= 0 for i in ids):
            raise bad_request("stop_token_ids must be a list of token ids", "stop_token_ids")
        p.stop_token_ids = list(ids)
    for name in ("ignore_eos", "skip_special_tokens", "no_stop_trim"):
        if body.get(name) is not None:
            setattr(p, name, check_bool(body[name], name))
    if body.get("seed") is not None:
        p.seed = check_int(body["seed"], "seed")
    if body.get("logit_bias") is not None:
        p.logit_bias = check_logit_bias(body["logit_bias"], "logit_bias")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type", "text") != "text"):
        raise bad_request("response_format: only {\"type\": \"text\"} is supported by the reference engine",
                          "response_format")
    if body.get("tools"):
        raise bad_request("tools are not supported by the reference engine", "tools")
    return p


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = check_bool(body["stream"], "stream") if body.get("stream") is not None else False
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad_request("stream_options must be an object", "stream_options")
        if opts.get("include_usage") is not None:
            include_usage = check_bool(opts["include_usage"], "stream_options.include_usage")
    return stream, include_usage


def _openai_items(body: dict[str, Any], prompts: list[list[int]], params: SamplingParams, want_logprob: bool,
                  top: int, field_name: str) -> list[GenerateItem]:
    n = len(prompts)
    hosts, ports, rooms = _bootstrap(body, n, n > 1)
    compression = _check_compression(body["kv_compression"], "kv_compression") \
        if body.get("kv_compression") is not None else None
    base = body.get("rid") if isinstance(body.get("rid"), str) else uuid.uuid4().hex
    return [
        GenerateItem(input_ids=prompts[i], params=params, rid=base if n == 1 else f"{base}-{i}",
                     return_logprob=want_logprob, top_logprobs_num=top, bootstrap_host=hosts[i],
                     bootstrap_port=ports[i], bootstrap_room=rooms[i], kv_compression=compression,
                     input_field=field_name)
        for i in range(n)
    ]


def parse_completion(body: Any, tok: Tokenizer, context_length: int) -> ParsedRequest:
    body = require_object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [tok.encode(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [tok.encode(p) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(i) for i in prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and all(_is_int(i) for i in p)
                                                     for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise bad_request("prompt must be a string, a list of strings, or token ids", "prompt")
    for i, p in enumerate(prompts):
        check_prompt(p, tok, context_length, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
    if body.get("echo"):
        raise bad_request("echo is not supported by the reference engine", "echo")
    if body.get("suffix"):
        raise bad_request("suffix is not supported by the reference engine", "suffix")
    params = openai_sampling(body, default_max=16)
    check_bias_vocab(params, tok, "logit_bias")
    logprobs = body.get("logprobs")
    top = 0 if logprobs is None else check_int(logprobs, "logprobs", low=0, high=MAX_TOP_LOGPROBS)
    stream, include_usage = _stream_options(body)
    items = _openai_items(body, prompts, params, logprobs is not None, top, "prompt")
    return ParsedRequest(items=items, batch=len(items) > 1, stream=stream, include_usage=include_usage,
                         model=body.get("model") if isinstance(body.get("model"), str) else None)


def chat_messages(raw: Any) -> list[dict[str, str]]:
    """Validate OpenAI chat messages and flatten text parts into plain strings."""
    if not isinstance(raw, list) or not raw:
        raise bad_request("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", where)
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}", f"{where}.role")
        content = m.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"{where}.content[{j}]: only text parts are supported", f"{where}.content")
                parts.append(part["text"])
            text = "".join(parts)
        else:
            raise bad_request(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": text})
    return out


def parse_chat(body: Any, tok: Tokenizer, context_length: int) -> ParsedRequest:
    body = require_object(body)
    messages = chat_messages(body.get("messages"))
    ids = check_prompt(tok.chat_ids(messages), tok, context_length, "messages")
    params = openai_sampling(body, default_max=context_length - len(ids))
    check_bias_vocab(params, tok, "logit_bias")
    want = check_bool(body["logprobs"], "logprobs") if body.get("logprobs") is not None else False
    top = 0
    if body.get("top_logprobs") is not None:
        top = check_int(body["top_logprobs"], "top_logprobs", low=0, high=MAX_TOP_LOGPROBS)
    stream, include_usage = _stream_options(body)
    items = _openai_items(body, [ids], params, want, top, "messages")
    return ParsedRequest(items=items, stream=stream, include_usage=include_usage,
                         model=body.get("model") if isinstance(body.get("model"), str) else None)
