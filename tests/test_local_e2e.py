"""The product end to end, as a user runs it: `tsctl up --local`, chat, preempt, heal, restart, `tsctl down`.

One deployment (real Redis, controller, gateway, node agents in their own process groups, reference CPU
engines computing with PyTorch) is shared by the tests of this module, in order.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from local_cluster import LocalCluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(home=tmp_path_factory.mktemp("tshome"), name=f"e2e{uuid.uuid4().hex[:6]}")
    t0 = time.monotonic()
    proc = c.tsctl("up", "--local", "--budget", "2", "--engine-model", "tiny", "-d", c.name, "--timeout", "300",
                   "--port", "0", timeout=400, check=False)
    print(f"\n`tsctl up --local` took {time.monotonic() - t0:.1f}s")
    if proc.returncode != 0:
        c.tsctl("down", "-d", c.name, check=False, timeout=120)
        raise AssertionError(f"tsctl up failed:\n{proc.stdout}\n{proc.stderr}\n"
                             f"controller:\n{c.log('controller')[-3000:]}")
    yield c
    if (c.home / "deployments" / c.name / "deployment.json").exists():  # a failed test left it up
        c.tsctl("down", "-d", c.name, check=False, timeout=180)


def client(c: LocalCluster) -> openai.OpenAI:
    dep = c.deployment()
    return openai.OpenAI(base_url=dep["gateway_url"] + "/v1", api_key=dep["api_key"], max_retries=0, timeout=120)


def model_id(c: LocalCluster) -> str:
    return client(c).models.list().data[0].id


def chat(c: LocalCluster, text: str, max_tokens: int = 16, stream: bool = True) -> str:
    kwargs: dict[str, Any] = {"model": model_id(c), "messages": [{"role": "user", "content": text}],
                              "max_tokens": max_tokens, "temperature": 0}
    if not stream:
        return client(c).chat.completions.create(**kwargs).choices[0].message.content or ""
    out = []
    for chunk in client(c).chat.completions.create(stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].delta.content:
            out.append(chunk.choices[0].delta.content)
    return "".join(out)


class SteadyLoad:
    """A few concurrent streaming clients in a loop; every failure is kept with its message."""

    def __init__(self, c: LocalCluster, streams: int = 3) -> None:
        self.c, self.streams = c, streams
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(streams)]
        self._lock = threading.Lock()

    def _run(self, i: int) -> None:
        cl = client(self.c)
        model = model_id(self.c)
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                text = []
                for chunk in cl.chat.completions.create(
                    model=model, stream=True, max_tokens=24, temperature=0,
                    messages=[{"role": "user", "content": f"stream {i} request {n}: count to ten"}],
                ):
                    if chunk.choices and chunk.choices[0].delta.content:
                        text.append(chunk.choices[0].delta.content)
                with self._lock:
                    self.ok += 1
            except Exception as e:
                with self._lock:
                    self.failures.append(f"stream {i} request {n}: {type(e).__name__}: {e}")

    def __enter__(self) -> SteadyLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)


def events_of(snap: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e for e in snap["events"] if e["kind"] == kind]


def test_up_brings_mixed_gpu_nodes_and_answers_chat(cluster: LocalCluster) -> None:
    snap = cluster.status()
    ready = [n for n in snap["nodes"] if n["status"] == "ready"]
    assert len(ready) >= 3, snap["nodes"]
    assert len({n["gpu_type"] for n in ready}) >= 3, f"want 3+ GPU types: {[n['gpu_type'] for n in ready]}"
    roles = {r["role"] for r in snap["replicas"] if r["status"] == "ready"}
    assert {"prefill", "decode"} <= roles, snap["replicas"]
    assert snap["spend_per_hour"] <= snap["budget_per_hour"]
    assert chat(cluster, "Hello!", stream=False)
    assert chat(cluster, "Hello again!", stream=True)


def test_preemption_loses_no_request_and_heals(cluster: LocalCluster) -> None:
    before = cluster.status()
    decode_nodes = [r["node_ids"][0] for r in before["replicas"] if r["role"] == "decode" and r["status"] == "ready"]
    victim = decode_nodes[0]
    with SteadyLoad(cluster, streams=3) as load:
        time.sleep(3)
        t_kill = time.time()
        cluster.tsctl("chaos", "preempt", victim, "-d", cluster.name)
        rescheds = cluster.wait_for(lambda s: [e for e in events_of(s, "reschedule") if e["ts"] >= t_kill], 60,
                                    "the reschedule after the preemption")
        healed = cluster.wait_for(
            lambda s: [e for e in events_of(s, "replan") if e["ts"] > t_kill], 240, "a replacement node folded in")
        # let traffic reach the replacement
        new_nodes = {n["id"] for n in cluster.status()["nodes"] if n["created_at"] > t_kill and n["status"] == "ready"}
        cluster.wait_for(lambda s: any(r["status"] == "ready" and r["node_ids"][0] in new_nodes
                                       for r in s["replicas"]), 180, "the replacement's replica to be ready")
        served: dict[str, float] = {}
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any(served.get(n, 0) > 0 for n in new_nodes):
            time.sleep(1)
            served = _served_by_node(cluster, cluster.status())
    after = cluster.status()
    print(f"\nsteady load: {load.ok} requests ok, {len(load.failures)} failed")
    assert not load.failures, load.failures[:5]
    assert load.ok > 0
    resched = rescheds[-1]
    detected = [e for e in events_of(after, "node.preempted") if e["ts"] >= t_kill - 1]
    assert detected, "the preemption was never recorded"
    print(f"preemption of {victim}: detected {detected[0]['ts'] - t_kill:.3f}s after the kill; reschedule "
          f"event {resched['ts'] - detected[0]['ts']:.3f}s after detection; replan {healed[-1]['ts'] - t_kill:.1f}s "
          "after the kill")
    assert resched["ts"] - detected[0]["ts"] < 1.0, (resched, detected)
    assert after["spend_per_hour"] <= after["budget_per_hour"]
    print(f"tokens served per node after healing: {served}")
    assert any(served.get(n, 0) > 0 for n in new_nodes), (served, new_nodes)
    # the gateway counted what it served for the controller: short chats, not the 256/64 the plan was made for
    seen = after["workload"]["observed"]
    assert seen["requests"] > 0 and 10 < seen["mean_prompt"] < 100 and 1 <= seen["mean_output"] <= 24, seen
    # the controller looks every 15 s: it decides on the shifted mix (kept, or phases re-decided)
    shifts = cluster.wait_for(lambda s: events_of(s, "workload_shift") + events_of(s, "workload_shift.kept"), 45,
                              f"a decision on the shifted mix; controller log: {cluster.log('controller')[-2000:]}")
    print(f"workload seen: {seen}; shift decisions: {[e['reason'] for e in shifts]}")
    # and judged each answer against the plan's SLO: `tsctl status` shows the live attainment and latencies
    slo = after["slo"]
    print(f"live SLO: {slo}")
    assert slo["judged"] > 0 and slo["attainment"] is not None and slo["target"]["ttft_s"] > 0, slo
    assert slo["ttft_p50_at_most_s"] is not None and slo["tpot_p50_at_most_s"] is not None, slo
    text = " ".join(cluster.tsctl("status", "-d", cluster.name).stdout.split())
    assert "SLO: " in text and f"within TTFT {slo['target']['ttft_s']:g}s" in text, text


def _served_by_node(c: LocalCluster, snap: dict[str, Any]) -> dict[str, float]:
    """Tokens each node's replicas processed (their own /metrics: prompt tokens prefilled plus tokens
    generated, so a decode replica, which receives its prompts' KV, counts too), by node."""
    import asyncio

    async def scrape() -> dict[str, float]:
        out: dict[str, float] = {}
        async with aiohttp.ClientSession() as http:
            for r in snap["replicas"]:
                if not r["url"]:
                    continue
                try:
                    async with http.get(r["url"] + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                        text = await resp.text()
                except (aiohttp.ClientError, TimeoutError):
                    continue
                total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                            if line.startswith(("sglang:prompt_tokens_total", "sglang:generation_tokens_total")))
                out[r["node_ids"][0]] = out.get(r["node_ids"][0], 0.0) + total
        return out

    return asyncio.run(scrape())


def test_controller_and_gateway_restart_resume_from_redis(cluster: LocalCluster) -> None:
    before = cluster.status()
    ready_before = {n["id"] for n in before["nodes"] if n["status"] == "ready"}
    with SteadyLoad(cluster, streams=2) as load:
        time.sleep(2)
        t_crash = time.time()
        controller_pid = cluster.deployment()["controller_pid"]
        assert controller_pid > 0  # os.kill(0, ...) would signal this test's own process group
        os.kill(controller_pid, signal.SIGKILL)  # a crash, not a clean stop
        time.sleep(1)
        cluster.tsctl("restart", "controller", "-d", cluster.name)
        cluster.wait_for(lambda s: events_of(s, "controller.started")[-1:] and
                         events_of(s, "controller.started")[-1]["ts"] > t_crash, 60,
                         "the new controller to take the lease")
        time.sleep(4)  # keep the load going under the new controller
    assert not load.failures, load.failures[:5]
    mid = cluster.status()
    assert mid["plan_version"] >= before["plan_version"]
    adopted = [e for e in events_of(mid, "node.adopted") if e["ts"] > t_crash]
    assert len(adopted) == len(ready_before), f"the restarted controller must adopt every node: {adopted}"
    assert {n["id"] for n in mid["nodes"] if n["status"] == "ready"} == ready_before
    # the gateway's keepalive runs a new gateway on the socket it holds, and the old one finishes its streams:
    # no request fails, none waits for a retry
    # (and the controller's keepalive, alive this time, runs a new controller once the old one handed over)
    services_before = cluster.status()["services"]
    with SteadyLoad(cluster, streams=2) as load:
        time.sleep(1)
        t_restart = time.time()
        cluster.tsctl("restart", "gateway", "-d", cluster.name)
        cluster.tsctl("restart", "controller", "-d", cluster.name)
        cluster.wait_for(lambda s: [e for e in events_of(s, "controller.started") if e["ts"] > t_restart], 60,
                         "the new controller to take the lease")
        time.sleep(7)  # past the keepalive's overlap: the old gateway stops accepting and finishes its streams
    assert not load.failures, load.failures[:5]
    services = cluster.status()["services"]
    assert all(services[s]["pid"] != services_before[s]["pid"] for s in ("gateway", "controller")), services
    assert all(services[s]["keepalive_pid"] == services_before[s]["keepalive_pid"] for s in ("gateway", "controller"))
    assert chat(cluster, "after the gateway restart")  # same API key: it lives in Redis


def test_a_crashed_controller_or_gateway_comes_back_by_itself(cluster: LocalCluster) -> None:
    """`tsctl chaos crash` SIGKILLs each, as an OOM kill would, and nobody runs `tsctl restart`: its keepalive
    starts it again. The controller is off the request path, so the load sees no failure; the gateway is the
    URL: a request sent right after its crash waits in the listening socket the keepalive holds, and the new
    gateway answers it (same key)."""
    with SteadyLoad(cluster, streams=2) as load:
        time.sleep(1)
        t_crash = time.time()
        cluster.tsctl("chaos", "crash", "controller", "-d", cluster.name)
        cluster.wait_for(lambda s: [e for e in events_of(s, "controller.started") if e["ts"] > t_crash], 60,
                         "the restarted controller to take the lease")
        time.sleep(2)
    assert not load.failures, load.failures[:5]
    snap = cluster.status()
    restarted = [e for e in events_of(snap, "service.restarted") if e["ts"] > t_crash]
    assert [e["reason"].split(" after")[0] for e in restarted] == ["controller killed by SIGKILL"]
    assert all(svc["running"] for svc in snap["services"].values()), snap["services"]
    gateway_before = snap["services"]["gateway"]["pid"]
    t_crash, t0 = time.time(), time.monotonic()
    cluster.tsctl("chaos", "crash", "gateway", "-d", cluster.name)
    # no retry: the keepalive holds the listening socket, so this connection waits for the new gateway
    assert chat(cluster, "right after the gateway crashed", stream=False)
    print(f"\ngateway answered a request sent right after its crash in {time.monotonic() - t0:.1f}s")
    snap = cluster.status()
    assert snap["services"]["gateway"]["running"] and snap["services"]["gateway"]["pid"] != gateway_before
    restarted = [e for e in events_of(snap, "service.restarted") if e["ts"] > t_crash]
    assert [e["reason"].split(" after")[0] for e in restarted] == ["gateway killed by SIGKILL"]


def test_a_crashed_embedded_redis_comes_back_with_every_key_and_no_request_fails(cluster: LocalCluster) -> None:
    """`tsctl chaos crash redis` SIGKILLs the embedded redis-server under load: its keepalive restarts it on the
    same port from its append-only file. The gateway serves on through it (cached keys, the routing table it
    holds), and afterwards the plan, the nodes, the replicas and the API key are all still there."""
    before = cluster.status()
    with SteadyLoad(cluster, streams=2) as load:
        time.sleep(1)
        t_crash = time.time()
        cluster.tsctl("chaos", "crash", "redis", "-d", cluster.name)
        after = cluster.wait_for(
            lambda s: s if [e for e in events_of(s, "service.restarted") if e["ts"] > t_crash] else None, 30,
            "Redis to come back and the restart to be recorded")
        time.sleep(3)  # load through the controller's and the agents' reconnections
    assert not load.failures, load.failures[:5]
    assert [e["reason"].split(" after")[0] for e in events_of(after, "service.restarted") if e["ts"] > t_crash] == [
        "redis killed by SIGKILL"]
    assert after["plan_version"] >= before["plan_version"]
    assert {n["id"] for n in after["nodes"]} >= {n["id"] for n in before["nodes"]}
    assert {r["id"] for r in after["replicas"]} >= {r["id"] for r in before["replicas"] if r["status"] == "ready"}
    assert before["events"][-1]["id"] in {e["id"] for e in after["events"]}  # the event log too (a wipe fails this)
    assert chat(cluster, "after Redis came back", stream=False)  # the key is checked against Redis again
    assert all(svc["running"] for svc in cluster.status()["services"].values())


def test_down_leaves_nothing_behind(cluster: LocalCluster) -> None:
    procs = cluster.processes()
    assert procs, "the deployment should be running before down"
    cluster.tsctl("down", "-d", cluster.name, timeout=180)
    time.sleep(0.5)
    left = cluster.processes()
    assert not left, [(p.pid, p.cmdline()) for p in left]
    assert not Path(cluster.home, "deployments", cluster.name, "deployment.json").exists()
