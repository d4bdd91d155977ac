"""The node agent as a real process with real engines and a real Redis: replica lifecycle, records and
heartbeats in Redis, role switches (with drain), restart on crash, clean stop, and the process group."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from replicas_support import get, post

from planner.state import StateStore
from replicas.agent_client import AgentClient, AgentError

SLOW = ["--emulate-decode-ms-per-step", "5"]


class AgentProcess:
    def __init__(self, redis_url: str, deployment: str, node_id: str = "n0", new_session: bool = False) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="agent-test-")
        port_file = Path(self.dir.name) / "port"
        argv = [sys.executable, "-m", "replicas.agent", "--node-id", node_id, "--host", "127.0.0.1", "--port", "0",
                "--port-file", str(port_file), "--redis-url", redis_url, "--deployment", deployment,
                "--gpu-type", "cpu", "--gpu-count", "4", "--heartbeat-ttl", "1.5", "--health-interval-s", "0.3",
                "--restart-backoff-s", "0.2", "--log-dir", self.dir.name, "--log-level", "warning"]
        self.log = open(Path(self.dir.name) / "agent.log", "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=new_session)
        self.port_file = port_file
        self.url = ""

    async def ready(self) -> AgentProcess:
        for _ in range(600):
            assert self.proc.poll() is None, (Path(self.dir.name) / "agent.log").read_text()
            if self.port_file.exists() and self.port_file.read_text().strip():
                self.url = f"http://127.0.0.1:{self.port_file.read_text().strip()}"
                if (await get(self.url + "/health"))[0] == 200:
                    return self
            await asyncio.sleep(0.05)
        raise AssertionError("agent did not come up")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.dir.cleanup()


@pytest.fixture
async def agent(redis_url: str, state: StateStore) -> AsyncIterator[tuple[AgentProcess, AgentClient]]:
    proc = AgentProcess(redis_url, state.deployment)
    try:
        await proc.ready()
        async with AgentClient(proc.url) as client:
            yield proc, client
    finally:
        await asyncio.to_thread(proc.stop)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def _wait(predicate: Any, timeout_s: float = 30.0) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def test_replicas_serve_pd_and_are_recorded_in_redis(agent: tuple[AgentProcess, AgentClient],
                                                           state: StateStore) -> None:
    _, client = agent
    health = await client.health()
    assert health["node_id"] == "n0" and health["gpu_count"] == 4
    p = await client.start_replica(id="p0", engine="reference", model="emulated", role="prefill", tp=1, pp=1,
                                   gpus=[0], kv_compression="int8", wait_ready=True)
    d = await client.start_replica({"id": "d0", "model": "emulated", "role": "decode", "gpus": [1],
                                    "max_batch": 4, "wait_ready": True})
    assert p["status"] == "ready" and p["bootstrap_port"] and p["url"].startswith("http://127.0.0.1:")
    records = await state.replicas()
    assert {k: (r.role, r.status, r.url, r.node_ids, r.gpus) for k, r in records.items()} == {
        "p0": ("prefill", "ready", p["url"], ["n0"], [["n0", 0]]),
        "d0": ("decode", "ready", d["url"], ["n0"], [["n0", 1]]),
    }
    assert records["p0"].bootstrap_port == p["bootstrap_port"]
    await _wait(lambda: _true((state.alive(["n0"])), "n0"))
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 8, "temperature": 0},
            "bootstrap_host": "127.0.0.1", "bootstrap_port": p["bootstrap_port"], "bootstrap_room": 42}
    (ps, _), (ds, out) = await asyncio.gather(post(p["url"] + "/generate", body), post(d["url"] + "/generate", body))
    assert ps == 200 and ds == 200 and len(out["output_ids"]) == 8
    _, info = await get(d["url"] + "/server_info")
    assert info["max_running_requests"] == 4
    listed = {r["id"]: r for r in await client.replicas()}
    assert listed["p0"]["kv_compression"] == "int8" and listed["d0"]["status"] == "ready"
    assert p == listed["p0"]  # the start answer is the replica as listed
    stopped = await client.stop_replica("d0")
    assert stopped["status"] == "stopped" and not _alive(listed["d0"]["pid"])
    assert (await state.get_replica("d0")).status == "stopped"
    kinds = [e.kind for e in await state.events()]
    assert kinds.count("replica_started") == 2 and "replica_stopped" in kinds


async def _true(coro: Any, key: str) -> bool:
    return bool((await coro)[key])


async def test_bad_requests_are_refused_with_the_field(agent: tuple[AgentProcess, AgentClient]) -> None:
    proc, client = agent
    cases = [
        ({"id": "x", "model": "emulated", "role": "middle"}, 400, "role"),
        ({"id": "x y", "model": "emulated", "role": "both"}, 400, "id"),
        ({"id": "x", "model": "emulated", "role": "both", "gpus": [9]}, 400, "gpus"),
        ({"id": "x", "model": "emulated", "role": "both", "engine": "vllm"}, 400, "engine"),
        ({"id": "x", "model": "emulated", "role": "both", "extra_args": "--flag"}, 400, "extra_args"),
        ({"id": "x", "model": "m", "role": "prefill", "engine": "sglang", "tp": 2, "gpus": [0]}, 400, "gpus"),
    ]
    for body, status, param in cases:
        with pytest.raises(AgentError) as err:
            await client.start_replica(body)
        assert err.value.status == status and err.value.body["error"]["param"] == param, body
    await client.start_replica(id="a", model="emulated", role="both", gpus=[2])
    with pytest.raises(AgentError) as err:
        await client.start_replica(id="a", model="emulated", role="both")
    assert err.value.status == 409
    with pytest.raises(AgentError) as err:
        await client.start_replica(id="b", model="emulated", role="both", gpus=[2])
    assert err.value.status == 409 and "GPU 2" in err.value.message
    for call in (client.stop_replica("nope"), client.switch_role("nope", "decode")):
        with pytest.raises(AgentError) as err:
            await call
        assert err.value.status == 404
    status, body = await post(proc.url + "/replicas", None, raw=b"{bad")
    assert status == 400 and "JSON" in body["error"]["message"]


async def test_role_switch_through_the_agent_drains_first(agent: tuple[AgentProcess, AgentClient],
                                                          state: StateStore) -> None:
    _, client = agent
    p, d = await asyncio.gather(
        client.start_replica(id="p1", model="emulated", role="prefill", extra_args=SLOW, wait_ready=True),
        client.start_replica(id="d1", model="emulated", role="decode", extra_args=SLOW, wait_ready=True))
    # a request in flight on d1 (SGLang's fake host: served there alone) for ~0.5 s
    busy = asyncio.ensure_future(post(d["url"] + "/generate", {
        "text": "x", "sampling_params": {"max_new_tokens": 100, "ignore_eos": True},
        "bootstrap_host": "2.2.2.2", "bootstrap_room": 0}))
    await _wait(lambda: _running(d["url"]))
    with pytest.raises(AgentError) as err:
        await client.switch_role("d1", "prefill", drain=False)
    assert err.value.status == 409 and "not idle" in err.value.message
    assert (await client.replica("d1"))["status"] == "ready"
    res = await client.switch_role("d1", "prefill", drain=True, timeout_s=30)
    assert res["success"] and res["role"] == "prefill" and (await busy)[0] == 200  # it finished, then switched
    res = await client.switch_role("p1", "decode")
    assert res["success"] and res["old_role"] == "prefill"
    records = await state.replicas()
    assert (records["d1"].role, records["d1"].status, records["p1"].role) == ("prefill", "ready", "decode")
    body = {"text": "swap", "sampling_params": {"max_new_tokens": 6}, "bootstrap_host": "127.0.0.1",
            "bootstrap_port": records["d1"].bootstrap_port, "bootstrap_room": 7}
    (ps, _), (ds, out) = await asyncio.gather(post(d["url"] + "/generate", body), post(p["url"] + "/generate", body))
    assert ps == 200 and ds == 200 and len(out["output_ids"]) == 6
    assert [e.kind for e in await state.events()].count("role_switched") == 2


async def _running(url: str) -> bool:
    _, loads = await get(url + "/v1/loads")
    return loads["loads"][0]["num_running_reqs"] > 0


async def test_a_crashed_engine_is_restarted_with_its_role(agent: tuple[AgentProcess, AgentClient],
                                                           state: StateStore) -> None:
    _, client = agent
    rep = await client.start_replica(id="c0", model="emulated", role="decode", wait_ready=True)
    await client.switch_role("c0", "prefill")
    assert rep["pid"] > 0  # os.kill(0, ...) would signal this test's own process group
    os.kill(rep["pid"], signal.SIGKILL)

    async def restarted() -> bool:
        r = await client.replica("c0")
        return r["restarts"] == 1 and r["status"] == "ready"

    await _wait(restarted)
    now = await client.replica("c0")
    assert now["pid"] != rep["pid"] and now["url"] == rep["url"] and now["role"] == "prefill"
    _, info = await get(rep["url"] + "/server_info")
    assert info["disaggregation_mode"] == "prefill"  # relaunched in the role it had switched to
    failed = [e for e in await state.events() if e.kind == "replica_failed"]
    assert failed and "exited with code -9" in failed[0].reason
    assert (await state.get_replica("c0")).status == "ready"


async def test_an_engine_that_cannot_start_is_reported_failed(agent: tuple[AgentProcess, AgentClient],
                                                              state: StateStore) -> None:
    """engine=sglang on a machine without sglang: the launch line runs, fails, and is retried with backoff."""
    proc, client = agent
    await client.start_replica(id="s0", engine="sglang", model="meta-llama/Llama-3.1-8B-Instruct", role="prefill",
                               tp=2, gpus=[2, 3])

    async def failed_twice() -> bool:
        return (await client.replica("s0"))["restarts"] >= 2

    await _wait(failed_twice)
    log = (Path(proc.dir.name) / "replica-s0.log").read_text()
    assert "-m sglang.launch_server --model-path meta-llama/Llama-3.1-8B-Instruct" in log
    assert "--disaggregation-mode prefill" in log and "--enable-pd-role-switch" in log and "--tp-size 2" in log
    assert (await state.get_replica("s0")).status in ("failed", "starting")
    await client.stop_replica("s0")


async def test_sigterm_stops_every_engine_and_killpg_takes_the_node(redis_url: str, state: StateStore) -> None:
    for how in ("sigterm", "killpg"):
        proc = AgentProcess(redis_url, state.deployment, node_id=f"g-{how}", new_session=True)
        try:
            await proc.ready()
            async with AgentClient(proc.url) as client:
                reps = await asyncio.gather(*(client.start_replica(id=f"{how}{i}", model="emulated", role="both",
                                                                   wait_ready=True) for i in range(2)))
            pids = [r["pid"] for r in reps]
            assert all(os.getpgid(pid) == proc.proc.pid for pid in pids)  # the agent's group, no new session
            if how == "sigterm":
                proc.proc.terminate()
                assert await asyncio.to_thread(proc.proc.wait, 30) == 0
                records = await state.replicas()
                assert [records[f"{how}{i}"].status for i in range(2)] == ["stopped", "stopped"]
            else:
                os.killpg(proc.proc.pid, signal.SIGKILL)  # what a preemption does
                await asyncio.to_thread(proc.proc.wait, 30)
            await _wait(lambda pids=pids: _none_alive(pids))
        finally:
            await asyncio.to_thread(proc.stop)


async def _none_alive(pids: list[int]) -> bool:
    return not any(_alive(p) for p in pids)


def test_agent_cli_needs_its_arguments() -> None:
    out = subprocess.run([sys.executable, "-m", "replicas.agent", "--node-id", "n0"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "--redis-url" in out.stderr



def test_replica_request_parsing_and_launch_hints() -> None:
    from replicas.replica_spec import SpecError, parse_replica_request

    req = parse_replica_request({"id": "r0", "model": "m", "role": "prefill", "engine": "sglang", "tp": 2, "pp": 2,
                                 "gpus": [0, 1], "extra_args": {"nnodes": 2, "layer_split": [16, 16],
                                                                "dist_init_addr": "10.0.0.1:5000"}})
    assert (req.nnodes, req.node_rank, req.layer_split, req.extra_args) == (2, 0, [16, 16], [])
    req = parse_replica_request({"id": "r1", "model": "tiny", "role": "both", "extra_args": ["--threads", "2"]})
    assert req.engine == "reference" and req.extra_args == ["--threads", "2"] and req.kv_compression == "none"
    for body, param in [({"id": "r", "model": "m", "role": "both", "extra_args": {"colour": "red"}}, "extra_args"),
                        ({"id": "r", "model": "m", "role": "decode", "engine": "sglang", "tp": 1, "pp": 2,
                          "gpus": [0], "nnodes": 2}, "dist_init_addr"),
                        ({"id": "r", "model": "m", "role": "both", "node_rank": 3}, "node_rank"),
                        ({"id": "r", "model": "", "role": "both"}, "model")]:
        with pytest.raises(SpecError) as err:
            parse_replica_request(body)
        assert err.value.param == param, body
