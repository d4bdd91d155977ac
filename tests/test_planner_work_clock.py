"""The planner's deadlines run on work done (planner/work.py), so a time-capped plan is one plan per seed,
whatever the machine's speed or load."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from planner import work
from planner.offers import load_offers
from planner.plan import Plan
from planner.scheduler import plan_deployment
from planner.workload import SLO, Lengths, Workload

LAMBDA = Path(__file__).parent / "data" / "sky-catalogs" / "lambda_vms.csv"
SHORT = Workload(0.0, Lengths(256, "lognormal", 0.8, lo=8, hi=4096), Lengths(256, "lognormal", 0.8, lo=2, hi=2048))


def _plan(limit_s: float) -> tuple[Plan, dict[str, float]]:
    before = work.counts()
    plan = plan_deployment("llama-2-7b", SHORT, SLO(1.0, 0.04), budget=10.0, offers=load_offers([LAMBDA]),
                           inter_node_gbps=40, time_limit_s=limit_s)
    return plan, work.since(before)


def _deployed(plan: Plan) -> dict:
    d = plan.to_dict()
    d.pop("created_at")
    d.pop("expected")  # timings
    return d


def _wall_at(monkeypatch: pytest.MonkeyPatch, speed: float) -> None:
    """The work clock sees a machine ``speed`` x slower than the reference: wall time advances ``speed``
    seconds per reference second of work counted. It is driven by the counts, not by this machine's real
    time, so neither this machine's speed nor its load (the other test worker) can move the result."""
    before = work.counts()
    monkeypatch.setattr(work, "time", SimpleNamespace(
        perf_counter=lambda: speed * work.reference_seconds(work.since(before))))


@pytest.fixture(scope="module")
def reference() -> tuple[Plan, dict[str, float]]:
    """The plan at a 2 s cap on a machine as fast as the reference (cold caches: the first plan in the
    process). Its wall clock too is driven by the counts: on a loaded CI machine more than ``WALL_SLACK``
    times slower than the reference, real time would make it wall-clock bound, and the comparisons below
    would then measure the machine, not the planner."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _wall_at(monkeypatch, 1.0)
        return _plan(2.0)


def test_a_time_capped_plan_is_the_same_on_a_slower_machine_and_with_a_warm_cache(
        reference: tuple[Plan, dict[str, float]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2 s cap binds (the search stops on time); the same plan comes back when wall time runs 1.6x as
    fast, and the second run in the process (capacities memoised by the first) counts the same work."""
    first, work_first = reference
    assert first.expected["stopped_by_time"] == 1.0
    assert "wall_clock_bound" not in first.expected
    _wall_at(monkeypatch, 1.6)
    second, work_second = _plan(2.0)
    assert "wall_clock_bound" not in second.expected
    assert _deployed(second) == _deployed(first)
    assert work_second == pytest.approx(work_first)
    assert second.expected["plan_work_seconds"] == first.expected["plan_work_seconds"]


def test_on_a_machine_far_slower_than_the_reference_the_wall_clock_still_caps_the_plan(
        reference: tuple[Plan, dict[str, float]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Wall time at 50x: the planner's deadlines fall on (wall time - grace) / WALL_SLACK instead, so it
    searches less than at the reference speed, says so, and still returns a plan within the budget."""
    _wall_at(monkeypatch, 50.0)
    plan, done = _plan(2.0)
    assert plan.expected["wall_clock_bound"] == 1.0
    assert done["lp"] < 0.8 * reference[1]["lp"]  # the search was cut short (the first finalist's
    assert work.reference_seconds(done) < work.reference_seconds(reference[1])  # measurement runs in any case)
    assert plan.replicas and plan.cost_per_hour <= 10.0


def test_a_refit_of_a_few_kinds_holds_the_others_and_recovers_the_machines_speed(bench) -> None:
    """``bench/work_clock.py --fit``: on jobs timed on a machine 1.3x slower than the reference, where the MIPs
    really cost 20 ms and a colocated rate point 0.6 ms (a mixed one 0.4 ms), the fit finds those costs and
    the speed, keeps every other kind's cost, and keeps a group's proportions."""
    wc = bench.bench_module("work_clock")
    true = dict(work.COST, mip=0.02, mip_resolve=0.02, colocated_point=0.6e-3, mixed_point=0.4e-3)
    jobs = [{"lp": 400, "sim_event": 2e5}, {"mip": 30, "mip_resolve": 40, "colocated_point": 3000, "mixed_point": 6000},
            {"mip": 80, "mip_resolve": 20, "offer": 2000}, {"colocated_point": 500, "mixed_point": 900, "lp": 50},
            {"sim_request": 1e5, "kv_quantile": 2e4}, {"mip": 5, "colocated_point": 4000, "mixed_point": 1000}]
    rows = [(f"job {i}", 1.3 * sum(true[k] * v for k, v in c.items()), c) for i, c in enumerate(jobs)]
    proportions = {"colocated_point": 0.6e-3, "mixed_point": 0.4e-3}
    original = dict(work.COST)
    try:
        work.COST.update(proportions)
        fitted, speed = wc.fit(rows, [["mip", "mip_resolve"], ["colocated_point", "mixed_point"]])
    finally:
        work.COST.clear()
        work.COST.update(original)
    assert speed == pytest.approx(1.3, rel=1e-3)
    for k, v in true.items():
        assert fitted[k] == pytest.approx(v, rel=1e-2), k
