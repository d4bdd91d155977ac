"""Model backends: one interface (``base.Backend``), an emulated model and a PyTorch one."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from replicas.engine.backends.base import Backend
    from replicas.engine.config import EngineConfig


BUILTIN_MODELS = ("smollm2", "tiny", "emulated")


def unknown_model(model: str) -> str | None:
    """Why ``--model`` names nothing the reference engine can load (a built-in name, or a folder with a
    config.json), or None. Torch-free: `tsctl up` checks ``--engine-model`` with it before starting anything."""
    if model in BUILTIN_MODELS or (Path(model) / "config.json").is_file():
        return None
    return f"not {', '.join(BUILTIN_MODELS)}, or a folder with config.json"


def load_backend(cfg: EngineConfig) -> Backend:
    """Build the backend ``--model`` names; torch is imported only for real models."""
    if cfg.model == "emulated":
        from replicas.engine.backends.emulated import EmulatedBackend

        return EmulatedBackend(
            context_length=cfg.context_length,
            prefill_ms_per_token=cfg.emulate_prefill_ms_per_token,
            decode_ms_per_step=cfg.emulate_decode_ms_per_step,
        )
    from replicas.engine.backends.torch_model import TorchBackend

    return TorchBackend(cfg.model, threads=cfg.threads, context_length=cfg.context_length,
                        decode_batch_sizes=cfg.decode_batch_sizes, max_batch=cfg.max_batch)
