"""Other ways to run the gateway: colocated workers, and pass-through (no tokenizer at the gateway)."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import orjson

from gateway.launcher import GatewayProcess
from replicas.process import EngineProcess

CHAT = {"model": "emulated", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}


async def sse_texts(resp: aiohttp.ClientResponse) -> tuple[str, list[bytes]]:
    text, lines = "", []
    async for line in resp.content:
        if line.startswith(b"data: {"):
            lines.append(line)
            choice = orjson.loads(line[6:])["choices"]
            if choice:
                text += choice[0].get("delta", {}).get("content") or choice[0].get("text") or ""
    return text, lines


async def test_colocated_workers_get_a_single_plain_request() -> None:
    engines = [EngineProcess("emulated", role="both"), EngineProcess("emulated", role="both")]
    await asyncio.gather(*(e.astart() for e in engines))
    gw = GatewayProcess(["--worker", engines[0].url, "--worker", engines[1].url, "--no-auth"])
    try:
        await asyncio.to_thread(gw.start)
        ready = await asyncio.to_thread(gw.wait_ready, 60.0, 2)
        assert ready["both"] == {"healthy": 2, "total": 2}
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                whole = await r.json()
            async with s.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                streamed, _ = await sse_texts(r)
            assert streamed == whole["choices"][0]["message"]["content"] and len(streamed) == 6
            body = {"text": "abc", "sampling_params": {"max_new_tokens": 3}}
            async with s.post(gw.url + "/generate", json=body) as r:
                assert r.status == 200 and (await r.json())["meta_info"]["completion_tokens"] == 3
    finally:
        gw.stop()
        for e in engines:
            e.stop()


async def test_pass_through_without_a_tokenizer_merges_prefill_logprobs() -> None:
    p, d = EngineProcess("emulated", role="prefill"), EngineProcess("emulated", role="decode")
    await asyncio.gather(p.astart(), d.astart())
    gw = GatewayProcess(["--prefill", p.url, str(p.bootstrap_port), "--decode", d.url, "--no-auth",
                         "--tokenizer", "none"])
    try:
        await asyncio.to_thread(gw.start)
        assert (await asyncio.to_thread(gw.wait_ready))["tokenizer"] is None
        body = {"text": "hello", "return_logprob": True, "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
        async with aiohttp.ClientSession() as s:
            # By hand, as a router would: decode's own answer has no prompt logprobs; prefill's has them.
            room = {"bootstrap_host": "127.0.0.1", "bootstrap_port": p.bootstrap_port,
                    "bootstrap_room": random.getrandbits(63)}
            legs = [s.post(u + "/generate", json={**body, **room}) for u in (p.url, d.url)]
            (pr, dr) = await asyncio.gather(*legs)
            prefill_lps = (await pr.json())["meta_info"]["input_token_logprobs"]
            assert (await dr.json())["meta_info"]["input_token_logprobs"] == [] and prefill_lps
            async with s.post(gw.url + "/generate", json=body) as r:
                merged = await r.json()
            assert merged["meta_info"]["input_token_logprobs"] == prefill_lps
            async with s.post(gw.url + "/generate", json={**body, "stream": True}) as r:
                events = [orjson.loads(line[6:]) async for line in r.content if line.startswith(b"data: {")]
            assert all(e["meta_info"]["input_token_logprobs"] == prefill_lps for e in events)
            async with s.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status == 200
                whole = (await r.json())["choices"][0]["message"]["content"]
            async with s.post(gw.url + "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                assert "Content-Length" not in r.headers and r.headers["Content-Type"] == "text/event-stream"
                streamed, _ = await sse_texts(r)
            assert streamed == whole
            async with s.post(gw.url + "/v1/chat/completions", json={**CHAT, "model": "other"}) as r:
                assert r.status == 404
    finally:
        gw.stop()
        p.stop()
        d.stop()
