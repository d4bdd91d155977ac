"""What the scheduler needs from a model: prefill one prompt, run one decode step for a batch, move KV.

Everything else (HTTP, PD transfer, batching policy, sampling, detokenizing) is shared by all backends.
Methods run on the scheduler's worker thread unless ``inline`` is true (then on the event loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from replicas.engine.tokenizer import Tokenizer


@dataclass
class PrefillResult:
    """A computed prompt: its KV (backend-specific), the next-token logits, and optional prompt logits.

    ``prompt_logits`` rows are the logits at positions ``[prompt_len - rows, prompt_len)``: row i predicts
    the token after that position, so prompt log-probs of token j use row ``j - 1 - first_row``.
    """

    kv: Any
    logits: np.ndarray
    prompt_logits: np.ndarray | None = None


class DecodeBatch(Protocol):
    """The running decode batch: sequences join with their KV and leave when done (continuous batching)."""

    def join(self, key: int, kv: Any) -> None: ...

    def leave(self, key: int) -> None: ...

    def step(self, tokens: dict[int, int]) -> tuple[list[int], np.ndarray]:
        """Feed each member its last token; return (keys in row order, next-token logits [rows, vocab])."""
        ...

    def kv_tokens(self) -> int: ...

    def compact(self) -> None:
        """Free the KV of sequences that left, without waiting for the next step."""
        ...


class Backend(Protocol):
    kind: str  # "emulated" | "torch"
    model_path: str
    model_type: str
    architecture: str
    fingerprint: str  # identifies weights + shape; a prefill and a decode worker must agree on it
    tokenizer: Tokenizer
    context_length: int
    inline: bool
    kv_layers: int
    kv_heads: int
    head_dim: int

    def prefill(self, ids: list[int], logits_rows: int = 1) -> PrefillResult: ...

    def kv_length(self, kv: Any) -> int: ...

    def export_kv(self, kv: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        """The prompt's KV as float32 ``[kv_heads, tokens, head_dim]`` arrays per layer (for the wire)."""
        ...

    def import_kv(self, layers: list[tuple[np.ndarray, np.ndarray]], ids: list[int]) -> Any: ...

    def new_batch(self) -> DecodeBatch: ...

    def prefill_delay_s(self, tokens: int) -> float: ...

    def decode_delay_s(self) -> float: ...
