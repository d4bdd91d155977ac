"""Real models on PyTorch + transformers (CPU, float32): ``smollm2``, the seeded ``tiny`` Llama, or a folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from replicas.engine.backends import batch_sizes, unknown_model
from replicas.engine.backends.base import PrefillResult
from replicas.engine.backends.kv_cache import SeqKV, TorchDecodeBatch
from replicas.engine.model_store import (
    SMOLLM2_NAME,
    TINY_NAME,
    ModelUnavailable,
    build_tiny_model,
    cache_dir,
    smollm2_dir,
)
from replicas.engine.tokenizer import HFTokenizer

DEFAULT_CONTEXT = 4096
TUNING_PROMPT = 16  # tokens per sequence when timing decode batch sizes: the GEMM shapes are what differ


@torch.inference_mode()
def prefill_model(model: Any, ids: list[int], logits_rows: int = 1) -> PrefillResult:
    """One prompt's forward pass: its KV and the logits of its last ``logits_rows`` positions (also what
    ``bench/cost_model_check.py`` times as the engine's prefill)."""
    rows = max(1, min(logits_rows, len(ids)))
    cache = DynamicCache()
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), cache=cache, use_cache=True, logits_to_keep=rows)
    logits = out.logits[0].float().numpy()
    return PrefillResult(kv=SeqKV.from_cache(out.cache), logits=logits[-1],
                         prompt_logits=logits if logits_rows > 1 else None)


def time_decode_steps(model: Any, max_batch: int, rounds: int = batch_sizes.ROUNDS) -> dict[int, float]:
    """Seconds of an unpadded decode step at each batch size 1..``max_batch`` (best of ``rounds``), every
    row a copy of one short prompt's KV: what ``--decode-batch-sizes auto`` tunes on (the GEMM shapes,
    not the context, are what differ)."""
    kv = prefill_model(model, list(range(1, TUNING_PROMPT + 1))).kv
    layers = model.config.num_hidden_layers
    batches: dict[int, TorchDecodeBatch] = {}

    def step(n: int) -> None:
        if n not in batches:
            batches[n] = TorchDecodeBatch(model, layers)
            for k in range(n):
                batches[n].join(k, kv)
        batches[n].step(dict.fromkeys(range(n), 1))

    return batch_sizes.time_sizes(step, max_batch, rounds)


class TorchBackend:
    kind = "torch"
    inline = False

    def __init__(self, model: str, threads: int | None = None, context_length: int | None = None,
                 decode_batch_sizes: str | tuple[int, ...] = "off", max_batch: int = 16) -> None:
        if threads:
            torch.set_num_threads(threads)
        if model == "smollm2":
            folder = smollm2_dir()
            self.tokenizer = HFTokenizer(str(folder))
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            self.model_path = SMOLLM2_NAME
        elif model == "tiny":
            self.tokenizer = HFTokenizer(str(smollm2_dir()))
            self.model = build_tiny_model(self.tokenizer.vocab_size)
            self.model_path = TINY_NAME
        else:
            folder = Path(model)
            if problem := unknown_model(model):
                raise ModelUnavailable(f"--model {model!r}: {problem}")
            self.tokenizer = HFTokenizer(str(folder))
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            self.model_path = os.path.abspath(model)
        self.model.eval()
        cfg = self.model.config
        self.model_type = cfg.model_type
        self.architecture = type(self.model).__name__
        self.kv_layers = cfg.num_hidden_layers
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        max_pos = getattr(cfg, "max_position_embeddings", DEFAULT_CONTEXT)
        self.context_length = min(context_length or min(max_pos, DEFAULT_CONTEXT), max_pos)
        self.fingerprint = self._fingerprint()
        self.decode_batch_sizes = self._resolve_sizes(decode_batch_sizes, max_batch)

    def _fingerprint(self) -> str:
        """Model identity for the PD handshake: shape plus a sample of the weights (not the path or name)."""
        cfg = self.model.config
        shape = (cfg.model_type, cfg.vocab_size, cfg.hidden_size, self.kv_layers, self.kv_heads, self.head_dim)
        h = hashlib.sha256(repr(shape).encode())
        for _, p in list(self.model.named_parameters())[:4]:
            h.update(p.detach().reshape(-1)[:256].float().numpy().tobytes())
        return f"{cfg.model_type}-{self.kv_layers}L:{h.hexdigest()[:16]}"

    def prefill(self, ids: list[int], logits_rows: int = 1) -> PrefillResult:
        return prefill_model(self.model, ids, logits_rows)

    def kv_length(self, kv: Any) -> int:
        return kv.length

    def export_kv(self, kv: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        return kv.to_numpy()

    def import_kv(self, layers: list[tuple[np.ndarray, np.ndarray]], ids: list[int]) -> Any:
        return SeqKV.from_numpy(layers)

    def _resolve_sizes(self, choice: str | tuple[int, ...], max_batch: int) -> tuple[int, ...]:
        """``off``: no padding; a tuple: those sizes; ``auto``: the tuned sizes for this machine (cached)."""
        if choice == "off":
            return ()
        if choice != "auto":
            return tuple(choice)
        largest = min(max_batch, batch_sizes.TUNED_UP_TO)
        key = batch_sizes.machine_key(self.fingerprint, torch.get_num_threads(), largest)
        return batch_sizes.cached_sizes(cache_dir() / batch_sizes.CACHE_FILE, key,
                                        lambda: batch_sizes.kept_sizes(self.time_batch_sizes(largest)))

    def time_batch_sizes(self, max_batch: int) -> dict[int, float]:
        """Seconds of an unpadded decode step at each batch size 1..``max_batch`` (``time_decode_steps``)."""
        return time_decode_steps(self.model, max_batch)

    def new_batch(self) -> TorchDecodeBatch:
        return TorchDecodeBatch(self.model, self.kv_layers, self.decode_batch_sizes)

    def prefill_delay_s(self, tokens: int) -> float:
        return 0.0

    def decode_delay_s(self) -> float:
        return 0.0
