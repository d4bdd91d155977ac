"""KV storage for batched decode on transformers models: a growable per-layer buffer and the batch.

Sequences of different lengths share one batch by left padding: every row's real tokens end at the
same column, pads are masked out and zero (never garbage: a NaN in a masked slot still poisons the
weighted sum). Appending a decode token is a write into preallocated capacity, not a concatenation.
The batch is rebuilt only when membership changes (a sequence joins or leaves), and each sequence's
own KV from prefill (or from a prefill worker) is copied in once when it joins. Given decode batch
``sizes`` (``batch_sizes.py``), the batch carries dummy rows up to the next size: each attends only to
its own newest token at position 0, and its logits are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from replicas.engine.backends.batch_sizes import padded

HEADROOM = 64  # decode steps of capacity added on each (re)allocation


class GrowableLayer(DynamicLayer):
    """A DynamicLayer whose ``update`` writes into spare capacity instead of ``torch.cat``."""

    def __init__(self, buf_k: torch.Tensor, buf_v: torch.Tensor, used: int) -> None:
        super().__init__()
        self.buf_k, self.buf_v, self.used = buf_k, buf_v, used
        self.is_initialized = True
        self.device = buf_k.device
        self._views()

    def _views(self) -> None:
        self.keys = self.buf_k[:, :, : self.used]
        self.values = self.buf_v[:, :, : self.used]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("GrowableLayer is created with its buffers")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        n = key_states.shape[-2]
        if self.used + n > self.buf_k.shape[2]:
            self._grow(self.used + n + HEADROOM)
        self.buf_k[:, :, self.used : self.used + n] = key_states
        self.buf_v[:, :, self.used : self.used + n] = value_states
        self.used += n
        self._views()
        return self.keys, self.values

    def _grow(self, capacity: int) -> None:
        b, h, _, d = self.buf_k.shape
        new_k = self.buf_k.new_zeros((b, h, capacity, d))
        new_v = self.buf_v.new_zeros((b, h, capacity, d))
        new_k[:, :, : self.used] = self.buf_k[:, :, : self.used]
        new_v[:, :, : self.used] = self.buf_v[:, :, : self.used]
        self.buf_k, self.buf_v = new_k, new_v


@dataclass
class SeqKV:
    """One sequence's KV outside the batch: per layer (K, V) as ``[kv_heads, tokens, head_dim]``."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def length(self) -> int:
        return int(self.layers[0][0].shape[1])

    @classmethod
    def from_cache(cls, cache: DynamicCache) -> SeqKV:
        return cls([(layer.keys[0], layer.values[0]) for layer in cache.layers])

    @classmethod
    def from_numpy(cls, layers: list[tuple[np.ndarray, np.ndarray]]) -> SeqKV:
        return cls([(torch.from_numpy(k), torch.from_numpy(v)) for k, v in layers])

    def to_numpy(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(k.float().contiguous().numpy(), v.float().contiguous().numpy()) for k, v in self.layers]


class TorchDecodeBatch:
    """Left-padded batch KV for a transformers causal LM, rebuilt on membership change only."""

    def __init__(self, model: Any, num_layers: int, sizes: tuple[int, ...] = ()) -> None:
        self.model = model
        self.num_layers = num_layers
        self.sizes = sizes
        self.keys: list[int] = []
        self.lens: list[int] = []
        self.dummies = 0  # rows after the real ones, there only to run the step at a fast size
        self.width = 0  # columns in use: every row's real tokens end here
        self.cache: DynamicCache | None = None
        self._joining: dict[int, SeqKV] = {}
        self._leaving: set[int] = set()

    def join(self, key: int, kv: Any) -> None:
        self._joining[key] = kv

    def leave(self, key: int) -> None:
        if self._joining.pop(key, None) is None:
            self._leaving.add(key)

    def kv_tokens(self) -> int:
        return sum(self.lens) + sum(kv.length for kv in self._joining.values())

    def compact(self) -> None:
        """Apply pending leaves now (frees their KV) instead of at the next step, which may not come soon."""
        if self._leaving:
            self._rebuild()

    def _rebuild(self) -> None:
        keep = [i for i, k in enumerate(self.keys) if k not in self._leaving]
        joining = list(self._joining.items())
        self._joining, self._leaving = {}, set()
        lens = [self.lens[i] for i in keep] + [kv.length for _, kv in joining]
        keys = [self.keys[i] for i in keep] + [k for k, _ in joining]
        if not keys:
            self.keys, self.lens, self.width, self.cache, self.dummies = [], [], 0, None, 0
            return
        width = max(lens)
        rows, nkeep = padded(len(keys), self.sizes), len(keep)
        idx = torch.tensor(keep, dtype=torch.long)
        layers = []
        for li in range(self.num_layers):
            sample = joining[0][1].layers[li][0] if joining else self.cache.layers[li].buf_k  # type: ignore[union-attr]
            heads, dim = sample.shape[-3], sample.shape[-1]
            bufs = []
            for which in (0, 1):
                buf = torch.zeros((rows, heads, width + HEADROOM, dim), dtype=sample.dtype)
                if nkeep:
                    old_layer = self.cache.layers[li]  # type: ignore[union-attr]
                    old = (old_layer.buf_k if which == 0 else old_layer.buf_v)[:, :, : self.width]
                    old = old.index_select(0, idx) if nkeep != len(self.keys) else old[:nkeep]
                    if width >= self.width:
                        buf[:nkeep, :, width - self.width : width] = old
                    else:
                        buf[:nkeep, :, :width] = old[:, :, self.width - width :]
                for j, (_, kv) in enumerate(joining):
                    t = kv.length
                    buf[nkeep + j, :, width - t : width] = kv.layers[li][which]
                bufs.append(buf)
            layers.append(GrowableLayer(bufs[0], bufs[1], width))
        cache = DynamicCache()
        cache.layers = layers
        self.keys, self.lens, self.width, self.cache, self.dummies = keys, lens, width, cache, rows - len(keys)

    @torch.inference_mode()
    def step(self, tokens: dict[int, int]) -> tuple[list[int], np.ndarray]:
        if self._joining or self._leaving:
            self._rebuild()
        if not self.keys:
            return [], np.zeros((0, 0), dtype=np.float32)
        input_ids = torch.tensor([[tokens[k]] for k in self.keys] + [[0]] * self.dummies, dtype=torch.long)
        lens = torch.tensor(self.lens + [0] * self.dummies, dtype=torch.long)  # a dummy sees only its new token
        mask = (torch.arange(self.width + 1)[None, :] >= (self.width - lens)[:, None]).long()
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=lens[:, None], cache=self.cache,
                         use_cache=True)
        self.width += 1
        self.lens = [n + 1 for n in self.lens]
        return list(self.keys), out.logits[: len(self.keys), -1, :].float().numpy()

