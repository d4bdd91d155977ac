"""Model catalog: the shape of each model, from which weights, FLOPs and KV bytes per token follow.

Shapes are copied from each model's public Hugging Face ``config.json``; any other model is read
from its own ``config.json`` (a file or a folder holding one) with ``load_model``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path


class UnknownModel(ValueError):
    """A model name that is neither in the catalog nor a readable config.json."""


_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float8": 1, "fp8": 1}


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer with grouped-query attention and a gated (SwiGLU) MLP."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads
    tied_embeddings: bool = False
    dtype_bytes: int = 2
    hf_id: str = ""

    @cached_property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @cached_property
    def layer_params(self) -> int:
        """Parameters of one transformer block (attention + gated MLP + two norms)."""
        q = self.hidden * self.heads * self.hd
        kv = 2 * self.hidden * self.kv_heads * self.hd
        o = self.heads * self.hd * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return q + kv + o + mlp + 2 * self.hidden

    @cached_property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @cached_property
    def head_params(self) -> int:
        """The LM head (shares the embedding's storage when tied, but is still computed)."""
        return self.vocab * self.hidden

    @cached_property
    def params(self) -> int:
        stored_head = 0 if self.tied_embeddings else self.head_params
        return self.layers * self.layer_params + self.embed_params + stored_head + self.hidden

    @cached_property
    def layer_bytes(self) -> float:
        return self.layer_params * self.dtype_bytes

    @cached_property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    @cached_property
    def kv_bytes_per_token_layer(self) -> float:
        """K and V of one token in one layer."""
        return 2 * self.kv_heads * self.hd * self.dtype_bytes

    @cached_property
    def kv_bytes_per_token(self) -> float:
        return self.kv_bytes_per_token_layer * self.layers

    def with_dtype(self, dtype_bytes: int) -> ModelSpec:
        return replace(self, dtype_bytes=dtype_bytes)


def _m(name: str, layers: int, hidden: int, heads: int, kv: int, inter: int, vocab: int, hf: str,
       tied: bool = False) -> ModelSpec:
    return ModelSpec(name, layers, hidden, heads, kv, inter, vocab, tied_embeddings=tied, hf_id=hf)


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        _m("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, "meta-llama/Llama-2-7b-hf"),
        _m("llama-2-13b", 40, 5120, 40, 40, 13824, 32000, "meta-llama/Llama-2-13b-hf"),
        _m("llama-2-70b", 80, 8192, 64, 8, 28672, 32000, "meta-llama/Llama-2-70b-hf"),
        _m("llama-30b", 60, 6656, 52, 52, 17920, 32000, "huggyllama/llama-30b"),
        _m("llama-3.1-8b", 32, 4096, 32, 8, 14336, 128256, "meta-llama/Llama-3.1-8B"),
        _m("llama-3.1-70b", 80, 8192, 64, 8, 28672, 128256, "meta-llama/Llama-3.1-70B"),
        _m("qwen2.5-7b", 28, 3584, 28, 4, 18944, 152064, "Qwen/Qwen2.5-7B"),
        _m("qwen2.5-14b", 48, 5120, 40, 8, 13824, 152064, "Qwen/Qwen2.5-14B"),
        _m("qwen2.5-32b", 64, 5120, 40, 8, 27648, 152064, "Qwen/Qwen2.5-32B"),
        _m("qwen2.5-72b", 80, 8192, 64, 8, 29568, 152064, "Qwen/Qwen2.5-72B"),
        _m("smollm2-135m", 30, 576, 9, 3, 1536, 49152, "HuggingFaceTB/SmolLM2-135M-Instruct", tied=True),
    ]
}

ALIASES: dict[str, str] = {
    "smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m", "llama-30b": "llama-30b",
    "llama-3-8b": "llama-3.1-8b", "llama-3-70b": "llama-3.1-70b", "llama-3.1-8b-instruct": "llama-3.1-8b",
    "llama-3.1-70b-instruct": "llama-3.1-70b", "llama2-7b": "llama-2-7b", "llama2-13b": "llama-2-13b",
    "llama2-70b": "llama-2-70b", "qwen2.5-7b-instruct": "qwen2.5-7b", "qwen2.5-72b-instruct": "qwen2.5-72b",
}


def model_from_config(cfg: dict, name: str = "custom") -> ModelSpec:
    """A ModelSpec from the fields of a Hugging Face config.json (Llama, Qwen2, Mistral style)."""
    try:
        text = cfg.get("text_config") or cfg
        heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        dtype = str(text.get("torch_dtype") or text.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
        return ModelSpec(
            name=name,
            layers=int(text["num_hidden_layers"]),
            hidden=hidden,
            heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            intermediate=int(text["intermediate_size"]),
            vocab=int(text["vocab_size"]),
            head_dim=int(text.get("head_dim") or hidden // heads),
            tied_embeddings=bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
            dtype_bytes=_DTYPE_BYTES.get(dtype.replace("torch.", ""), 2),
            hf_id=str(cfg.get("_name_or_path", "")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UnknownModel(f"config for {name!r} lacks a usable field: {e}") from e


def load_model(name_or_path: str) -> ModelSpec:
    """A catalog model by name (case-insensitive, common aliases), or a config.json file or folder."""
    key = name_or_path.strip().lower()
    key = ALIASES.get(key, key)
    if key in MODELS:
        return MODELS[key]
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UnknownModel(f"cannot read model config {path}: {e}") from e
        return model_from_config(cfg, name=str(name_or_path))
    raise UnknownModel(f"unknown model {name_or_path!r}; known: {', '.join(sorted(MODELS))} (or a config.json path)")
