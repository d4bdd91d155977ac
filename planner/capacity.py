"""How many requests/s one replica can take while meeting the SLO: queueing on top of the roofline.

The scheduler needs a fast, monotone estimate for thousands of candidates; the discrete-event
simulator (``planner.simulator``) is the judge of the final plan. Models, per role:

* prefill: batches of waiting prompts (up to ``max_batch_tokens``); batch size ``k`` from the
  fixed point ``k = 1 + rate * bottleneck(k)``; waiting time tail from the M/G/1 exponential
  approximation ``P(W > t) = rho * exp(-2 (1 - rho) t / (s (ca^2 + cs^2)))``.
  TTFT quantile = own batch latency + waiting quantile.
* decode: continuous batching; the running batch ``b`` solves Little's law
  ``b = rate * output_len * step(b)``; the TPOT quantile is the step time at ``b + z sqrt(b)``;
  the KV cache must hold that many sequences at full length.
* colocated (``both``): prefill has priority (SGLang's default), so decode steps stretch by
  ``1 / (1 - rho_prefill)`` and each request's TPOT carries the prefill stalls of its lifetime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from scipy.special import pdtrc

from planner.cost_model import ReplicaModel
from planner.workload import SLO, Workload

GRID = 32


@dataclass(frozen=True)
class Targets:
    """Quantiles the estimator checks: each of TTFT and TPOT at ``q``, so both hold for ~the SLO share."""

    q: float
    z: float
    max_batch_tokens: int = 8192

    @staticmethod
    def for_slo(slo: SLO, max_batch_tokens: int = 8192) -> Targets:
        q = 1 - (1 - slo.attainment) * 0.6
        return Targets(q, NormalDist().inv_cdf(q), max_batch_tokens)


def _wait_quantile(rho: float, s: float, scv_sum: float, q: float) -> float:
    if rho >= 1:
        return math.inf
    if rho <= 1 - q:
        return 0.0
    return s * scv_sum / (2 * (1 - rho)) * math.log(rho / (1 - q))


def _prefill_point(rm: ReplicaModel, wl: Workload, rate: float, t: Targets) -> tuple[float, float, float]:
    """(TTFT quantile, utilisation, batch latency) of a prefill queue at ``rate``."""
    mean_in = wl.mean_input
    sq = mean_in * mean_in * (1 + wl.input.scv)
    kmax = max(1.0, t.max_batch_tokens / mean_in)
    k = 1.0
    for _ in range(4):
        b = rm.prefill_bottleneck(k * mean_in, k * sq, max(1, round(k)))
        k = min(kmax, 1.0 + rate * b)
    b = rm.prefill_bottleneck(k * mean_in, k * sq, max(1, round(k)))
    s = b / k
    rho = rate * s
    lat = rm.prefill_time(k * mean_in, k * sq, max(1, round(k)))
    w = _wait_quantile(rho, s, wl.arrival_scv + wl.input.scv, t.q)
    # a long prompt (the input-length quantile) in an otherwise average batch
    long_in = wl.input.quantile(t.q)
    own = rm.prefill_time((k - 1) * mean_in + long_in, (k - 1) * mean_in**2 + long_in**2, max(1, round(k)))
    return max(own, lat + w), rho, lat


def prefill_max_rate(rm: ReplicaModel, wl: Workload, t: Targets) -> float:
    mean_in = wl.mean_input
    kmax = max(1.0, t.max_batch_tokens / mean_in)
    sq = mean_in * mean_in * (1 + wl.input.scv)
    return kmax / rm.prefill_bottleneck(kmax * mean_in, kmax * sq, max(1, round(kmax)))


def prefill_curve(rm: ReplicaModel, wl: Workload, t: Targets) -> tuple[np.ndarray, np.ndarray]:
    """Rates (req/s) and the TTFT quantile at each: a monotone table to read capacities from."""
    hi = prefill_max_rate(rm, wl, t)
    rates = np.linspace(0.0, hi, GRID + 1)[1:] * 0.995
    ttft = np.array([_prefill_point(rm, wl, r, t)[0] for r in rates])
    ttft = np.maximum.accumulate(np.where(np.isfinite(ttft), ttft, 1e9))
    return rates, ttft


def rate_for_slack(rates: np.ndarray, ttft: np.ndarray, slack: float) -> float:
    """Highest rate whose TTFT quantile stays within ``slack`` seconds (0 if none)."""
    if slack <= 0 or ttft[0] > slack:
        return 0.0
    idx = int(np.searchsorted(ttft, slack, side="right")) - 1
    if idx >= len(rates) - 1:
        return float(rates[-1])
    r0, r1, t0, t1 = rates[idx], rates[idx + 1], ttft[idx], ttft[idx + 1]
    return float(r0 + (r1 - r0) * (slack - t0) / (t1 - t0)) if t1 > t0 else float(r0)


def _decode_batch(rm: ReplicaModel, wl: Workload, rate: float, ctx: float, stretch: float = 1.0) -> float | None:
    """Running batch at ``rate`` (Little's law fixed point), or None if it would exceed memory."""
    b_mem = rm.kv_tokens / max(wl.mean_input + wl.mean_output, 1.0)
    out = wl.mean_output

    def excess(b: float) -> float:
        return rate * out * rm.decode_step_time(max(b, 1e-9), b * ctx) * stretch - b

    if b_mem < 1 or excess(b_mem) > 0:
        return None
    lo, hi = 0.0, b_mem
    for _ in range(30):
        mid = (lo + hi) / 2
        if excess(mid) > 0:
            lo = mid
        else:
            hi = mid
    return hi


def _kv_fits(rm: ReplicaModel, wl: Workload, b: float, z: float) -> bool:
    """The KV cache holds a running batch of mean size ``b`` at full length, with a z-sigma margin."""
    per = wl.mean_input + wl.mean_output
    var = wl.input.var + wl.output.var
    return b * per + z * math.sqrt(max(b, 1e-9) * (var + per * per)) <= rm.kv_tokens


def decode_tpot(rm: ReplicaModel, wl: Workload, rate: float, t: Targets) -> float:
    """TPOT quantile of a decode replica at ``rate`` (inf when memory or compute cannot keep up)."""
    ctx = wl.mean_input + wl.mean_output / 2
    b = _decode_batch(rm, wl, rate, ctx)
    if b is None or not _kv_fits(rm, wl, b, t.z):
        return math.inf
    bq = b + t.z * math.sqrt(max(b, 1e-9))
    return rm.decode_step_time(max(bq, 1.0), max(bq, 1.0) * ctx)


def _bisect_rate(ok, hi: float, iters: int = 16) -> float:
    if hi <= 0 or not ok(hi * 1e-4):
        return 0.0
    lo = hi * 1e-4
    if ok(hi):
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def decode_capacity(rm: ReplicaModel, wl: Workload, slo: SLO, t: Targets) -> float:
    """Highest rate (req/s) a decode replica takes with its TPOT quantile within the target.

    The largest mean running batch ``b`` whose quantile batch ``b + z sqrt(b)`` steps within the
    TPOT target, and whose sequences fit in the KV cache, gives the rate by Little's law:
    ``rate = b / (output_len * step(b))``.
    """
    ctx = wl.mean_input + wl.mean_output / 2

    def ok(b: float) -> bool:
        bq = b + t.z * math.sqrt(b)
        return _kv_fits(rm, wl, b, t.z) and rm.decode_step_time(bq, bq * ctx) <= slo.tpot_s

    if not ok(0.05):
        return 0.0
    lo, hi = 0.05, max(1.0, rm.kv_tokens / max(wl.mean_input + wl.mean_output, 1.0))
    if ok(hi):
        lo = hi
    else:
        for _ in range(40):
            mid = (lo + hi) / 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
    return lo / (max(wl.mean_output, 1.0) * rm.decode_step_time(lo, lo * ctx))


def colocated_point(rm: ReplicaModel, wl: Workload, rate: float, t: Targets, tpot_target: float) -> tuple[float, float]:
    """(TTFT quantile, share of requests over the TPOT target) of a replica doing both phases.

    Prefill runs first, so each prefill batch during a request's decode stalls it for a batch
    latency; the number of stalls is Poisson, and short outputs suffer most, so the TPOT violation
    share is averaged over the output-length distribution.
    """
    ttft, rho, lat = _prefill_point(rm, wl, rate, t)
    if rho >= 0.98:
        return math.inf, 1.0
    stretch = 1.0 / (1.0 - rho)
    ctx = wl.mean_input + wl.mean_output / 2
    b = _decode_batch(rm, wl, rate, ctx, stretch)
    if b is None:
        return math.inf, 1.0
    if not _kv_fits(rm, wl, b, t.z):
        return math.inf, 1.0
    bq = b + t.z * math.sqrt(max(b, 1e-9))
    step = rm.decode_step_time(max(bq, 1.0), max(bq, 1.0) * ctx)
    if step >= tpot_target:
        return ttft + step, 1.0
    mean_in = wl.mean_input
    k = max(1.0, min(t.max_batch_tokens / mean_in, 1.0 + rate * lat))
    batch_rate = rate / k
    gaps = _output_gaps(wl)
    stalls = batch_rate * gaps * step * stretch  # Poisson mean of prefill batches during the decode
    allowed = np.floor((tpot_target - step) * gaps / max(lat, 1e-9))
    over = np.where(allowed < 0, 1.0, pdtrc(np.maximum(allowed, 0.0), np.maximum(stalls, 1e-12)))  # P(N > allowed)
    viol = np.where(gaps >= 1, over, 0.0)
    return ttft + step, float(viol.mean())


def _output_gaps(wl: Workload) -> np.ndarray:
    """Token gaps (output length - 1) at evenly spread quantiles of the output length."""
    if wl.output.kind == "fixed":
        return np.array([max(wl.output.mean - 1.0, 0.0)])
    return np.array([max(wl.output.quantile((i + 0.5) / 12) - 1.0, 0.0) for i in range(12)])


def colocated_capacity(rm: ReplicaModel, wl: Workload, slo: SLO, t: Targets) -> float:
    ctx = wl.mean_input + wl.mean_output / 2
    b_mem = rm.kv_tokens / max(wl.mean_input + wl.mean_output, 1.0)
    if b_mem < 1:
        return 0.0
    hi = min(prefill_max_rate(rm, wl, t), b_mem / (max(wl.mean_output, 1.0) * rm.decode_step_time(b_mem, b_mem * ctx)))

    def ok(r: float) -> bool:
        ttft, viol = colocated_point(rm, wl, r, t, slo.tpot_s)
        return ttft <= slo.ttft_s and viol <= 1 - t.q

    return _bisect_rate(ok, hi)
