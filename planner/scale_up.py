"""What to rent next when the running plan misses its SLO: one instance, the one that adds the most goodput per
dollar to the plan as it runs, within what is left of the budget.

The controller calls this when the gateways' live attainment stays under the target (``Controller.check_slo``)
and ``tsctl up --scale-up`` allowed it. Each candidate (the cheapest offer per GPU type and count, spot first when
the deployment rents spot) is judged by the lightweight reschedule with that instance added (``reschedule(plan,
new_instances=...)``: the running replicas keep their GPUs, the new one is grouped and given a phase, routing is
re-solved), on the observed workload, against the plan as it runs on the same workload. The choice is the same for
the same inputs (the reschedule's clock counts work, not time).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from planner.offers import Offer
from planner.plan import Instance, Plan

MIN_GAIN = 0.02  # an addition must add at least this share of the plan's goodput to be worth renting


@dataclass(frozen=True)
class Addition:
    """The instance to rent and what the reschedule expects of the plan with it."""

    instance: Instance
    goodput_now: float  # the plan as it runs, on the workload judged
    goodput_after: float  # with the instance added

    @property
    def gain_per_dollar(self) -> float:
        return (self.goodput_after - self.goodput_now) / self.instance.price_per_hour

    def to_dict(self) -> dict[str, Any]:
        i = self.instance
        return {"node": i.id, "instance_type": i.instance_type, "gpus": f"{i.gpu_count}x{i.gpu_type}", "spot": i.spot,
                "price_per_hour": i.price_per_hour, "goodput_now": round(self.goodput_now, 4),
                "goodput_after": round(self.goodput_after, 4)}


def candidates(offers: list[Offer], spot: bool, max_price: float, max_gpus: int, node_id: str,
               in_use: Counter[str] | None = None) -> list[Instance]:
    """The cheapest offer of each (GPU type, count) that fits ``max_price`` and ``max_gpus`` and has capacity left
    (``in_use``: instances of each type already rented), as an instance named ``node_id``; spot where the
    deployment rents spot and the offer has it, else on-demand."""
    best: dict[tuple[str, int], Instance] = {}
    in_use = in_use or Counter()
    for o in offers:
        price, is_spot = o.hourly(spot)
        if price <= 0 or price > max_price or o.gpu_count > max_gpus:
            continue
        if o.capacity is not None and in_use[o.instance_type] >= o.capacity:
            continue
        key = (o.gpu_type, o.gpu_count)
        if key not in best or price < best[key].price_per_hour:
            best[key] = Instance(node_id, o.instance_type, o.gpu_type, o.gpu_count, is_spot, price, o.region, o.cloud)
    return sorted(best.values(), key=lambda i: (i.price_per_hour, i.gpu_type, i.gpu_count))


def choose_addition(plan: Plan, offers: list[Offer], workload: Any, slo: Any, *, budget: float, max_gpus: int,
                    spot: bool, node_id: str) -> Addition | None:
    """The candidate adding the most goodput per dollar to ``plan`` for ``workload`` (at least ``MIN_GAIN`` of
    its goodput), within ``budget`` $/h and ``max_gpus`` GPUs in all; None when no offer helps or fits."""
    from planner.plan import PlanError
    from planner.reschedule import reschedule

    gpus_left = max_gpus - sum(i.gpu_count for i in plan.instances)
    room = budget - plan.cost_per_hour
    in_use = Counter(i.instance_type for i in plan.instances)
    pool = candidates(offers, spot, room + 1e-9, gpus_left, node_id, in_use)
    if not pool:
        return None
    _, kept = reschedule(plan, workload=workload, slo=slo)
    now = kept.goodput_after
    best: Addition | None = None
    for inst in pool:
        try:
            _, changes = reschedule(plan, new_instances=[inst], workload=workload, slo=slo)
        except PlanError:  # e.g. the model does not fit this GPU
            continue
        add = Addition(inst, now, changes.goodput_after)
        if add.goodput_after - now < MIN_GAIN * max(now, 1e-9):
            continue
        if best is None or add.gain_per_dollar > best.gain_per_dollar:
            best = add
    return best
