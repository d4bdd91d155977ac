"""Lightweight rescheduling: after a node loss, new nodes, a node that runs somewhere other than planned,
or a new workload, keep every surviving
replica's GPUs and parallelism (no weight reload) and re-decide only phases and routing.

Replicas on lost nodes are dropped; new nodes are grouped into new replicas (those load weights
anyway); then the phase of every replica is chosen among prefill and decode (colocated replicas
stay colocated), exhaustively screened by a capacity bound when there are at most
``EXHAUSTIVE_MAX`` replicas, else by single-flip local search from the current phases, and the
best few are scored with the routing LP. A lone survivor of a disaggregated plan becomes colocated
so the service keeps answering. The result says what changed: phase flips, dropped and added
replicas, routing weight deltas.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from planner.capacity import ColocatedPolicy
from planner.cluster import Cluster, cluster_from_instances
from planner.deployment import check_layer_split, plan_context
from planner.evaluate import Evaluation, Evaluator, Group
from planner.parallel import PlanContext, ReplicaConfig, configure_group, role_capacity, spec_policy
from planner.plan import Instance, Plan, PlanError, ReplicaSpec, Route
from planner.search import initial_groups, label_phases
from planner.work import WorkClock
from planner.workload import SLO, Workload

EXHAUSTIVE_MAX = 12
SCORED_PER_SEARCH = 8


@dataclass
class Changes:
    """What a reschedule changed, for the controller (role switches) and for people (tsctl)."""

    lost_nodes: list[str] = field(default_factory=list)
    new_nodes: list[str] = field(default_factory=list)
    moved_nodes: list[tuple[str, str, str]] = field(default_factory=list)  # (node, planned place, actual place)
    dropped_replicas: list[str] = field(default_factory=list)
    added_replicas: list[str] = field(default_factory=list)
    role_flips: list[tuple[str, str, str]] = field(default_factory=list)  # (replica, old role, new role)
    routing_deltas: list[tuple[str, str, float, float]] = field(default_factory=list)  # (p, d, old w, new w)
    goodput_before: float = 0.0  # what the plan expected (its own workload, all its nodes)
    goodput_kept: float = 0.0  # the surviving replicas in their current phases, on the new conditions
    goodput_after: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "lost_nodes": self.lost_nodes, "new_nodes": self.new_nodes,
            "moved_nodes": [{"node": n, "from": a, "to": b} for n, a, b in self.moved_nodes],
            "dropped_replicas": self.dropped_replicas, "added_replicas": self.added_replicas,
            "role_flips": [{"replica": r, "from": a, "to": b} for r, a, b in self.role_flips],
            "routing_deltas": [{"prefill": p, "decode": d, "from": a, "to": b} for p, d, a, b in self.routing_deltas],
            "goodput_before": round(self.goodput_before, 4), "goodput_kept": round(self.goodput_kept, 4),
            "goodput_after": round(self.goodput_after, 4),
            "seconds": round(self.seconds, 4),
        }


class _Configs:
    """Replica configurations with kept parallelism, computed once per distinct hardware shape."""

    def __init__(self, ctx: PlanContext) -> None:
        self.ctx = ctx
        self._cap: dict[tuple, tuple[float, object, ColocatedPolicy]] = {}

    def get(self, gpus: list[tuple[str, int]], tp: int, split: list[int], role: str,
            policy: ColocatedPolicy | None = None) -> ReplicaConfig:
        """``policy``: a colocated replica that stays colocated keeps its engine setting (no restart)."""
        from planner.parallel import build_replica_model

        rm = build_replica_model(self.ctx, gpus, tp, split)
        shape = (tuple((s.gpu.name, s.tp, s.layers) for s in rm.stages), tuple(round(b) for b, _ in rm.pp_links), role,
                 policy)
        if shape not in self._cap:
            self._cap[shape] = role_capacity(self.ctx, rm, role, policy)
        cap, curve, pol = self._cap[shape]
        return ReplicaConfig(tuple(gpus), tp, len(gpus) // tp, tuple(split), role, rm, cap, curve, pol)  # type: ignore[arg-type]


def reschedule(plan: Plan, *, lost_nodes: Iterable[str] = (), new_instances: Iterable[Instance] = (),
               placed: Iterable[Instance] = (), workload: Workload | None = None, slo: SLO | None = None,
               time_limit_s: float = 1.0) -> tuple[Plan, Changes]:
    """A new plan keeping surviving replicas and their parallelism; only phases and routing change.

    ``placed``: plan instances as they actually run (same id, GPU type and count; another cloud,
    region, market or price): a launch that failed over to another region, or fell back from spot to
    on-demand. The links to and from a moved node are then those of its real place, so routing is
    re-decided on the network the replicas really have."""
    t0, clock = time.perf_counter(), WorkClock()  # the phase search's deadline is on work done: one answer
    lost = set(lost_nodes)
    unknown = lost - {i.id for i in plan.instances}
    if unknown:
        raise PlanError(f"unknown node(s) {', '.join(sorted(unknown))}; the plan has "
                        f"{', '.join(i.id for i in plan.instances)}")
    new_instances = list(new_instances)
    taken = {i.id for i in plan.instances}
    for inst in new_instances:
        if inst.id in taken:
            raise PlanError(f"new instance id {inst.id} is already in the plan")
    actual, moved = _placed(plan, placed)
    instances = [actual.get(i.id, i) for i in plan.instances if i.id not in lost] + new_instances
    network = _network_after_moves(plan.network, {n for n, _, _ in moved})
    base = plan_context(plan, workload=workload, slo=slo)
    cluster = cluster_from_instances(instances, network)
    ctx = replace(base, cluster=cluster)
    ev = Evaluator(ctx, kv_compression=_plan_kv_mode(plan), objective="goodput")
    configs = _Configs(ctx)

    survivors = [r for r in plan.replicas if not set(r.node_ids) & lost]
    kept = {r.id: spec_policy(r) for r in survivors if r.role == "both"}
    dropped = [r.id for r in plan.replicas if set(r.node_ids) & lost]
    specs: list[tuple[str, list[tuple[str, int]], int, list[int], str]] = [
        (r.id, list(r.gpus), r.tp, check_layer_split(ctx.model, r), r.role) for r in survivors]
    added: list[str] = []
    if new_instances:
        fresh = Cluster([n for n in cluster.nodes if n.id in {i.id for i in new_instances}],
                        cluster.inter_node_gbps, cluster.links_gbps)
        sub = Evaluator(replace(ctx, cluster=fresh))
        groups = initial_groups(sub, fresh)
        roles = label_phases(sub, groups, ("prefill", "decode")) if groups else []
        next_id = plan.first_free_replica_number()
        for g, role in zip(groups, roles, strict=True):
            cfg = configure_group(ctx, list(g), role)
            if cfg is None:
                continue
            rid = f"r{next_id}"
            next_id += 1
            added.append(rid)
            specs.append((rid, list(cfg.gpus), cfg.tp, list(cfg.layer_split), role))
    if not specs:
        raise PlanError("no replica survives and no new node can hold one: nothing left to serve with")

    colocated = [s[4] == "both" for s in specs]
    options = [("both",) if c else ("prefill", "decode") for c in colocated]
    if sum(1 for c in colocated if not c) == 1:
        options = [("both",) if c else ("prefill", "decode", "both") for c in colocated]
    best, now = _search_phases(ev, configs, specs, options, {i.id: i.price_per_hour for i in instances},
                               clock, time_limit_s, kept)
    if best.goodput <= 0 and any(not c for c in colocated):  # PD cannot serve: go colocated
        options = [("both",)] * len(specs)
        best, _ = _search_phases(ev, configs, specs, options, {i.id: i.price_per_hour for i in instances},
                                 clock, time_limit_s, kept)

    new_plan = _to_plan(plan, instances, specs, ev.balanced(ev.lean(best)), ctx, network)
    changes = Changes(sorted(lost), [i.id for i in new_instances], moved, dropped, added)
    old_roles = {r.id: r.role for r in plan.replicas}
    for r in new_plan.replicas:
        if r.id in old_roles and old_roles[r.id] != r.role:
            changes.role_flips.append((r.id, old_roles[r.id], r.role))
    old_w = {(x.prefill, x.decode): x.weight for x in plan.routing}
    new_w = {(x.prefill, x.decode): x.weight for x in new_plan.routing}
    for key in sorted(set(old_w) | set(new_w)):
        a, b = old_w.get(key, 0.0), new_w.get(key, 0.0)
        if abs(a - b) > 1e-6:
            changes.routing_deltas.append((key[0], key[1], round(a, 6), round(b, 6)))
    changes.goodput_before = float(plan.expected.get("goodput_rps", 0.0))
    changes.goodput_kept = now.goodput
    changes.goodput_after = best.goodput
    changes.seconds = time.perf_counter() - t0
    new_plan.expected["reschedule_seconds"] = round(changes.seconds, 4)
    return new_plan, changes


def _place(i: Instance) -> str:
    return f"{i.cloud or '?'}/{i.region or '?'} {'spot' if i.spot else 'on-demand'} ${i.price_per_hour:.2f}/h"


def _placed(plan: Plan, placed: Iterable[Instance]) -> tuple[dict[str, Instance], list[tuple[str, str, str]]]:
    """The actual instances by id, and (node, planned place, actual place) of those that differ."""
    planned = {i.id: i for i in plan.instances}
    actual: dict[str, Instance] = {}
    moved: list[tuple[str, str, str]] = []
    for inst in placed:
        was = planned.get(inst.id)
        if was is None:
            raise PlanError(f"placed node {inst.id} is not in the plan")
        if (inst.gpu_type, inst.gpu_count) != (was.gpu_type, was.gpu_count):
            raise PlanError(f"node {inst.id} has {inst.gpu_count}x {inst.gpu_type}, the plan has "
                            f"{was.gpu_count}x {was.gpu_type}: that is a different node, not a move")
        actual[inst.id] = inst
        if inst != was:
            moved.append((inst.id, _place(was), _place(inst)))
    return actual, moved


def _network_after_moves(network: dict, moved: set[str]) -> dict:
    """The plan's network with what was planned for the moved nodes (their zone) forgotten: explicit
    links stay (a user measured them), the location defaults follow the node's real place."""
    if not moved:
        return dict(network)
    out = dict(network)
    out["zones"] = {n: z for n, z in network.get("zones", {}).items() if n not in moved}
    return out


def _plan_kv_mode(plan: Plan) -> str:
    modes = {r.kv_compression for r in plan.routing if r.prefill != r.decode}
    return "auto" if len(modes) != 1 else modes.pop()


def _search_phases(ev: Evaluator, configs: _Configs, specs, options, prices: dict[str, float],
                   clock: WorkClock, deadline: float,
                   kept: dict[str, ColocatedPolicy] | None = None) -> tuple[Evaluation, Evaluation]:
    """The best phases found, and the current phases' evaluation (what keeping them is worth now)."""
    groups: list[Group] = [tuple(s[1]) for s in specs]
    kept = kept or {}
    per_role: list[dict[str, ReplicaConfig]] = []
    for (rid, gpus, tp, split, _), opts in zip(specs, options, strict=True):
        per_role.append({role: configs.get(gpus, tp, split, role, kept.get(rid) if role == "both" else None)
                         for role in opts})

    def score(roles: tuple[str, ...]) -> Evaluation:
        return ev.evaluate_configs(groups, list(roles), [per_role[i][r] for i, r in enumerate(roles)], prices)

    def bound(roles: tuple[str, ...]) -> float:
        cp = sum(per_role[i][r].capacity for i, r in enumerate(roles) if r == "prefill")
        cd = sum(per_role[i][r].capacity for i, r in enumerate(roles) if r == "decode")
        cc = sum(per_role[i][r].capacity for i, r in enumerate(roles) if r == "both")
        return cc + min(cp, cd)

    current = tuple(s[4] if s[4] in opts else opts[0] for s, opts in zip(specs, options, strict=True))
    n_combos = int(np.prod([len(o) for o in options]))
    if len(specs) <= EXHAUSTIVE_MAX and n_combos <= 1 << EXHAUSTIVE_MAX:
        combos = list(itertools.product(*options))
        combos.sort(key=lambda rs: (-bound(rs), rs != current))
        best = now = score(current)
        for rs in combos[:SCORED_PER_SEARCH]:
            e = score(rs)
            if e.goodput > best.goodput * (1 + 1e-9):
                best = e
        return best, now
    best = now = score(current)  # many replicas: single-flip local search from the current phases
    roles = list(current)
    improved = True
    while improved and clock() < deadline:
        improved = False
        moves = []
        for i, opts in enumerate(options):
            for r in opts:
                if r != roles[i]:
                    cand = tuple([*roles[:i], r, *roles[i + 1:]])
                    moves.append((bound(cand), cand))
        moves.sort(key=lambda m: -m[0])
        for _, cand in moves[:SCORED_PER_SEARCH]:
            e = score(cand)
            if e.goodput > best.goodput * (1 + 1e-6):
                best, roles, improved = e, list(cand), True
                break
    return best, now


def _to_plan(old: Plan, instances: list[Instance], specs, e: Evaluation, ctx: PlanContext, network: dict) -> Plan:
    ids = [s[0] for s in specs]
    gid = {f"g{i}": ids[i] for i in range(len(ids))}
    replicas = []
    for (rid, gpus, tp, split, _), role, cfg in zip(specs, e.roles, e.configs, strict=True):
        mixed = cfg is not None and role == "both" and cfg.policy.mixed
        replicas.append(ReplicaSpec(rid, sorted({n for n, _ in gpus}), list(gpus), tp, len(gpus) // tp, role,  # type: ignore[arg-type]
                                    list(split), cfg.policy.chunk if mixed else 0, mixed))
    total = e.routing.total
    routing = []
    for (p, d), f in sorted(e.routing.pairs.items()):
        pi, di = int(p[1:]), int(d[1:])
        mode = e.compression.get((pi, di), "none") if p != d else "none"
        routing.append(Route(gid[p], gid[d], f / total, mode))  # type: ignore[arg-type]
    cost = sum(i.price_per_hour for i in instances)
    expected = {"goodput_rps": round(e.goodput, 4),
                "goodput_per_dollar": round(e.goodput / cost, 4) if cost > 0 else 0.0,
                "slo_attainment": float(ctx.slo.attainment if e.goodput >= ctx.workload.rate else 0.0),
                **e.quantiles()}
    new = Plan(model=old.model, instances=instances, replicas=replicas, routing=routing, strategy=old.strategy,
               seed=old.seed, version=old.version, expected=expected, workload=ctx.workload.to_dict(),
               slo=ctx.slo.to_dict(), network=network, allow_mixed_chunk=old.allow_mixed_chunk)
    new.next_replica_id = max(old.first_free_replica_number(), new.first_free_replica_number())
    new.validate()
    return new
