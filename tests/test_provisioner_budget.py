"""The budget ledger on a real Redis: holds, refusals with reasons, atomic records, and a concurrent storm
from several clients (as several provisioner processes would be) that never passes the budget."""

from __future__ import annotations

import asyncio
import random

import pytest
import redis.asyncio as aioredis

from planner.state import NodeRecord, StateStore
from provisioner.budget import BudgetExceeded, BudgetLedger, HoldExists, to_micro
from provisioner.fallback import SpotFallbackPolicy


async def test_reserve_refuse_release_with_reasons(state: StateStore) -> None:
    ledger = BudgetLedger(state)
    with pytest.raises(BudgetExceeded, match="no hourly budget is set"):
        await ledger.reserve("n0", 0.1)
    await ledger.set_limit(2.0)
    assert (await ledger.reserve("n0", 0.8)).committed == pytest.approx(0.8)
    assert (await ledger.reserve("n1", 0.86)).committed == pytest.approx(1.66)
    with pytest.raises(BudgetExceeded) as refused:
        await ledger.reserve("n2", 0.75)
    msg = str(refused.value)
    assert "$0.75/h refused" in msg and "$1.66/h already committed" in msg and "$0.34/h left of the $2.00/h" in msg
    assert refused.value.remaining == pytest.approx(0.34)
    assert await ledger.held("n2") is None
    assert await ledger.release("n0") == pytest.approx(0.8)
    assert await ledger.release("n0") == 0.0  # releasing twice frees nothing twice
    await ledger.reserve("n2", 0.75)
    assert await ledger.committed() == pytest.approx(1.61)
    assert await ledger.holds() == {"n1": pytest.approx(0.86), "n2": pytest.approx(0.75)}


async def test_exactly_at_the_budget_is_allowed_and_cents_do_not_drift(state: StateStore) -> None:
    ledger = BudgetLedger(state)
    await ledger.set_limit(1.0)
    for _ in range(500):  # 0.1 + 0.2 + 0.7 in floats is not 1.0; in micro-dollars it is
        for node, price in (("a", 0.1), ("b", 0.2), ("c", 0.7)):
            await ledger.reserve(node, price)
        with pytest.raises(BudgetExceeded):
            await ledger.reserve("d", 0.000001)
        for node in ("a", "b", "c"):
            await ledger.release(node)
    assert await ledger.committed() == 0.0


async def test_a_node_holds_once_resize_replaces_and_record_is_atomic(state: StateStore) -> None:
    ledger = BudgetLedger(state)
    await ledger.set_limit(1.0)
    rec = NodeRecord("n0", "1x_L40S", "L40S", 1, True, 0.9)
    await ledger.reserve("n0", 0.9, record=rec)
    assert (await state.get_node("n0")) == rec  # written in the same Lua step as the hold
    with pytest.raises(HoldExists, match="already holds"):
        await ledger.reserve("n0", 0.1)
    res = await ledger.reserve("n0", 0.43, resize=True)  # the price actually charged
    assert res.committed == pytest.approx(0.43)
    with pytest.raises(BudgetExceeded):  # re-sizing up past the budget is refused too
        await ledger.reserve("n0", 1.2, resize=True)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve("n1", 0.6, record=NodeRecord("n1", "x", "L4", 1, True, 0.6))
    assert await state.get_node("n1") is None  # refused: no record either
    with pytest.raises(ValueError, match="non-negative"):
        await ledger.reserve("n2", -1.0)


async def test_concurrent_storm_from_several_clients_never_passes_the_budget(state: StateStore, redis_url: str) -> None:
    """Four clients (like four provisioner processes) reserve and release at random, all at once;
    an observer reads the holds in between and the sum is never over the limit, and no update is lost."""
    limit = 3.0
    prices = [0.16, 0.22, 0.30, 0.43, 0.44, 0.75, 0.86, 1.19]
    clients = [aioredis.from_url(redis_url) for _ in range(4)]
    ledgers = [BudgetLedger(StateStore(c, state.deployment)) for c in clients]
    await ledgers[0].set_limit(limit)
    believed: dict[str, float] = {}
    observed_max = 0.0
    refusals = 0
    stop = asyncio.Event()

    async def worker(i: int) -> None:
        nonlocal refusals
        rng = random.Random(i)
        ledger = ledgers[i % len(ledgers)]
        for step in range(60):
            node = f"w{i}-n{step % 5}"
            if node in believed:
                await ledger.release(node)
                del believed[node]
            else:
                price = rng.choice(prices)
                try:
                    res = await ledger.reserve(node, price)
                except BudgetExceeded:
                    refusals += 1
                    continue
                assert res.committed <= limit + 1e-9
                believed[node] = price

    async def observer() -> None:
        nonlocal observed_max
        raw = StateStore(clients[0], state.deployment)
        while not stop.is_set():
            total = sum(int(v) for v in await raw.r.hvals(raw.budget_holds_key))
            assert total <= to_micro(limit), f"holds sum to {total / 1e6} > {limit}"
            observed_max = max(observed_max, total / 1e6)
            await asyncio.sleep(0)

    watch = asyncio.create_task(observer())
    try:
        await asyncio.gather(*(worker(i) for i in range(8)))
    finally:
        stop.set()
        await watch
        for c in clients:
            await c.aclose()
    assert refusals > 0, "the storm never hit the budget: it tested nothing"
    assert observed_max > limit * 0.7
    assert await ledgers[0].holds() == pytest.approx(believed)


def test_spot_fallback_counts_recent_failures_per_gpu_type() -> None:
    now = [0.0]
    policy = SpotFallbackPolicy(max_spot_failures=2, window_s=100, clock=lambda: now[0])
    assert not policy.use_on_demand("L4")
    policy.record_spot_failure("L4")
    policy.record_spot_failure("A10G")
    assert not policy.use_on_demand("L4")
    now[0] = 50
    assert policy.record_spot_failure("L4") == 2
    assert policy.use_on_demand("L4") and not policy.use_on_demand("A10G")
    assert "2 spot failures of L4" in policy.reason("L4")
    now[0] = 101  # the first failure ages out: spot is worth another try
    assert not policy.use_on_demand("L4")
    with pytest.raises(ValueError):
        SpotFallbackPolicy(max_spot_failures=0)
