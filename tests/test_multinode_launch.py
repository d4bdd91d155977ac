"""A replica over several nodes with SGLang: one process per node, by rank, and only rank 0 is the replica.

Controller side: what each node's agent is asked to run (rank, ``--dist-init-addr``, node list, that
node's GPUs), all or nothing, and a stop that reaches every node. The agents are ``RankRecorder``s, a
test double (sglang cannot run here) that records each request and writes the Redis record a real agent
writes (rank 0 only); each request is also put through the agent's own parser and SGLang command
builder. Supervisor side: a follower rank serves no HTTP, so it is ready while its process lives, is never
restarted for failed probes, and writes no replica record. Real Redis throughout; no GPU, no sglang.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from planner.controller import Controller, ControllerConfig, dist_init_port
from planner.plan import Instance, Plan, ReplicaSpec
from planner.state import NodeRecord, ReplicaRecord, StateStore
from replicas.agent import NodeAgent
from replicas.agent_client import AgentError
from replicas.replica_spec import ReplicaRequest, parse_replica_request
from replicas.supervisor import ManagedReplica, SupervisorConfig

NODES = ("n0", "n1", "n2")
HOSTS = {"n0": "10.0.0.1", "n1": "10.0.0.2", "n2": "10.0.0.3"}
# r7 spans three 4-GPU nodes, two GPUs on each (TP 2 x PP 3); r8 is a one-node replica next to it on n2
MULTI = ReplicaSpec("r7", list(NODES), [("n0", 0), ("n0", 1), ("n1", 0), ("n1", 1), ("n2", 2), ("n2", 3)], 2, 3,
                    "both", [10, 10, 10])
SINGLE = ReplicaSpec("r8", ["n2"], [("n2", 0)], 1, 1, "both", [30])


def plan(*replicas: ReplicaSpec) -> Plan:
    instances = [Instance(n, "local-L4x4", "L4", 4, True, 1.0, "local", "local") for n in NODES]
    return Plan("smollm2", instances, list(replicas), [], strategy="test")


def node(node_id: str, status: str = "ready") -> NodeRecord:
    return NodeRecord(id=node_id, instance_type="local-L4x4", gpu_type="L4", gpu_count=4, spot=True,
                      price_per_hour=1.0, status=status, agent_url=f"http://{HOSTS[node_id]}:8700")


class RankRecorder:
    """Test double of one node's agent: records requests in ``calls``; writes the record only for rank 0."""

    def __init__(self, state: StateStore, node_id: str, calls: list[tuple[str, str, Any]], fail: bool) -> None:
        self.state, self.node_id, self.calls, self.fail = state, node_id, calls, fail

    async def start_replica(self, body: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.01)  # a round trip: lets concurrent starts interleave as real ones would
        self.calls.append(("start", self.node_id, body))
        if self.fail:
            raise AgentError(409, f"GPU 0 is already used by replica r1 on {self.node_id}")
        req = parse_replica_request(body)  # what the real agent accepts, and the command it would run
        ManagedReplica(req, SupervisorConfig(node_id=self.node_id), _noop, _noop_event).command()
        if req.node_rank == 0:
            await self.state.put_replica(ReplicaRecord(id=req.id, node_ids=req.node_ids or [self.node_id],
                                                       role=req.role, url=f"http://{HOSTS[self.node_id]}:30000",
                                                       engine=req.engine, status="ready"))
        return {"id": req.id, "url": f"http://{HOSTS[self.node_id]}:30000" if req.node_rank == 0 else None}

    async def stop_replica(self, replica_id: str) -> dict[str, Any]:
        self.calls.append(("stop", self.node_id, replica_id))
        return {"id": replica_id}

    async def close(self) -> None:
        pass


class RecordingController(Controller):
    __test__ = False

    def __init__(self, state: StateStore, engine: str, failing: tuple[str, ...] = ()) -> None:
        super().__init__(state, None, ControllerConfig(model="smollm2", budget=10.0, engine=engine,
                                                       engine_model="/models/smollm2"))
        self.calls: list[tuple[str, str, Any]] = []
        self.failing = failing

    def _agent(self, node: NodeRecord) -> Any:
        return RankRecorder(self.state, node.id, self.calls, node.id in self.failing)

    async def settle(self) -> None:
        """Wait for the starts and stops the last reconcile pass spawned."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


async def _noop(_: Any) -> None:
    pass


async def _noop_event(*_: Any) -> None:
    pass


async def put_nodes(state: StateStore, *nodes: NodeRecord) -> None:
    for n in nodes:
        await state.put_node(n)


def starts(calls: list[tuple[str, str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(n, body) for kind, n, body in calls if kind == "start"]


async def test_sglang_replica_over_three_nodes_starts_one_rank_per_node_head_last(state: StateStore) -> None:
    await put_nodes(state, *(node(n) for n in NODES))
    c = RecordingController(state, "sglang")
    c.plan = plan(MULTI, SINGLE)
    await c.reconcile()
    await c.settle()
    multi = [(n, b) for n, b in starts(c.calls) if b["id"] == "r7"]
    assert [n for n, _ in multi][-1] == "n0"  # rank 0 (the HTTP server) after its followers
    assert sorted(n for n, _ in multi) == ["n0", "n1", "n2"]
    by_node = dict(multi)
    addr = f"10.0.0.1:{dist_init_port('r7')}"
    for rank, (n, gpus) in enumerate([("n0", [0, 1]), ("n1", [0, 1]), ("n2", [2, 3])]):
        body = by_node[n]
        assert body["gpus"] == gpus
        assert body["extra_args"] == {"nnodes": 3, "node_rank": rank, "node_ids": ["n0", "n1", "n2"],
                                      "dist_init_addr": addr, "layer_split": [10, 10, 10]}
        assert (body["engine"], body["tp"], body["pp"], body["role"]) == ("sglang", 2, 3, "both")
        req = parse_replica_request(body)
        argv, env = ManagedReplica(req, SupervisorConfig(node_id=n), _noop, _noop_event).command()
        assert argv[argv.index("--node-rank") + 1] == str(rank)
        assert argv[argv.index("--dist-init-addr") + 1] == addr
        assert argv[argv.index("--nnodes") + 1] == "3"
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, gpus))
        assert env["SGLANG_PP_LAYER_PARTITION"] == "10,10,10"
    single = [(n, b) for n, b in starts(c.calls) if b["id"] == "r8"]
    assert [n for n, _ in single] == ["n2"] and "extra_args" not in single[0][1]  # one node: unchanged
    records = await state.replicas()
    assert records["r7"].node_ids == ["n0", "n1", "n2"] and records["r7"].url == "http://10.0.0.1:30000"
    kinds = [e.kind for e in await state.events()]
    assert kinds.count("replica.started") == 2 and "replica.start_failed" not in kinds

    c.calls.clear()
    c.plan = plan(SINGLE)  # r7 leaves the plan: every rank stops, not only rank 0
    await c.reconcile()
    await c.settle()
    assert sorted(n for kind, n, rid in c.calls if kind == "stop" and rid == "r7") == ["n0", "n1", "n2"]
    assert "r7" not in await state.replicas()


async def test_a_node_not_ready_starts_no_rank(state: StateStore) -> None:
    await put_nodes(state, node("n0"), node("n1"), node("n2", status="pending"))
    c = RecordingController(state, "sglang")
    c.plan = plan(MULTI)
    await c.reconcile()  # the pass waits for the node, as for any replica
    await c.settle()
    assert c.calls == []


async def test_a_rank_that_fails_to_start_stops_the_others_and_the_head_never_starts(state: StateStore) -> None:
    await put_nodes(state, *(node(n) for n in NODES))
    c = RecordingController(state, "sglang", failing=("n2",))
    c.plan = plan(MULTI)
    await c.reconcile()
    await c.settle()
    assert sorted(n for n, _ in starts(c.calls)) == ["n1", "n2"]  # followers tried; rank 0 not started
    assert sorted(n for kind, n, _ in c.calls if kind == "stop") == ["n0", "n1", "n2"]
    assert await state.replicas() == {}
    assert "replica.start_failed" in [e.kind for e in await state.events()]


async def test_a_lost_node_stops_the_surviving_ranks_once(state: StateStore) -> None:
    await put_nodes(state, *(node(n) for n in NODES))
    c = RecordingController(state, "sglang")
    c.plan = before = plan(MULTI)
    await c.reconcile()
    await c.settle()
    await state.put_node(node("n2", status="preempted"))
    c.plan = Plan("smollm2", [i for i in before.instances if i.id != "n2"], [], [], strategy="test")
    await state.delete_replica("r7")  # as the reschedule does; then rank 0 on n0 writes it again as it fails
    await state.put_replica(ReplicaRecord(id="r7", node_ids=list(NODES), role="both", url="http://10.0.0.1:30000",
                                          engine="sglang", status="failed"))
    c.calls.clear()
    c._stop_survivors(before, ["r7"], ["n2"])
    await c.reconcile()  # the record is the survivors' stop's to remove, not this pass's
    await c.settle()
    assert sorted(n for kind, n, _ in c.calls if kind == "stop") == ["n0", "n1"]
    assert "r7" not in await state.replicas()
    assert "replica.stopped" not in [e.kind for e in await state.events()]


async def test_reference_engine_still_runs_a_multi_node_replica_on_the_head_only(state: StateStore) -> None:
    await put_nodes(state, *(node(n) for n in NODES))
    c = RecordingController(state, "reference")
    c.plan = plan(MULTI)
    await c.reconcile()
    await c.settle()
    assert [(n, b["gpus"], b["extra_args"]) for n, b in starts(c.calls)] == [
        ("n0", [0, 1], {"nnodes": 3, "layer_split": [10, 10, 10]})]


# -- supervisor ------------------------------------------------------------------------------------------
class Sleeper(ManagedReplica):
    """A replica whose engine is a process that lives and serves nothing (as an SGLang follower rank)."""

    def command(self) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, "-c", "import time; time.sleep(60)"], {}


def sleeper(agent: NodeAgent, node_rank: int, tmp_path: Path) -> Sleeper:
    req = ReplicaRequest(id="r7", model="/models/m", role="decode", engine="sglang", tp=1, pp=2, gpus=[0],
                         node_ids=["n0", "n1"], nnodes=2, node_rank=node_rank, dist_init_addr="10.0.0.1:20112")
    # probes so strict that a process without HTTP would be restarted well within the test's second
    cfg = SupervisorConfig(node_id=["n0", "n1"][node_rank], log_dir=tmp_path, health_interval_s=0.05,
                           health_failures=1, start_timeout_s=0.3, backoff_initial_s=0.05, backoff_max_s=0.1)
    return Sleeper(req, cfg, agent._publish, agent._event)


def agent_on(state: StateStore, node_id: str, tmp_path: Path) -> NodeAgent:
    return NodeAgent(state, SupervisorConfig(node_id=node_id, log_dir=tmp_path), "L4", 1, 6.0)


async def test_follower_rank_is_ready_while_alive_never_restarted_and_writes_no_record(
        state: StateStore, tmp_path: Path) -> None:
    rep = sleeper(agent_on(state, "n1", tmp_path), 1, tmp_path)
    rep.start()
    try:
        assert await rep.wait_ready(10.0)
        assert rep.proc is not None
        pid = rep.proc.pid
        await asyncio.sleep(1.0)  # > start timeout, 20 probe intervals
        assert (rep.status, rep.restarts, rep.proc.pid, rep.proc.returncode) == ("ready", 0, pid, None)
        listed = rep.to_json()
        assert (listed["url"], listed["node_rank"], listed["nnodes"]) == (None, 1, 2)  # rank shown, no URL
        status, answer = await rep.switch_role("prefill", drain=True, timeout_s=1.0)
        assert status == 409 and not answer["success"] and rep.role == "decode"
        assert await state.replicas() == {}  # the gateway routes by rank 0's record only
    finally:
        await rep.stop(timeout_s=5.0)
    assert rep.status == "stopped" and await state.replicas() == {}  # nor marks rank 0's record stopped


async def test_rank_zero_without_http_is_restarted_and_owns_the_record(state: StateStore, tmp_path: Path) -> None:
    """The control: the same silent process as rank 0 is probed over HTTP, so it never gets ready."""
    rep = sleeper(agent_on(state, "n0", tmp_path), 0, tmp_path)
    rep.start()
    try:
        assert not await rep.wait_ready(1.0)
        assert rep.restarts >= 1
        records = await state.replicas()
        assert records["r7"].node_ids == ["n0", "n1"] and records["r7"].status != "ready"
    finally:
        await rep.stop(timeout_s=5.0)
