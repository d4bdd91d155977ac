"""Parallel configuration of one GPU group: TP degree, pipeline stages, and a layer split balanced to
unequal GPUs, chosen for the group's phase.

TP stays inside a node (every node's share of the group is a multiple of ``tp``); stages run across
nodes (and, for nodes with more GPUs than ``tp``, inside them). Layers go to stages so that the slowest
stage is as fast as possible under each stage's memory cap: the smallest bottleneck time ``T`` with
``sum_s min(cap_s, (T - fixed_s) / cost_s) >= layers`` is found by bisection (exact for this min-max
split, the same answer as HexGen's dynamic program), then the split is trimmed to the layer count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from planner.bisection import narrow
from planner.capacity import (
    MIXED_CHUNKS,
    PREFILL_FIRST,
    ColocatedPolicy,
    Targets,
    best_colocated,
    colocated_capacity,
    colocated_mixed_capacity,
    decode_capacity,
    may_serve_colocated,
    memoised,
    prefill_curve,
    rate_for_slack,
)
from planner.cluster import Cluster, GpuId
from planner.cost_model import DEFAULT_EFF, Efficiency, ReplicaModel, Stage
from planner.models import ModelSpec
from planner.work import charge
from planner.workload import SLO, Workload

TP_CHOICES = (1, 2, 4, 8)


@dataclass
class ReplicaConfig:
    """A GPU group made into a replica for one role, with its capacity at the SLO."""

    gpus: tuple[GpuId, ...]  # stage by stage, tp GPUs per stage
    tp: int
    pp: int
    layer_split: tuple[int, ...]
    role: str
    rm: ReplicaModel
    capacity: float  # req/s at the SLO (prefill: with the whole TTFT as slack)
    curve: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # prefill: rate -> TTFT
    policy: ColocatedPolicy = PREFILL_FIRST  # colocated: how prefill is scheduled against decode

    @property
    def nodes(self) -> list[str]:
        return sorted({n for n, _ in self.gpus})

    def prefill_capacity(self, slack: float) -> float:
        if self.curve is None:
            return 0.0
        return rate_for_slack(self.curve[0], self.curve[1], slack)


@dataclass
class PlanContext:
    """Everything a replica's configuration depends on besides its GPUs."""

    model: ModelSpec
    workload: Workload
    slo: SLO
    cluster: Cluster
    eff: Efficiency = DEFAULT_EFF
    targets: Targets | None = None
    # whether the engine can mix prompt chunks into a colocated replica's decode steps (chunked prefill,
    # SGLang ``--enable-mixed-chunk``); False: prefill-first scheduling only
    mixed_chunk: bool = True

    def __post_init__(self) -> None:
        if self.targets is None:
            self.targets = Targets.for_slo(self.slo)

    @property
    def mixed_chunks(self) -> tuple[int, ...]:
        """The chunk sizes a colocated replica's policy is chosen among (none without mixed chunks)."""
        return MIXED_CHUNKS if self.mixed_chunk else ()

    def reserve_tokens(self, role: str) -> float:
        """KV tokens a replica of this role must be able to hold to be worth running."""
        wl = self.workload
        longest = wl.input.p_max + wl.output.p_max
        if role == "prefill":
            return max(wl.input.p_max, min(self.targets.max_batch_tokens, 4 * wl.mean_input))
        return max(longest, 8 * (wl.mean_input + wl.mean_output))


def _stage_costs(ctx: PlanContext, gpu_spec, tp: int, role: str) -> tuple[float, float]:
    """(seconds per layer, memory bytes per layer per GPU incl. the KV reserve) for balancing."""
    m, e, wl = ctx.model, ctx.eff, ctx.workload
    if role == "prefill":
        tokens = max(wl.mean_input, 256.0)
        flops = 2 * m.layer_params * tokens + 2 * tokens * tokens * m.heads * m.hd
        nbytes = m.layer_bytes
        comm_tokens = tokens
    else:
        b = 16.0
        ctx_tokens = b * (wl.mean_input + wl.mean_output / 2)
        flops = 2 * m.layer_params * b + 4 * ctx_tokens * m.heads * m.hd
        nbytes = m.layer_bytes + ctx_tokens * m.kv_bytes_per_token_layer
        comm_tokens = b
    roof = max(flops / (tp * gpu_spec.sustained_flops * e.compute),
               nbytes / (tp * gpu_spec.sustained_mem_bytes_per_s * e.memory))
    comm = 0.0
    if tp > 1:
        ring = 2 * (tp - 1) / tp * comm_tokens * m.hidden * m.dtype_bytes
        comm = 2 * ring / (gpu_spec.link_bytes_per_s * e.network)
    per_layer_time = roof + e.layer_overhead_s + comm
    per_layer_mem = m.layer_bytes / tp + ctx.reserve_tokens(role) * m.kv_bytes_per_token_layer / min(tp, m.kv_heads)
    return per_layer_time, per_layer_mem


def balance_layers(layers: int, costs: list[float], fixed: list[float], caps: list[int]) -> list[int] | None:
    """Layers per stage minimising the slowest stage ``fixed_s + n_s * cost_s`` with ``1 <= n_s <= cap_s``.
    Memoised as the capacities are (``capacity.memoised``: a plan counts a split's work once): the rent
    step's unit catalog and the search ask for the same stages again and again, ~60% of the calls."""
    if sum(caps) < layers or any(c < 1 for c in caps) or len(caps) > layers:
        return None
    if len(caps) == 1:
        return [layers]
    found = memoised(("balance", layers, tuple(costs), tuple(fixed), tuple(caps)),
                     lambda: _balance(layers, costs, fixed, caps))
    return None if found is None else list(found)


def _balance(layers: int, costs: list[float], fixed: list[float], caps: list[int]) -> list[int] | None:
    charge("layer_balance")

    def take(t: float) -> list[int]:
        return [max(1, min(cap, math.floor((t - f) / c + 1e-9))) for c, f, cap in zip(costs, fixed, caps, strict=True)]

    lo, hi = 0.0, max(f + cap * c for c, f, cap in zip(costs, fixed, caps, strict=True))
    _, hi = narrow(lambda t: sum(take(t)) < layers, lo, hi, 60)
    split = take(hi)
    while sum(split) > layers:  # trim from the slowest stage that can give one up
        order = sorted(range(len(split)), key=lambda i: -(fixed[i] + split[i] * costs[i]))
        for i in order:
            if split[i] > 1:
                split[i] -= 1
                break
        else:
            return None
    return split


def _group_nodes(cluster: Cluster, gpus: list[GpuId]) -> list[tuple[str, list[GpuId]]]:
    by_node: dict[str, list[GpuId]] = {}
    for g in sorted(gpus):
        by_node.setdefault(g[0], []).append(g)
    # Faster GPUs first: the first stage holds the embedding, the last the LM head; order is stable.
    return sorted(by_node.items(), key=lambda kv: (-cluster.node(kv[0]).gpu.sustained_flops, kv[0]))


def build_replica_model(ctx: PlanContext, gpus: list[GpuId], tp: int, split: list[int]) -> ReplicaModel:
    """The ReplicaModel of GPUs listed stage by stage (tp per stage) with a given layer split."""
    cl = ctx.cluster
    stages = []
    pp = len(gpus) // tp
    for s in range(pp):
        node = gpus[s * tp][0]
        stages.append(Stage(node, cl.node(node).gpu, tp, split[s], s == 0, s == pp - 1))
    links = [(cl.bandwidth(stages[s].node, stages[s + 1].node), cl.latency(stages[s].node, stages[s + 1].node))
             for s in range(pp - 1)]
    return ReplicaModel(ctx.model, stages, links, ctx.eff)


def role_capacity(ctx: PlanContext, rm: ReplicaModel, role: str, policy: ColocatedPolicy | None = None
                  ) -> tuple[float, tuple[np.ndarray, np.ndarray] | None, ColocatedPolicy]:
    """(req/s at the SLO, prefill's rate -> TTFT table, colocated policy). A colocated replica gets
    ``policy``, or when None the best one for the workload (its engine setting is part of the plan)."""
    t = ctx.targets
    assert t is not None
    if role == "prefill":
        curve = prefill_curve(rm, ctx.workload, t)
        return rate_for_slack(curve[0], curve[1], ctx.slo.ttft_s), curve, PREFILL_FIRST
    if role == "decode":
        return decode_capacity(rm, ctx.workload, ctx.slo, t), None, PREFILL_FIRST
    if policy is None:
        cap, _, policy = best_colocated([rm], ctx.workload, ctx.slo, t, ctx.mixed_chunks)
        return cap, None, policy
    if policy.mixed:
        return colocated_mixed_capacity(rm, ctx.workload, ctx.slo, t, policy.chunk), None, policy
    return colocated_capacity(rm, ctx.workload, ctx.slo, t), None, policy


def configure_group(ctx: PlanContext, gpus: list[GpuId], role: str) -> ReplicaConfig | None:
    """The best (TP, stages, layer split) for this group and role, or None if the model does not fit."""
    options = replica_shapes(ctx, gpus, role)
    if role == "both":  # the policies are searched over every TP at once
        return _best_colocated_config(ctx, options) if options else None
    best: ReplicaConfig | None = None
    for tp, ordered, split, rm in options:
        cap, curve, policy = role_capacity(ctx, rm, role)
        if best is None or cap > best.capacity * 1.001:
            best = ReplicaConfig(tuple(ordered), tp, len(ordered) // tp, tuple(split), role, rm, cap, curve, policy)
    return best


def colocated_may_serve(ctx: PlanContext, gpus: list[GpuId], rate: float) -> bool:
    """Whether a colocated replica on this group may serve more than ``rate`` x 1.001 (the margin a
    capacity must beat to win) under some TP and policy: a point or two per shape instead of
    ``configure_group``'s capacity searches, for a group that must beat a known rate to matter."""
    assert ctx.targets is not None
    rms = [rm for *_, rm in replica_shapes(ctx, gpus, "both")]
    return may_serve_colocated(rms, ctx.workload, ctx.slo, ctx.targets, rate, ctx.mixed_chunks)


def replica_shapes(ctx: PlanContext, gpus: list[GpuId], role: str
                   ) -> list[tuple[int, list[GpuId], list[int], ReplicaModel]]:
    """(TP, GPUs stage by stage, layer split, replica model) for each TP the group can hold the model
    at, with the KV room its role reserves."""
    nodes = _group_nodes(ctx.cluster, gpus)
    m = ctx.model
    out: list[tuple[int, list[GpuId], list[int], ReplicaModel]] = []
    for tp in TP_CHOICES:
        if any(len(g) % tp for _, g in nodes) or m.heads % tp:
            continue
        ordered: list[GpuId] = []
        costs, fixed, caps = [], [], []
        for node_id, node_gpus in nodes:
            spec = ctx.cluster.node(node_id).gpu
            per_time, per_mem = _stage_costs(ctx, spec, tp, role)
            usable = spec.memory_bytes * ctx.eff.mem_fraction
            extra = (m.embed_params + m.head_params) * m.dtype_bytes / tp  # first/last stage extras, conservatively
            for j in range(len(node_gpus) // tp):
                ordered.extend(node_gpus[j * tp : (j + 1) * tp])
                costs.append(per_time)
                fixed.append(0.0)
                caps.append(int(max(0.0, (usable - extra) // per_mem)))
        split = balance_layers(m.layers, costs, fixed, caps)
        if split is None:
            continue
        rm = build_replica_model(ctx, ordered, tp, split)
        if rm.kv_tokens >= ctx.reserve_tokens(role):
            out.append((tp, ordered, split, rm))
    return out


def _best_colocated_config(ctx: PlanContext, options: list[tuple[int, list[GpuId], list[int], ReplicaModel]]
                           ) -> ReplicaConfig:
    """The best (TP, scheduling policy) of a colocated group, over every TP choice at once."""
    assert ctx.targets is not None
    cap, i, policy = best_colocated([rm for *_, rm in options], ctx.workload, ctx.slo, ctx.targets,
                                    ctx.mixed_chunks)
    tp, ordered, split, rm = options[i]
    return ReplicaConfig(tuple(ordered), tp, len(ordered) // tp, tuple(split), "both", rm, cap, None, policy)


def spec_policy(spec) -> ColocatedPolicy:
    """The colocated scheduling a plan's replica runs with (ReplicaSpec's engine-setting fields)."""
    if spec.role != "both":
        return PREFILL_FIRST
    return ColocatedPolicy(bool(spec.mixed_chunk), int(spec.prefill_chunk or 0))


def config_from_spec(ctx: PlanContext, gpus: list[GpuId], tp: int, split: list[int], role: str,
                     policy: ColocatedPolicy | None = None) -> ReplicaConfig:
    """Re-derive the model and capacity of an existing replica (kept parallelism, possibly new role)."""
    rm = build_replica_model(ctx, gpus, tp, split)
    cap, curve, policy = role_capacity(ctx, rm, role, policy)
    return ReplicaConfig(tuple(gpus), tp, len(gpus) // tp, tuple(split), role, rm, cap, curve, policy)


SPLIT_SIZES = (1, 2, 4, 8)  # GPUs per prefill or decode replica inside one node


def best_node_split(gpus: int, prefill_caps: dict[int, float], decode_caps: dict[int, float]
                    ) -> tuple[float, int, int, int, int] | None:
    """The prefill/decode mix inside one node of ``gpus`` GPUs that serves the most (KV stays on the
    node's GPU link): (rate, prefill size, prefill count, decode size, decode count), by the served rate
    min(n_p x prefill capacity, n_d x decode capacity); ``*_caps``: capacity per replica size (sizes that
    cannot hold the model left out). None when the node cannot hold one of each. The rent step sizes
    its in-node units with it, and the DistServe baseline its low node-affinity placement."""
    best = None
    for ps in SPLIT_SIZES:
        pcap = prefill_caps.get(ps, 0.0)
        if pcap <= 0:
            continue
        for ds in SPLIT_SIZES:
            dcap = decode_caps.get(ds, 0.0)
            if dcap <= 0 or ps + ds > gpus:
                continue
            for n_p in range(1, (gpus - ds) // ps + 1):
                n_d = (gpus - n_p * ps) // ds
                rate = min(n_p * pcap, n_d * dcap)
                if n_d >= 1 and (best is None or rate > best[0] * 1.001):
                    best = (rate, ps, n_p, ds, n_d)
    return best
