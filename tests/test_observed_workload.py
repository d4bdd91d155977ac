"""The observed workload: gateway counts -> a planner Workload, and when it counts as a shift."""

from __future__ import annotations

import time

import numpy as np
import pytest

from planner.observed_workload import WorkloadSample, is_observed, shift, to_workload
from planner.state import WORKLOAD_BUCKET_S, StateStore
from planner.workload import Lengths, Workload


def _sample(prompts: np.ndarray, outputs: np.ndarray, seconds: float = 60.0) -> WorkloadSample:
    return WorkloadSample(seconds, len(prompts), float(prompts.sum()), float((prompts**2).sum()),
                          float(outputs.sum()), float((outputs**2).sum()))


def test_observed_lengths_keep_the_mean_and_the_spread_and_one_length_stays_one() -> None:
    rng = np.random.default_rng(0)
    prompts = rng.lognormal(np.log(900), 0.6, 5000).round()
    outputs = np.full(5000, 64.0)
    wl = to_workload(_sample(prompts, outputs), rate=2.0)
    assert wl.rate == 2.0 and wl.input.kind == "lognormal"
    assert wl.input.mean == pytest.approx(prompts.mean(), rel=1e-6)
    assert wl.input.cv == pytest.approx(prompts.std() / prompts.mean(), abs=1e-3)
    assert wl.output == Lengths.fixed(64)
    assert is_observed(wl.to_dict()) and "5000 requests over 60 s (83.33 req/s)" in wl.trace
    assert not is_observed(Workload(1.0).to_dict())
    with pytest.raises(ValueError, match="no request"):
        to_workload(WorkloadSample(60.0), rate=1.0)


def test_a_shift_is_a_mean_length_moved_past_the_ratio_either_way() -> None:
    planned = Workload(1.0, Lengths.fixed(256), Lengths.fixed(64))
    assert shift(planned, Workload(1.0, Lengths.fixed(300), Lengths.fixed(50)), 1.5) is None
    assert shift(planned, Workload(1.0, Lengths.fixed(100), Lengths.fixed(64)), 1.5) == "mean prompt 256 -> 100 tokens"
    assert shift(planned, Workload(1.0, Lengths.fixed(256), Lengths.fixed(200)), 1.5) == "mean output 64 -> 200 tokens"


async def test_gateways_counts_add_up_per_bucket_and_the_window_leaves_the_current_one_out(state: StateStore) -> None:
    """Two gateways add to the same bucket; a window of 30 s reads the three whole buckets before now."""
    now = (time.time() // WORKLOAD_BUCKET_S) * WORKLOAD_BUCKET_S + 5  # mid-bucket
    counts = {"requests": 2, "input_sum": 10, "input_sq": 50, "output_sum": 4, "output_sq": 8}
    await state.record_workload(counts, now=now - 15)  # one whole bucket back
    await state.record_workload(counts, now=now - 12)  # the same bucket, another gateway
    await state.record_workload(counts, now=now - 45)  # four buckets back: outside a 30 s window
    await state.record_workload(counts, now=now)  # the current bucket: not yet whole
    seen = await state.workload_window(30, now=now)
    assert (seen.seconds, seen.requests, seen.input_sum, seen.input_sq, seen.output_sum, seen.output_sq) == (
        30.0, 4, 20, 100, 8, 16)
    assert seen.rate == pytest.approx(4 / 30)


def test_the_meter_judges_each_answer_against_the_plans_slo_and_buckets_its_latencies() -> None:
    """TTFT and TPOT land in their histogram buckets; a request counts as met only within both targets (one
    output token: TTFT alone); without an SLO nothing is judged, but the latencies are still counted."""
    from gateway.workload_meter import WorkloadMeter, slo_targets

    meter = WorkloadMeter()
    meter.timed(0.3, 0.04)  # before any plan: histograms only
    assert meter.counts["judged"] == 0 and meter.counts["ttft_5"] == 1 and meter.counts["tpot_2"] == 1
    meter.slo = slo_targets({"ttft_s": 0.5, "tpot_s": 0.05, "attainment": 0.9})
    assert slo_targets({}) is None and slo_targets({"ttft_s": "x", "tpot_s": 1}) is None
    meter.timed_span(0.2, 0.2 + 9 * 0.05, 10)  # TPOT exactly at the target: met
    meter.timed(0.6, 0.01)  # TTFT over
    meter.timed(0.1, 0.2)  # TPOT over
    meter.timed_span(0.4, 0.4, 1)  # one token: judged on TTFT alone
    assert (meter.counts["judged"], meter.counts["slo_met"]) == (4, 2)
    assert meter.counts["ttft_11"] == 0 and sum(meter.counts[f"ttft_{i}"] for i in range(12)) == 5
    assert sum(meter.counts[f"tpot_{i}"] for i in range(12)) == 4


async def test_a_windows_attainment_and_latency_quantiles_add_up_over_gateways(state: StateStore) -> None:
    """Two gateways' SLO counts and latency histograms sum in Redis; the window's quantiles are the bucket
    bounds that hold them (past the last bound: inf)."""
    from gateway.workload_meter import WorkloadMeter

    now = (time.time() // WORKLOAD_BUCKET_S) * WORKLOAD_BUCKET_S + 5
    for ttfts in ([0.04] * 48 + [0.3] * 2, [0.04] * 48 + [0.8, 40.0]):  # two gateways, 100 answers
        meter = WorkloadMeter()
        meter.slo = (0.5, 1.0)
        for ttft in ttfts:
            meter.timed(ttft, 0.015)
        await state.record_workload(meter.counts, now=now - 15)
    seen = await state.workload_window(30, now=now)
    assert (seen.judged, seen.slo_met) == (100, 98) and seen.attainment == pytest.approx(0.98)
    assert seen.latency_quantile("ttft", 0.5) == 0.05 and seen.latency_quantile("ttft", 0.97) == 0.5
    assert seen.latency_quantile("ttft", 0.99) == 1.0 and seen.latency_quantile("ttft", 1.0) == float("inf")
    assert seen.latency_quantile("tpot", 0.99) == 0.02
    empty = await state.workload_window(30, now=now + 3600)
    assert empty.attainment is None and empty.latency_quantile("tpot", 0.5) is None
