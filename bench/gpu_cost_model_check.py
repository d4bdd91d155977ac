"""Check the roofline cost model (``planner.cost_model``) against a serving-shaped decoder on a real GPU.

Builds a Llama-3.1-8B-shaped decoder (shape from ``planner.models``; random bf16 weights, nothing
downloaded) in plain PyTorch, written the way a serving engine runs it: fused QKV and gate/up GEMMs,
RoPE, fused RMSNorm, torch SDPA (flash) with a causal mask for prefill, a preallocated KV cache that
prefill and decode write into, the LM head on the last prompt token only, and the decode step
(embed, 32 layers, norm, LM head, argmax) captured in one CUDA graph per batch size, so what is left
of launch overhead is what SGLang's CUDA graphs leave.

Measures (CUDA events, warm-up, median of several): prefill latency at batch 1 for several prompt
lengths, decode step latency at a fixed context for several batch sizes, and a mixed step (a decode
batch plus a prefill chunk in one pass, SGLang ``--enable-mixed-chunk``) against the same chunk and
decode step run apart, both captured as CUDA graphs, to check ``ReplicaModel.mixed_step_time``. Predicts the same
points with the planner's own ``ReplicaModel`` (TP=1, PP=1, the GPU's catalog figures from
``planner.gpus``, ``DEFAULT_EFF``) and prints a plain table and, last, one JSON line.

The planner's prediction includes ``step_overhead_s`` (scheduler, sampling, detokenize: host work
this bench does not do), so each point is also predicted without it ("gpu-only"), which is the part
this bench measures. Achieved fractions of the datasheet peak (FLOPs and bytes as the cost model
counts them, over the measured time) are printed to read the efficiency constants off.

    python bench/gpu_cost_model_check.py                 # on a CUDA GPU (H100 / H200 ...)
    python bench/gpu_cost_model_check.py --cpu-smoke     # tiny shape on the CPU: checks the code path only
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Only the dependency-free planner modules: no numpy, highspy, orjson or redis needed.
from planner.cost_model import DEFAULT_EFF, Efficiency, ReplicaModel, Stage
from planner.gpus import GPUS, GpuSpec, UnknownGpu, canonical_gpu
from planner.models import ModelSpec, load_model

SMOKE_SHAPE = ModelSpec("tiny-smoke", layers=2, hidden=128, heads=8, kv_heads=2, intermediate=256, vocab=256)


# -- GPU type ---------------------------------------------------------------------------------------
def catalog_gpu(device_name: str, memory_gib: float | None = None) -> str:
    """Catalog name for what ``torch.cuda.get_device_name`` reports (e.g. 'NVIDIA H100 80GB HBM3')."""
    up = device_name.upper()
    if "GH200" in up:
        return "GH200"
    if "H200" in up:
        return "H200"
    if "H100" in up:
        if "PCIE" in up:
            return "H100-PCIE"
        if "NVL" in up:
            return "H100-NVL"
        return "H100"
    for token in [device_name, *re.split(r"[\s_-]+", device_name.replace("NVIDIA", "").strip())]:
        try:
            return canonical_gpu(token, memory_gib)
        except UnknownGpu:
            continue
    raise UnknownGpu(f"cannot map {device_name!r} to the catalog; pass --gpu NAME ({', '.join(sorted(GPUS))})")


# -- the decoder ----------------------------------------------------------------------------------
class Decoder:
    """Weights, RoPE tables and KV caches of a Llama-style decoder, with prefill and decode steps."""

    def __init__(self, spec: ModelSpec, device: str, dtype: torch.dtype, decode_batch: int, decode_ctx: int,
                 prefill_len: int, gqa: str) -> None:
        self.s, self.device, self.dtype, self.gqa = spec, device, dtype, gqa
        h, hd, nh, nkv, inter = spec.hidden, spec.hd, spec.heads, spec.kv_heads, spec.intermediate
        self.group = nh // nkv
        g = torch.Generator(device=device).manual_seed(0)

        def w(*shape: int, std: float | None = None) -> torch.Tensor:  # (out, in): std 1/sqrt(in) by default
            t = torch.empty(*shape, device=device, dtype=dtype)
            return t.normal_(0.0, shape[-1] ** -0.5 if std is None else std, generator=g)

        self.embed = w(spec.vocab, h, std=1.0)
        self.lm_head = w(spec.vocab, h)
        self.final_norm = torch.ones(h, device=device, dtype=dtype)
        self.layers = []
        for _ in range(spec.layers):
            self.layers.append({
                "ln1": torch.ones(h, device=device, dtype=dtype),
                "qkv": w((nh + 2 * nkv) * hd, h),  # fused Q, K, V projection (out, in) as nn.Linear stores it
                "o": w(h, nh * hd),
                "ln2": torch.ones(h, device=device, dtype=dtype),
                "gate_up": w(2 * inter, h),  # fused gate and up projection
                "down": w(h, inter),
            })
        max_pos = max(prefill_len, decode_ctx + 1) + 8
        inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
        ang = torch.outer(torch.arange(max_pos, device=device, dtype=torch.float32), inv)
        ang = torch.cat([ang, ang], dim=-1)
        self.cos, self.sin = ang.cos().to(dtype), ang.sin().to(dtype)
        # KV caches, (batch, kv_heads, tokens, head_dim) per layer: slicing tokens keeps the last dim contiguous.
        dshape = (decode_batch, nkv, decode_ctx + 8, hd)
        self.dk = [torch.zeros(dshape, device=device, dtype=dtype) for _ in range(spec.layers)]
        self.dv = [torch.zeros(dshape, device=device, dtype=dtype) for _ in range(spec.layers)]
        pshape = (1, nkv, prefill_len, hd)
        self.pk = [torch.zeros(pshape, device=device, dtype=dtype) for _ in range(spec.layers)]
        self.pv = [torch.zeros(pshape, device=device, dtype=dtype) for _ in range(spec.layers)]

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, 1e-5)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def _prompt_attention(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of one prompt's ``n`` tokens at layer ``i`` (K/V written to the prefill cache first)."""
        n = q.shape[2]
        self.pk[i][:, :, :n].copy_(k)
        self.pv[i][:, :, :n].copy_(v)
        kk, vv = self.pk[i][:, :, :n], self.pv[i][:, :, :n]
        if self.gqa == "repeat":
            kk, vv = kk.repeat_interleave(self.group, 1), vv.repeat_interleave(self.group, 1)
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        return F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=True)

    def _mlp(self, x: torch.Tensor, lw: dict) -> torch.Tensor:
        gate, up = F.linear(x, lw["gate_up"]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, lw["down"])

    def prefill(self, ids: torch.Tensor, logits: bool = False) -> torch.Tensor:
        """One prompt (batch 1, ``n`` tokens): KV into the prefill cache, next token out."""
        s, n = self.s, ids.shape[1]
        nh, nkv, hd = s.heads, s.kv_heads, s.hd
        cos, sin = self.cos[:n][None, None], self.sin[:n][None, None]
        x = F.embedding(ids, self.embed)  # (1, n, hidden)
        for i, lw in enumerate(self.layers):
            qkv = F.linear(self._norm(x, lw["ln1"]), lw["qkv"])
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q = self._rope(q.view(1, n, nh, hd).transpose(1, 2), cos, sin)
            k = self._rope(k.view(1, n, nkv, hd).transpose(1, 2), cos, sin)
            v = v.view(1, n, nkv, hd).transpose(1, 2)
            a = self._prompt_attention(i, q, k, v)
            x = x + F.linear(a.transpose(1, 2).reshape(1, n, nh * hd), lw["o"])
            x = x + self._mlp(self._norm(x, lw["ln2"]), lw)
        last = self._norm(x[:, -1], self.final_norm)  # the LM head runs on the last token only
        out = F.linear(last, self.lm_head)
        return out if logits else out.argmax(-1)

    def decode(self, ids: torch.Tensor, pos: int, logits: bool = False) -> torch.Tensor:
        """One decode step for ``b`` sequences each holding ``pos`` tokens: attends to ``pos + 1``."""
        s, b = self.s, ids.shape[0]
        nh, nkv, hd = s.heads, s.kv_heads, s.hd
        cos, sin = self.cos[pos][None, None, None], self.sin[pos][None, None, None]
        x = F.embedding(ids, self.embed)  # (b, hidden)
        for i, lw in enumerate(self.layers):
            qkv = F.linear(self._norm(x, lw["ln1"]), lw["qkv"])
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            # GQA folded into the query length: the query heads sharing KV head j are rows of one block.
            q = self._rope(q.view(b, nkv, self.group, hd), cos, sin)
            k = self._rope(k.view(b, nkv, 1, hd), cos, sin)
            self.dk[i][:b, :, pos:pos + 1].copy_(k)
            self.dv[i][:b, :, pos:pos + 1].copy_(v.view(b, nkv, 1, hd))
            a = F.scaled_dot_product_attention(q, self.dk[i][:b, :, :pos + 1], self.dv[i][:b, :, :pos + 1])
            x = x + F.linear(a.reshape(b, nh * hd), lw["o"])
            x = x + self._mlp(self._norm(x, lw["ln2"]), lw)
        out = F.linear(self._norm(x, self.final_norm), self.lm_head)
        return out if logits else out.argmax(-1)

    def mixed(self, dec_ids: torch.Tensor, pos: int, chunk_ids: torch.Tensor) -> torch.Tensor:
        """One iteration of chunked prefill mixed with decode (SGLang ``--enable-mixed-chunk``): ``b``
        decoding sequences (each holding ``pos`` tokens) and the first ``c``-token chunk of a new prompt.
        The GEMMs see ``b + c`` rows (one read of the weights); attention runs per part, as engines do."""
        s, b, c = self.s, dec_ids.shape[0], chunk_ids.shape[1]
        nh, nkv, hd = s.heads, s.kv_heads, s.hd
        dcos, dsin = self.cos[pos][None, None, None], self.sin[pos][None, None, None]
        pcos, psin = self.cos[:c][None, None], self.sin[:c][None, None]
        x = torch.cat([F.embedding(dec_ids, self.embed), F.embedding(chunk_ids[0], self.embed)])  # (b + c, hidden)
        for i, lw in enumerate(self.layers):
            qkv = F.linear(self._norm(x, lw["ln1"]), lw["qkv"])
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            qd = self._rope(q[:b].view(b, nkv, self.group, hd), dcos, dsin)
            self.dk[i][:b, :, pos:pos + 1].copy_(self._rope(k[:b].view(b, nkv, 1, hd), dcos, dsin))
            self.dv[i][:b, :, pos:pos + 1].copy_(v[:b].view(b, nkv, 1, hd))
            ad = F.scaled_dot_product_attention(qd, self.dk[i][:b, :, :pos + 1], self.dv[i][:b, :, :pos + 1])
            ap = self._prompt_attention(i, self._rope(q[b:].view(1, c, nh, hd).transpose(1, 2), pcos, psin),
                                        self._rope(k[b:].view(1, c, nkv, hd).transpose(1, 2), pcos, psin),
                                        v[b:].view(1, c, nkv, hd).transpose(1, 2))
            a = torch.cat([ad.reshape(b, nh * hd), ap.transpose(1, 2).reshape(c, nh * hd)])
            x = x + F.linear(a, lw["o"])
            x = x + self._mlp(self._norm(x, lw["ln2"]), lw)
        rows = torch.cat([x[:b], x[-1:]])  # the LM head: every decode row and the chunk's last token
        return F.linear(self._norm(rows, self.final_norm), self.lm_head).argmax(-1)

    def check_consistency(self, n: int) -> float:
        """Max |logit difference| between prefilling n+1 tokens and prefilling n then decoding one
        (through the decode cache): a wrong cache, RoPE position or GQA mapping shows up here."""
        ids = torch.randint(0, self.s.vocab, (1, n + 1), device=self.device)
        ref = self.prefill(ids, logits=True).float()
        self.prefill(ids[:, :n])
        for i in range(self.s.layers):
            self.dk[i][:1, :, :n].copy_(self.pk[i][:, :, :n])
            self.dv[i][:1, :, :n].copy_(self.pv[i][:, :, :n])
        got = self.decode(ids[:, n], n, logits=True).float()
        return (ref - got).abs().mean().item() / max(ref.abs().mean().item(), 1e-9)


def sdpa_backends(device: str):
    """The attention backends to allow: flash only on CUDA (as a serving engine would use)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device == "cuda":
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def probe_gqa(device: str, dtype: torch.dtype) -> str:
    """'native' if flash SDPA takes ``enable_gqa`` here, else 'repeat' (K/V expanded before attention)."""
    q = torch.randn(1, 4, 16, 64, device=device, dtype=dtype)
    kv = torch.randn(1, 2, 16, 64, device=device, dtype=dtype)
    try:
        with sdpa_backends(device):
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        return "native"
    except (RuntimeError, TypeError):
        return "repeat"


# -- timing -------------------------------------------------------------------------------------------
def captured(fn: Callable[[], object], device: str, pool) -> Callable[[], object]:
    """``fn`` as a CUDA graph replay on the GPU (warmed up on a side stream first), else ``fn`` itself."""
    if device != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph.replay


def median_ms(fn: Callable[[], object], device: str, reps: int, warmup: int) -> tuple[float, list[float]]:
    """Median milliseconds of ``fn()`` (CUDA events around each call on a GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    out = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out), out


def calibrate(device: str, dtype: torch.dtype, smoke: bool) -> dict:
    """Microbenchmarks to read the datasheet against: a large GEMM and a device-to-device copy."""
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    gemm_ms, _ = median_ms(lambda: a @ b, device, reps=10, warmup=3)
    numel = (1 << 20) if smoke else (1 << 31)  # 4 GiB of bf16 on the GPU
    src = torch.empty(numel, device=device, dtype=dtype).fill_(1.0)
    dst = torch.empty_like(src)
    copy_ms, _ = median_ms(lambda: dst.copy_(src), device, reps=10, warmup=3)
    moved = 2 * numel * src.element_size()  # read + write
    return {"gemm_tflops": round(2 * n**3 / (gemm_ms * 1e-3) / 1e12, 1),
            "copy_gbs_read_plus_write": round(moved / (copy_ms * 1e-3) / 1e9, 1),
            "gemm_n": n, "copy_bytes": moved}


# -- cost model side ----------------------------------------------------------------------------------
def model_counts(spec: ModelSpec, kind: str, n: int, context_tokens: int = 0) -> tuple[float, float]:
    """(FLOPs, bytes) of one pass as ``ReplicaModel`` counts them (one stage, TP=1, last stage)."""
    layers, d_attn = spec.layers, spec.heads * spec.hd
    head = 2 * spec.vocab * spec.hidden
    b_const = layers * spec.layer_bytes + spec.head_params * spec.dtype_bytes
    if kind == "prefill":
        flops = 2 * spec.layer_params * layers * n + 2 * d_attn * layers * n * n + head
        return flops, b_const + layers * spec.kv_bytes_per_token_layer * n
    flops = (2 * spec.layer_params * layers + head) * n + 4 * d_attn * layers * context_tokens
    return flops, b_const + layers * spec.kv_bytes_per_token_layer * context_tokens


def fmt_row(cols: list[str], widths: list[int]) -> str:
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths, strict=True)))


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    print(fmt_row(header, widths))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(fmt_row(r, widths))


def mape(pairs: list[tuple[float, float]]) -> float | None:
    """Mean absolute percentage error of (predicted, measured) pairs, in percent."""
    return round(100 * statistics.mean(abs(p - m) / m for p, m in pairs), 1) if pairs else None


# -- main -----------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU: exercises the code only")
    ap.add_argument("--model", default="llama-3.1-8b", help="catalog model whose shape to build")
    ap.add_argument("--gpu", default=None, help="catalog GPU to predict for (default: detected)")
    ap.add_argument("--prompts", default=None, help="comma-separated prefill lengths (batch 1)")
    ap.add_argument("--batches", default=None, help="comma-separated decode batch sizes")
    ap.add_argument("--context", type=int, default=None, help="tokens each decoding sequence already holds")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per point (median reported)")
    ap.add_argument("--chunks", default=None, help="comma-separated prefill chunk sizes mixed into a decode batch")
    ap.add_argument("--mixed-batch", type=int, default=None, help="decode batch of the mixed steps (default 32)")
    ap.add_argument("--json-out", default=None, help="also write the final JSON line to this file")
    args = ap.parse_args()

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or pass --cpu-smoke")
    device = "cpu" if smoke else "cuda"
    dtype = torch.bfloat16
    spec = SMOKE_SHAPE if smoke else load_model(args.model)
    spec = replace(spec, dtype_bytes=2)
    prompts = [int(x) for x in (args.prompts or ("16,64" if smoke else "128,512,2048,8192")).split(",")]
    batches = [int(x) for x in (args.batches or ("1,4" if smoke else "1,8,32,128")).split(",")]
    ctx = args.context or (32 if smoke else 1024)
    reps = args.reps or (3 if smoke else 10)
    chunks = [int(x) for x in (args.chunks or ("16" if smoke else "256,512,1024,2048")).split(",")]
    mixed_batch = args.mixed_batch or (4 if smoke else 32)
    torch.manual_seed(0)
    if smoke:
        torch.set_num_threads(2)

    if device == "cuda":
        dev_name = torch.cuda.get_device_name()
        props = torch.cuda.get_device_properties(0)
        mem_gib = props.total_memory / 2**30
        gpu_name = args.gpu or catalog_gpu(dev_name, mem_gib)
    else:
        dev_name, mem_gib = "cpu (smoke: predictions use the GPU figures and do not describe the CPU)", 0.0
        gpu_name = args.gpu or "H100"
    gpu: GpuSpec = GPUS[gpu_name]
    eff: Efficiency = DEFAULT_EFF
    rm = ReplicaModel(spec, [Stage("n0", gpu, 1, spec.layers, True, True)], [], eff)
    fixed_s = spec.layers * eff.layer_overhead_s

    print(f"device: {dev_name} ({mem_gib:.1f} GiB)  ->  catalog {gpu.name}: {gpu.tflops} TFLOP/s bf16 dense, "
          f"{gpu.mem_gbs} GB/s")
    print(f"model shape: {spec.name} layers={spec.layers} hidden={spec.hidden} heads={spec.heads}/"
          f"{spec.kv_heads} inter={spec.intermediate} vocab={spec.vocab}  weights {spec.weight_bytes / 1e9:.2f} GB")
    print(f"efficiency (DEFAULT_EFF): compute={eff.compute} memory={eff.memory} "
          f"layer_overhead={eff.layer_overhead_s * 1e6:.1f}us step_overhead={eff.step_overhead_s * 1e3:.2f}ms")
    print(f"torch {torch.__version__}", flush=True)

    cal = calibrate(device, dtype, smoke)
    if device == "cuda":
        torch.cuda.empty_cache()  # hand the calibration's 8 GiB back before the model's weights and caches
    print(f"calibration: {cal['gemm_n']}^3 bf16 GEMM {cal['gemm_tflops']} TFLOP/s; "
          f"copy {cal['copy_gbs_read_plus_write']} GB/s (read+write)", flush=True)

    gqa = probe_gqa(device, dtype)
    print(f"prefill attention: SDPA {'flash' if device == 'cuda' else 'cpu'} backend, GQA {gqa}", flush=True)
    # Correctness first, on the tiny shape (bf16 noise is small there, so a real bug stands out): prefilling
    # n+1 tokens must give the logits of prefilling n and decoding one through the decode cache.
    with torch.inference_mode(), sdpa_backends(device):
        consistency = Decoder(SMOKE_SHAPE, device, dtype, 1, 64, 65, gqa).check_consistency(48)
    ok = consistency < 0.01
    print(f"consistency (tiny shape; mean |logit difference| / mean |logit|): {consistency:.2e} "
          f"{'ok' if ok else 'MISMATCH: the decoder is wrong, its timings are suspect'}", flush=True)
    if smoke and not ok:
        sys.exit(1)
    t0 = time.perf_counter()
    net = Decoder(spec, device, dtype, max(batches), ctx, max(*prompts, *chunks), gqa)
    if device == "cuda":
        torch.cuda.synchronize()
        print(f"built decoder in {time.perf_counter() - t0:.1f}s; GPU memory allocated "
              f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)

    points = []  # dicts
    with torch.inference_mode(), sdpa_backends(device):
        consistency_full = net.check_consistency(min(ctx, max(prompts) - 1, 512)) if not smoke else consistency
        if not smoke:
            print(f"consistency, {spec.name} shape (information: bf16 through {spec.layers} layers): "
                  f"{consistency_full:.2e}", flush=True)
        # prefill, batch 1, eager (as engines run prefill)
        for n in prompts:
            ids = torch.randint(0, spec.vocab, (1, n), device=device)
            r = max(3, reps // 2) if n >= 4096 else reps
            ms, _ = median_ms(lambda ids=ids: net.prefill(ids), device, reps=r, warmup=2)
            pred_s = rm.prefill_time(n, float(n * n), 1)
            flops, nbytes = model_counts(spec, "prefill", n)
            points.append({"kind": "prefill", "point": f"prefill {n} tok", "tokens": n, "batch": 1,
                           "measured_ms": ms, "predicted_ms": pred_s * 1e3,
                           "predicted_gpu_only_ms": (pred_s - eff.step_overhead_s) * 1e3,
                           "flops": flops, "bytes": nbytes})
            print(f"  prefill {n}: {ms:.3f} ms", flush=True)
        # decode, CUDA graph per batch size on the GPU
        pool = torch.cuda.graph_pool_handle() if device == "cuda" else None
        decode_ms: dict[int, float] = {}
        graphs: list[Callable[[], object]] = []
        for b in batches:
            ids = torch.randint(0, spec.vocab, (b,), device=device)
            step = captured(lambda ids=ids: net.decode(ids, ctx), device, pool)
            ms, _ = median_ms(step, device, reps=max(reps, 20) if device == "cuda" else reps, warmup=3)
            decode_ms[b] = ms
            graphs.append(step)  # kept alive: freeing a graph of a shared pool before the next capture trips
            # PyTorch's caching allocator (seen with torch 2.11: "use_count > 0 INTERNAL ASSERT FAILED")
            context_tokens = b * (ctx + 1)
            pred_s = rm.decode_step_time(b, context_tokens)
            flops, nbytes = model_counts(spec, "decode", b, context_tokens)
            points.append({"kind": "decode", "point": f"decode b={b} ctx={ctx}", "tokens": b, "batch": b,
                           "measured_ms": ms, "predicted_ms": pred_s * 1e3,
                           "predicted_gpu_only_ms": (pred_s - eff.step_overhead_s) * 1e3,
                           "flops": flops, "bytes": nbytes})
            print(f"  decode b={b}: {ms:.3f} ms", flush=True)
        # chunked prefill mixed with decode, against the same chunk and decode batch run apart (all graphed)
        mb = mixed_batch if mixed_batch in decode_ms else max(decode_ms)
        for c in chunks:
            dec_ids = torch.randint(0, spec.vocab, (mb,), device=device)
            chunk_ids = torch.randint(0, spec.vocab, (1, c), device=device)
            mixed_step = captured(lambda d=dec_ids, p=chunk_ids: net.mixed(d, ctx, p), device, pool)
            ms, _ = median_ms(mixed_step, device, reps=max(reps, 20) if device == "cuda" else reps, warmup=3)
            alone = captured(lambda p=chunk_ids: net.prefill(p), device, pool)
            pre_ms, _ = median_ms(alone, device, reps=max(reps, 20) if device == "cuda" else reps, warmup=3)
            graphs += [mixed_step, alone]
            context_tokens = mb * (ctx + 1)
            pred_s = rm.mixed_step_time(mb, context_tokens, c, float(c * c), 1)
            pred_apart = rm.prefill_time(c, float(c * c), 1) + rm.decode_step_time(mb, context_tokens)
            fp, bp = model_counts(spec, "prefill", c)
            fd, bd = model_counts(spec, "decode", mb, context_tokens)
            b_weights = spec.layers * spec.layer_bytes + spec.head_params * spec.dtype_bytes
            points.append({"kind": "mixed", "point": f"mixed b={mb}+{c} tok", "tokens": mb + c, "batch": mb,
                           "measured_ms": ms, "predicted_ms": pred_s * 1e3,
                           "predicted_gpu_only_ms": (pred_s - eff.step_overhead_s) * 1e3,
                           "flops": fp + fd, "bytes": bp + bd - b_weights,
                           "apart_measured_ms": pre_ms + decode_ms[mb],
                           "apart_predicted_gpu_only_ms": (pred_apart - 2 * eff.step_overhead_s) * 1e3})
            print(f"  mixed b={mb} + chunk {c}: {ms:.3f} ms (apart: prefill {pre_ms:.3f} + decode "
                  f"{decode_ms[mb]:.3f} ms)", flush=True)

    rows = []
    for p in points:
        sec = p["measured_ms"] * 1e-3
        p["ratio"] = p["predicted_ms"] / p["measured_ms"]
        p["ratio_gpu_only"] = p["predicted_gpu_only_ms"] / p["measured_ms"]
        p["achieved_tflops"] = p["flops"] / sec / 1e12
        p["achieved_gbs"] = p["bytes"] / sec / 1e9
        p["compute_fraction"] = p["achieved_tflops"] * 1e12 / gpu.flops
        p["memory_fraction"] = p["achieved_gbs"] * 1e9 / gpu.mem_bytes_per_s
        # the same with the model's per-layer overhead taken off the measured time
        busy = max(sec - fixed_s, 1e-9)
        p["compute_fraction_ex_overhead"] = p["flops"] / busy / gpu.flops
        p["memory_fraction_ex_overhead"] = p["bytes"] / busy / gpu.mem_bytes_per_s
        rows.append([p["point"], f"{p['measured_ms']:.3f}", f"{p['predicted_ms']:.3f}", f"{p['ratio']:.2f}",
                     f"{p['predicted_gpu_only_ms']:.3f}", f"{p['ratio_gpu_only']:.2f}",
                     f"{p['achieved_tflops']:.1f}", f"{p['compute_fraction']:.2f}",
                     f"{p['achieved_gbs']:.0f}", f"{p['memory_fraction']:.2f}"])
    print_table(f"Cost model vs measurement: {spec.name} on {dev_name}, predicted for {gpu.name}, TP=1 PP=1",
                ["point", "meas ms", "pred ms", "pred/meas", "pred-gpu ms", "gpu/meas",
                 "TFLOP/s", "of peak", "GB/s", "of BW"], rows)

    pre = [p for p in points if p["kind"] == "prefill"]
    dec = [p for p in points if p["kind"] == "decode"]
    mix = [p for p in points if p["kind"] == "mixed"]
    for p in mix:  # what one pass saves over running the chunk and the decode step apart
        p["saving_measured"] = 1 - p["measured_ms"] / p["apart_measured_ms"]
        p["saving_predicted"] = 1 - p["predicted_gpu_only_ms"] / p["apart_predicted_gpu_only_ms"]
    if mix:
        print_table("Mixed step vs the same chunk and decode batch apart (GPU time; prediction without host overhead)",
                    ["point", "mixed ms", "apart ms", "saving", "pred-gpu mixed", "pred-gpu apart", "pred saving"],
                    [[p["point"], f"{p['measured_ms']:.3f}", f"{p['apart_measured_ms']:.3f}",
                      f"{p['saving_measured']:.2f}", f"{p['predicted_gpu_only_ms']:.3f}",
                      f"{p['apart_predicted_gpu_only_ms']:.3f}", f"{p['saving_predicted']:.2f}"] for p in mix])
    big = max(pre, key=lambda p: p["tokens"]) if pre else None
    small = min(dec, key=lambda p: p["batch"]) if dec else None
    suggest = {
        "compute_from": big["point"] if big else None,
        "compute": round(big["compute_fraction_ex_overhead"], 3) if big else None,
        "memory_from": small["point"] if small else None,
        "memory": round(small["memory_fraction_ex_overhead"], 3) if small else None,
    }
    print(f"\nimplied efficiencies (per-layer overhead {fixed_s * 1e3:.3f} ms taken off): compute "
          f"{suggest['compute']} ({suggest['compute_from']}), memory {suggest['memory']} ({suggest['memory_from']}); "
          f"model uses compute={eff.compute}, memory={eff.memory}")

    def r(x: float) -> float:
        return round(x, 4) if math.isfinite(x) else x

    summary = {
        "bench": "gpu_cost_model_check", "smoke": smoke,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": dev_name, "catalog_gpu": gpu.name, "torch": torch.__version__, "model": spec.name,
        "tp": 1, "pp": 1, "decode_context": ctx, "prefill_gqa": gqa, "consistency_tiny": consistency,
        "consistency_full": consistency_full, "calibration": cal,
        "efficiency": {"compute": eff.compute, "memory": eff.memory, "layer_overhead_s": eff.layer_overhead_s,
                       "step_overhead_s": eff.step_overhead_s},
        "points": [{k: (r(v) if isinstance(v, float) else v) for k, v in p.items()
                    if k in ("point", "kind", "measured_ms", "predicted_ms", "ratio", "predicted_gpu_only_ms",
                             "ratio_gpu_only", "achieved_tflops", "compute_fraction", "achieved_gbs",
                             "memory_fraction", "apart_measured_ms", "apart_predicted_gpu_only_ms",
                             "saving_measured", "saving_predicted")} for p in points],
        "mape_prefill_pct": mape([(p["predicted_ms"], p["measured_ms"]) for p in pre]),
        "mape_decode_pct": mape([(p["predicted_ms"], p["measured_ms"]) for p in dec]),
        "mape_prefill_gpu_only_pct": mape([(p["predicted_gpu_only_ms"], p["measured_ms"]) for p in pre]),
        "mape_decode_gpu_only_pct": mape([(p["predicted_gpu_only_ms"], p["measured_ms"]) for p in dec]),
        "mape_mixed_gpu_only_pct": mape([(p["predicted_gpu_only_ms"], p["measured_ms"]) for p in mix]),
        "implied_efficiency": suggest,
    }
    line = json.dumps(summary)
    print(line, flush=True)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")


if __name__ == "__main__":
    main()
