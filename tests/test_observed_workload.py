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
