"""The emulated model: no torch, no weights; the next token is a hash of the last few token ids.

Because the choice depends only on the token context, a continuation from prompt + partial output
produces exactly the tokens the uninterrupted run would have (what the gateway's mid-stream migration
relies on). It speaks the whole protocol, PD included: its "KV" is a small per-token array that travels
in the same wire format. Optional per-token/per-step delays let it stand in for a GPU's timing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from replicas.engine.backends.base import PrefillResult
from replicas.engine.tokenizer import ByteTokenizer

CONTEXT_TAIL = 4  # ids that decide the next one
ALPHABET = np.frombuffer(b"etaoinshrdlucmfwypvbgkqjxz .,", dtype=np.uint8).astype(np.int64)  # no repeats
_MULTIPLIERS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5],
                        dtype=np.uint64)
KV_DIM = 4
LOGIT_SCALE = 8.0


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def emulated_logits(tails: np.ndarray, vocab: int) -> np.ndarray:
    """Logits [rows, vocab] for context tails [rows, CONTEXT_TAIL] (uint64, zero-padded on the left)."""
    seed = _mix((tails * _MULTIPLIERS[None, :]).sum(axis=1, dtype=np.uint64))
    cand = _mix(seed[:, None] + np.arange(1, ALPHABET.size + 1, dtype=np.uint64)[None, :])
    scores = (cand >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    out = np.full((tails.shape[0], vocab), -np.inf, dtype=np.float32)
    out[:, ALPHABET] = scores * LOGIT_SCALE
    return out


def _tails(contexts: list[list[int]]) -> np.ndarray:
    tails = np.zeros((len(contexts), CONTEXT_TAIL), dtype=np.uint64)
    for row, ctx in enumerate(contexts):
        tail = ctx[-CONTEXT_TAIL:]
        if tail:
            tails[row, CONTEXT_TAIL - len(tail) :] = tail
    return tails


class EmulatedBatch:
    """Members are token contexts; a step extends each with the token it was fed."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.contexts: dict[int, list[int]] = {}

    def join(self, key: int, kv: Any) -> None:
        self.contexts[key] = list(kv)

    def leave(self, key: int) -> None:
        self.contexts.pop(key, None)

    def step(self, tokens: dict[int, int]) -> tuple[list[int], np.ndarray]:
        keys = list(self.contexts)
        for k in keys:
            self.contexts[k].append(tokens[k])
        return keys, emulated_logits(_tails([self.contexts[k] for k in keys]), self.vocab)

    def kv_tokens(self) -> int:
        return sum(len(c) for c in self.contexts.values())

    def compact(self) -> None:
        """Leaves are immediate here."""


class EmulatedBackend:
    kind = "emulated"
    model_path = "emulated"
    model_type = "emulated"
    architecture = "EmulatedForCausalLM"
    fingerprint = "emulated-v1"
    inline = True
    kv_layers = 1
    kv_heads = 1
    head_dim = KV_DIM

    def __init__(self, context_length: int | None = None, prefill_ms_per_token: float = 0.0,
                 decode_ms_per_step: float = 0.0) -> None:
        self.tokenizer = ByteTokenizer()
        self.context_length = context_length or 8192
        self._prefill_s = prefill_ms_per_token / 1000.0
        self._decode_s = decode_ms_per_step / 1000.0

    def prefill(self, ids: list[int], logits_rows: int = 1) -> PrefillResult:
        rows = max(1, min(logits_rows, len(ids)))
        contexts = [ids[: len(ids) - rows + 1 + r] for r in range(rows)]
        logits = emulated_logits(_tails(contexts), self.tokenizer.vocab_size)
        return PrefillResult(kv=list(ids), logits=logits[-1], prompt_logits=logits if logits_rows > 1 else None)

    def kv_length(self, kv: Any) -> int:
        return len(kv)

    def export_kv(self, kv: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        ids = np.asarray(kv, dtype=np.float32)
        pos = np.arange(ids.size, dtype=np.float32)
        k = np.stack([ids, pos, ids * 0.5, np.ones_like(ids)], axis=-1)[None, :, :]
        v = np.stack([pos, ids, -ids, np.zeros_like(ids)], axis=-1)[None, :, :]
        return [(k, v)]

    def import_kv(self, layers: list[tuple[np.ndarray, np.ndarray]], ids: list[int]) -> Any:
        return list(ids)

    def new_batch(self) -> EmulatedBatch:
        return EmulatedBatch(self.tokenizer.vocab_size)

    def prefill_delay_s(self, tokens: int) -> float:
        return self._prefill_s * tokens

    def decode_delay_s(self) -> float:
        return self._decode_s
