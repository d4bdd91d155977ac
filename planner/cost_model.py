"""Roofline cost model: how long a replica takes to prefill and to decode, and what fits in memory.

A replica is ``pp`` pipeline stages of ``tp`` GPUs each (TP inside a node). For one stage holding
``l`` layers, a forward pass over ``T`` tokens costs

    max(FLOPs / (tp * peak_FLOPs * e_c),  bytes / (tp * peak_mem_bw * e_m))       # roofline
    + l * per-layer overhead + l * 2 TP all-reduces + one PP activation send           # fixed + comm

with FLOPs = 2 * params_per_layer * T * l + attention (2 * sum(s^2) * d_attn * l for a causal prefill,
4 * context * d_attn * l for a decode step) + the LM head on the last stage; bytes = weights of the
stage + the KV cache it reads or writes. A TP all-reduce of ``n`` bytes over a ring of ``tp`` GPUs
moves 2 (tp-1)/tp * n over the GPU link; a PP send moves T * hidden * dtype bytes to the next stage
(over the network when the next stage is on another node). Prefill latency is the sum over stages,
its throughput the slowest stage (stages pipeline across batches); a decode step is the sum over stages.

KV transfer from a prefill to a decode replica moves ``input_len * kv_bytes_per_token * q`` bytes,
``q`` = 1 (none), 0.516 (int8 + an fp16 scale per 64 values) or 0.266 (int4), split by layer over
the stage pairs whose layer ranges overlap (``kv_segments``), each over its own link.

The efficiency factors (achieved fraction of peak) and the fixed overheads are the model's only
fitted constants. Three of them only matter off the GPU and default to neutral: a weight GEMM over
``m`` rows reaching ``m / (m + gemm_half_rows)`` of the compute rate, attention FLOPs running at
``attention_compute`` of it and attention's KV traffic at ``attention_memory`` of the memory rate.
``bench/cost_model_check.py`` calibrates all of them for this CPU and compares predictions with the
reference engine's measured prefill and decode steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from planner.gpus import GpuSpec
from planner.models import ModelSpec
from planner.work import COUNTS as WORK

KV_FACTOR = {"none": 1.0, "int8": (1 + 2 / 64) / 2, "int4": (0.5 + 2 / 64) / 2}


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of peak and fixed overheads (defaults: SGLang-class engines on GPUs)."""

    # Calibrated 2026-11-28 on an H100 and an H200 (bench/gpu_cost_model_check.py, results in bench/results/:
    # Llama-3.1-8B and Qwen2.5-14B shapes, prefill 2k-8k, decode batch 1-128, mixed steps of 256-2048-token
    # chunks; 34 points): mean |error| 6.6%, worst 15%, where the datasheet roofline (0.6 / 0.8 / max /
    # 6 us) was 22% and 44%, all optimistic. The fit's own per-layer overhead was 35 us for that plain
    # PyTorch decoder; 20 us here, since SGLang fuses more of a layer's small kernels.
    compute: float = 0.55  # of dense bf16 peak in large GEMMs and prefill attention
    memory: float = 0.7  # of datasheet HBM/GDDR bandwidth when streaming weights and KV
    network: float = 0.8  # of nominal link bandwidth
    layer_overhead_s: float = 20e-6  # per layer per forward (small kernels; CUDA graphs in decode)
    step_overhead_s: float = 1.5e-3  # per forward pass (scheduler, sampling, detokenize)
    mem_fraction: float = 0.88  # of device memory the engine may take (SGLang mem_fraction_static)
    # A GEMM over few rows (a decode batch, a short prompt) reaches only part of ``compute``: a weight
    # GEMM over m >= 2 rows runs at ``compute * m / (m + gemm_half_rows)`` (one row is a GEMV, which
    # streams its weights: no ramp; phased in between). The LM head's rows are the prompts' last tokens
    # and the decode rows. 0 = no ramp (the GPU fit above: there a few-row GEMM is memory-bound anyway);
    # on one CPU core about 10 rows (bench/cost_model_check.py calibrates it).
    gemm_half_rows: float = 0.0
    # Attention kernels' FLOP rate as a fraction of ``compute``, FLOPs counted causally (half the square
    # of a prompt), for prefill, decode and mixed steps alike. Flash attention on a GPU is folded into
    # ``compute`` (1.0); a kernel that also computes the masked half, as PyTorch's CPU SDPA does,
    # reaches at most 0.5.
    attention_compute: float = 1.0
    # Attention's KV traffic (reads in decode, reads and writes in prefill) as a fraction of ``memory``'s
    # rate. A GPU decode-attention kernel streams KV about as fast as a GEMV streams weights (1.0).
    attention_memory: float = 1.0
    # How compute and memory time combine in one pass: inf = the plain roofline max(); a finite p gives
    # (t_compute^p + t_memory^p)^(1/p), slower near the ridge point, where real GEMMs reach neither
    # peak (a 256-token prefill chunk, a mixed step: measured 15.4 ms where max() said 8.7 on an H100).
    roofline_p: float = 1.5

    def __post_init__(self) -> None:
        rates = ("compute", "memory", "network", "attention_compute", "attention_memory", "mem_fraction",
                 "roofline_p")
        bad = [f for f in rates if not getattr(self, f) > 0]
        bad += [f for f in ("gemm_half_rows", "layer_overhead_s", "step_overhead_s") if not getattr(self, f) >= 0]
        if bad:
            raise ValueError(f"Efficiency: {', '.join(bad)} out of range (rates > 0, overheads and ramp >= 0)")


DEFAULT_EFF = Efficiency()


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: ``tp`` GPUs of one type on one node holding ``layers`` layers."""

    node: str
    gpu: GpuSpec
    tp: int
    layers: int
    first: bool
    last: bool


def roof_array(compute_s: np.ndarray, memory_s: np.ndarray, p: float) -> np.ndarray:
    """``roof`` element by element (the capacity tables evaluate many batch sizes at once)."""
    WORK["roof_array"] += 1
    hi = np.maximum(compute_s, memory_s)
    if p == math.inf:
        return hi
    safe = np.where(hi > 0, hi, 1.0)
    soft = safe * ((compute_s / safe) ** p + (memory_s / safe) ** p) ** (1.0 / p)
    return np.where((compute_s <= 0) | (memory_s <= 0), hi, soft)


def roof(compute_s: float, memory_s: float, p: float) -> float:
    """Time of a pass that needs ``compute_s`` at its compute rate and ``memory_s`` at its memory rate."""
    WORK["roof"] += 1
    if p == math.inf or compute_s <= 0 or memory_s <= 0:
        return max(compute_s, memory_s)
    hi = max(compute_s, memory_s)
    return hi * ((compute_s / hi) ** p + (memory_s / hi) ** p) ** (1.0 / p)


class ReplicaModel:
    """Timing and memory of one replica (its stages, links and the model)."""

    def __init__(self, model: ModelSpec, stages: list[Stage], pp_links: list[tuple[float, float]],
                 eff: Efficiency = DEFAULT_EFF) -> None:
        """``pp_links[s]`` = (bytes/s, latency s) from stage s to s+1."""
        self.model = model
        self.stages = stages
        self.pp_links = pp_links
        self.eff = eff
        m = model
        self._d_attn = m.heads * m.hd
        self._head_flops_per_req = 2 * m.vocab * m.hidden
        self._act_bytes_per_token = m.hidden * m.dtype_bytes
        self.kv_tokens = self._kv_capacity_tokens()
        self._precompute()

    # -- memory --------------------------------------------------------------------------------
    def stage_weight_bytes_per_gpu(self, s: Stage) -> float:
        m = self.model
        b = s.layers * m.layer_bytes
        if s.first:
            b += m.embed_params * m.dtype_bytes
        if s.last:
            b += m.head_params * m.dtype_bytes + m.hidden * m.dtype_bytes
        return b / s.tp

    def _kv_capacity_tokens(self) -> float:
        """Tokens of KV cache the replica can hold (the tightest stage decides)."""
        m, e = self.model, self.eff
        cap = math.inf
        for s in self.stages:
            free = s.gpu.memory_bytes * e.mem_fraction - self.stage_weight_bytes_per_gpu(s)
            per_token = m.kv_bytes_per_token_layer * s.layers / min(s.tp, m.kv_heads)
            cap = min(cap, free / per_token if per_token > 0 else math.inf)
        return max(cap, 0.0)

    @property
    def gpu_count(self) -> int:
        return sum(s.tp for s in self.stages)

    # -- compute -------------------------------------------------------------------------------
    def _precompute(self) -> None:
        """Per-stage coefficients, so a step time is a few multiply-adds (the search calls it a lot)."""
        m, e = self.model, self.eff
        self._coef = []
        self._half_rows = e.gemm_half_rows
        for i, s in enumerate(self.stages):
            last = s.last
            f_tok = 2 * m.layer_params * s.layers + (self._head_flops_per_req if last else 0.0)  # per token/seq
            f_sq = 2 * self._d_attn * s.layers / e.attention_compute  # prefill: x sum(s^2); decode: x2 x context
            b_const = s.layers * m.layer_bytes + (m.head_params * m.dtype_bytes if last else 0.0)
            b_kv = s.layers * m.kv_bytes_per_token_layer / e.attention_memory
            f_den = s.tp * s.gpu.sustained_flops * e.compute
            b_den = s.tp * s.gpu.sustained_mem_bytes_per_s * e.memory
            fixed = s.layers * e.layer_overhead_s
            comm_tok = 0.0
            if s.tp > 1:  # two ring all-reduces per layer of tokens x hidden x dtype bytes
                fixed += 2 * s.layers * 2 * (s.tp - 1) * 5e-6
                comm_tok += 2 * s.layers * 2 * (s.tp - 1) / s.tp * self._act_bytes_per_token / (
                    s.gpu.link_bytes_per_s * e.network)
            if i < len(self.pp_links):
                bw, lat = self.pp_links[i]
                fixed += lat
                comm_tok += self._act_bytes_per_token / (bw * e.network)
            self._coef.append((f_tok, f_sq, b_const, b_kv, f_den, b_den, fixed, comm_tok, last))
        # Identical stages (a 70B model over 8 pipeline stages of one GPU type) take identical times:
        # each distinct stage is computed once and counted as often as it occurs.
        index: dict[tuple, int] = {}
        self._stage_group: list[int] = []
        groups: list[list] = []
        for coef in self._coef:
            if coef not in index:
                index[coef] = len(groups)
                groups.append([coef, 0])
            groups[index[coef]][1] += 1
            self._stage_group.append(index[coef])
        self._groups: list[tuple[tuple, int]] = [(c, n) for c, n in groups]
        self._counts = np.array([n for _, n in self._groups], dtype=float)

    def _slow_rows(self, rows: float) -> float:
        """1 / (fraction of peak a weight GEMM over ``rows`` rows reaches): 1.0 exactly with no ramp.
        One row is a GEMV, a kernel that streams the weights (the roofline's memory side): no ramp there;
        the ramp phases in between one row and two, so a step's time stays continuous and non-decreasing
        in its rows (the capacity search interpolates and bisects on it)."""
        if not self._half_rows or rows <= 1:
            return 1.0
        return 1.0 + self._half_rows * min(rows - 1.0, 1.0) / rows

    def _slow_rows_array(self, rows: np.ndarray) -> np.ndarray | float:
        if not self._half_rows:
            return 1.0
        safe = np.maximum(rows, 1.0)
        return 1.0 + self._half_rows * np.clip(safe - 1.0, 0.0, 1.0) / safe

    def _prefill_group_times(self, tokens: float, sum_sq: float, n_req: int) -> list[float]:
        head = self._head_flops_per_req
        p = self.eff.roofline_p
        slow, slow_head = self._slow_rows(tokens), self._slow_rows(n_req)
        out = []
        for (f_tok, f_sq, b_const, b_kv, f_den, b_den, fixed, comm_tok, last), _ in self._groups:
            flops = f_tok * tokens * slow + f_sq * sum_sq
            if last:  # the LM head runs on the last token of each prompt only (``n_req`` rows)
                flops += head * (n_req * slow_head - tokens * slow)
            out.append(roof(flops / f_den, (b_const + b_kv * tokens) / b_den, p) + fixed + comm_tok * tokens)
        return out

    def prefill_stage_times(self, tokens: float, sum_sq: float | None = None, n_req: int = 1) -> list[float]:
        """Per-stage time to prefill ``tokens`` prompt tokens (``sum_sq`` = sum of squared prompt lengths)."""
        if sum_sq is None:
            sum_sq = tokens * tokens / max(n_req, 1)
        times = self._prefill_group_times(tokens, sum_sq, n_req)
        return [times[g] for g in self._stage_group]

    def prefill_array(self, tokens: np.ndarray, sum_sq: np.ndarray, n_req: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(``prefill_time``, ``prefill_bottleneck``) for many batches at once."""
        head = self._head_flops_per_req
        p = self.eff.roofline_p
        slow, slow_head = self._slow_rows_array(tokens), self._slow_rows_array(n_req)
        rows = []
        for (f_tok, f_sq, b_const, b_kv, f_den, b_den, fixed, comm_tok, last), _ in self._groups:
            flops = f_tok * tokens * slow + f_sq * sum_sq
            if last:
                flops = flops + head * (n_req * slow_head - tokens * slow)
            rows.append(roof_array(flops / f_den, (b_const + b_kv * tokens) / b_den, p) + fixed + comm_tok * tokens)
        st = np.array(rows)
        overhead = self.eff.step_overhead_s
        return (st * self._counts[:, None]).sum(axis=0) + overhead, st.max(axis=0) + overhead

    def prefill_time(self, tokens: float, sum_sq: float | None = None, n_req: int = 1) -> float:
        """Latency of one prefill batch (all stages, plus the per-pass overhead)."""
        if sum_sq is None:
            sum_sq = tokens * tokens / max(n_req, 1)
        times = self._prefill_group_times(tokens, sum_sq, n_req)
        return sum(t * n for t, (_, n) in zip(times, self._groups, strict=True)) + self.eff.step_overhead_s

    def prefill_bottleneck(self, tokens: float, sum_sq: float | None = None, n_req: int = 1) -> float:
        """Time the slowest stage is busy with one batch: the inverse of pipelined batch throughput."""
        if sum_sq is None:
            sum_sq = tokens * tokens / max(n_req, 1)
        return max(self._prefill_group_times(tokens, sum_sq, n_req)) + self.eff.step_overhead_s

    def decode_step_time(self, batch: float, context_tokens: float) -> float:
        """One decode iteration for ``batch`` sequences holding ``context_tokens`` tokens in total."""
        if batch <= 0:
            return 0.0
        t = self.eff.step_overhead_s
        p = self.eff.roofline_p
        slow = self._slow_rows(batch)
        for (f_tok, f_sq, b_const, b_kv, f_den, b_den, fixed, comm_tok, _), n in self._groups:
            flops = f_tok * batch * slow + 2 * f_sq * context_tokens
            t += n * (roof(flops / f_den, (b_const + b_kv * context_tokens) / b_den, p) + fixed + comm_tok * batch)
        return t

    def decode_step_array(self, batch: np.ndarray, context_tokens: np.ndarray) -> np.ndarray:
        """``decode_step_time`` for many batches at once (0 where the batch is empty)."""
        t = np.full(np.shape(batch), self.eff.step_overhead_s)
        p = self.eff.roofline_p
        slow = self._slow_rows_array(batch)
        for (f_tok, f_sq, b_const, b_kv, f_den, b_den, fixed, comm_tok, _), n in self._groups:
            flops = f_tok * batch * slow + 2 * f_sq * context_tokens
            t = t + n * (roof_array(flops / f_den, (b_const + b_kv * context_tokens) / b_den, p) + fixed
                         + comm_tok * batch)
        return np.where(batch > 0, t, 0.0)

    def mixed_step_array(self, batch: np.ndarray, context_tokens: np.ndarray, chunk_tokens: np.ndarray,
                         chunk_sum_sq: np.ndarray, chunk_reqs: np.ndarray, prefix_tokens: np.ndarray) -> np.ndarray:
        """``mixed_step_time`` for many (batch, chunk) pairs at once; every chunk is non-empty."""
        t = np.full(np.shape(batch), self.eff.step_overhead_s)
        head = self._head_flops_per_req
        p = self.eff.roofline_p
        slow, slow_head = self._slow_rows_array(batch + chunk_tokens), self._slow_rows_array(batch + chunk_reqs)
        for (f_tok, f_sq, b_const, b_kv, f_den, b_den, fixed, comm_tok, last), n in self._groups:
            flops = f_tok * (batch + chunk_tokens) * slow
            if last:  # the head's rows: the decode rows and one per prompt in the chunk
                flops = flops + head * (chunk_reqs * slow_head - chunk_tokens * slow + batch * (slow_head - slow))
            gemm = roof_array(flops / f_den, np.full(np.shape(batch), b_const / b_den), p)
            attn_p = roof_array(f_sq * chunk_sum_sq / f_den, b_kv * (prefix_tokens + chunk_tokens) / b_den, p)
            attn_d = roof_array(2 * f_sq * context_tokens / f_den, b_kv * context_tokens / b_den, p)
            t = t + n * (gemm + attn_p + attn_d + fixed + comm_tok * (batch + chunk_tokens))
        alone = self.prefill_array(chunk_tokens, chunk_sum_sq, chunk_reqs)[0]
        return np.where(batch > 0, t, alone)

    def mixed_step_time(self, batch: float, context_tokens: float, chunk_tokens: float, chunk_sum_sq: float,
                        chunk_reqs: int, prefix_tokens: float = 0.0) -> float:
        """One iteration carrying ``batch`` decoding sequences (``context_tokens`` in total) and a prefill
        chunk of ``chunk_tokens`` prompt tokens (SGLang ``--enable-mixed-chunk``, vLLM's chunked
        prefill): one pass over the weights for both, so the step costs as much as the chunk it
        carries. ``chunk_sum_sq`` is the causal attention term of the chunk (sum over its pieces of
        ``2 * piece * offset + piece^2``); ``prefix_tokens``: earlier tokens of chunked prompts whose
        KV the chunk's attention reads."""
        if chunk_tokens <= 0:
            return self.decode_step_time(batch, context_tokens)
        if batch <= 0:
            return self.prefill_time(chunk_tokens, chunk_sum_sq, chunk_reqs)
        t = self.eff.step_overhead_s
        head = self._head_flops_per_req
        p = self.eff.roofline_p
        slow, slow_head = self._slow_rows(batch + chunk_tokens), self._slow_rows(batch + chunk_reqs)
        for (f_tok, f_sq, b_const, b_kv, f_den, b_den, fixed, comm_tok, last), n in self._groups:
            # the GEMMs see one batch of (decode rows + chunk tokens): one read of the weights
            flops = f_tok * (batch + chunk_tokens) * slow
            if last:  # the LM head runs on the decode rows and the last token of each prompt only
                flops += head * (chunk_reqs * slow_head - chunk_tokens * slow + batch * (slow_head - slow))
            gemm = roof(flops / f_den, b_const / b_den, p)
            # attention runs as separate kernels (prefill: compute-bound; decode: reads the whole KV)
            attn_p = roof(f_sq * chunk_sum_sq / f_den, b_kv * (prefix_tokens + chunk_tokens) / b_den, p)
            attn_d = roof(2 * f_sq * context_tokens / f_den, b_kv * context_tokens / b_den, p)
            t += n * (gemm + attn_p + attn_d + fixed + comm_tok * (batch + chunk_tokens))
        return t

    def kv_compress_time(self, tokens: float, compression: str) -> float:
        """Quantize (or dequantize) the KV of ``tokens`` tokens: one memory-bound pass over it."""
        if compression == "none":
            return 0.0
        m, e = self.model, self.eff
        slow = min(s.gpu.sustained_mem_bytes_per_s * s.tp for s in self.stages) * e.memory
        return tokens * m.kv_bytes_per_token * (1 + KV_FACTOR[compression]) / slow

    def layer_ranges(self) -> list[tuple[int, int, str]]:
        """(first layer, end layer, node) of each stage."""
        out, start = [], 0
        for s in self.stages:
            out.append((start, start + s.layers, s.node))
            start += s.layers
        return out


def kv_segments(src: ReplicaModel, dst: ReplicaModel) -> list[tuple[str, str, int]]:
    """(source node, destination node, layers) for every overlap of source and destination stage
    layer ranges: the KV of those layers travels that way (the pipeline routing between two splits)."""
    segs: dict[tuple[str, str], int] = {}
    for a0, a1, an in src.layer_ranges():
        for b0, b1, bn in dst.layer_ranges():
            overlap = min(a1, b1) - max(a0, b0)
            if overlap > 0:
                segs[(an, bn)] = segs.get((an, bn), 0) + overlap
    return [(a, b, n) for (a, b), n in segs.items()]


KV_AUTO_SHARE = 0.05  # "auto" KV compression: the least that keeps a prompt's KV transfer within this share of TTFT


def auto_kv_mode(transfer_s: Callable[[str], float], ttft_s: float) -> str:
    """The least KV compression whose transfer (``transfer_s(mode)`` seconds) stays within
    ``KV_AUTO_SHARE`` of the TTFT target, else the strongest: quantizing costs accuracy (and two
    passes over the KV), so it is used only where the link would eat into the TTFT."""
    for mode in ("none", "int8"):
        if transfer_s(mode) <= KV_AUTO_SHARE * ttft_s:
            return mode
    return "int4"


def kv_bytes(model: ModelSpec, tokens: float, layers: int, compression: str) -> float:
    return tokens * model.kv_bytes_per_token_layer * layers * KV_FACTOR[compression]
