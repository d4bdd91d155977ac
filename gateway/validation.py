"""Request validation: turn a client's JSON into a typed request, or a 400 naming the field at fault.

Unknown fields are ignored (clients send vendor extras); fields we cannot honour (n > 1, tools,
structured output) are refused by name rather than silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.errors import ApiError, invalid

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or 400."""
    if not raw.strip():
        raise invalid("request body is empty; send a JSON object", None, "empty_body")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise invalid(f"request body is not valid JSON: {e}", None, "invalid_json") from e
    if not isinstance(body, dict):
        raise invalid(f"request body must be a JSON object, not {type(body).__name__}", None, "invalid_type")
    return body


# -- typed field readers (bool is an int in Python: refuse it where a number is meant) ---------------
def _missing(name: str) -> ApiError:
    return invalid(f"'{name}' is required", name, "missing_required_parameter")


def _type_error(name: str, want: str, value: Any) -> ApiError:
    return invalid(f"'{name}' must be {want}, got {type(value).__name__}", name, "invalid_type")


def get_int(body: dict[str, Any], name: str, lo: int | None = None, hi: int | None = None,
            path: str | None = None) -> int | None:
    value = body.get(name)
    path = path or name
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) >= 2**63:  # JSON ints past 64 bits: floats
        raise invalid(f"'{path}' must be an integer within 64 bits, got {value:.0f}", path)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(path, "an integer", value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise invalid(f"'{path}' must be {bounds}, got {value}", path)
    return value


def get_number(body: dict[str, Any], name: str, lo: float, hi: float, path: str | None = None) -> float | None:
    value = body.get(name)
    path = path or name
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(path, "a number", value)
    if not lo <= value <= hi:
        raise invalid(f"'{path}' must be between {lo} and {hi}, got {value}", path)
    return float(value)


def get_bool(body: dict[str, Any], name: str, default: bool = False, path: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(path or name, "a boolean", value)
    return value


def get_str(body: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _missing(name)
        return None
    if not isinstance(value, str):
        raise _type_error(name, "a string", value)
    return value


def _token_ids(value: Any, path: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise _type_error(path, "a list of integer token ids", value)
    if any(t < 0 for t in value):
        raise invalid(f"'{path}' holds a negative token id", path)
    return value


# -- OpenAI requests ---------------------------------------------------------------------------------
@dataclass
class OpenAIRequest:
    """What chat and completions have in common, already mapped to SGLang sampling parameters."""

    model: str
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None = off; else number of top alternatives (0 = only the chosen token)
    user: str | None = None


@dataclass
class ChatRequest(OpenAIRequest):
    messages: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CompletionRequest(OpenAIRequest):
    prompt: str | list[int] = ""
    echo: bool = False


def _logit_bias(value: Any) -> dict[str, float]:
    """OpenAI's ``logit_bias``: token id (as a string) -> bias in [-100, 100]; SGLang takes the same map."""
    if not isinstance(value, dict):
        raise _type_error("logit_bias", "an object mapping token ids to biases", value)
    for key in value:
        if not (isinstance(key, str) and key.isdigit()):
            raise invalid(f"'logit_bias' keys must be token ids, got {key!r}", "logit_bias")
        get_number(value, key, -100.0, 100.0, path=f"logit_bias.{key}")
    return {key: float(bias) for key, bias in value.items()}


def _common(body: dict[str, Any], req: OpenAIRequest) -> None:
    req.stream = get_bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise _type_error("stream_options", "an object", opts)
        req.include_usage = get_bool(opts, "include_usage", path="stream_options.include_usage")
    n = get_int(body, "n", 1)
    if n is not None and n != 1:
        raise invalid("only n=1 is supported", "n", "unsupported_value")
    s: dict[str, Any] = {}
    for name, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0), ("min_p", 0.0, 1.0),
                         ("presence_penalty", -2.0, 2.0), ("frequency_penalty", -2.0, 2.0),
                         ("repetition_penalty", 0.0, 2.0)):
        value = get_number(body, name, lo, hi)
        if value is not None:
            s[name] = value
    if s.get("top_p") == 0.0:
        raise invalid("'top_p' must be in (0, 1], got 0", "top_p")
    if (top_k := get_int(body, "top_k", -1)) is not None:
        if top_k == 0:
            raise invalid("'top_k' must be -1 (no limit) or at least 1, got 0", "top_k")
        s["top_k"] = top_k
    if (seed := get_int(body, "seed", -(2**63), 2**63 - 1)) is not None:  # OpenAI's seed is an int64
        s["sampling_seed"] = seed
    if body.get("logit_bias") is not None:
        s["logit_bias"] = _logit_bias(body["logit_bias"])
    if (min_tokens := get_int(body, "min_tokens", 0)) is not None:
        s["min_new_tokens"] = min_tokens
    if get_bool(body, "ignore_eos"):
        s["ignore_eos"] = True
    if body.get("stop_token_ids") is not None:
        s["stop_token_ids"] = _token_ids(body["stop_token_ids"], "stop_token_ids")
    req.sampling = s
    stop = body.get("stop")
    if isinstance(stop, str):
        req.stop = [stop] if stop else []
    elif isinstance(stop, list):
        if not all(isinstance(x, str) for x in stop):
            raise _type_error("stop", "a string or a list of strings", stop)
        if len(stop) > MAX_STOP_STRINGS:
            raise invalid(f"'stop' may hold at most {MAX_STOP_STRINGS} strings", "stop")
        req.stop = [x for x in stop if x]
    elif stop is not None:
        raise _type_error("stop", "a string or a list of strings", stop)
    req.user = get_str(body, "user")
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", None):
            raise invalid("only response_format {'type': 'text'} is supported", "response_format",
                          "unsupported_value")
    if body.get("tools") or body.get("functions"):
        raise invalid("tool calling is not supported", "tools" if body.get("tools") else "functions",
                      "unsupported_parameter")


def _text_content(content: Any, path: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise _type_error(f"{path}[{j}]", "an object", part)
            if part.get("type") != "text":
                raise invalid(f"only text content parts are supported, got {part.get('type')!r}",
                              f"{path}[{j}].type", "unsupported_value")
            if not isinstance(part.get("text"), str):
                raise _type_error(f"{path}[{j}].text", "a string", part.get("text"))
            parts.append(part["text"])
        return "".join(parts)
    raise _type_error(path, "a string or a list of content parts", content)


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    req = ChatRequest(model=get_str(body, "model", required=True) or "")
    messages = body.get("messages")
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list):
        raise _type_error("messages", "a list of messages", messages)
    if not messages:
        raise invalid("'messages' must not be empty", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _type_error(f"messages[{i}]", "an object", m)
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"'messages[{i}].role' must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                          f"messages[{i}].role")
        if "content" not in m or m["content"] is None:
            raise _missing(f"messages[{i}].content")
        msg = {"role": "system" if role == "developer" else role,
               "content": _text_content(m["content"], f"messages[{i}].content")}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    req.messages = out
    _common(body, req)
    limit = get_int(body, "max_completion_tokens", 1)
    req.max_tokens = limit if limit is not None else get_int(body, "max_tokens", 1)
    if get_bool(body, "logprobs"):
        req.logprobs = get_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    elif body.get("top_logprobs"):
        raise invalid("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return req


def parse_completion(body: dict[str, Any]) -> CompletionRequest:
    req = CompletionRequest(model=get_str(body, "model", required=True) or "")
    prompt = body.get("prompt")
    if prompt is None:
        raise _missing("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("'prompt' must not be empty", "prompt")
        req.prompt = prompt
    elif isinstance(prompt, list):
        if prompt and all(isinstance(p, str | list) for p in prompt):
            raise invalid("only one prompt per request is supported", "prompt", "unsupported_value")
        ids = _token_ids(prompt, "prompt")
        if not ids:
            raise invalid("'prompt' must not be empty", "prompt")
        req.prompt = ids
    else:
        raise _type_error("prompt", "a string or a list of token ids", prompt)
    _common(body, req)
    req.max_tokens = get_int(body, "max_tokens", 1)
    req.echo = get_bool(body, "echo")
    if body.get("suffix"):
        raise invalid("'suffix' is not supported", "suffix", "unsupported_parameter")
    best_of = get_int(body, "best_of", 1)
    if best_of is not None and best_of != 1:
        raise invalid("only best_of=1 is supported", "best_of", "unsupported_value")
    lp = get_int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    req.logprobs = lp
    return req


# -- SGLang-native /generate -------------------------------------------------------------------------
@dataclass
class GenerateRequest:
    """What the gateway needs to know of a /generate body it otherwise passes through untouched."""

    stream: bool
    return_logprob: bool
    input_ids: list[int] | None  # a single prompt given as ids (then a stream can migrate)
    max_new_tokens: int
    token_estimate: int


def parse_generate(body: dict[str, Any]) -> GenerateRequest:
    if not body:
        raise invalid("request body is an empty object; send 'text' or 'input_ids'", None, "missing_required_parameter")
    present = [k for k in ("text", "input_ids", "input_embeds") if body.get(k) is not None]
    if not present:
        raise invalid("one of 'text' or 'input_ids' is required", "text", "missing_required_parameter")
    if len(present) > 1:
        raise invalid(f"send only one of {', '.join(present)}", present[1])
    prompt_tokens = 0
    input_ids: list[int] | None = None
    if "text" in present:
        text = body["text"]
        if isinstance(text, str):
            prompt_tokens = len(text) // 3 + 1
        elif isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            prompt_tokens = sum(len(t) // 3 + 1 for t in text)
        else:
            raise _type_error("text", "a string or a non-empty list of strings", text)
    elif "input_ids" in present:
        ids = body["input_ids"]
        if isinstance(ids, list) and ids and all(isinstance(x, list) for x in ids):
            prompt_tokens = sum(len(_token_ids(x, f"input_ids[{i}]")) for i, x in enumerate(ids))
        else:
            input_ids = _token_ids(ids, "input_ids")
            if not input_ids:
                raise invalid("'input_ids' must not be empty", "input_ids")
            prompt_tokens = len(input_ids)
    sp = body.get("sampling_params")
    max_new = 128  # SGLang's default
    batch_sp = isinstance(sp, list)
    if sp is not None:
        items = sp if batch_sp else [sp]
        for i, item in enumerate(items):
            path = f"sampling_params[{i}]" if batch_sp else "sampling_params"
            if not isinstance(item, dict):
                raise _type_error(path, "an object", item)
            m = get_int(item, "max_new_tokens", 0, path=f"{path}.max_new_tokens")
            if m is not None:
                max_new = m
            get_number(item, "temperature", 0.0, 1e6, path=f"{path}.temperature")
            get_number(item, "top_p", 0.0, 1.0, path=f"{path}.top_p")
            get_int(item, "top_k", -1, path=f"{path}.top_k")
    stream = get_bool(body, "stream")
    return_logprob = get_bool(body, "return_logprob")
    if body.get("rid") is not None and not isinstance(body["rid"], str | list):
        raise _type_error("rid", "a string", body["rid"])
    single = input_ids is not None and not batch_sp
    return GenerateRequest(stream, return_logprob, input_ids if single else None, max_new, prompt_tokens + max_new)
