"""Response bodies: SGLang's /generate objects and the OpenAI completion/chat shapes, whole or as stream chunks."""

from __future__ import annotations

import time
from typing import Any

from replicas.engine.sequence import Mode, Sequence
from replicas.engine.tokenizer import Tokenizer

DONE = b"data: [DONE]\n\n"


def _lp_entry(tok: Tokenizer, lp: float | None, token: int, with_text: bool) -> list[Any]:
    return [lp, token, tok.token_text(token) if with_text else None]


def meta_info(seq: Sequence, tok: Tokenizer) -> dict[str, Any]:
    item = seq.item
    end = seq.finished_at if seq.finished_at is not None else time.monotonic()
    meta: dict[str, Any] = {
        "id": item.rid,
        "finish_reason": seq.finish_reason if seq.finished else None,
        "prompt_tokens": len(seq.prompt_ids),
        "completion_tokens": len(seq.output_ids),
        "cached_tokens": 0,
        "e2e_latency": round(end - seq.arrival, 6),
        "weight_version": "default",
    }
    if item.return_logprob:
        t = item.return_text_in_logprobs
        if seq.mode == Mode.DECODE:
            meta["input_token_logprobs"] = []  # the prefill worker returns the prompt's; the router merges them
        else:
            meta["input_token_logprobs"] = [_lp_entry(tok, lp, i, t) for lp, i in (seq.input_logprobs or [])]
        meta["output_token_logprobs"] = [
            _lp_entry(tok, lp, i, t) for lp, i in zip(seq.output_logprobs, seq.output_ids, strict=True)
        ]
        if item.top_logprobs_num:
            meta["output_top_logprobs"] = [
                [_lp_entry(tok, lp, i, t) for i, lp in top] if top else None for top in seq.output_top
            ]
    if seq.finish_reason and seq.finish_reason.get("type") == "stop":
        meta["matched_stop"] = seq.finish_reason.get("matched")
    return meta


def generate_object(seq: Sequence, tok: Tokenizer, index: int | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"text": seq.text, "output_ids": list(seq.output_ids), "meta_info": meta_info(seq, tok)}
    if index is not None:
        obj["index"] = index
    return obj


def finish_reason_name(seq: Sequence) -> str | None:
    if not seq.finished:
        return None
    reason = (seq.finish_reason or {}).get("type", "abort")
    return {"stop": "stop", "length": "length"}.get(reason, "abort")


def matched_stop(seq: Sequence) -> Any:
    reason = seq.finish_reason or {}
    return reason.get("matched") if reason.get("type") == "stop" else None


def usage(seqs: list[Sequence]) -> dict[str, int]:
    prompt = sum(len(s.prompt_ids) for s in seqs)
    completion = sum(len(s.output_ids) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_logprobs(seq: Sequence, tok: Tokenizer, start: int = 0) -> dict[str, Any] | None:
    if not seq.item.return_logprob:
        return None
    tokens = [tok.token_text(i) for i in seq.output_ids[start:]]
    tops = None
    if seq.item.top_logprobs_num:
        tops = [{tok.token_text(i): lp for i, lp in (t or [])} for t in seq.output_top[start:]]
    return {"tokens": tokens, "token_logprobs": seq.output_logprobs[start:], "top_logprobs": tops,
            "text_offset": None}


def chat_logprobs(seq: Sequence, tok: Tokenizer, start: int = 0) -> dict[str, Any] | None:
    if not seq.item.return_logprob:
        return None
    content = []
    for k, (token, lp) in enumerate(zip(seq.output_ids[start:], seq.output_logprobs[start:], strict=True)):
        text = tok.token_text(token)
        top = seq.output_top[start + k] or []
        content.append({
            "token": text, "logprob": lp, "bytes": list(text.encode()),
            "top_logprobs": [{"token": (tt := tok.token_text(i)), "logprob": tlp, "bytes": list(tt.encode())}
                             for i, tlp in top],
        })
    return {"content": content}


def completion_object(rid: str, model: str, seqs: list[Sequence], tok: Tokenizer) -> dict[str, Any]:
    return {
        "id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [
            {"index": i, "text": s.text, "logprobs": completion_logprobs(s, tok),
             "finish_reason": finish_reason_name(s), "matched_stop": matched_stop(s)}
            for i, s in enumerate(seqs)
        ],
        "usage": usage(seqs),
    }


def chat_object(rid: str, model: str, seq: Sequence, tok: Tokenizer) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{
            "index": 0, "message": {"role": "assistant", "content": seq.text, "tool_calls": None},
            "logprobs": chat_logprobs(seq, tok), "finish_reason": finish_reason_name(seq),
            "matched_stop": matched_stop(seq),
        }],
        "usage": usage([seq]),
    }


def completion_chunk(rid: str, model: str, index: int, text: str, finish: str | None,
                     logprobs: dict[str, Any] | None = None, matched: Any = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    if finish is not None:
        choice["matched_stop"] = matched
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice]}


def chat_chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None,
               logprobs: dict[str, Any] | None = None, matched: Any = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    if finish is not None:
        choice["matched_stop"] = matched
    return {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, obj: str, seqs: list[Sequence]) -> dict[str, Any]:
    prefix = "chatcmpl" if obj == "chat.completion.chunk" else "cmpl"
    return {"id": f"{prefix}-{rid}", "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(seqs)}
