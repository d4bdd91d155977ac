"""Roofline cost model, layer balancing, capacity estimates and the routing LP."""

from __future__ import annotations

import math
from dataclasses import replace
from statistics import NormalDist

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.cluster import Cluster, Node
from planner.cost_model import DEFAULT_EFF, KV_FACTOR, Efficiency, ReplicaModel, Stage, kv_bytes, kv_segments
from planner.gpus import GPUS
from planner.models import load_model
from planner.parallel import PlanContext, balance_layers, configure_group
from planner.routing import LINK_UTILISATION, RoutingProblem, solve_routing
from planner.workload import SLO, Lengths, Workload

IDEAL = Efficiency(compute=1.0, memory=1.0, network=1.0, layer_overhead_s=0.0, step_overhead_s=0.0)


def one_stage(model: str, gpu: str, tp: int = 1, eff: Efficiency = IDEAL) -> ReplicaModel:
    m = load_model(model)
    return ReplicaModel(m, [Stage("n0", GPUS[gpu], tp, m.layers, True, True)], [], eff)


def test_decode_is_memory_bound_and_prefill_compute_bound() -> None:
    rm = one_stage("llama-2-7b", "A100-80GB")
    m, g = rm.model, GPUS["A100-80GB"]
    step = rm.decode_step_time(1, 100)
    assert step == pytest.approx((m.weight_bytes + 100 * m.kv_bytes_per_token) / g.mem_bytes_per_s, rel=0.02)
    t = rm.prefill_time(8192, 8192.0**2 / 4, 4)
    flops = 2 * m.layer_params * m.layers * 8192
    assert flops / g.flops < t < 1.3 * flops / g.flops  # compute-bound, attention adds a little
    tp2 = one_stage("llama-2-7b", "A100-80GB", tp=2).decode_step_time(1, 100)
    assert 0.5 * step < tp2 < 0.65 * step  # TP halves the reads, all-reduce latency adds a little


def test_kv_transfer_bytes_and_compression() -> None:
    m = load_model("llama-30b")
    full = kv_bytes(m, 1000, m.layers, "none")
    assert full == pytest.approx(1.6e9, rel=0.01)
    assert full * 8 / 5e9 == pytest.approx(2.56, rel=0.01)  # 1,000 tokens over 5 Gbps (notes 4.4)
    assert kv_bytes(m, 1000, m.layers, "int4") / full == pytest.approx(KV_FACTOR["int4"])
    assert KV_FACTOR["int4"] < KV_FACTOR["int8"] < 1


def test_kv_segments_follow_unequal_pipeline_splits() -> None:
    m = load_model("llama-2-13b")
    p = ReplicaModel(m, [Stage("a", GPUS["L4"], 1, 20, True, False), Stage("b", GPUS["L4"], 1, 20, False, True)],
                     [(1e9, 1e-5)])
    d = ReplicaModel(m, [Stage("c", GPUS["A100"], 1, 30, True, False), Stage("d", GPUS["A100"], 1, 10, False, True)],
                     [(1e9, 1e-5)])
    assert sorted(kv_segments(p, d)) == [("a", "c", 20), ("b", "c", 10), ("b", "d", 10)]


def test_memory_feasibility() -> None:
    assert one_stage("llama-2-70b", "A100-80GB").kv_tokens == 0  # 140 GB of weights on one 80 GB GPU
    assert one_stage("llama-2-70b", "A100-80GB", tp=2).kv_tokens > 20_000  # ~12 GiB left for KV
    assert one_stage("llama-2-7b", "L4").kv_tokens > 5_000


def test_balance_layers_gives_faster_stages_more_layers() -> None:
    split = balance_layers(80, [1.0, 2.0, 2.0], [0.0, 0.0, 0.0], [80, 80, 80])
    assert split == [40, 20, 20]
    split = balance_layers(80, [1.0, 2.0], [0.0, 0.0], [30, 80])
    assert split == [30, 50]  # memory cap binds on the fast stage
    assert balance_layers(80, [1.0, 1.0], [0.0, 0.0], [30, 30]) is None


def test_configure_group_balances_a_mixed_pipeline() -> None:
    nodes = [Node("a", "A100-80GB", 1), Node("b", "L4", 1), Node("c", "L4", 1)]
    ctx = PlanContext(load_model("llama-2-13b"), Workload(1.0, Lengths.fixed(512), Lengths.fixed(128)),
                      SLO(5.0, 0.3), Cluster(nodes, inter_node_gbps=25))
    cfg = configure_group(ctx, [("a", 0), ("b", 0), ("c", 0)], "decode")
    assert cfg is not None and cfg.pp == 3 and cfg.tp == 1
    assert sum(cfg.layer_split) == 40
    assert cfg.layer_split[0] > cfg.layer_split[1]  # the A100 stage takes more layers than an L4
    assert configure_group(ctx, [("b", 0)], "decode") is None  # 26 GB of weights on a 24 GB L4


def test_routing_lp_respects_every_capacity() -> None:
    prob = RoutingProblem(prefill=["p0", "p1"], decode=["d0", "d1"], colocated=["c"],
                          pair_cap={("p0", "d0"): 4.0, ("p0", "d1"): 2.0, ("p1", "d0"): 3.0, ("p1", "d1"): 3.0},
                          decode_cap={"d0": 2.0, "d1": 10.0}, colocated_cap={"c": 1.5},
                          link_use={("nic", "x"): {("p0", "d1"): 0.5, ("p1", "d1"): 0.5}})
    sol = solve_routing(prob)
    f = sol.pairs
    assert f.get(("c", "c"), 0) == pytest.approx(1.5)
    assert f.get(("p0", "d0"), 0) + f.get(("p1", "d0"), 0) <= 2.0 + 1e-6
    assert (f.get(("p0", "d1"), 0) + f.get(("p1", "d1"), 0)) * 0.5 <= LINK_UTILISATION + 1e-6
    for p in ("p0", "p1"):
        assert sum(v / prob.pair_cap[(p, d)] for (pp, d), v in f.items() if pp == p) <= 1 + 1e-6
    assert sol.total == pytest.approx(1.5 + 2.0 + 2 * LINK_UTILISATION, rel=1e-6)  # decode d0 + link bound
    assert sum(sol.weights().values()) == pytest.approx(1.0)
    assert solve_routing(RoutingProblem(prefill=["p"], decode=[])).total == 0.0


def test_routing_lp_keeps_links_under_the_cap_it_is_given_and_says_when_they_bind() -> None:
    prob = RoutingProblem(prefill=["p"], decode=["d"], pair_cap={("p", "d"): 10.0}, decode_cap={"d": 10.0},
                          link_use={("nic", "p"): {("p", "d"): 0.2}})
    low = solve_routing(prob)
    assert low.total == pytest.approx(LINK_UTILISATION / 0.2) and low.links_bind
    assert low.link_caps == {("nic", "p"): LINK_UTILISATION}
    prob.link_cap = 0.9
    high = solve_routing(prob)
    assert high.total == pytest.approx(0.9 / 0.2) and high.links_bind
    prob.link_caps = {("nic", "p"): 0.3}  # a link's own cap overrides the problem's
    own = solve_routing(prob)
    assert own.total == pytest.approx(0.3 / 0.2) and own.links_bind and own.link_caps == {("nic", "p"): 0.3}
    prob.link_caps = {}
    prob.link_use = {("nic", "p"): {("p", "d"): 0.01}}  # the prefill binds, not the link
    free = solve_routing(prob)
    assert free.total == pytest.approx(10.0) and not free.links_bind


def test_balanced_routing_spreads_the_same_rate_over_each_phase() -> None:
    """One prefill replica (10 req/s) feeds two decodes of 20 and 10 req/s beside a colocated one: the
    LP's optimum may send all of it to one decode; the balanced routing keeps the rate and loads both
    decodes to the same share, within every cap (links included)."""
    from planner.routing import BALANCE_KEEP, balance_routing

    prob = RoutingProblem(prefill=["p"], decode=["d0", "d1"], colocated=["c"],
                          pair_cap={("p", "d0"): 10.0, ("p", "d1"): 10.0}, decode_cap={"d0": 20.0, "d1": 10.0},
                          colocated_cap={"c": 4.0}, link_use={("nic", "p"): {("p", "d0"): 0.05, ("p", "d1"): 0.05}})
    sol = solve_routing(prob)
    even = balance_routing(prob, sol)
    assert sol.total == pytest.approx(14.0) and even.total >= BALANCE_KEEP * sol.total - 1e-9
    f = even.pairs
    assert f[("p", "d0")] / 20.0 == pytest.approx(f[("p", "d1")] / 10.0, rel=1e-3)  # same share of each decode
    assert f[("c", "c")] <= 4.0 + 1e-9 and f[("p", "d0")] + f[("p", "d1")] <= 10.0 + 1e-9
    assert (f[("p", "d0")] + f[("p", "d1")]) * 0.05 <= LINK_UTILISATION + 1e-9
    assert sum(even.weights().values()) == pytest.approx(1.0)
    assert balance_routing(prob, solve_routing(RoutingProblem(prefill=["p"], decode=[]))).total == 0.0


def test_planned_routing_is_balanced_and_verifies() -> None:
    """Our plans carry the balanced routing (the baselines their LP optimum); both pass the independent
    check, and ours leaves no decode replica much busier than another where the LP would."""
    from planner.scheduler import plan_deployment
    from planner.verify import routing_violations

    wl = Workload(0.0, Lengths(1024, "lognormal", 0.5, lo=64, hi=4096), Lengths(128, "lognormal", 0.8, lo=1, hi=1024))
    # three L40S prefill for two H100 decodes: the LP's optimum loads them 100% and 70%
    plan = plan_deployment("llama-2-7b", wl, SLO(2.0, 0.05), pool="2*1xH100,3*1xL40S", inter_node_gbps=25,
                           disaggregate=True, time_limit_s=0, verify=False)
    assert routing_violations(plan) == []
    from planner.deployment import materialize
    from planner.parallel import config_from_spec

    ctx = materialize(plan).ctx
    shares = []
    for r in plan.replicas_with_role("decode"):
        load = sum(x.weight for x in plan.routing if x.decode == r.id) * plan.expected["goodput_rps"]
        shares.append(load / config_from_spec(ctx, list(r.gpus), r.tp, list(r.layer_split), "decode").capacity)
    assert len(shares) >= 2 and max(shares) - min(shares) < 0.05, shares


def _link_bound_pair(ttft: float):
    """One GH200 prefilling 2k-token prompts of Llama-2-13B for one GH200 decoding, uncompressed KV
    over 40 Gbps: the link is the bottleneck."""
    from planner.evaluate import Evaluator

    nodes = [Node("a", "GH200", 1), Node("b", "GH200", 1)]
    ctx = PlanContext(load_model("llama-2-13b"), Workload(1.0, Lengths(2048, "lognormal", 0.7, lo=64, hi=8192),
                                                          Lengths(128, "lognormal", 0.8, lo=2, hi=1024)),
                      SLO(ttft, 0.1), Cluster(nodes, inter_node_gbps=40))
    ev = Evaluator(ctx, kv_compression="none")
    return ev.evaluate([(("a", 0),), (("b", 0),)], ["prefill", "decode"], {"a": 1.0, "b": 1.0})


def test_a_generous_ttft_buys_link_throughput_and_a_tight_one_keeps_the_link_idler(monkeypatch) -> None:
    """A link-bound split's link is capped where what it carries meets what the prefill takes within its
    TTFT budget, which reserves the link's wait at that cap: a generous TTFT loads the link past
    LINK_UTILISATION, a tight one keeps it well under, and either routes more than the link held at
    LINK_UTILISATION (a tight TTFT there leaves the prefill almost nothing: the wait's tail eats it)."""
    import planner.evaluate

    def at_fixed_cap(ttft: float) -> float:
        with monkeypatch.context() as m:
            m.setattr(planner.evaluate, "LINK_CAPS", (LINK_UTILISATION,))
            return _link_bound_pair(ttft).goodput

    generous, tight = _link_bound_pair(4.0), _link_bound_pair(2.0)
    (high,), (low,) = generous.routing.link_caps.values(), tight.routing.link_caps.values()
    assert low < LINK_UTILISATION < high
    assert generous.goodput > 1.05 * at_fixed_cap(4.0) > 0
    assert tight.goodput > 1.5 * at_fixed_cap(2.0)


def test_two_waits_add_up_to_their_convolution() -> None:
    """``P(W1 + W2 > y)`` of a prefill queue's wait and a KV link's (each none, or exponential with
    some probability) against a million samples of the sum."""
    import numpy as np

    from planner.capacity import _two_wait_tail

    rng = np.random.default_rng(3)
    n = 1_000_000
    for a, m1, b, m2 in ((0.6, 0.3, 0.7, 1.2), (0.9, 0.5, 0.2, 0.5), (0.3, 2.0, 0.55, 0.1)):
        w = np.where(rng.random(n) < a, rng.exponential(m1, n), 0.0) + np.where(rng.random(n) < b,
                                                                                rng.exponential(m2, n), 0.0)
        ys = np.array([-0.1, 0.0, 0.2, 0.5, 1.0, 2.0, 4.0])
        empirical = np.array([(w > y).mean() for y in ys])
        assert _two_wait_tail(ys, a, m1, b, m2) == pytest.approx(empirical, abs=2e-3)


def test_a_mixed_step_costs_its_chunk_plus_the_decodes_minus_one_weight_read() -> None:
    """Chunked prefill mixed with decode (SGLang --enable-mixed-chunk, vLLM): the GEMMs of the decode rows
    and the chunk share one read of the weights; attention stays separate kernels, so the decodes'
    KV reads are not hidden under the chunk's compute."""
    rm = one_stage("llama-2-13b", "H100", eff=Efficiency())
    m, g = rm.model, GPUS["H100"]
    b, ctx = 32, 32 * 2100
    dec = rm.decode_step_time(b, ctx)
    assert rm.mixed_step_time(b, ctx, 0, 0.0, 0) == dec  # no chunk: a plain decode step
    for chunk in (256, 1024, 4096):
        mixed = rm.mixed_step_time(b, ctx, chunk, float(chunk) ** 2, 1)
        pre = rm.prefill_time(chunk, float(chunk) ** 2, 1)
        weights = m.weight_bytes / (g.mem_bytes_per_s * rm.eff.memory)
        assert max(pre, dec) < mixed < pre + dec  # one pass, longer than either part alone
        assert mixed > pre + dec - weights - 2e-3  # ... it saves at most one weight read (+ one step overhead)
    # a later chunk of a long prompt attends to the earlier ones: it costs more than the first chunk
    first = rm.mixed_step_time(b, ctx, 1024, 1024.0**2, 0)
    later = rm.mixed_step_time(b, ctx, 1024, 2 * 1024 * 6144 + 1024.0**2, 0, prefix_tokens=6144)
    assert later > first


def test_colocated_capacity_is_computed_once_per_replica_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rent step meets the same replica shape from many offers (1x, 2x, 8x instances, every region): the
    capacity search runs once per shape, and the memo returns exactly what a fresh computation would."""
    import planner.capacity as cap
    from planner.capacity import Targets, colocated_mixed_capacity

    wl = Workload(0.0, Lengths(512, "lognormal", 0.8, lo=8, hi=4096), Lengths(128, "lognormal", 0.8, lo=1, hi=1024))
    slo = SLO(2.0, 0.1)
    t = Targets.for_slo(slo)
    m = load_model("llama-2-7b")
    a = ReplicaModel(m, [Stage("n0", GPUS["L40S"], 1, m.layers, True, True)], [])
    b = ReplicaModel(m, [Stage("n7", GPUS["L40S"], 1, m.layers, True, True)], [])  # same shape, other node
    c = ReplicaModel(m, [Stage("n0", GPUS["A100-80GB"], 1, m.layers, True, True)], [])
    cap._MEMO.clear()
    calls: list[int] = []
    real = cap._colocated_mixed_capacity
    monkeypatch.setattr(cap, "_colocated_mixed_capacity", lambda *args: calls.append(1) or real(*args))
    first = colocated_mixed_capacity(a, wl, slo, t, 512)
    assert first > 0 and colocated_mixed_capacity(b, wl, slo, t, 512) == first and len(calls) == 1
    assert colocated_mixed_capacity(a, wl, slo, t, 256) != first and len(calls) == 2  # another chunk: computed
    assert colocated_mixed_capacity(c, wl, slo, t, 512) != first and len(calls) == 3  # another GPU: computed
    cap._MEMO.clear()
    assert real(a, wl, slo, t, 512) == first


def _best_colocated_by_full_search(rms, wl, slo, t):
    """What ``best_colocated`` chose before it screened: every prefill-first capacity, then the mixed
    chunks in the order of their bounds, each searched whole."""
    from planner.capacity import (
        MIXED_CHUNKS,
        PREFILL_FIRST,
        ColocatedPolicy,
        colocated_capacity,
        colocated_mixed_capacity,
        mixed_rate_bound,
    )

    best = None
    for i, rm in enumerate(rms):
        c = colocated_capacity(rm, wl, slo, t)
        if best is None or c > best[0] * 1.001:
            best = (c, i, PREFILL_FIRST)
    for bound, i, chunk in sorted(((mixed_rate_bound(rm, wl, c), i, c) for i, rm in enumerate(rms)
                                   for c in MIXED_CHUNKS), reverse=True):
        if bound <= best[0] * 1.001:
            break
        c = colocated_mixed_capacity(rms[i], wl, slo, t, chunk)
        if c > best[0] * 1.001:
            best = (c, i, ColocatedPolicy(True, chunk))
    return best


@pytest.mark.parametrize(("model", "gpu", "tpot"), [("llama-2-7b", "L40S", 0.1), ("llama-2-13b", "A100-80GB", 0.05),
                                                    ("llama-2-13b", "RTX4090", 0.2), ("llama-30b", "H100", 0.08)])
def test_best_colocated_screens_a_shape_that_cannot_win_with_one_point(model: str, gpu: str, tpot: float) -> None:
    """A shape or chunk policy whose SLO fails at the rate it must beat is skipped after that one point
    (the rent step's unit catalog was half colocated capacity searches that lost): the choice is the
    full search's, in fewer points."""
    import planner.capacity as cap
    from planner import work
    from planner.capacity import Targets, best_colocated

    m = load_model(model)
    wl = Workload(0.0, Lengths(1024, "lognormal", 0.8, lo=8, hi=8192), Lengths(256, "lognormal", 0.8, lo=1, hi=2048))
    slo = SLO(4.0, tpot)
    t = Targets.for_slo(slo)
    rms = [ReplicaModel(m, [Stage("n0", GPUS[gpu], tp, m.layers, True, True)], [], DEFAULT_EFF) for tp in (1, 2, 4)]
    rms = [rm for rm in rms if rm.kv_tokens > 0]

    def points(f) -> tuple[tuple, float]:
        cap._MEMO.clear()
        before = work.counts()
        out = f(rms, wl, slo, t)
        done = work.since(before)
        return out, done.get("colocated_point", 0.0) + done.get("mixed_point", 0.0)

    screened, fewer = points(best_colocated)
    full, all_points = points(_best_colocated_by_full_search)
    assert screened == full and screened[0] > 0
    assert fewer < all_points


def test_a_plan_balances_the_same_layers_once() -> None:
    """Layer splits are kept for the plan (clock epoch) that found them: a repeat costs no work, a new plan
    counts it again (its clock must not depend on earlier plans in the process), a single stage none."""
    from planner import work
    from planner.parallel import _balance

    def charged(f) -> float:
        before = work.counts()
        f()
        return work.since(before).get("layer_balance", 0.0)

    args = (80, [1.0, 2.0, 2.5], [0.1, 0.0, 0.0], [80, 40, 80])
    work.WorkClock()
    assert charged(lambda: balance_layers(*args)) == 1
    split = balance_layers(*args)
    assert split == _balance(*args) and sum(split) == 80
    split.append(7)  # the caller's copy, not the kept one
    assert charged(lambda: balance_layers(*args)) == 0 and balance_layers(*args) == _balance(*args)
    work.WorkClock()
    assert charged(lambda: balance_layers(*args)) == 1
    one = (80, [1.0], [0.0], [80])
    assert charged(lambda: balance_layers(*one)) == 0 and balance_layers(*one) == [80]
    assert balance_layers(80, [1.0], [0.0], [79]) is None


def test_finalist_race_weighs_price_against_goodput() -> None:
    from planner.scheduler import MARGINAL_VALUE, _rate_to_beat

    assert MARGINAL_VALUE == 0.5
    # most goodput (no demanded rate): 1% more at the same price
    assert _rate_to_beat("goodput", 100.0, 10.0, 10.0) == pytest.approx(101.0)
    assert _rate_to_beat("goodput", 100.0, 10.0, 9.95) == pytest.approx(101.0)  # 0.5% cheaper is noise
    # 11% cheaper: may give up 5.5% of the goodput (half the best plan's goodput per dollar saved)
    assert _rate_to_beat("goodput", 100.0, 10.0, 8.9) == pytest.approx(94.5)
    # 1.5% cheaper: at least within the simulation's noise (0.5%)
    assert _rate_to_beat("goodput", 100.0, 10.0, 9.85) == pytest.approx(99.25)
    # 11% dearer: must earn its extra $1.1/h at half of 10 req/s per $: 105.5
    assert _rate_to_beat("goodput", 100.0, 10.0, 11.1) == pytest.approx(105.5)
    # per dollar: 1% more goodput per dollar at the finalist's own cost
    assert _rate_to_beat("per_dollar", 100.0, 10.0, 5.0) == pytest.approx(50.5)


@settings(max_examples=300, deadline=None)
@given(st.floats(1.0, 1000.0), st.floats(0.5, 50.0), st.floats(1.0, 1000.0), st.floats(0.5, 50.0),
       st.sampled_from(["goodput", "per_dollar"]))
def test_finalists_are_ranked_by_the_race_s_own_rule(g_a: float, c_a: float, g_b: float, c_b: float,
                                                     objective: str) -> None:
    """The race can run out of time after its first finalist, and then the ranking decides: a finalist
    that would clearly beat another in the race (1% past the rate it needs) must rank above it. With
    the most goodput as the aim, ranking by goodput alone kept a $10/h split estimated 4% over six
    colocated GH200s at $8.94/h, which served 11% less per dollar."""
    from planner.evaluate import Evaluation
    from planner.scheduler import _rate_to_beat, _worth

    def ev(g: float, c: float) -> Evaluation:
        return Evaluation(g, c, g if objective == "goodput" else g / c, [], [], [], None)  # type: ignore[arg-type]

    if g_b >= 1.01 * _rate_to_beat(objective, g_a, c_a, c_b):
        assert _worth(objective, ev(g_b, c_b)) > _worth(objective, ev(g_a, c_a))
    # the case above: the cheaper colocated plan ranks first
    assert _worth("goodput", Evaluation(77.31, 8.94, 77.31, [], [], [], None)) > _worth(  # type: ignore[arg-type]
        "goodput", Evaluation(80.69, 10.0, 80.69, [], [], [], None))  # type: ignore[arg-type]


def pipeline(model: str, gpus: list[str], tp: int = 1, eff: Efficiency | None = None) -> ReplicaModel:
    """A pipeline over one stage per entry of ``gpus`` (layers split evenly, links of 10 GB/s)."""
    m = load_model(model)
    n = len(gpus)
    split = [m.layers // n] * n
    split[-1] += m.layers - sum(split)
    stages = [Stage(f"n{i}", GPUS[g], tp, split[i], i == 0, i == n - 1) for i, g in enumerate(gpus)]
    return ReplicaModel(m, stages, [(10e9, 2e-5)] * (n - 1), eff or DEFAULT_EFF)


def per_stage_reference(rm: ReplicaModel, tokens: float, sum_sq: float, n_req: int, batch: float,
                        context: float) -> tuple[list[float], float]:
    """Prefill stage times and a decode step computed stage by stage, without the grouping."""
    from planner.cost_model import roof

    p, head = rm.eff.roofline_p, 2 * rm.model.vocab * rm.model.hidden
    half = rm.eff.gemm_half_rows

    def slow(rows: float) -> float:  # a weight GEMM over m >= 2 rows runs at m / (m + half) of peak
        return 1.0 + half * min(max(rows - 1.0, 0.0), 1.0) / rows if rows > 0 else 1.0

    pre, dec = [], rm.eff.step_overhead_s
    for f_tok, f_sq, b_const, b_kv, f_den, b_den, fixed, comm, last in rm._coef:
        layers_f = f_tok - (head if last else 0.0)  # the layers' GEMMs see the tokens, the head the prompts
        flops = layers_f * tokens * slow(tokens) + (head * n_req * slow(n_req) if last else 0.0) + f_sq * sum_sq
        pre.append(roof(flops / f_den, (b_const + b_kv * tokens) / b_den, p) + fixed + comm * tokens)
        dflops = f_tok * batch * slow(batch) + 2 * f_sq * context
        dec += roof(dflops / f_den, (b_const + b_kv * context) / b_den, p) + fixed + comm * batch
    return pre, dec


@pytest.mark.parametrize("half_rows", [0.0, 8.0])
@pytest.mark.parametrize(("gpus", "groups"), [(["L40S"] * 8, [7, 1]),
                                              (["A100-80GB", "L40S", "L40S", "RTX4090"], [1, 2, 1]), (["H100"], [1])])
def test_batched_step_times_equal_the_scalar_ones(gpus: list[str], groups: list[int], half_rows: float) -> None:
    import numpy as np

    rm = pipeline("llama-2-70b", gpus, eff=replace(DEFAULT_EFF, gemm_half_rows=half_rows))
    # identical stages (same GPU, layers and outgoing link) are computed once and counted; the last
    # stage differs (LM head, no link)
    assert [n for _, n in rm._groups] == groups
    overhead = rm.eff.step_overhead_s
    for tokens in (1.0, 700.0, 8192.0):
        stages, step = per_stage_reference(rm, tokens, tokens**2, 2, 48.0, 48.0 * 1500)
        assert rm.prefill_stage_times(tokens, tokens**2, 2) == pytest.approx(stages)
        assert rm.prefill_time(tokens, tokens**2, 2) == pytest.approx(sum(stages) + overhead)
        assert rm.prefill_bottleneck(tokens, tokens**2, 2) == pytest.approx(max(stages) + overhead)
        assert rm.decode_step_time(48.0, 48.0 * 1500) == pytest.approx(step)
    b = np.array([0.0, 1.0, 7.5, 64.0, 300.0])
    ctx = b * 1500
    scalar = [rm.decode_step_time(x, c) for x, c in zip(b, ctx, strict=True)]
    assert rm.decode_step_array(b, ctx) == pytest.approx(scalar)
    chunk = np.maximum(512 - b, 1.0)
    mixed = rm.mixed_step_array(b, ctx, chunk, chunk * 900, np.ones_like(b), chunk / 3)
    assert mixed == pytest.approx([rm.mixed_step_time(x, c, k, k * 900, 1, k / 3)
                                   for x, c, k in zip(b, ctx, chunk, strict=True)])
    lat, neck = rm.prefill_array(np.array([100.0, 4096.0]), np.array([1e4, 4096.0**2]), np.array([1.0, 1.0]))
    assert lat == pytest.approx([rm.prefill_time(100.0, 1e4, 1), rm.prefill_time(4096.0, 4096.0**2, 1)])
    assert neck == pytest.approx([rm.prefill_bottleneck(100.0, 1e4, 1), rm.prefill_bottleneck(4096.0, 4096.0**2, 1)])


def test_few_row_gemms_run_below_peak_when_a_ramp_is_set() -> None:
    """``gemm_half_rows``: a weight GEMM over m rows runs at m / (m + half) of peak. On a compute-bound
    device (one CPU core) a 4-row decode step's GEMMs take 3x as long with half = 8; a 4096-token prefill
    barely changes; with no ramp (the GPU default) nothing changes at all."""
    from planner.gpus import GpuSpec

    cpu = GpuSpec("cpu-core", 0.09, 64.0, 1e4, 1e3, "-", "test")  # 90 GFLOP/s, near-free memory
    flat = Efficiency(compute=1.0, memory=1.0, layer_overhead_s=0.0, step_overhead_s=0.0, roofline_p=math.inf)
    m = load_model("smollm2-135m")

    def model(eff: Efficiency) -> ReplicaModel:
        return ReplicaModel(m, [Stage("n", cpu, 1, m.layers, True, True)], [], eff)

    base, ramp = model(flat), model(replace(flat, gemm_half_rows=8.0))
    assert ramp.decode_step_time(4, 4) == pytest.approx(3 * base.decode_step_time(4, 4), rel=0.01)
    assert ramp.prefill_time(4096) == pytest.approx(base.prefill_time(4096), rel=0.003)
    assert ramp.prefill_time(4096) > base.prefill_time(4096)
    assert model(replace(flat, gemm_half_rows=0.0)).decode_step_time(4, 4) == base.decode_step_time(4, 4)
    # one row is a GEMV (no ramp), the ramp phases in up to two rows, and a step never gets faster with
    # more rows (continuous too: the capacity search interpolates and bisects on these times)
    assert ramp.decode_step_time(1, 1) == base.decode_step_time(1, 1)
    assert ramp.decode_step_time(1.0001, 1) == pytest.approx(base.decode_step_time(1, 1), rel=1e-3)
    steps = [ramp.decode_step_time(b, b) for b in (0.25, 0.5, 1.0, 1.001, 1.5, 2.0, 3.0, 8.0, 64.0)]
    assert steps == sorted(steps)
    for n_req in (1, 4):  # prefill: the head's rows are the prompts, not the tokens
        times = [ramp.prefill_time(t, t * t / n_req, n_req) for t in (n_req, n_req + 0.3, n_req + 1.0, 64.0, 512.0)]
        assert times == sorted(times)


def test_attention_knobs_scale_only_attention() -> None:
    """``attention_compute`` slows prefill attention FLOPs, ``attention_memory`` the KV a decode step
    reads; neither touches the weight GEMMs (a 1-token prefill, a decode step over no context)."""
    m = load_model("llama-2-7b")
    gpu = GPUS["A100-80GB"]
    flat = Efficiency(layer_overhead_s=0.0, step_overhead_s=0.0, roofline_p=math.inf)

    def model(eff: Efficiency) -> ReplicaModel:
        return ReplicaModel(m, [Stage("n", gpu, 1, m.layers, True, True)], [], eff)

    base = model(flat)
    slow_attn, slow_kv = model(replace(flat, attention_compute=0.5)), model(replace(flat, attention_memory=0.5))
    # 8k-token prompt: compute-bound; attention's share doubles
    gemm_only = model(replace(flat, attention_compute=1e9)).prefill_time(8192)
    assert slow_attn.prefill_time(8192) - gemm_only == pytest.approx(2 * (base.prefill_time(8192) - gemm_only),
                                                                     rel=1e-6)
    assert slow_attn.prefill_time(1) == pytest.approx(base.prefill_time(1), rel=1e-6)
    # decode at batch 8 over 4k tokens each: memory-bound; the KV share of the bytes doubles
    weights_only = base.decode_step_time(8, 0)
    assert slow_kv.decode_step_time(8, 8 * 4096) - weights_only == pytest.approx(
        2 * (base.decode_step_time(8, 8 * 4096) - weights_only), rel=1e-6)
    assert slow_kv.decode_step_time(8, 0) == weights_only


def test_tabulated_batch_fixed_point_matches_the_exact_one() -> None:
    """The capacity search reads the running batch off a step-time table: it must agree with solving
    Little's law exactly (bisection on the real step time, in the batch a request sees: ``_seen``)."""
    from planner.bisection import narrow
    from planner.capacity import StepTable, _decode_batch, _kv_batch, _mean_context, _seen

    wl = Workload(0.0, Lengths(1024, "lognormal", 0.8, lo=16, hi=8192), Lengths(256, "lognormal", 0.8, lo=4, hi=2048))
    rm = pipeline("llama-2-13b", ["A100-80GB"])
    ctx = _mean_context(wl)
    table = StepTable.build(rm, wl)
    for rate in (0.5, 2.0, 6.0):
        def excess(b: float, rate: float = rate) -> float:
            return rate * wl.mean_output * rm.decode_step_time(_seen(b), _seen(b) * ctx) - b

        b_mem = _kv_batch(rm, wl)
        exact = narrow(lambda b: excess(b) > 0, 0.0, b_mem, 50)[1] if excess(b_mem) <= 0 else None
        got = _decode_batch(rm, wl, rate, table=table)
        if exact is None:
            assert got is None
        else:
            assert got == pytest.approx(exact, rel=0.02)


def test_tabulated_mixed_fixed_point_matches_the_exact_one() -> None:
    """The same for a colocated replica with mixed chunks, including low rates where the batch
    settles inside the table's first cell (an empty batch has no decode step: not a line)."""
    import math

    from planner.bisection import narrow
    from planner.capacity import StepTable, _kv_batch, _mixed_batch, _mixed_tpot

    wl = Workload(0.0, Lengths(1024, "lognormal", 0.8, lo=16, hi=8192), Lengths(256, "lognormal", 0.8, lo=4, hi=2048))
    checked = 0
    for gpus in (["A100-80GB"], ["L40S"] * 4):
        rm = pipeline("llama-2-13b", gpus)
        table = StepTable.build(rm, wl, 512)
        b_mem = _kv_batch(rm, wl)
        for rate in (0.02, 0.3, 2.0, 1e3):
            def excess(b: float, rate: float = rate, rm: ReplicaModel = rm) -> float:
                tp, _ = _mixed_tpot(rm, wl, rate, b, 512)
                return rate * wl.mean_output * tp - b if math.isfinite(tp) else math.inf

            # the smallest root: a fine scan with the exact function, then bisection
            grid = [b_mem * i / 4000 for i in range(4001)]
            first = next((i for i, b in enumerate(grid) if i and excess(b) <= 0), None)
            got = _mixed_batch(rm, wl, rate, 512, table)
            if first is None:
                assert got is None
                continue
            exact = narrow(lambda x: excess(x) > 0, grid[first - 1], grid[first], 40)[1]
            assert got == pytest.approx(exact, rel=0.03, abs=0.01)
            checked += 1
    assert checked >= 4


def test_vectorised_prefill_curve_equals_the_per_rate_queue_model() -> None:
    """The prefill curve is computed for all rates at once: it must agree exactly with the queue model
    written out one rate at a time (the batch fixed point of ``_prefill_queue``; a long prompt's pass in
    an average batch, or the mean pass plus the M/G/1 wait quantile, whichever is longer)."""
    import numpy as np

    from planner.capacity import Targets, _prefill_queue, _prefill_ttft_array, _wait_quantile, prefill_max_rate

    def per_rate(rm, wl: Workload, rate: float, t: Targets) -> float:
        mean_in, scv = wl.mean_input, wl.input.scv
        k, s, rho = _prefill_queue(rm, wl, rate, t)
        batch = max(1, round(k))
        lat = rm.prefill_time(k * mean_in, k * mean_in**2 * (1 + scv), batch)
        long_in = wl.input.quantile(t.q_ttft)
        own = rm.prefill_time((k - 1) * mean_in + long_in, (k - 1) * mean_in**2 + long_in**2, batch)
        return max(own, lat + _wait_quantile(rho, s, wl.arrival_scv + scv, t.q_ttft))

    wl = Workload(0.0, Lengths(2048, "lognormal", 0.7, lo=64, hi=8192), Lengths(128, "lognormal", 0.8, lo=2, hi=1024))
    t = Targets.for_slo(SLO(2.0, 0.05, 0.9))
    for gpus in (["H100"], ["L40S"] * 4):
        rm = pipeline("llama-2-13b", gpus)
        rates = np.linspace(0.0, prefill_max_rate(rm, wl, t), 17)[1:] * 0.999
        want = [per_rate(rm, wl, float(r), t) for r in rates]
        assert list(_prefill_ttft_array(rm, wl, rates, t)) == pytest.approx(want, rel=1e-9)


def test_cpu_cost_model_check_runs_against_the_engine() -> None:
    """``bench/cost_model_check.py`` end to end at its smallest (one model, one prompt, one decode batch,
    one round): it times the engine's own prefill and decode and predicts both from its calibration.
    Behaviour only; its accuracy is the bench's to report, not a test's (timing on a shared machine)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "bench" / "cost_model_check.py"), "--models",
                          "llama-small-random", "--prompts", "32", "--batches", "2", "--rounds", "1"],
                         capture_output=True, text=True, timeout=300, check=True, cwd=root)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["points"] == 2
    assert set(summary["errors"]) == {"llama-small-random: prefill 32 tokens",
                                      "llama-small-random: decode batch 2 @ 128 ctx"}
    assert all(math.isfinite(e) and e > -1.0 for e in summary["errors"].values())
    cal = summary["calibration"]["llama-small-random"]
    rates = ("matmul_gflops", "gemm_8_rows_gflops", "attention_gflops", "decode_attention_gbs", "stream_gbs")
    assert all(math.isfinite(cal[k]) and cal[k] > 0 for k in rates)
    assert cal["roofline_p"] in (1.0, 1.5, 2.0, 3.0, "max")


@pytest.mark.parametrize("attainment", [0.9, 0.95, 0.99])
def test_the_slo_s_miss_budget_is_split_evenly_or_leans_to_one_phase(attainment: float) -> None:
    """Requests missing either target are about the larger miss share plus OVERLAP of the smaller: every
    split keeps that at the SLO's miss budget, the even one is the calibrated 0.6 each, leaning to TTFT
    lets more prompts miss TTFT and fewer requests miss TPOT, and leaning to TPOT is its mirror."""
    from planner.capacity import EVEN_SHARE, LEANS, OVERLAP, Targets

    slo = SLO(2.0, 0.05, attainment)
    miss = 1 - attainment
    split = {lean: Targets.for_slo(slo, lean=lean) for lean in LEANS}
    assert split["even"].q_ttft == split["even"].q_tpot == pytest.approx(1 - EVEN_SHARE * miss)
    assert split["ttft"].q_ttft < split["even"].q_ttft < split["ttft"].q_tpot
    for t in split.values():
        a, b = (1 - t.q_ttft) / miss, (1 - t.q_tpot) / miss
        assert max(a, b) + OVERLAP * min(a, b) == pytest.approx(1.0)
        assert t.z == pytest.approx(NormalDist().inv_cdf(t.q_tpot))
    with pytest.raises(ValueError, match="lean"):
        Targets.for_slo(slo, lean="decode")
