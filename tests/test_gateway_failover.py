"""Failures around the gateway, on real emulated-model workers: retries, cancelled legs, hangs, disconnects.

Each test gets its own workers (they are killed), started in parallel; the emulated model is fast to
start and deterministic in its context, so a resumed stream can be compared token for token.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from gateway.launcher import GatewayProcess
from replicas.process import EngineProcess

ADMIN = "adm"


async def start_engines(*specs: tuple[str, list[str]]) -> list[EngineProcess]:
    engines = [EngineProcess("emulated", role=role, extra_args=extra) for role, extra in specs]
    results = await asyncio.gather(*(e.astart() for e in engines), return_exceptions=True)
    if any(isinstance(r, BaseException) for r in results):
        for e in engines:
            e.stop()
        raise next(r for r in results if isinstance(r, BaseException))
    return engines


async def start_gateway(engines: list[EngineProcess], *extra: str) -> GatewayProcess:
    args: list[str] = []
    for e in engines:
        args += ["--prefill", e.url, str(e.bootstrap_port)] if e.role == "prefill" else ["--decode", e.url]
    gw = GatewayProcess([*args, "--no-auth", "--admin-key", ADMIN, *extra])
    await asyncio.to_thread(gw.start)
    await asyncio.to_thread(gw.wait_ready)
    return gw


@contextlib.asynccontextmanager
async def cluster(specs: list[tuple[str, list[str]]], *gw_args: str) -> AsyncIterator[
        tuple[GatewayProcess, list[EngineProcess], aiohttp.ClientSession]]:
    engines = await start_engines(*specs)
    gw = None
    try:
        gw = await start_gateway(engines, *gw_args)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            yield gw, engines, session
    finally:
        if gw is not None:
            gw.stop()
        for e in engines:
            e.stop()


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def workers(session: aiohttp.ClientSession, gw: GatewayProcess) -> list[dict[str, object]]:
    async with session.get(gw.url + "/admin/workers", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        return (await r.json())["workers"]


def freeze_and_kill(engine: EngineProcess) -> None:
    os.kill(engine.pid, signal.SIGSTOP)  # stops it at once, mid-whatever it is doing
    os.kill(engine.pid, signal.SIGKILL)
    engine.proc.wait()  # type: ignore[union-attr]


async def generate(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> tuple[int, bytes]:
    async with session.post(url + "/generate", json=body) as r:
        return r.status, await r.read()


BODY = {"text": "The gateway must never lose a request", "sampling_params": {"max_new_tokens": 16, "temperature": 0}}


async def test_decode_killed_before_the_first_byte_is_retried_on_another_pair() -> None:
    async with cluster([("prefill", []), ("decode", []), ("decode", [])], "--health-interval-s", "60") as (
            gw, (_, d0, _), session):
        status, ref = await generate(session, gw.url, BODY)
        assert status == 200
        freeze_and_kill(d0)  # the gateway has not noticed (health checks every 60 s)
        results = await asyncio.gather(*(generate(session, gw.url, BODY) for _ in range(20)))
        assert [s for s, _ in results] == [200] * 20
        assert all(orjson.loads(b)["text"] == orjson.loads(ref)["text"] for _, b in results)
        assert await metric(session, gw.url, "ts_gateway_retries_total") >= 1
        dead = next(w for w in await workers(session, gw) if w["url"] == d0.url)
        assert dead["healthy"] is False and dead["outstanding"] == 0


async def test_prefill_failure_cancels_the_decode_leg() -> None:
    async with cluster([("prefill", []), ("prefill", []), ("decode", [])], "--health-interval-s", "60") as (
            gw, (p0, _, d), session):
        freeze_and_kill(p0)
        results = await asyncio.gather(*(generate(session, gw.url, BODY) for _ in range(20)))
        assert [s for s, _ in results] == [200] * 20
        assert await metric(session, gw.url, "ts_gateway_retries_total") >= 1
        # No decode leg is left waiting for a bootstrap from the dead prefill worker.
        for _ in range(50):
            if await metric(session, d.url, "sglang:num_running_reqs") == 0:
                break
            await asyncio.sleep(0.1)
        assert await metric(session, d.url, "sglang:num_running_reqs") == 0
        assert all(w["outstanding"] == 0 for w in await workers(session, gw))


@pytest.mark.parametrize("detected_by", ["silence", "health"])
async def test_generate_stream_survives_a_hung_then_killed_decode(detected_by: str) -> None:
    """A native /generate stream given as input_ids: the decode worker freezes mid-stream (no reset, as a
    preempted VM); it is noticed by the read timeout, or by failed health checks long before that timeout,
    the stream resumes on the other decode worker, and its events read as one answer."""
    slow = ["--emulate-decode-ms-per-step", "4"]
    flags = (["--upstream-read-timeout-s", "1", "--health-interval-s", "60"] if detected_by == "silence" else
             ["--upstream-read-timeout-s", "60", "--health-interval-s", "0.3", "--health-timeout-s", "0.5"])
    async with cluster([("prefill", []), ("decode", slow), ("decode", slow)], *flags) as (
            gw, (_, d0, d1), session):
        body = {"input_ids": list(b"Resume me exactly, please."), "stream": True,
                "sampling_params": {"max_new_tokens": 150, "temperature": 0}}
        ref = await generate(session, gw.url, {**body, "stream": False})
        ref_obj = orjson.loads(ref[1])
        events = []
        frozen = None
        async with session.post(gw.url + "/generate", json=body) as resp:
            assert resp.status == 200 and "Content-Length" not in resp.headers
            async for line in resp.content:
                if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                    continue
                events.append(orjson.loads(line[5:]))
                if frozen is None and len(events) == 3:
                    busy = [w["url"] for w in await workers(session, gw)
                            if w["role"] == "decode" and w["outstanding"]]
                    frozen = d0 if busy == [d0.url] else d1
                    os.kill(frozen.pid, signal.SIGSTOP)
                    t_frozen = asyncio.get_running_loop().time()
        assert frozen is not None
        freeze_and_kill(frozen)
        assert asyncio.get_running_loop().time() - t_frozen < 20  # not the 60 s read timeout
        last = events[-1]
        assert last["output_ids"] == ref_obj["output_ids"] and last["text"] == ref_obj["text"]
        assert last["meta_info"]["completion_tokens"] == 150
        assert last["meta_info"]["prompt_tokens"] == len(body["input_ids"])  # type: ignore[arg-type]
        counts = [e["meta_info"]["completion_tokens"] for e in events]
        assert counts == sorted(counts) and len(set(counts)) == len(counts)  # nothing repeated
        assert await metric(session, gw.url, "ts_gateway_migrations_total") == 1


async def test_client_disconnect_aborts_both_legs() -> None:
    slow = ["--emulate-decode-ms-per-step", "20"]
    async with cluster([("prefill", []), ("decode", slow)]) as (gw, (_, d), session):
        body = {"text": "a long answer", "stream": True, "sampling_params": {"max_new_tokens": 2000}}
        async with session.post(gw.url + "/generate", json=body) as resp:
            assert resp.status == 200
            await resp.content.readline()  # the stream has started; now walk away
        for _ in range(100):
            aborted = await metric(session, d.url, "sglang:num_aborted_requests_total")
            running = await metric(session, d.url, "sglang:num_running_reqs")
            if aborted >= 1 and running == 0:
                break
            await asyncio.sleep(0.1)
        assert (aborted, running) == (1, 0)
        assert all(w["outstanding"] == 0 for w in await workers(session, gw))


async def test_no_healthy_worker_gives_503_and_ready_says_so() -> None:
    async with cluster([("prefill", []), ("decode", [])], "--health-interval-s", "0.2",
                       "--wait-for-pair-s", "0.5") as (gw, (_, d), session):
        freeze_and_kill(d)
        for _ in range(50):
            async with session.get(gw.url + "/ready") as r:
                status, ready = r.status, await r.json()
            if status == 503:
                break
            await asyncio.sleep(0.1)
        assert status == 503 and ready["decode"]["healthy"] == 0
        status, body = await generate(session, gw.url, BODY)
        assert status == 503 and orjson.loads(body)["error"]["code"] == "no_workers"


async def test_request_waits_for_a_pair_to_come_back() -> None:
    """No usable pair (the only decode is frozen, marked unhealthy): the request is held, not failed,
    and is served as soon as the worker is healthy again (as after a controller's role switch)."""
    async with cluster([("prefill", []), ("decode", [])], "--health-interval-s", "0.2",
                       "--wait-for-pair-s", "30") as (gw, (_, d), session):
        os.kill(d.pid, signal.SIGSTOP)
        try:
            for _ in range(100):
                async with session.get(gw.url + "/ready") as r:
                    if r.status == 503:
                        break
                await asyncio.sleep(0.1)
            pending = asyncio.create_task(generate(session, gw.url, BODY))
            await asyncio.sleep(1.0)
            assert not pending.done(), "the request must wait for a pair, not fail"
        finally:
            os.kill(d.pid, signal.SIGCONT)
        status, body = await asyncio.wait_for(pending, 30)
        assert status == 200, body
        assert orjson.loads(body)["meta_info"]["completion_tokens"] == 16
        assert await metric(session, gw.url, "ts_gateway_pair_waits_total") >= 1


async def test_silent_worker_gives_504_not_a_hang() -> None:
    async with cluster([("prefill", []), ("decode", [])], "--upstream-read-timeout-s", "0.5",
                       "--request-timeout-s", "3", "--max-attempts", "2", "--health-interval-s", "60") as (
            gw, (_, d), session):
        os.kill(d.pid, signal.SIGSTOP)
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            async with session.post(gw.url + "/generate", json={**BODY, "stream": True}) as r:
                assert r.status == 504 and (await r.json())["error"]["code"] == "upstream_timeout"
            async with session.post(gw.url + "/generate", json=BODY) as r:
                assert r.status == 504
            assert loop.time() - t0 < 10
        finally:
            os.kill(d.pid, signal.SIGCONT)
