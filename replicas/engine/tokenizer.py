"""Tokenizers behind one small interface: HF tokenizers for real models, an exact byte tokenizer for emulated.

Also the incremental detokenizer that turns a growing list of ids into text deltas for streaming.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

CHATML_START = "<|im_start|>"
CHATML_END = "<|im_end|>"
END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


class Tokenizer(Protocol):
    eos_token_ids: frozenset[int]
    vocab_size: int
    path: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]: ...

    def token_text(self, token_id: int) -> str: ...


class HFTokenizer:
    """A transformers tokenizer with its chat template (SmolLM2's for ``smollm2`` and ``tiny``)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.path = path
        self.tok = AutoTokenizer.from_pretrained(path)
        self.vocab_size = len(self.tok)
        eos = {self.tok.eos_token_id} if self.tok.eos_token_id is not None else set()
        special = set(self.tok.all_special_ids)
        vocab = self.tok.get_vocab()
        # End-of-turn and end-of-text markers both end a generation (chat and plain completion).
        eos |= {vocab[m] for m in END_MARKERS if m in vocab and vocab[m] in special}
        self.eos_token_ids = frozenset(eos)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tok.encode(text, add_special_tokens=False))

    def token_text(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)


class ByteTokenizer:
    """Exact and trivial: ids 0-255 are bytes, 256 is end-of-text. Text round-trips byte for byte."""

    EOS = 256

    def __init__(self) -> None:
        self.path = "bytes"
        self.vocab_size = 257
        self.eos_token_ids = frozenset({self.EOS})

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        raw = bytes(i for i in ids if 0 <= i < 256)
        text = raw.decode("utf-8", errors="replace")
        if not skip_special_tokens and self.EOS in ids:
            text += "<|endoftext|>" * sum(1 for i in ids if i == self.EOS)
        return text

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        parts = [f"{CHATML_START}{m['role']}\n{m['content']}{CHATML_END}\n" for m in messages]
        return self.encode("".join(parts) + f"{CHATML_START}assistant\n")

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id], skip_special_tokens=False)


class IncrementalDetokenizer:
    """Text deltas for a growing id list without re-decoding everything each step.

    Decodes a short window (from ``prefix`` to the end) and emits what lies past the text already
    emitted; a window ending in an incomplete UTF-8 sequence (U+FFFD) is held back until it completes.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0
        self._read = 0

    def add(self, token_id: int) -> str:
        """Append one id; return the new text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self._prefix : self._read], self.skip)
        full = self.tok.decode(self.ids[self._prefix :], self.skip)
        if len(full) > len(prefix_text) and not full.endswith("\ufffd"):
            delta = full[len(prefix_text) :]
            self._prefix = self._read
            self._read = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end: whatever is still held back (an incomplete character renders as U+FFFD)."""
        rest = self.tok.decode(self.ids[self._prefix :], self.skip)
        done = self.tok.decode(self.ids[self._prefix : self._read], self.skip)
        delta = rest[len(done) :]
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta
