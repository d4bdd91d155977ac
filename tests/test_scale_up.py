"""What to rent next when the SLO is missed (``planner.scale_up``)."""

from __future__ import annotations

from collections import Counter

from planner.controller import ControllerConfig, offers_of, workload_of
from planner.plan import Instance, Plan, ReplicaSpec, Route
from planner.scale_up import candidates, choose_addition


def _offers() -> list:
    return offers_of(ControllerConfig(model="smollm2", budget=2.0, provider="local"))


def test_candidates_are_the_cheapest_per_gpu_shape_that_fit_the_money_the_gpus_and_the_capacity() -> None:
    offers = _offers()
    every = candidates(offers, True, 10.0, 8, "n9")
    assert all(i.id == "n9" for i in every)
    shapes = [(i.gpu_type, i.gpu_count) for i in every]
    assert len(shapes) == len(set(shapes)) and ("L4", 2) in shapes
    a40 = next(i for i in every if i.gpu_type == "A40")
    assert not a40.spot  # no spot price in the catalog: on-demand
    assert {i.instance_type for i in candidates(offers, True, 0.25, 8, "n9")} == {"local-T4", "local-L4"}
    assert ("L4", 2) not in [(i.gpu_type, i.gpu_count) for i in candidates(offers, True, 10.0, 1, "n9")]
    full = candidates(offers, True, 10.0, 8, "n9", Counter({"local-T4": 1}))  # capacity 1, in use
    assert "local-T4" not in {i.instance_type for i in full}


def test_the_addition_is_the_best_gain_per_dollar_within_the_budget_and_none_when_nothing_fits() -> None:
    """Two L4s (prefill + decode) of SmolLM2: of every candidate the choice gains the most goodput per dollar by
    the reschedule's own estimate, and is the same on a second call; no money left, no addition."""
    from planner.reschedule import reschedule

    insts = [Instance(f"n{i}", "local-L4", "L4", 1, True, 0.22, "local", "local") for i in range(2)]
    plan = Plan("smollm2", insts, [ReplicaSpec("r0", ["n0"], [("n0", 0)], 1, 1, "prefill", [30]),
                                   ReplicaSpec("r1", ["n1"], [("n1", 0)], 1, 1, "decode", [30])],
                [Route("r0", "r1", 1.0, "none")], strategy="test")
    cfg = ControllerConfig(model="smollm2", budget=1.0, provider="local", rate=1.0, ttft_s=0.5, tpot_s=0.05)
    workload, slo = workload_of(cfg)
    add = choose_addition(plan, _offers(), workload, slo, budget=1.0, max_gpus=8, spot=True, node_id="n2")
    assert add is not None and add.instance.price_per_hour <= 1.0 - 0.44 + 1e-9
    now = reschedule(plan, workload=workload, slo=slo)[1].goodput_after
    assert add.goodput_now == now and add.goodput_after > now
    for other in candidates(_offers(), True, 0.56, 6, "n2", Counter({"local-L4": 2})):
        after = reschedule(plan, new_instances=[other], workload=workload, slo=slo)[1].goodput_after
        assert (after - now) / other.price_per_hour <= add.gain_per_dollar + 1e-9, other
    again = choose_addition(plan, _offers(), workload, slo, budget=1.0, max_gpus=8, spot=True, node_id="n2")
    assert again == add
    assert choose_addition(plan, _offers(), workload, slo, budget=0.5, max_gpus=8, spot=True, node_id="n2") is None
