"""Plan mode: the gateway routes by the plan in Redis and follows plan updates while requests are in flight.

The split is measured at the workers (their own `sglang:num_requests_total`), not from the gateway's
bookkeeping, over 1,000 requests per plan.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from gateway.launcher import GatewayProcess
from planner.observed_workload import WorkloadSample
from planner.plan import Instance, Plan, ReplicaSpec, Route
from planner.state import ReplicaRecord, StateStore
from replicas.process import EngineProcess

ADMIN = "adm"
N = 1000


def plan(w0: float, w1: float) -> Plan:
    return Plan(
        model="emulated",
        instances=[Instance(f"n{i}", "1x_L4", "L4", 1, True, 0.5) for i in range(3)],
        replicas=[ReplicaSpec("p0", ["n0"], [("n0", 0)], 1, 1, "prefill"),
                  ReplicaSpec("d0", ["n1"], [("n1", 0)], 1, 1, "decode"),
                  ReplicaSpec("d1", ["n2"], [("n2", 0)], 1, 1, "decode")],
        routing=[Route("p0", "d0", w0), Route("p0", "d1", w1)],
    )


async def requests_total(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("sglang:num_requests_total"))


async def split(session: aiohttp.ClientSession, gw: str, d0: EngineProcess, d1: EngineProcess) -> float:
    """Send N short requests (16 at a time); the share that decode worker d0 served."""
    before = [await requests_total(session, d.url) for d in (d0, d1)]
    sem = asyncio.Semaphore(16)
    body = {"text": "route me", "sampling_params": {"max_new_tokens": 2, "temperature": 0}}

    async def one() -> int:
        async with sem, session.post(gw + "/generate", json=body) as r:
            await r.read()
            return r.status

    statuses = await asyncio.gather(*(one() for _ in range(N)))
    assert statuses == [200] * N
    after = [await requests_total(session, d.url) for d in (d0, d1)]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == N
    print(f"split over {N}: d0={served[0]:.0f} d1={served[1]:.0f}")
    return served[0] / N


async def table_version(session: aiohttp.ClientSession, gw: str) -> int:
    async with session.get(gw + "/admin/plan", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        return (await r.json())["table"]["version"]


@contextlib.asynccontextmanager
async def deployment(state: StateStore, redis_url: str, *gw_args: str) -> AsyncIterator[
        tuple[GatewayProcess, list[EngineProcess], aiohttp.ClientSession]]:
    slow = ["--emulate-decode-ms-per-step", "2", "--max-batch", "64"]
    engines = [EngineProcess("emulated", role="prefill"), EngineProcess("emulated", role="decode", extra_args=slow),
               EngineProcess("emulated", role="decode", extra_args=slow)]
    await asyncio.gather(*(e.astart() for e in engines))
    p, d0, d1 = engines
    await state.put_replica(ReplicaRecord("p0", ["n0"], "prefill", url=p.url, bootstrap_port=p.bootstrap_port,
                                          status="ready"))
    for rid, d in (("d0", d0), ("d1", d1)):
        await state.put_replica(ReplicaRecord(rid, [rid], "decode", url=d.url, status="ready"))
    gw = GatewayProcess(["--redis-url", redis_url, "--deployment", state.deployment, "--admin-key", ADMIN,
                         "--plan-refresh-s", "60", *(gw_args or ("--no-auth",))])
    try:
        await asyncio.to_thread(gw.start)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            yield gw, engines, session
    finally:
        gw.stop()
        for e in engines:
            e.stop()


async def wait_version(session: aiohttp.ClientSession, gw: str, version: int) -> None:
    for _ in range(100):
        if await table_version(session, gw) == version:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the gateway never swapped to plan v{version}")


@pytest.mark.slow
async def test_plan_updates_move_new_traffic_and_spare_requests_in_flight(state: StateStore, redis_url: str) -> None:
    await state.publish_plan(plan(0.8, 0.2))
    async with deployment(state, redis_url) as (gw, (_, d0, d1), session):
        await asyncio.to_thread(gw.wait_ready)
        assert await table_version(session, gw.url) == 1
        assert await split(session, gw.url, d0, d1) == pytest.approx(0.8, abs=0.05)

        # Long streams in flight on both decode workers while the plan changes under them.
        body = {"text": "keep going", "stream": True, "sampling_params": {"max_new_tokens": 300, "temperature": 0}}

        async def long_stream() -> int:
            async with session.post(gw.url + "/generate", json=body) as r:
                last = b""
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        last = line
                return orjson.loads(last[5:])["meta_info"]["completion_tokens"]

        in_flight = [asyncio.create_task(long_stream()) for _ in range(8)]
        await asyncio.sleep(0.2)
        assert await state.publish_plan(plan(0.25, 0.75)) == 2
        await wait_version(session, gw.url, 2)
        assert not all(t.done() for t in in_flight)  # the swap happened while they ran
        assert await asyncio.gather(*in_flight) == [300] * 8
        assert await split(session, gw.url, d0, d1) == pytest.approx(0.25, abs=0.05)


async def test_replica_leaving_ready_is_dropped_on_the_next_update(state: StateStore, redis_url: str) -> None:
    await state.publish_plan(plan(0.5, 0.5))
    async with deployment(state, redis_url) as (gw, (_, _, d1), session):
        await asyncio.to_thread(gw.wait_ready)
        await state.update_replica("d1", status="draining")
        await state.publish_plan(plan(0.5, 0.5))
        await wait_version(session, gw.url, 2)
        before = await requests_total(session, d1.url)
        body = {"text": "x", "sampling_params": {"max_new_tokens": 1}}
        for _ in range(30):
            async with session.post(gw.url + "/generate", json=body) as r:
                assert r.status == 200
        assert await requests_total(session, d1.url) == before
        async with session.get(gw.url + "/admin/plan", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            table = (await r.json())["table"]
        assert [(p["decode"], p["weight"]) for p in table["pairs"]] == [("d0", 0.5)]
        async with session.get(gw.url + "/metrics") as r:
            assert "ts_gateway_plan_version 2.0" in await r.text()


METRIC_NAMES = ("ts_gateway_requests_total", "ts_gateway_ttft_seconds", "ts_gateway_tpot_seconds",
                "ts_gateway_e2e_seconds", "ts_gateway_worker_outstanding", "ts_gateway_retries_total",
                "ts_gateway_migrations_total", "ts_gateway_plan_version")


async def test_admin_keys_limits_revocation_and_metrics(state: StateStore, redis_url: str) -> None:
    await state.publish_plan(plan(0.5, 0.5))
    async with deployment(state, redis_url, "--key-cache-s", "0.5") as (gw, _, session):
        await asyncio.to_thread(gw.wait_ready)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        async with session.post(gw.url + "/admin/keys", json={"name": "alice", "rpm": 3}) as r:
            assert r.status == 401
        async with session.post(gw.url + "/admin/keys", json={"name": "alice", "rpm": "3"}, headers=admin) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "rpm"
        async with session.post(gw.url + "/admin/keys", json={"name": "a" * 10_000}, headers=admin) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "name"
        async with session.post(gw.url + "/admin/keys", json={"name": "alice", "rpm": 3}, headers=admin) as r:
            assert r.status == 201
            created = await r.json()
        user = {"Authorization": f"Bearer {created['key']}"}
        chat = {"model": "emulated", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                "stream": True, "stream_options": {"include_usage": True}}
        for _ in range(3):
            async with session.post(gw.url + "/v1/chat/completions", json=chat, headers=user) as r:
                assert r.status == 200 and (await r.read()).endswith(b"data: [DONE]\n\n")
        async with session.post(gw.url + "/v1/chat/completions", json=chat, headers=user) as r:
            assert r.status == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
            assert (await r.json())["error"]["code"] == "rate_limit_exceeded"
        async with session.get(gw.url + "/admin/keys", headers=admin) as r:
            listed = (await r.json())["keys"]
        assert [k["name"] for k in listed] == ["alice"] and created["key"] not in str(listed)
        async with session.delete(gw.url + f"/admin/keys/{created['key_hash']}", headers=admin) as r:
            assert r.status == 200
        async with session.delete(gw.url + f"/admin/keys/{created['key_hash']}", headers=admin) as r:
            assert r.status == 404
        async with session.get(gw.url + "/v1/models", headers=user) as r:
            assert r.status == 401  # revoked, and this gateway forgot its cached lookup at once
        async with session.get(gw.url + "/metrics") as r:
            text = await r.text()
        for name in METRIC_NAMES:
            assert name in text, name
        assert 'ts_gateway_requests_total{route="/v1/chat/completions",status="429"} 1.0' in text
        assert 'ts_gateway_requests_total{route="/v1/chat/completions",status="200"} 3.0' in text


async def test_the_gateway_records_the_lengths_it_serves_for_the_controller(state: StateStore, redis_url: str) -> None:
    """Each finished request's prompt and output lengths reach the deployment's workload buckets in Redis (the
    controller's view of the workload shift): 12 pass-through answers of 7-token prompts and 5 output tokens, and
    4 streams (the gateway's own token-exact path) of 3 and 9."""
    import time

    await state.publish_plan(plan(0.5, 0.5))
    async with deployment(state, redis_url) as (gw, _, session):
        await asyncio.to_thread(gw.wait_ready)
        for n, prompt, out, stream in ((12, 7, 5, False), (4, 3, 9, True)):
            body = {"input_ids": list(range(10, 10 + prompt)), "stream": stream,
                    "sampling_params": {"max_new_tokens": out, "temperature": 0, "ignore_eos": True}}
            for _ in range(n):
                async with session.post(gw.url + "/generate", json=body) as r:
                    assert r.status == 200, await r.text()
                    text = await r.text()
                    assert f'"completion_tokens":{out}' in text.replace(" ", "")
        seen = None
        for _ in range(100):  # the gateway flushes every 5 s
            seen = await state.workload_window(60, now=time.time() + 10)  # the current bucket too
            if seen.requests >= 16:
                break
            await asyncio.sleep(0.2)
    assert seen is not None and seen.requests == 16
    assert (seen.input_sum, seen.input_sq) == (12 * 7 + 4 * 3, 12 * 49 + 4 * 9)
    assert (seen.output_sum, seen.output_sq) == (12 * 5 + 4 * 9, 12 * 25 + 4 * 81)


async def test_the_gateway_judges_what_it_serves_against_the_plans_slo(state: StateStore, redis_url: str) -> None:
    """Every timed path (token-exact /generate streams, pass-through text streams, OpenAI chat whole and
    streamed) counts a TTFT and TPOT and whether they met the plan's SLO; a whole pass-through answer (its first
    token unseen) is counted but not judged. Under a 60 s SLO all 12 meet it; under the next plan's 1 us TTFT
    none of 4 more does."""
    import time

    loose = plan(0.5, 0.5)
    loose.slo = {"ttft_s": 60.0, "tpot_s": 60.0, "attainment": 0.9}
    await state.publish_plan(loose)
    tokens = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
    bodies = [("/generate", {"input_ids": [11, 12, 13], "stream": True, "sampling_params": tokens}),
              ("/generate", {"text": "hello there", "stream": True, "sampling_params": tokens}),
              ("/v1/chat/completions", {"model": "emulated", "messages": [{"role": "user", "content": "hi"}],
                                        "max_tokens": 4}),
              ("/v1/chat/completions", {"model": "emulated", "messages": [{"role": "user", "content": "hi"}],
                                        "max_tokens": 4, "stream": True})]

    async def served(judged: float) -> WorkloadSample | None:
        seen = None
        for _ in range(100):  # the gateway flushes every 5 s
            seen = await state.workload_window(60, now=time.time() + 10)  # the current bucket too
            if seen.judged >= judged:
                return seen
            await asyncio.sleep(0.2)
        return seen

    async with deployment(state, redis_url) as (gw, _, session):
        await asyncio.to_thread(gw.wait_ready)
        for path, body in bodies * 3 + [("/generate", {"text": "whole", "sampling_params": tokens})] * 2:
            async with session.post(gw.url + path, json=body) as r:
                assert r.status == 200, await r.text()
                await r.read()
        seen = await served(12)
        assert (seen.requests, seen.judged, seen.slo_met) == (14, 12, 12)
        tight = plan(0.5, 0.5)
        tight.slo = {"ttft_s": 1e-6, "tpot_s": 60.0, "attainment": 0.9}
        version = await state.publish_plan(tight)
        await wait_version(session, gw.url, version)
        for path, body in bodies:
            async with session.post(gw.url + path, json=body) as r:
                assert r.status == 200, await r.text()
                await r.read()
        seen = await served(16)
    assert (seen.judged, seen.slo_met) == (16, 12) and seen.attainment == 0.75
    assert sum(seen.ttft_hist) == 16 and sum(seen.tpot_hist) == 16  # 4 tokens each: every TPOT known
    assert seen.latency_quantile("ttft", 0.5) <= 2.0


async def test_a_gateway_whose_workers_have_not_answered_yet_lists_the_plans_model(state: StateStore,
                                                                                  redis_url: str) -> None:
    """Model discovery asks a worker; until one answers (a gateway just restarted, workers still booting) the
    plan's model is what /v1/models lists and what /v1/models/{id} knows, not nothing."""
    await state.publish_plan(plan(0.5, 0.5))
    for rid, role in (("p0", "prefill"), ("d0", "decode"), ("d1", "decode")):
        await state.put_replica(ReplicaRecord(rid, [rid], role, url="http://127.0.0.1:9", bootstrap_port=9,
                                              status="ready"))
    gw = GatewayProcess(["--redis-url", redis_url, "--deployment", state.deployment, "--no-auth"])
    try:
        await asyncio.to_thread(gw.start)
        async with aiohttp.ClientSession() as session:
            async with session.get(gw.url + "/v1/models") as r:
                assert r.status == 200 and [m["id"] for m in (await r.json())["data"]] == ["emulated"]
            async with session.get(gw.url + "/v1/models/emulated") as r:
                assert r.status == 200
            async with session.get(gw.url + "/v1/models/other") as r:
                assert r.status == 404
    finally:
        gw.stop()
