"""The controller's decisions: losses, replacements, restarts, the lease, a node that cannot be had.

Real Redis and the real ``Provisioner`` base (budget ledger, node records, events, ``replace``,
``wait_ready``); the machines are a test double, ``RecordOnlyProvisioner``: a node exists only as its
record and turns ready, fails or is lost when the test says so. Agents are ``RecordingAgent``s that write
the replica record an agent would. So each test runs in seconds and checks what the controller decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis

# Imported here, not first by the controller's warm-up thread: once, a run here ended with CPython 3.11's
# "AST constructor recursion depth mismatch" (cpython gh-106905, pytest #10763) while that thread was still
# compiling these modules and pytest rewrote a plugin module's source.
import planner.reschedule
import planner.scheduler  # noqa: F401
from planner.controller import (
    REPLACEMENTS_META_KEY,
    SCALE_UPS_META_KEY,
    SCALED_NODES_META_KEY,
    Controller,
    ControllerConfig,
)
from planner.plan import Instance, Plan, ReplicaSpec, Route
from planner.state import NodeRecord, ReplicaRecord, StateStore
from provisioner.base import NodeRequest, Provisioner, ProvisionError
from provisioner.budget import BudgetLedger
from provisioner.catalog import Catalog, default_local_catalog_path

BUDGET = 2.0
SPOT_L4 = 0.22


class RecordOnlyProvisioner(Provisioner):
    """Nodes as records only. ``auto_ready``: a node turns ready as soon as it is acquired."""

    ref_prefix = "fake:"

    def __init__(self, state: StateStore, *, auto_ready: bool = True, unservable: tuple[str, ...] = (),
                 lands: dict[str, tuple[str, str, bool, float]] | None = None) -> None:
        super().__init__(state, BudgetLedger(state))
        self.lands = lands or {}  # node id -> (cloud, region, spot, $/h) it launches with, whatever was asked
        self.catalog = Catalog.load(default_local_catalog_path())
        self.auto_ready = auto_ready
        self.unservable = set(unservable)
        self.acquired: list[str] = []
        self.released: list[str] = []
        self._bg: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        pass

    async def acquire(self, request: NodeRequest) -> NodeRecord:
        request.validate()
        await self._check_new_id(request.node_id)
        if request.node_id in self.unservable:
            raise ProvisionError(f"node {request.node_id}: no such instance type here")
        entry = self.catalog.get(request.instance_type)
        cloud, region, spot, price = self.lands.get(request.node_id, ("local", "local", request.spot,
                                                                      entry.price_for(request.spot)))
        record = NodeRecord(id=request.node_id, instance_type=entry.instance_type, gpu_type=entry.gpu_type,
                            gpu_count=entry.gpu_count, spot=spot, price_per_hour=price, region=region,
                            cloud=cloud, status="pending", provider_ref=self.ref_prefix)
        await self._reserve(record, price, "test double")
        self._requests[request.node_id] = request
        self.acquired.append(request.node_id)
        if self.auto_ready:
            task = asyncio.create_task(self.make_ready(request.node_id))
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)
        return record

    async def make_ready(self, node_id: str) -> None:
        await self._transition(node_id, "ready", "test double: up", release_budget=False,
                               agent_url=f"http://127.0.0.1:9/{node_id}")

    async def lose(self, node_id: str, kind: str = "preempted") -> None:
        await self._transition(node_id, kind, "test double: taken away", release_budget=True)  # type: ignore[arg-type]

    async def release(self, node_id: str, reason: str = "released") -> NodeRecord:
        self.released.append(node_id)
        return (await self._transition(node_id, "terminated", reason, release_budget=True)).record

    async def close(self, release_nodes: bool = True) -> None:
        for t in list(self._bg):
            t.cancel()
        self._close_hub()


class RecordingAgent:
    """Does what a node agent does to Redis when asked to start, stop or switch a replica."""

    def __init__(self, state: StateStore, node_id: str) -> None:
        self.state, self.node_id = state, node_id

    async def start_replica(self, body: dict[str, Any]) -> dict[str, Any]:
        url = f"http://127.0.0.1:9/{body['id']}"
        await self.state.put_replica(ReplicaRecord(id=body["id"], node_ids=[self.node_id], role=body["role"],
                                                   url=url, status="ready"))
        return {"id": body["id"], "url": url}

    async def stop_replica(self, replica_id: str) -> dict[str, Any]:
        return {"id": replica_id}

    async def switch_role(self, replica_id: str, role: str, drain: bool = True, timeout_s: float = 30) -> Any:
        await self.state.modify_replica(replica_id, lambda r: setattr(r, "role", role))
        return {"success": True}

    async def close(self) -> None:
        pass


class TestController(Controller):
    __test__ = False

    def _agent(self, node: NodeRecord) -> Any:
        return RecordingAgent(self.state, node.id)


def four_node_plan() -> Plan:
    """Two prefill and two decode replicas of SmolLM2 on four spot L4 nodes (what `tsctl up --local` rents)."""
    instances = [Instance(f"n{i}", "local-L4", "L4", 1, True, SPOT_L4, "local", "local") for i in range(4)]
    replicas = [ReplicaSpec(f"r{i}", [f"n{i}"], [(f"n{i}", 0)], 1, 1, "prefill" if i % 2 == 0 else "decode", [30])
                for i in range(4)]
    routing = [Route(p, d, 0.25, "none") for p in ("r0", "r2") for d in ("r1", "r3")]
    plan = Plan("smollm2", instances, replicas, routing, strategy="test")
    plan.validate(BUDGET)
    return plan


def config(**overrides: Any) -> ControllerConfig:
    base: dict[str, Any] = {"model": "smollm2", "budget": BUDGET, "provider": "local", "engine_model": "emulated",
                            "rate": 1.0, "ttft_s": 5.0, "tpot_s": 0.5, "replace_retry_s": 0.1}
    return ControllerConfig(**{**base, **overrides})


@pytest.fixture
async def fresh(redis_url: str) -> AsyncIterator[Callable[[type[StateStore]], StateStore]]:
    """Make StateStores (of any subclass) on one fresh deployment namespace; the plan and budget are set."""
    deployment = f"c{uuid.uuid4().hex[:8]}"
    clients: list[aioredis.Redis] = []

    def make(cls: type[StateStore] = StateStore) -> StateStore:
        client = aioredis.from_url(redis_url)
        clients.append(client)
        return cls(client, deployment)

    seed = make()
    await BudgetLedger(seed).set_limit(BUDGET)
    await seed.publish_plan(four_node_plan())
    yield make
    await seed.wipe()
    for c in clients:
        await c.aclose()


class Running:
    """A controller running in the background until ``stop()``."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(controller.run(self.stop_event))

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 20)
        await self.controller.provisioner.close(release_nodes=False)


async def eventually(check: Callable[[], Awaitable[Any]], what: str, within_s: float = 20.0) -> Any:
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def all_replicas_ready(state: StateStore, n: int = 4) -> bool:
    return sum(r.status == "ready" for r in (await state.replicas()).values()) >= n


async def plan_has(state: StateStore, node_id: str) -> bool:
    plan = await state.get_plan()
    return plan is not None and node_id in {i.id for i in plan.instances}


async def event_kinds(state: StateStore) -> list[str]:
    return [e.kind for e in await state.events()]


async def test_successor_keeps_and_folds_in_a_replacement_its_predecessor_was_renting(fresh: Any) -> None:
    state = fresh()
    prov_a = RecordOnlyProvisioner(state)
    a = Running(TestController(state, prov_a, config(), tick_s=0.05, owner="a"))
    await eventually(lambda: all_replicas_ready(state), "the first replicas")
    prov_a.auto_ready = False  # the replacement stays pending while the controller changes hands
    await prov_a.lose("n1")
    await eventually(lambda: state.get_node("n1-r1"), "the replacement to be asked for")
    await a.stop()
    assert not await plan_has(state, "n1") and not await plan_has(state, "n1-r1")
    assert (await state.meta())[REPLACEMENTS_META_KEY] == {"n1": "n1-r1"}

    prov_b = RecordOnlyProvisioner(state)
    b = Running(TestController(state, prov_b, config(), tick_s=0.05, owner="b"))
    await eventually(lambda: event_kinds(state), "b to start")
    await asyncio.sleep(0.5)  # several reconcile passes with n1-r1 pending and not in the plan
    assert "n1-r1" not in prov_b.released
    await prov_b.make_ready("n1-r1")
    await eventually(lambda: plan_has(state, "n1-r1"), "the replacement folded into the plan")
    await eventually(lambda: all_replicas_ready(state), "a replica on the replacement")
    await eventually(lambda: _no_replacements_recorded(state), "the replacement record to be cleared")
    await b.stop()
    assert "n1-r1" not in prov_b.released


async def _no_replacements_recorded(state: StateStore) -> bool:
    return (await state.meta()).get(REPLACEMENTS_META_KEY) == {}


class CrashesAfterReschedule(TestController):
    """Dies (stops acting) right after publishing the reschedule, before asking for a replacement."""

    def _start_replacement(self, lost_id: str) -> None:
        pass


async def test_successor_replaces_a_loss_its_predecessor_only_rescheduled(fresh: Any) -> None:
    state = fresh()
    prov_a = RecordOnlyProvisioner(state)
    a = Running(CrashesAfterReschedule(state, prov_a, config(), tick_s=0.05, owner="a"))
    await eventually(lambda: all_replicas_ready(state), "the first replicas")
    await prov_a.lose("n1")
    await eventually(lambda: _kinds_include(state, "reschedule"), "the reschedule")
    await a.stop()
    assert await state.get_node("n1-r1") is None

    prov_b = RecordOnlyProvisioner(state)
    b = Running(TestController(state, prov_b, config(), tick_s=0.05, owner="b"))
    await eventually(lambda: plan_has(state, "n1-r1"), "the successor to replace n1")
    await b.stop()


async def _kinds_include(state: StateStore, kind: str) -> bool:
    return kind in await event_kinds(state)


async def test_refused_replacement_is_asked_for_again_when_budget_frees(fresh: Any) -> None:
    state = fresh()
    ledger = BudgetLedger(state)
    prov = RecordOnlyProvisioner(state)
    c = Running(TestController(state, prov, config(), tick_s=0.05))
    await eventually(lambda: all_replicas_ready(state), "the first replicas")
    await ledger.set_limit(3 * SPOT_L4 + 0.01)  # room for the survivors only
    await prov.lose("n1")
    await eventually(lambda: _kinds_include(state, "replacement.refused"), "the refusal")
    await asyncio.sleep(0.3)  # retries in the meantime are refused too
    assert await state.get_node("n1-r1") is None
    await ledger.set_limit(BUDGET)
    await eventually(lambda: plan_has(state, "n1-r1"), "the replacement once the budget allows it")
    await c.stop()
    assert await ledger.committed() <= BUDGET


async def test_replacement_that_fails_to_come_up_is_itself_replaced(fresh: Any) -> None:
    state = fresh()
    prov = RecordOnlyProvisioner(state)
    c = Running(TestController(state, prov, config(), tick_s=0.05))
    await eventually(lambda: all_replicas_ready(state), "the first replicas")
    prov.auto_ready = False
    await prov.lose("n1")
    await eventually(lambda: state.get_node("n1-r1"), "the first replacement")
    prov.auto_ready = True
    await prov.lose("n1-r1", kind="failed")  # e.g. its agent never answered
    await eventually(lambda: plan_has(state, "n1-r2"), "a second replacement folded in")
    await c.stop()
    assert not await plan_has(state, "n1-r1")


async def test_a_node_that_cannot_be_had_does_not_stop_the_rest(fresh: Any) -> None:
    state = fresh()
    prov = RecordOnlyProvisioner(state, unservable=("n3",))
    c = Running(TestController(state, prov, config(), tick_s=0.05))
    await eventually(lambda: all_replicas_ready(state, 3), "replicas on the nodes that could be had")
    await asyncio.sleep(0.3)
    await c.stop()
    assert (await event_kinds(state)).count("node.acquire_failed") == 1  # said once, not every pass


class FlakyRedis(StateStore):
    """Redis answers until ``down`` is set (then lease calls fail), or fails the next plan publish."""

    down = False
    fail_publish = 0

    async def acquire_leader(self, owner: str, ttl_s: float = 5.0) -> bool:
        if self.down:
            raise ConnectionError("Redis is unreachable")
        return await super().acquire_leader(owner, ttl_s)

    async def publish_plan(self, plan: Plan) -> int:
        if self.fail_publish:
            self.fail_publish -= 1
            raise ConnectionError("Redis is unreachable")
        return await super().publish_plan(plan)


async def test_controller_steps_down_when_it_cannot_renew_its_lease(fresh: Any) -> None:
    state = fresh(FlakyRedis)
    prov = RecordOnlyProvisioner(state)
    controller = TestController(state, prov, config(), tick_s=0.05, lease_ttl_s=0.5)
    stop = asyncio.Event()
    task = asyncio.create_task(controller.run(stop))
    await eventually(lambda: all_replicas_ready(state), "the first replicas")
    state.down = True  # type: ignore[attr-defined]
    try:
        await asyncio.wait_for(asyncio.shield(task), 5)  # it stops acting on its own, before the lease expires
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        await prov.close()
    assert controller.lease_lost.is_set()


async def test_a_loss_whose_reschedule_could_not_be_published_is_handled_again(fresh: Any) -> None:
    state = fresh(FlakyRedis)
    prov = RecordOnlyProvisioner(state)
    c = Running(TestController(state, prov, config(), tick_s=0.05))
    await eventually(lambda: all_replicas_ready(state), "the first replicas")
    state.fail_publish = 1  # type: ignore[attr-defined]
    await prov.lose("n1")
    await eventually(lambda: _not_planned(state, "n1"), "a plan without n1 after all")
    await eventually(lambda: plan_has(state, "n1-r1"), "its replacement")
    await c.stop()


async def _not_planned(state: StateStore, node_id: str) -> bool:
    return not await plan_has(state, node_id)


class FoldsInDuringReconcile(StateStore):
    """Simulates a replacement being folded in while a reconcile pass awaits Redis."""

    hook: Callable[[], None] | None = None

    async def replicas(self) -> dict[str, ReplicaRecord]:
        found = await super().replicas()
        if self.hook is not None:
            hook, self.hook = self.hook, None
            hook()
        return found


async def test_reconcile_does_not_release_a_node_folded_in_during_the_pass(fresh: Any) -> None:
    state = fresh(FoldsInDuringReconcile)
    prov = RecordOnlyProvisioner(state)
    controller = TestController(state, prov, config(), tick_s=0.05)
    old = four_node_plan()
    controller.plan = old
    await prov.acquire(NodeRequest("n4", instance_type="local-L4"))  # the replacement, ready and awaited
    await eventually(lambda: _status_is(state, "n4", "ready"), "n4 ready")
    controller._replacing["n1"] = "n4"
    new = four_node_plan()
    new.instances.append(Instance("n4", "local-L4", "L4", 1, True, SPOT_L4, "local", "local"))

    def fold_in_now() -> None:  # what fold_in does: publish the plan with the node, then drop the record
        controller.plan = new
        controller._replacing.pop("n1")

    state.hook = fold_in_now  # type: ignore[attr-defined]
    await controller.reconcile()
    await asyncio.gather(*controller._tasks, return_exceptions=True)
    assert "n4" not in prov.released
    await prov.close()


async def _status_is(state: StateStore, node_id: str, status: str) -> bool:
    rec = await state.get_node(node_id)
    return rec is not None and rec.status == status


def test_a_local_replacement_is_planned_in_the_same_place_as_the_node_it_replaces() -> None:
    """The local provisioner records every node (replacements too) in cloud and region ``local``; the
    plan's instances must say the same, or a replacement looks like a node behind a slow cross-cloud
    link and the re-plan routes almost nothing to it (it once got 0.14% of the traffic)."""
    from planner.controller import plan_for_config
    from planner.reschedule import reschedule

    cfg = ControllerConfig(model="smollm2", budget=2.0, provider="local", disaggregate=True, ttft_s=5.0, tpot_s=0.5,
                           max_nodes=4, plan_time_limit_s=0)
    plan = plan_for_config(cfg)
    assert {(i.cloud, i.region) for i in plan.instances} == {("local", "local")}
    victim = next(i for i in plan.instances
                  if any(r.role == "decode" and i.id in r.node_ids for r in plan.replicas))
    shrunk, _ = reschedule(plan, lost_nodes=[victim.id])
    # what Controller.fold_in builds from the provisioner's record of the replacement
    new = Instance(victim.id + "-r1", victim.instance_type, victim.gpu_type, victim.gpu_count, victim.spot,
                   victim.price_per_hour, "local", "local")
    healed, _ = reschedule(shrunk, new_instances=[new])
    on_new = {r.id for r in healed.replicas if new.id in r.node_ids}
    share = sum(r.weight for r in healed.routing if r.prefill in on_new or r.decode in on_new)
    assert share >= 0.25, healed.routing
    assert healed.expected["goodput_rps"] >= 0.99 * plan.expected["goodput_rps"]


async def test_a_node_that_runs_somewhere_else_than_planned_is_planned_where_it_runs(fresh: Any) -> None:
    """n3 launched in another cloud's region, on-demand (a failover): the controller re-plans once with
    n3 where it runs, at its price, and keeps every replica where it is."""
    state = fresh()
    prov = RecordOnlyProvisioner(state, lands={"n3": ("lambda", "us-west-1", False, 0.4)})
    ctl = Running(TestController(state, prov, config(), tick_s=0.05))
    await eventually(lambda: all_replicas_ready(state), "the replicas")

    async def n3_as_it_runs() -> Instance | None:
        plan = await state.get_plan()
        n3 = next(i for i in plan.instances if i.id == "n3") if plan else None
        return n3 if n3 is not None and n3.region == "us-west-1" else None

    n3 = await eventually(n3_as_it_runs, "the plan to say where n3 runs")
    assert (n3.cloud, n3.spot, n3.price_per_hour) == ("lambda", False, 0.4)
    await asyncio.sleep(0.5)  # ten more passes: the plan now matches, nothing to re-plan again
    plan = await state.get_plan()
    assert plan is not None
    assert {i.id: (i.cloud, i.region) for i in plan.instances if i.id != "n3"} == {f"n{i}": ("local", "local")
                                                                                for i in range(3)}
    assert {r.id: r.gpus for r in plan.replicas} == {r.id: r.gpus for r in four_node_plan().replicas}
    replans = [e for e in await state.events() if e.kind == "replan"]
    assert len(replans) == 1 and replans[0].data["moved"] == ["n3"]
    assert "n3 runs lambda/us-west-1 on-demand $0.40/h, planned local/local spot $0.22/h" in replans[0].reason
    await ctl.stop()


class HoldingAgent(RecordingAgent):
    """Like ``RecordingAgent``, but the replicas named in ``held`` stay ``starting`` (an engine still loading)."""

    held: ClassVar[set[str]] = set()

    async def start_replica(self, body: dict[str, Any]) -> dict[str, Any]:
        out = await super().start_replica(body)
        if body["id"] in self.held:
            await self.state.modify_replica(body["id"], lambda r: setattr(r, "status", "starting"))
        return out


class HoldingController(Controller):
    __test__ = False

    def _agent(self, node: NodeRecord) -> Any:
        return HoldingAgent(self.state, node.id)


async def test_a_role_switch_that_would_leave_nothing_to_serve_waits_for_the_replica_taking_over(fresh: Any) -> None:
    """Make before break. After the decode nodes were lost, r0 stands in as decode; the plan that folds in
    the replacement gives r0 back to prefill and the new r4 the decode role. While r4 is still starting,
    switching r0 would leave no decode replica at all: r0 keeps decoding until r4 is ready, then switches."""
    state = fresh()
    prov = RecordOnlyProvisioner(state)
    ctl = HoldingController(state, prov, config(), tick_s=0.05)
    n = [Instance(f"n{i}", "local-L4", "L4", 1, True, SPOT_L4, "local", "local") for i in (0, 2, 4)]
    plan = Plan("smollm2", n, [ReplicaSpec("r0", ["n0"], [("n0", 0)], 1, 1, "prefill", [30]),
                               ReplicaSpec("r2", ["n2"], [("n2", 0)], 1, 1, "prefill", [30]),
                               ReplicaSpec("r4", ["n4"], [("n4", 0)], 1, 1, "decode", [30])],
                [Route("r0", "r4", 0.5, "none"), Route("r2", "r4", 0.5, "none")], strategy="test")
    plan.validate(BUDGET)
    await state.publish_plan(plan)
    ctl.plan = plan
    await state.put_replica(ReplicaRecord(id="r0", node_ids=["n0"], role="decode", url="http://127.0.0.1:9/r0",
                                          status="ready"))
    await state.put_replica(ReplicaRecord(id="r2", node_ids=["n2"], role="prefill", url="http://127.0.0.1:9/r2",
                                          status="ready"))
    HoldingAgent.held = {"r4"}

    async def passes(n: int) -> None:
        for _ in range(n):
            await ctl.reconcile()
            await asyncio.sleep(0.05)

    try:
        async def r4_starting() -> bool:
            await passes(1)
            rec = (await state.replicas()).get("r4")
            return rec is not None and rec.status == "starting"

        await eventually(r4_starting, "r4 to be starting on its new node")
        await passes(10)
        replicas = await state.replicas()
        assert replicas["r0"].role == "decode", "r0 switched while r4 was still starting"
        assert "role_switch" not in await event_kinds(state)
        await state.modify_replica("r4", lambda r: setattr(r, "status", "ready"))

        async def r0_back_to_prefill() -> bool:
            await passes(1)
            return (await state.replicas())["r0"].role == "prefill"

        await eventually(r0_back_to_prefill, "r0 to switch back to prefill once r4 is ready")
    finally:
        HoldingAgent.held = set()
        for t in list(ctl._tasks):
            t.cancel()
        await prov.close(release_nodes=False)


async def test_a_controller_whose_redis_is_gone_backs_off(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Its deployment torn down under it (Redis gone for good), a controller retried every second, forever,
    logging each time (an orphan wrote 1.4 MB in 90 minutes). The pause now doubles: 1 s, 2 s, 4 s ..."""
    import logging
    import socket

    from planner import controller as ctl_module

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    caplog.set_level(logging.WARNING, logger="planner.controller")
    task = asyncio.create_task(ctl_module.serve(dead, "gone", config(workdir=str(tmp_path))))
    await asyncio.sleep(3.5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    lines = [r.getMessage() for r in caplog.records]
    pauses = [m.rsplit(" in ", 1)[1] for m in lines if "take the controller lease" in m]
    assert pauses[:2] == ["1 s", "2 s"] and len(pauses) <= 3, pauses


async def _observe(state: StateStore, requests: int, prompt: float, output: float, ago_s: float = 15.0) -> None:
    """What gateways would record after ``requests`` requests of these mean lengths (10% spread)."""
    import time

    await state.record_workload({"requests": requests, "input_sum": prompt * requests,
                                 "input_sq": 1.01 * prompt * prompt * requests, "output_sum": output * requests,
                                 "output_sq": 1.01 * output * output * requests}, now=time.time() - ago_s)


async def test_a_workload_shift_flips_roles_for_the_observed_mix_and_later_plans_plan_for_it(fresh: Any) -> None:
    """The plan was made for 256-token prompts and 64-token outputs (2 prefill, 2 decode); the gateways now see
    32-token prompts and 512-token outputs. The controller reschedules for that mix (a prefill replica becomes a
    decode one: +50% goodput on the estimate), publishes it, switches the replica, and from then on plans for the
    observed workload; the same mix seen again is no new shift."""
    state = fresh()
    c = Running(TestController(state, RecordOnlyProvisioner(state), config(workload_check_s=0), tick_s=0.05))
    await eventually(lambda: all_replicas_ready(state), "the replicas")
    version = (await state.get_plan()).version
    await _observe(state, 200, 32, 512)
    assert await c.controller.check_workload() == "workload_shift"
    plan = await state.get_plan()
    assert plan.version == version + 1
    assert sorted(r.role for r in plan.replicas) == ["decode", "decode", "decode", "prefill"]
    assert plan.workload["trace"].startswith("observed: 200 requests")
    assert plan.workload["output"]["mean"] == pytest.approx(512)
    shifted = [e for e in await state.events() if e.kind == "workload_shift"][-1]
    assert "mean prompt 256 -> 32 tokens, mean output 64 -> 512 tokens" in shifted.reason
    assert shifted.data["gain"] > 0.1 and shifted.data["goodput_after"] > shifted.data["goodput_kept"]

    async def switched() -> bool:
        return sorted(r.role for r in (await state.replicas()).values()) == ["decode", "decode", "decode", "prefill"]

    await eventually(switched, "the flipped replica to switch role")
    assert c.controller._workload()[0].mean_output == pytest.approx(512, rel=0.01)
    assert await c.controller.check_workload() is None  # the plan's own (observed) mix: no shift
    await c.stop()


async def test_a_shift_that_does_not_pay_keeps_the_plan_and_is_not_solved_again(fresh: Any) -> None:
    """Prompts twice as long (past the 1.5x ratio) but the same phases stay best: the plan is kept, said once;
    a window with too few requests says nothing."""
    state = fresh()
    c = Running(TestController(state, RecordOnlyProvisioner(state), config(workload_check_s=0), tick_s=0.05))
    await eventually(lambda: all_replicas_ready(state), "the replicas")
    version = (await state.get_plan()).version
    await _observe(state, 10, 32, 512)
    assert await c.controller.check_workload() is None  # 10 < workload_min_requests
    await _observe(state, 190, 1024, 64, ago_s=25)  # 200 in the window, mean prompt ~980: past 1.5x of 256
    assert await c.controller.check_workload() == "workload_shift.kept"
    assert await c.controller.check_workload() is None  # the same mix: not re-solved
    assert (await state.get_plan()).version == version
    kept = [e for e in await state.events() if e.kind == "workload_shift.kept"]
    assert len(kept) == 1 and "plan kept" in kept[0].reason and kept[0].data["gain"] < 0.1
    await c.stop()


async def test_the_controller_says_when_the_live_slo_is_missed_and_when_it_is_met_again(fresh: Any) -> None:
    """The gateways judged 100 requests and 70 met the SLO (under the 90% target): one ``slo.missed`` event with
    the served rate against the plan's expected goodput, not repeated while it lasts; 1,000 more that met it lift
    the window to 97%: one ``slo.met``. Too few judged requests say nothing."""
    import time

    state = fresh()
    plan = four_node_plan()
    plan.expected["goodput_rps"] = 0.5
    await state.publish_plan(plan)
    c = Running(TestController(state, RecordOnlyProvisioner(state), config(workload_check_s=0), tick_s=0.05))

    async def planned() -> bool:
        return c.controller.plan is not None

    await eventually(planned, "the controller's plan")
    judged = {"requests": 10, "judged": 10, "slo_met": 5, "ttft_6": 10}
    await state.record_workload(judged, now=time.time() - 25)
    assert await c.controller.check_slo() is None  # 10 < workload_min_requests
    await state.record_workload({"requests": 90, "judged": 90, "slo_met": 65, "ttft_7": 90}, now=time.time() - 25)
    assert await c.controller.check_slo() == "slo.missed"
    assert await c.controller.check_slo() is None  # still missed: said once
    missed = [e for e in await state.events() if e.kind == "slo.missed"]
    assert len(missed) == 1 and missed[0].data["attainment"] == pytest.approx(0.7)
    assert "70.0% of 100 requests" in missed[0].reason and "TTFT 5s and TPOT 0.5s (target 90%)" in missed[0].reason
    assert "serving 0.83 req/s, over the plan's expected goodput of 0.50" in missed[0].reason
    assert missed[0].data["ttft_p90_at_most_s"] == 2.0
    await state.record_workload({"requests": 1000, "judged": 1000, "slo_met": 1000, "ttft_3": 1000},
                                now=time.time() - 15)
    assert await c.controller.check_slo() == "slo.met"
    met = [e for e in await state.events() if e.kind == "slo.met"]
    assert len(met) == 1 and met[0].data["attainment"] == pytest.approx(1070 / 1100, abs=1e-4)
    await c.stop()


async def _missed(state: StateStore, c: Running) -> None:
    """The gateways judged 100 requests of short chats, 50 within the SLO: the controller sees the miss."""
    import time

    await state.record_workload({"requests": 100, "input_sum": 4000, "input_sq": 1.01 * 40 * 40 * 100,
                                 "output_sum": 2400, "output_sq": 1.01 * 24 * 24 * 100, "judged": 100, "slo_met": 50},
                                now=time.time() - 15)
    assert await c.controller.check_slo() == "slo.missed"


async def test_a_missed_slo_rents_the_instance_adding_most_goodput_per_dollar_and_folds_it_in(fresh: Any) -> None:
    """With --scale-up, a missed SLO rents one more node within the budget and --max-nodes (the four L4s are the
    catalog's capacity, so another type), folds it in once ready (a replica on it, routing re-solved), and waits
    out the cooldown; with --max-nodes reached it says so, once."""
    state = fresh()
    cfg = config(workload_check_s=0, scale_up=True, scale_up_cooldown_s=0.0, max_nodes=5)
    c = Running(TestController(state, RecordOnlyProvisioner(state), cfg, tick_s=0.05))
    await eventually(lambda: all_replicas_ready(state), "the replicas")
    await _missed(state, c)
    assert await c.controller.check_scale_up() == "scale_up"
    decided = [e for e in await state.events() if e.kind == "scale_up"][-1]
    assert decided.data["node"] == "n4" and decided.data["instance_type"] != "local-L4"
    assert decided.data["goodput_after"] > decided.data["goodput_now"]
    assert decided.data["price_per_hour"] <= BUDGET - 4 * SPOT_L4

    async def folded() -> bool:
        plan = await state.get_plan()
        return plan is not None and "n4" in {i.id for i in plan.instances} and \
            any("n4" in r.node_ids for r in plan.replicas) and not (await state.meta()).get(SCALE_UPS_META_KEY)

    await eventually(folded, "the new node folded into the plan")
    replan = [e for e in await state.events() if e.kind == "replan"][-1]
    assert "scale-up for the SLO: n4" in replan.reason
    await eventually(lambda: all_replicas_ready(state, 5), "the new node's replica")
    assert await c.controller.check_scale_up() == "scale_up.refused"  # 5 GPUs: --max-nodes reached
    refused = [e for e in await state.events() if e.kind == "scale_up.refused"]
    assert len(refused) == 1 and "0 GPU(s) left of --max-nodes" in refused[0].reason
    assert await c.controller.check_scale_up() is None  # said once
    await c.stop()


async def test_no_scale_up_without_the_flag_without_a_miss_or_in_the_cooldown(fresh: Any) -> None:
    state = fresh()
    c = Running(TestController(state, RecordOnlyProvisioner(state),
                               config(workload_check_s=0, scale_up=True, max_nodes=6), tick_s=0.05))
    await eventually(lambda: all_replicas_ready(state), "the replicas")
    assert await c.controller.check_scale_up() is None  # no miss seen
    await _missed(state, c)
    assert await c.controller.check_scale_up() == "scale_up"
    await eventually(lambda: all_replicas_ready(state, 5), "the new node's replica")
    assert await c.controller.check_scale_up() is None  # within the 120 s cooldown
    await c.stop()


async def test_a_scale_up_left_by_a_stopped_controller_is_folded_in_by_the_next(fresh: Any) -> None:
    """The node being rented is recorded in Redis before it is asked for; a successor finishes the job instead
    of releasing it as a node the plan does not have."""
    state = fresh()
    inst = Instance("n4", "local-T4", "T4", 1, True, 0.16, "local", "local")
    await state.set_meta(**{SCALE_UPS_META_KEY: {"n4": {**inst.__dict__}}})
    c = Running(TestController(state, RecordOnlyProvisioner(state), config(workload_check_s=0), tick_s=0.05))

    async def folded() -> bool:
        plan = await state.get_plan()
        return plan is not None and "n4" in {i.id for i in plan.instances}

    await eventually(folded, "the recorded scale-up folded in")
    assert c.controller.provisioner.acquired.count("n4") == 1 and "n4" not in c.controller.provisioner.released
    await c.stop()


async def test_the_node_a_scale_up_rented_is_given_back_once_the_slo_is_met_with_room(fresh: Any) -> None:
    """After a scale-up, a window met with room (99% within, p90 TTFT far under half the target) gives the
    newest scaled node back: a plan without it first, then its replica stopped and the node released; the four
    nodes of the original plan stay, and nothing more is given back."""
    import time

    state = fresh()
    prov = RecordOnlyProvisioner(state)
    cfg = config(workload_check_s=0, scale_up=True, scale_up_cooldown_s=0.0, scale_down_after_s=0.0, max_nodes=5)
    c = Running(TestController(state, prov, cfg, tick_s=0.05))
    await eventually(lambda: all_replicas_ready(state), "the replicas")
    await _missed(state, c)
    assert await c.controller.check_scale_down() is None  # missed: no room
    assert await c.controller.check_scale_up() == "scale_up"
    await eventually(lambda: all_replicas_ready(state, 5), "the new node's replica")
    assert (await state.meta())[SCALED_NODES_META_KEY] == ["n4"]
    await state.record_workload({"requests": 5000, "input_sum": 200000, "input_sq": 1.01 * 40 * 40 * 5000,
                                 "output_sum": 120000, "output_sq": 1.01 * 24 * 24 * 5000, "judged": 5000,
                                 "slo_met": 5000, "ttft_0": 5000}, now=time.time() - 15)
    assert await c.controller.check_slo() == "slo.met"
    assert await c.controller.check_scale_down() == "scale_down"
    event = [e for e in await state.events() if e.kind == "scale_down"][-1]
    assert event.data["removed"] == ["n4"] and "giving back n4" in event.reason

    async def given_back() -> bool:
        plan = await state.get_plan()
        return "n4" in prov.released and "n4" not in {i.id for i in plan.instances} and \
            not any("n4" in r.node_ids for r in (await state.replicas()).values())

    await eventually(given_back, "n4 released and its replica stopped")
    assert sorted(i.id for i in (await state.get_plan()).instances) == ["n0", "n1", "n2", "n3"]
    assert not prov.released[:-1] and (await state.meta())[SCALED_NODES_META_KEY] == []
    assert await c.controller.check_scale_down() is None  # nothing scaled left
    await c.stop()


async def test_a_scale_down_waits_for_an_engine_that_still_holds_a_request() -> None:
    """The drain asks the engine itself (SGLang's /get_load): busy while a 2 s answer runs, idle after; an engine
    that does not answer holds nothing to wait for."""
    import aiohttp

    from planner.controller import _holding
    from replicas.process import EngineProcess

    engine = EngineProcess("emulated", role="both", extra_args=["--emulate-decode-ms-per-step", "50"])
    await engine.astart()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            assert not await _holding(http, [engine.url, "http://127.0.0.1:9"])
            body = {"text": "hi", "sampling_params": {"max_new_tokens": 40, "ignore_eos": True}}
            answer = asyncio.create_task(http.post(engine.url + "/generate", json=body))
            await eventually(lambda: _holding(http, [engine.url]), "the engine to hold the request", 10)
            (await answer).release()
            assert not await _holding(http, [engine.url])
    finally:
        engine.stop()


async def test_a_successor_keeps_the_scale_up_cooldown(fresh: Any) -> None:
    """A controller restarted right after a scale-up sees the same miss but does not rent again before the
    cooldown (seen live: a restart rented a second node at once)."""
    state = fresh()
    cfg = config(workload_check_s=0, scale_up=True, max_nodes=6)
    a = Running(TestController(state, RecordOnlyProvisioner(state), cfg, tick_s=0.05, owner="a"))
    await eventually(lambda: all_replicas_ready(state), "the replicas")
    await _missed(state, a)
    assert await a.controller.check_scale_up() == "scale_up"
    await eventually(lambda: all_replicas_ready(state, 5), "the new node's replica")
    await a.stop()
    b = Running(TestController(state, RecordOnlyProvisioner(state), cfg, tick_s=0.05, owner="b"))

    async def resumed() -> bool:
        return b.controller._scaled_at > 0

    await eventually(resumed, "b to read the cooldown")
    assert await b.controller.check_slo() == "slo.missed"
    assert await b.controller.check_scale_up() is None
    await b.stop()
