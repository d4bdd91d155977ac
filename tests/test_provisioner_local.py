"""LocalProvisioner with real node agents (``python -m replicas.agent``) in their own process groups, on a real
Redis: nodes of declared types come up, get preempted without warning (SIGKILL to the group, or a hung node
whose heartbeat expires), are released leaving no process behind, and never cost more than the budget,
even through a concurrent preemption storm with replacements."""

from __future__ import annotations

import asyncio
import io
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from planner.state import StateStore
from provisioner.base import NodeRequest, Offer, ProvisionError
from provisioner.budget import BudgetExceeded, BudgetLedger, to_micro
from provisioner.catalog import Catalog, CatalogError, default_local_catalog_path
from provisioner.chaos import RandomPreemptor
from provisioner.events import NodeEvent
from provisioner.fallback import SpotFallbackPolicy
from provisioner.local import LocalProvisioner
from provisioner.process_group import parse_pgid, signallable_group, tagged_node_ids, tagged_processes
from replicas.agent_client import AgentClient

REPO = Path(__file__).resolve().parents[1]
HEARTBEAT_TTL_S = 1.5  # the heartbeat-expiry test's
# every other test's: agents stall on a loaded 2-core machine, and a node lost to a late heartbeat is not what
# they test (a fresh-clone CI run once saw n5 "preempted" while one of them still waited for n0..n4)
QUIET_HEARTBEAT_TTL_S = 10.0
READY_TIMEOUT_S = 90.0  # generous: agents start slower on a busy 2-core machine


def node_group(rec: Any) -> int:
    """A node's process group from its record, checked to be another group than this test run's:
    ``killpg`` on 0 or on our own id would stop or kill pytest, make and the CI script."""
    pgid = parse_pgid(rec.provider_ref)
    assert pgid is not None and signallable_group(pgid), rec.provider_ref
    return pgid


def node_pids(deployment: str, node_id: str | None = None) -> list[int]:
    """Live (non-zombie) processes of this deployment's virtual nodes (or of one), found by their environment tag."""
    by_node = tagged_processes(deployment)
    return [p.pid for nid, procs in by_node.items() if node_id in (None, nid) for p in procs]


@pytest.fixture
async def make_local(state: StateStore, redis_url: str, tmp_path: Path) -> AsyncIterator[Any]:
    made: list[LocalProvisioner] = []

    async def make(budget: float = 2.0, **kwargs: Any) -> LocalProvisioner:
        ledger = BudgetLedger(state)
        await ledger.set_limit(budget)
        kwargs.setdefault("heartbeat_ttl_s", QUIET_HEARTBEAT_TTL_S)
        kwargs.setdefault("ready_timeout_s", READY_TIMEOUT_S)
        kwargs.setdefault("monitor_interval_s", 0.1)
        kwargs.setdefault("die_with_parent", True)  # a killed test run leaves no agents behind
        prov = LocalProvisioner(state, ledger, redis_url=redis_url, workdir=tmp_path / "nodes", **kwargs)
        await prov.start()
        made.append(prov)
        return prov

    yield make
    for prov in made:
        await prov.close()
    assert node_pids(state.deployment) == [], "a virtual node outlived its provisioner"


async def next_event(events: Any, kind: str | None = None, node_id: str | None = None,
                     timeout_s: float = READY_TIMEOUT_S) -> NodeEvent:
    deadline = time.monotonic() + timeout_s
    while True:
        ev = await events.next(max(0.01, deadline - time.monotonic()))
        if (kind is None or ev.kind == kind) and (node_id is None or ev.node_id == node_id):
            return ev


# -- the local catalog -----------------------------------------------------------------------------------


def test_local_catalog_declares_types_in_skypilot_format(tmp_path: Path) -> None:
    cat = Catalog.load(default_local_catalog_path())
    types = {e.instance_type: e for e in cat.entries()}
    assert {"local-T4", "local-L4", "local-A10G", "local-L40S"} <= set(types)
    assert len({e.gpu_type for e in types.values()}) >= 4
    l40s = types["local-L40S"]
    assert (l40s.gpu_type, l40s.gpu_count, l40s.price, l40s.spot_price) == ("L40S", 1, 0.86, 0.43)
    for e in types.values():
        assert e.price > 0 and (e.spot_price is None or 0 < e.spot_price < e.price)
    assert types["local-A40"].spot_price is None  # a type with no spot market
    assert [e.instance_type for e in cat.find("L4", 1, spot=True)] == ["local-L4"]
    assert [e.instance_type for e in cat.find("l4", 2, spot=False)] == ["local-2xL4"]
    with pytest.raises(CatalogError, match=r"unknown instance type 'local-H100'.*known: local-2xL4"):
        cat.get("local-H100")
    bad = tmp_path / "bad.csv"
    bad.write_text("InstanceType,AcceleratorName,AcceleratorCount,Price\nx,L4,1,0.4\n")
    with pytest.raises(CatalogError, match=r"lacks column.*SpotPrice"):
        Catalog.load(bad)
    bad.write_text("InstanceType,AcceleratorName,AcceleratorCount,Price,SpotPrice\nx,L4,1,cheap,\n")
    with pytest.raises(CatalogError, match="column Price: 'cheap' is not a number"):
        Catalog.load(bad)
    with pytest.raises(CatalogError, match="cannot read catalog"):
        Catalog.load(tmp_path / "missing.csv")


# -- life cycle with real agents ---------------------------------------------------------------------------


async def test_three_node_types_come_up_and_answer(make_local: Any, state: StateStore) -> None:
    prov = await make_local(budget=2.0)
    events = prov.watch()
    await prov.acquire(NodeRequest("n0", instance_type="local-L4", spot=True))
    await prov.acquire(NodeRequest("n1", gpu_type="A10G", gpu_count=1, spot=True))
    await prov.acquire(NodeRequest("n2", instance_type="local-L40S", spot=False))
    assert await prov.ledger.committed() == pytest.approx(0.22 + 0.30 + 0.86)  # held before they run
    ready = {}
    for _ in range(3):
        ev = await next_event(events, "ready")
        ready[ev.node_id] = ev
        assert ev.timing["elapsed_s"] > 0 and "answers /health" in ev.reason
    recs = {n.id: n for n in await prov.nodes()}
    assert {k: (r.instance_type, r.gpu_type, r.spot, r.price_per_hour, r.status) for k, r in recs.items()} == {
        "n0": ("local-L4", "L4", True, 0.22, "ready"),
        "n1": ("local-A10G", "A10G", True, 0.30, "ready"),
        "n2": ("local-L40S", "L40S", False, 0.86, "ready"),
    }
    for node_id, rec in recs.items():
        async with AgentClient(rec.agent_url) as agent:
            health = await agent.health()
        assert (health["node_id"], health["gpu_type"], health["gpu_count"]) == (node_id, rec.gpu_type, 1)
        assert rec.provider_ref.startswith("local:pgid=")
        assert os.getpgid(node_group(rec)) == node_group(rec)
    for _ in range(50):
        if all((await state.alive(list(recs))).values()):
            break
        await asyncio.sleep(0.1)
    assert all((await state.alive(list(recs))).values())
    kinds = [e.kind for e in await state.events()]
    assert kinds.count("node.requested") == 3 and kinds.count("node.ready") == 3


async def test_preempt_kills_the_whole_group_without_warning(make_local: Any, state: StateStore) -> None:
    prov = await make_local()
    events = prov.watch()
    await prov.acquire(NodeRequest("n0", instance_type="local-L4", spot=True))
    rec = (await next_event(events, "ready")).record
    async with AgentClient(rec.agent_url) as agent:  # an engine child, so the node is more than one process
        await agent.start_replica(id="r0", model="emulated", role="both", wait_ready=True, ready_timeout_s=60)
    pids = node_pids(state.deployment, "n0")
    assert len(pids) >= 2
    await prov.preempt("n0")
    lost = await next_event(events, "preempted", "n0", timeout_s=30)
    assert "injected preemption" in lost.reason and "exit -9" in lost.reason and "process exit" in lost.reason
    assert 0 <= lost.timing["detect_s"] < 30
    assert node_pids(state.deployment, "n0") == []
    assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids)
    assert await prov.ledger.held("n0") is None and (await state.get_node("n0")).status == "preempted"
    assert prov.fallback.spot_failures("L4") == 1
    stream = [e for e in await state.events() if e.data.get("node_id") == "n0"]
    assert [e.kind for e in stream][-2:] == ["node.preempt_injected", "node.preempted"]
    assert stream[-1].data["detect_s"] == pytest.approx(lost.timing["detect_s"], abs=1e-5)
    with pytest.raises(ProvisionError, match="not a live local node"):
        await prov.preempt("n0")


async def test_a_hung_node_is_lost_by_heartbeat_expiry(make_local: Any, state: StateStore) -> None:
    prov = await make_local(heartbeat_ttl_s=HEARTBEAT_TTL_S)
    events = prov.watch()
    await prov.acquire(NodeRequest("n0", instance_type="local-T4", spot=True))
    rec = (await next_event(events, "ready")).record
    for _ in range(50):  # wait for a first heartbeat
        if (await state.alive(["n0"]))["n0"]:
            break
        await asyncio.sleep(0.1)
    pgid = node_group(rec)
    os.killpg(pgid, signal.SIGSTOP)  # hung: the process exists, nothing answers, no heartbeat
    stopped = time.monotonic()
    lost = await next_event(events, "preempted", "n0", timeout_s=30)
    assert "heartbeat expired" in lost.reason and "heartbeat expiry" in lost.reason
    assert HEARTBEAT_TTL_S * 0.5 < time.monotonic() - stopped < 30
    assert node_pids(state.deployment, "n0") == []  # presumed lost, so killed: it cannot come back
    assert await prov.ledger.held("n0") is None


async def test_release_stops_the_group_and_leaves_nothing(make_local: Any, state: StateStore) -> None:
    prov = await make_local()
    events = prov.watch()
    await prov.acquire(NodeRequest("n0", instance_type="local-A10G", spot=True))
    rec = (await next_event(events, "ready")).record
    async with AgentClient(rec.agent_url) as agent:
        await agent.start_replica(id="r0", model="emulated", role="both", wait_ready=True, ready_timeout_s=60)
    pids = node_pids(state.deployment, "n0")
    assert len(pids) >= 2
    out = await prov.release("n0", "plan shrank")
    assert out.status == "terminated" and await prov.ledger.held("n0") is None
    assert not any(psutil.pid_exists(p) for p in pids), "release must stop (and reap) every process of the node"
    ev = [e for e in await state.events() if e.kind == "node.terminated"][-1]
    assert ev.reason == "plan shrank" and ev.data["stop_s"] >= 0 and ev.data["budget_released"]
    assert (await prov.release("n0")).status == "terminated"  # releasing again is harmless
    with pytest.raises(ProvisionError, match="unknown local node"):
        await prov.release("nope")


async def test_budget_market_choice_and_bad_requests(make_local: Any, state: StateStore) -> None:
    fallback = SpotFallbackPolicy(max_spot_failures=2)
    prov = await make_local(budget=2.0, fallback=fallback)
    await prov.acquire(NodeRequest("n0", instance_type="local-A100", spot=True))  # $1.19
    with pytest.raises(BudgetExceeded, match=r"\$1.64/h refused.*\$1.19/h already committed.*\$0.81/h left"):
        await prov.acquire(NodeRequest("n1", instance_type="local-A100", spot=False))
    assert await state.get_node("n1") is None and node_pids(state.deployment, "n1") == []
    refused = [e for e in await state.events() if e.kind == "node.refused"]
    assert len(refused) == 1 and refused[0].data["budget"] == 2.0 and refused[0].data["node_id"] == "n1"

    # A type with no spot market is served on-demand, and says why.
    a40 = await prov.acquire(NodeRequest("n2", instance_type="local-A40", spot=True))
    assert (a40.spot, a40.price_per_hour) == (False, 0.44)
    await prov.release("n2")
    # After repeated spot failures of a GPU type: on-demand if it fits the budget ...
    for _ in range(2):
        fallback.record_spot_failure("T4")
        fallback.record_spot_failure("L4")
    t4 = await prov.acquire(NodeRequest("n3", gpu_type="T4", spot=True))
    assert (t4.spot, t4.price_per_hour) == (False, 0.40)
    # ... else spot again: $1.59 committed, on-demand L4 ($0.44) would pass $2.00, spot ($0.22) does not.
    l4 = await prov.acquire(NodeRequest("n4", gpu_type="L4", gpu_count=1, spot=True))
    assert (l4.spot, l4.price_per_hour) == (True, 0.22)
    requested = {e.data["node_id"]: e.reason for e in await state.events() if e.kind == "node.requested"}
    assert "no spot offer for local-A40" in requested["n2"]
    assert "on-demand fallback: 2 spot failures of T4" in requested["n3"]
    assert "staying on spot" in requested["n4"]

    with pytest.raises(ProvisionError, match="unknown instance type 'local-H100'"):
        await prov.acquire(NodeRequest("x", instance_type="local-H100"))
    with pytest.raises(ProvisionError, match="no local instance type has 3x L4"):
        await prov.acquire(NodeRequest("x", gpu_type="L4", gpu_count=3))
    with pytest.raises(ProvisionError, match="max_price_per_hour"):
        await prov.acquire(NodeRequest("x", gpu_type="L40S", spot=False, max_price_per_hour=0.5))
    with pytest.raises(ProvisionError, match="already exists"):
        await prov.acquire(NodeRequest("n0", instance_type="local-T4"))
    with pytest.raises(ProvisionError, match="gpu_count"):
        await prov.acquire(NodeRequest("x", gpu_type="L4", gpu_count=0))
    offered = await prov.acquire(NodeRequest("n5", offers=(
        Offer("runpod", "1x_L4_SECURE", "L4", 1, False, 0.44), Offer("local", "local-T4", "T4", 1, True, 0.16),
    )))
    assert offered.instance_type == "local-T4"  # only local offers apply here
    for node in ("n0", "n3", "n4", "n5"):
        assert (await prov.wait_ready(node, READY_TIMEOUT_S)).status == "ready"
    assert await prov.ledger.committed() == pytest.approx(1.19 + 0.40 + 0.22 + 0.16)


async def test_an_agent_that_cannot_start_fails_and_frees_its_budget(make_local: Any, state: StateStore) -> None:
    prov = await make_local(agent_module="replicas.no_such_agent")
    events = prov.watch()
    await prov.acquire(NodeRequest("n0", instance_type="local-L4"))
    failed = await next_event(events, "failed", "n0", timeout_s=60)
    assert "exited with code 1" in failed.reason and "No module named replicas.no_such_agent" in failed.reason
    assert await prov.ledger.holds() == {}
    with pytest.raises(ProvisionError, match="n0 is failed, not ready: agent exited with code 1"):
        await prov.wait_ready("n0", 5)  # says why, as the controller's replacement.failed event then does


async def test_random_preemptions_are_seeded(make_local: Any, state: StateStore) -> None:
    prov = await make_local(budget=3.0)
    events = prov.watch()
    for i, t in enumerate(["local-L4", "local-A10G", "local-T4"]):
        await prov.acquire(NodeRequest(f"n{i}", instance_type=t, spot=True))
    await prov.acquire(NodeRequest("od", instance_type="local-L40S", spot=False))
    for _ in range(4):
        await next_event(events, "ready")
    expected = random.Random(11)
    expected.expovariate(1 / 0.2)
    victim = expected.choice(["n0", "n1", "n2"])  # spot nodes only, sorted
    chaos = RandomPreemptor(prov, mean_s=0.2, seed=11, spot_only=True, max_preemptions=1)
    chaos.start()
    await asyncio.wait_for(chaos.wait(), 30)
    assert [p.node_id for p in chaos.history] == [victim]
    lost = await next_event(events, "preempted", timeout_s=30)
    assert lost.node_id == victim and "random preemption #1 (mean 0.2s, seed 11)" in lost.reason


async def test_restarted_provisioner_adopts_running_nodes(make_local: Any, state: StateStore) -> None:
    first = await make_local()
    events = first.watch()
    await first.acquire(NodeRequest("n0", instance_type="local-L4"))
    await first.acquire(NodeRequest("n1", instance_type="local-T4"))
    await next_event(events, "ready")
    await next_event(events, "ready")
    await first.close(release_nodes=False)  # the controller dies; the nodes run on (their own sessions)
    assert set(tagged_node_ids(state.deployment)) == {"n0", "n1"}
    n1 = await state.get_node("n1")
    os.killpg(node_group(n1), signal.SIGKILL)  # lost while nobody watches
    for _ in range(100):
        if not node_pids(state.deployment, "n1"):
            break
        await asyncio.sleep(0.05)

    second = await make_local()
    events = second.watch()
    assert {n.id: n.status for n in await second.nodes()} == {"n0": "ready", "n1": "preempted"}
    assert await second.ledger.holds() == {"n0": pytest.approx(0.22)}
    n0 = await state.get_node("n0")
    os.killpg(node_group(n0), signal.SIGKILL)  # not our child: seen by polling
    lost = await next_event(events, "preempted", "n0", timeout_s=30)
    assert "process poll" in lost.reason or "heartbeat" in lost.reason
    assert await second.ledger.holds() == {}


# -- the preemption storm -----------------------------------------------------------------------------------
STORM_LIMIT_S = 200  # under pytest's 300 s timeout: it takes ~10 s


def task_stacks() -> str:
    """Where every asyncio task of the running loop stands (what a thread dump does not show)."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(file=out)
    return out.getvalue()


async def test_budget_holds_through_a_preemption_storm(make_local: Any, state: StateStore) -> None:
    """15 random preemptions, one every ~0.3 s; each loss is replaced at once (spot first, on-demand after repeated
    spot failures, a cheaper type when refused); greedy extra requests try to overfill. At every event, every
    request, and every 50 ms: budget holds, live+pending node records, and running process groups each cost
    <= the budget, and every live or pending record has its hold."""
    budget = 1.5
    prov = await make_local(budget=budget, fallback=SpotFallbackPolicy(max_spot_failures=2, window_s=600))
    events = prov.watch()
    checks = 0
    worst = {"holds": 0.0, "records": 0.0, "processes": 0.0}
    refusals = 0
    failures: list[str] = []

    async def check(where: str) -> None:
        nonlocal checks
        running = await asyncio.to_thread(tagged_node_ids, state.deployment)  # first: see the comment below
        async with state.r.pipeline(transaction=True) as pipe:  # holds and records as one snapshot
            pipe.hgetall(state.budget_holds_key)
            pipe.hgetall(state.nodes_key)
            raw_holds, raw_nodes = await pipe.execute()
        holds = {k.decode(): int(v) for k, v in raw_holds.items()}
        records = {k.decode(): orjson.loads(v) for k, v in raw_nodes.items()}
        live = {i: r for i, r in records.items() if r["status"] in ("pending", "ready")}
        # A process seen running had its hold then; its record (never deleted here) gives its price.
        billing = sum(to_micro(records[i]["price_per_hour"]) for i in running if i in records)
        values = {"holds": sum(holds.values()), "records": sum(to_micro(r["price_per_hour"]) for r in live.values()),
                  "processes": billing}
        problems = [f"{k} cost ${v / 1e6:.2f}/h > ${budget}/h" for k, v in values.items() if v > to_micro(budget)]
        problems += [f"{i} is {r['status']} without a budget hold" for i, r in live.items() if i not in holds]
        problems += [f"process group of {i} has no node record" for i in running if i not in records]
        if problems:
            failures.append(f"{where}: {'; '.join(problems)}")
        for k, v in values.items():
            worst[k] = max(worst[k], v / 1e6)
        checks += 1

    async def ask(node_id: str, instance_type: str) -> None:
        nonlocal refusals
        for choice in dict.fromkeys([instance_type, "local-T4", "local-L4", "local-A10G"]):
            try:
                await prov.acquire(NodeRequest(node_id, instance_type=choice, spot=True))
                return
            except BudgetExceeded:
                refusals += 1
            finally:
                await check(f"after asking {choice} for {node_id}")

    async def sampler() -> None:
        while True:
            await check("sampler")
            await asyncio.sleep(0.05)

    replacements: list[asyncio.Task[None]] = []

    async def controller() -> None:
        async for ev in events:
            await check(f"event {ev.kind} {ev.node_id}")
            if ev.lost:
                name = f"r{len(replacements) + 1}"
                replacements.append(asyncio.create_task(ask(name, ev.record.instance_type)))

    for i, t in enumerate(["local-L40S", "local-A10G", "local-L4", "local-T4"]):  # $0.43+0.30+0.22+0.16
        await ask(f"n{i}", t)
    watchers = [asyncio.create_task(sampler()), asyncio.create_task(controller())]
    greedy = [asyncio.create_task(ask(f"g{i}", "local-L40S")) for i in range(3)]
    chaos = RandomPreemptor(prov, mean_s=0.3, seed=5, spot_only=False, max_preemptions=15)
    stage = "the storm"
    try:
        # once (CI, 2026-11-30) this test hung past pytest's 300 s with the event loop idle and no sign of
        # where: past STORM_LIMIT_S it fails saying which step it waited on and where every task stood
        async with asyncio.timeout(STORM_LIMIT_S):
            chaos.start()
            await asyncio.wait_for(chaos.wait(), 120)
            stage = "the greedy requests"
            await asyncio.gather(*greedy)
            stage = "the last loss to be seen"
            for _ in range(300):  # the last loss is still being seen and replaced
                if len(replacements) >= len(chaos.history):
                    break
                await asyncio.sleep(0.05)
            stage = "the last replacements"
            for _ in range(200):  # let the last replacements come up
                await asyncio.gather(*replacements)
                if not any(n.status == "pending" for n in (await state.nodes()).values()):
                    break
                await asyncio.sleep(0.1)
            stage = "the last check"
            await check("end of storm")
    except TimeoutError:
        pytest.fail(f"the storm test waited over {STORM_LIMIT_S}s on {stage} ({len(chaos.history)} preemptions, "
                    f"{len(replacements)} replacements); tasks:\n{task_stacks()}")
    finally:
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    assert not failures, failures[:5]
    assert len(chaos.history) == 15 and len(replacements) >= 15
    assert refusals > 0, "the storm never pressed against the budget"
    assert checks > 50 and worst["holds"] > budget * 0.7
    print(f"\nstorm: {len(chaos.history)} preemptions, {len(replacements)} replacements, {refusals} refusals, "
          f"{checks} invariant checks; peak $/h: holds {worst['holds']:.2f}, live records {worst['records']:.2f}, "
          f"running groups {worst['processes']:.2f} (budget {budget:.2f})")


def provisioner_script(redis_url: str, state: StateStore, tmp_path: Path, body: str) -> str:
    """A program for a child process: a LocalProvisioner ``prov`` (``die_with_parent``, on this test's
    deployment, $1/h), then ``body``: the rest of its ``main()``, indented by 4."""
    return f"""
import asyncio
import provisioner.local as local
from planner.state import StateStore
from provisioner.base import NodeRequest, ProvisionError
from provisioner.budget import BudgetLedger
from provisioner.local import LocalProvisioner

async def main():
    state = StateStore.from_url({redis_url!r}, {state.deployment!r})
    ledger = BudgetLedger(state)
    await ledger.set_limit(1.0)
    prov = LocalProvisioner(state, ledger, redis_url={redis_url!r}, workdir={str(tmp_path)!r}, die_with_parent=True)
    await prov.start()
{body}
asyncio.run(main())
"""


async def test_die_with_parent_reaps_agents_of_a_killed_provisioner(redis_url: str, state: StateStore,
                                                                    tmp_path: Path) -> None:
    """A test run killed outright must not leave agents behind: with ``die_with_parent`` they die with it."""
    script = provisioner_script(redis_url, state, tmp_path, f"""
    await prov.acquire(NodeRequest("n0", instance_type="local-L4"))
    await prov.wait_ready("n0", {READY_TIMEOUT_S})
    print("ready", flush=True)
    await asyncio.sleep(600)
""")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE,
                                                cwd=str(REPO))
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT_S)  # type: ignore[union-attr]
        assert line.strip() == b"ready"
        assert node_pids(state.deployment, "n0")
    finally:
        proc.kill()  # SIGKILL: no teardown, no release
        await proc.wait()
    for _ in range(100):
        if not node_pids(state.deployment, "n0"):
            break
        await asyncio.sleep(0.05)
    assert node_pids(state.deployment, "n0") == []


async def test_a_node_released_while_it_launches_spares_this_process_group(redis_url: str, state: StateStore,
                                                                          tmp_path: Path) -> None:
    """A node released while its agent is being started has no pid yet; releasing it once sent
    ``killpg(0, ...)``, which signals the caller's own group: pytest, make and the CI script with it (a CI
    run died with exit code 137). Here one acquire is cancelled mid-launch and the provisioner closed, and
    another node is released mid-launch, whose launch then ends with an error and no agent left. Run in a
    session of its own, so that the old behaviour kills only the child, which then never says it survived."""
    script = provisioner_script(redis_url, state, tmp_path, """
    real_exec = asyncio.create_subprocess_exec
    launching, go = asyncio.Event(), asyncio.Event()

    async def held_exec(*args, **kwargs):  # the node is known, its agent not started yet
        launching.set()
        await go.wait()
        return await real_exec(*args, **kwargs)

    local.asyncio.create_subprocess_exec = held_exec
    released = asyncio.create_task(prov.acquire(NodeRequest("n1", instance_type="local-T4")))
    await launching.wait()
    await prov.release("n1")
    go.set()
    try:
        await released
        print("n1 launched after its release")
    except ProvisionError:
        print("n1 refused")
    launching.clear()
    go.clear()
    cancelled = asyncio.create_task(prov.acquire(NodeRequest("n0", instance_type="local-L4")))
    await launching.wait()
    cancelled.cancel()
    await prov.close()
    print("survived", (await state.get_node("n0")).status, (await state.get_node("n1")).status, flush=True)
""")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, cwd=str(REPO),
                                                start_new_session=True)
    out, _ = await asyncio.wait_for(proc.communicate(), READY_TIMEOUT_S)
    assert proc.returncode == 0, out.decode()[-2000:]
    assert out.decode().split("\n")[-3:-1] == ["n1 refused", "survived terminated terminated"], out.decode()[-2000:]
    assert node_pids(state.deployment) == []


def test_only_other_process_groups_are_signallable() -> None:
    """0 and our own group id both mean 'this group' to killpg: never a node's group."""
    assert not signallable_group(None)
    assert not signallable_group(0)
    assert not signallable_group(-5)
    assert not signallable_group(os.getpgrp())
    other = psutil.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert signallable_group(other.pid)
    finally:
        other.kill()
        other.wait()
