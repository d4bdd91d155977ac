"""Turn a Plan back into cost-model objects: the cluster it runs on and a ReplicaModel per replica.

The simulator and the rescheduler start from a Plan (JSON), not from the search's internals, so
they see exactly what the controller deploys: a replica's GPUs are listed stage by stage (``tp``
per stage) and ``layer_split`` gives each stage's layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cluster import Cluster, cluster_from_instances
from planner.cost_model import DEFAULT_EFF, Efficiency, ReplicaModel
from planner.models import ModelSpec, load_model
from planner.parallel import PlanContext, build_replica_model
from planner.plan import Plan, PlanError, ReplicaSpec
from planner.workload import SLO, Workload


@dataclass
class Materialized:
    ctx: PlanContext
    models: dict[str, ReplicaModel]


def check_layer_split(model: ModelSpec, spec: ReplicaSpec) -> list[int]:
    """The replica's layer split, if it gives each of its stages its layers of ``model``; else PlanError."""
    split = list(spec.layer_split)
    if len(split) != spec.pp or sum(split) != model.layers:
        raise PlanError(f"replica {spec.id}: layer_split {split} does not give {model.layers} layers to "
                        f"{spec.pp} stages")
    return split


def replica_model(ctx: PlanContext, spec: ReplicaSpec) -> ReplicaModel:
    return build_replica_model(ctx, list(spec.gpus), spec.tp, check_layer_split(ctx.model, spec))


def plan_context(plan: Plan, *, workload: Workload | None = None, slo: SLO | None = None,
                 model: ModelSpec | None = None, cluster: Cluster | None = None,
                 eff: Efficiency = DEFAULT_EFF) -> PlanContext:
    """The planning context a plan was made in (or the given overrides)."""
    try:
        wl = workload or Workload.from_dict(plan.workload)
        target = slo or SLO.from_dict(plan.slo)
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"plan lacks its workload/slo ({e}); pass them explicitly") from e
    spec = model or load_model(plan.model)
    cl = cluster or cluster_from_instances(plan.instances, plan.network)
    return PlanContext(spec, wl, target, cl, eff, mixed_chunk=plan.allow_mixed_chunk)


def materialize(plan: Plan, **kw) -> Materialized:
    ctx = plan_context(plan, **kw)
    return Materialized(ctx, {r.id: replica_model(ctx, r) for r in plan.replicas})
