"""OpenAI response shapes (chat.completion, text_completion and their stream chunks), written by the gateway."""

from __future__ import annotations

import secrets
import time
from typing import Any

from gateway.generation import Logprob
from gateway.sse import event
from gateway.tokenizer import GatewayTokenizer


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Formatter:
    """Builds one request's response objects; ``kind`` is "chat" or "completion"."""

    def __init__(self, kind: str, model: str, tokenizer: GatewayTokenizer) -> None:
        self.kind = kind
        self.model = model
        self.tok = tokenizer
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())
        self._text_offset = 0

    # -- logprobs ----------------------------------------------------------------------------------------
    def _token(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    def logprobs(self, items: list[Logprob]) -> dict[str, Any] | None:
        if not items:
            return None
        if self.kind == "chat":
            content = []
            for lp in items:
                tok = self._token(lp.token_id)
                content.append({
                    "token": tok, "logprob": lp.logprob, "bytes": list(tok.encode()),
                    "top_logprobs": [{"token": (t := self._token(i)), "logprob": v, "bytes": list(t.encode())}
                                     for i, v in lp.top],
                })
            return {"content": content}
        tokens, offsets = [], []
        for lp in items:
            tokens.append(self._token(lp.token_id))
            offsets.append(self._text_offset)
            self._text_offset += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in items],
            "top_logprobs": [{self._token(i): v for i, v in lp.top} for lp in items],
            "text_offset": offsets,
        }

    # -- streaming --------------------------------------------------------------------------------------
    def chunk(self, text: str, finish_reason: str | None = None, logprobs: dict[str, Any] | None = None,
              role: bool = False) -> bytes:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {}
            if text and not role:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            obj = "text_completion"
        return event({"id": self.id, "object": obj, "created": self.created, "model": self.model,
                      "choices": [choice]})

    def usage_chunk(self, usage: dict[str, int]) -> bytes:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return event({"id": self.id, "object": obj, "created": self.created, "model": self.model,
                      "choices": [], "usage": usage})

    # -- whole answers ----------------------------------------------------------------------------------
    def full(self, text: str, finish_reason: str, usage: dict[str, int],
             logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": logprobs, "finish_reason": finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
