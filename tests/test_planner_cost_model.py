"""Roofline cost model, layer balancing, capacity estimates and the routing LP."""

from __future__ import annotations

import pytest

from planner.cluster import Cluster, Node
from planner.cost_model import KV_FACTOR, Efficiency, ReplicaModel, Stage, kv_bytes, kv_segments
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


def test_finalist_race_prefers_a_cheaper_plan_at_the_same_goodput() -> None:
    from planner.scheduler import _rate_to_beat

    # most goodput (no demanded rate): 1% more, or the same within 0.5% when at least 1% cheaper
    assert _rate_to_beat("goodput", 100.0, 10.0, 10.0) == pytest.approx(101.0)
    assert _rate_to_beat("goodput", 100.0, 10.0, 8.9) == pytest.approx(99.5)
    assert _rate_to_beat("goodput", 100.0, 10.0, 9.95) == pytest.approx(101.0)  # 0.5% cheaper is noise
    # per dollar: 1% more goodput per dollar at the finalist's own cost
    assert _rate_to_beat("per_dollar", 100.0, 10.0, 5.0) == pytest.approx(50.5)
