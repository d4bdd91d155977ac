"""The reference engine over real HTTP on loopback, with the emulated model (no torch): SGLang's routes,
OpenAI clients, bad input, PD hand-over with its timeouts, disconnects, batching and role switches."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

import aiohttp
import pytest
from replicas_support import get, metric, pd_fields, pd_post, post, sse_events, stream

from replicas.process import EnginePair, EngineProcess, free_port

PD_TIMEOUTS = ["--pd-bootstrap-timeout-s", "3", "--pd-waiting-timeout-s", "3"]
SLOW = ["--emulate-decode-ms-per-step", "5"]


@pytest.fixture(scope="module")
def both() -> Iterator[EngineProcess]:
    with EngineProcess(model="emulated", context_length=512) as e:
        yield e


@pytest.fixture(scope="module")
def pair() -> Iterator[EnginePair]:
    pair = EnginePair(model="emulated", context_length=512, extra_args=PD_TIMEOUTS + SLOW).start()
    yield pair
    pair.stop()


GEN = {"text": "The sea is", "sampling_params": {"max_new_tokens": 24, "temperature": 0}}
CHAT = {"model": "emulated", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 12,
        "temperature": 0}


async def test_info_routes_speak_sglang(both: EngineProcess) -> None:
    assert (await get(both.url + "/health"))[0] == 200
    assert (await get(both.url + "/health_generate"))[0] == 200
    for path in ("/server_info", "/get_server_info"):
        status, info = await get(both.url + path)
        assert status == 200
        assert info["disaggregation_mode"] == "null" and info["tp_size"] == 1 and info["dp_size"] == 1
        assert info["internal_states"][0]["disaggregation_mode"] == "null"
        assert info["disaggregation_bootstrap_port"] == both.bootstrap_port and info["context_length"] == 512
    for path in ("/model_info", "/get_model_info"):
        status, info = await get(both.url + path)
        assert status == 200 and info["is_generation"] is True
    status, models = await get(both.url + "/v1/models")
    assert models["data"][0]["id"] == "emulated" and models["data"][0]["max_model_len"] == 512
    assert (await get(both.url + "/v1/models/emulated"))[0] == 200
    status, err = await get(both.url + "/v1/models/nope")
    assert status == 404 and err["error"]["code"] == "model_not_found"
    status, loads = await get(both.url + "/v1/loads")
    assert loads["loads"][0]["num_running_reqs"] == 0
    assert (await post(both.url + "/flush_cache", {}))[0] == 200
    status, err = await get(both.url + "/no_such_route")
    assert status == 404 and "error" in err
    status, err = await get(both.url + "/generate")
    assert status == 405 and "error" in err


async def test_generate_whole_streamed_and_batched(both: EngineProcess) -> None:
    status, out = await post(both.url + "/generate", GEN)
    assert status == 200 and len(out["output_ids"]) == 24 and out["text"]
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 24}
    assert out["meta_info"]["prompt_tokens"] == len(b"The sea is") and out["meta_info"]["completion_tokens"] == 24
    status, events = await stream(both.url + "/generate", GEN)
    assert status == 200 and events[-1] == "[DONE]"
    chunks = events[:-1]
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))  # cumulative, as SGLang streams
    assert chunks[-1]["text"] == out["text"] and chunks[-1]["output_ids"] == out["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    status, batch = await post(both.url + "/generate", {**GEN, "text": ["The sea is", "Other"]})
    assert status == 200 and isinstance(batch, list) and batch[0]["output_ids"] == out["output_ids"]
    status, ids_out = await post(both.url + "/generate", {"input_ids": list(b"The sea is"),
                                                           "sampling_params": GEN["sampling_params"]})
    assert ids_out["output_ids"] == out["output_ids"]


async def test_stop_strings_logprobs_and_continuation(both: EngineProcess) -> None:
    status, out = await post(both.url + "/generate", GEN)
    text = out["text"]
    stop = text[5:7]
    status, stopped = await post(both.url + "/generate",
                                 {**GEN, "sampling_params": {**GEN["sampling_params"], "stop": [stop]}})
    assert status == 200 and stopped["text"] == text[: text.index(stop)]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    _, lp = await post(both.url + "/generate", {**GEN, "return_logprob": True, "top_logprobs_num": 2,
                                                      "return_text_in_logprobs": True})
    meta = lp["meta_info"]
    assert len(meta["output_token_logprobs"]) == 24 and meta["output_token_logprobs"][0][1] == out["output_ids"][0]
    assert all(x[0] <= 0 for x in meta["output_token_logprobs"]) and len(meta["output_top_logprobs"][0]) == 2
    assert len(meta["input_token_logprobs"]) == 1  # logprob_start_len -1: the last prompt token only
    # The emulated model's next token depends on the context only: resuming from prompt + partial output
    # (what the gateway does when it migrates a stream) yields the rest of the same output.
    cut = 9
    _status, rest = await post(both.url + "/generate", {"input_ids": list(b"The sea is") + out["output_ids"][:cut],
                                                        "sampling_params": {"max_new_tokens": 24 - cut,
                                                                            "temperature": 0}})
    assert rest["output_ids"] == out["output_ids"][cut:]


async def test_openai_routes_with_the_official_client(both: EngineProcess) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=both.url + "/v1", api_key="unused")
    try:
        chat = await client.chat.completions.create(**CHAT)
        assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 12
        content = chat.choices[0].message.content
        pieces = []
        usage = None
        async for chunk in await client.chat.completions.create(**CHAT, stream=True,
                                                                stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage
        assert "".join(pieces) == content and usage is not None and usage.completion_tokens == 12
        comp = await client.completions.create(model="emulated", prompt="The sea is", max_tokens=24, temperature=0)
        _status, native = await post(both.url + "/generate", GEN)
        assert comp.choices[0].text == native["text"]
        streamed = [c.choices[0].text async for c in await client.completions.create(
            model="emulated", prompt="The sea is", max_tokens=24, temperature=0, stream=True)]
        assert "".join(streamed) == native["text"]
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/generate", b'{"text": "x", ', None),
        ("/generate", b"", None),
        ("/generate", b'["text"]', None),
        ("/generate", b'{"text": 5}', "text"),
        ("/generate", b'{"text": "x", "sampling_params": {"max_new_tokens": -1}}', "sampling_params.max_new_tokens"),
        ("/generate", b'{"text": "x", "sampling_params": {"temperature": "warm"}}', "sampling_params.temperature"),
        ("/generate", b'{"input_ids": [1, 2, 99999]}', "input_ids"),
        ("/generate", b'{"text": "' + b"long " * 200 + b'"}', "text"),
        ("/v1/chat/completions", b'{"messages": "hi"}', "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}', "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "top_p": 2}', "top_p"),
    ],
)
async def test_bad_input_gets_a_4xx_naming_the_field(both: EngineProcess, path: str, raw: bytes,
                                                     param: str | None) -> None:
    status, body = await post(both.url + path, None, raw=raw)
    assert 400 <= status < 500
    assert isinstance(body, dict) and body["error"]["message"] and body["error"]["param"] == param
    status, out = await post(both.url + "/generate", GEN)  # and it keeps serving
    assert status == 200 and len(out["output_ids"]) == 24


async def test_prefill_decode_hand_over_equals_one_worker(both: EngineProcess, pair: EnginePair) -> None:
    _, whole = await post(both.url + "/generate", GEN)
    for compression in ("none", "int8", "int4"):
        (ps, pbody), (ds, dbody) = await pd_post(pair.prefill, pair.decode, "/generate",
                                                 {**GEN, "kv_compression": compression})
        assert ps == 200 and pbody["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
        assert ds == 200 and dbody["output_ids"] == whole["output_ids"] and dbody["text"] == whole["text"]
    (ps, pev), (ds, dev) = await pd_post(pair.prefill, pair.decode, "/v1/chat/completions", CHAT, streaming=True)
    _, local_chat = await post(both.url + "/v1/chat/completions", CHAT)
    assert ps == 200 and pev[-1] == "[DONE]" and ds == 200 and dev[-1] == "[DONE]"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in dev[:-1] if c["choices"])
    assert text == local_chat["choices"][0]["message"]["content"]
    (ps, pbody), (ds, dbody) = await pd_post(pair.prefill, pair.decode, "/generate", {**GEN, "return_logprob": True})
    assert len(pbody["meta_info"]["input_token_logprobs"]) == 1 and dbody["meta_info"]["input_token_logprobs"] == []
    assert len(dbody["meta_info"]["output_token_logprobs"]) == 24
    _, info = await get(pair.prefill.url + "/server_info")
    assert info["disaggregation_mode"] == "prefill" and info["kv_bytes_sent"] > 0


async def test_pd_peers_that_never_come_time_out_cleanly(pair: EnginePair) -> None:
    fields = pd_fields(pair.prefill)
    status, err = await post(pair.prefill.url + "/generate", {**GEN, **fields})  # no decode worker comes
    assert status == 504 and "no decode worker fetched" in err["error"]["message"]
    _, loads = await get(pair.prefill.url + "/v1/loads")
    assert loads["loads"][0]["disagg"]["pending_rooms"] == 0  # its KV was freed
    status, err = await post(pair.decode.url + "/generate", {**GEN, **pd_fields(pair.prefill)})  # unknown room
    assert status == 400 and err["error"]["code"] == "unknown_bootstrap_room"
    dead = {"bootstrap_host": "127.0.0.1", "bootstrap_port": free_port(), "bootstrap_room": 1}
    status, err = await post(pair.decode.url + "/generate", {**GEN, **dead})
    assert status == 502 and "cannot reach" in err["error"]["message"]
    status, err = await post(pair.decode.url + "/generate", GEN)  # a PD worker needs a room
    assert status == 400 and err["error"]["message"].startswith("Invalid request: Disaggregated request")
    status, out = await post(pair.decode.url + "/generate", {**GEN, "bootstrap_host": "2.2.2.2",
                                                              "bootstrap_room": 0})
    assert status == 200 and len(out["output_ids"]) == 24  # SGLang's fake host: served without a peer
    (ps, _), (ds, dbody) = await pd_post(pair.prefill, pair.decode, "/generate", GEN)
    assert ps == 200 and ds == 200 and len(dbody["output_ids"]) == 24


async def test_a_decode_that_gives_up_tells_its_prefill(pair: EnginePair) -> None:
    fields = pd_fields(pair.prefill)
    waiting = asyncio.ensure_future(post(pair.decode.url + "/generate", {**GEN, **fields}))

    async def disagg() -> dict:
        return (await get(pair.prefill.url + "/v1/loads"))[1]["loads"][0]["disagg"]

    for _ in range(200):  # the decode worker is now waiting at the prefill's bootstrap server for the room
        if (await disagg())["pending_rooms"] == 1:
            break
        await asyncio.sleep(0.02)
    waiting.cancel()  # its client goes away
    for _ in range(200):
        if (await disagg())["aborted_rooms"] == 1:
            break
        await asyncio.sleep(0.02)
    assert (await disagg())["aborted_rooms"] == 1
    status, err = await post(pair.prefill.url + "/generate", {**GEN, **fields})  # the prefill leg, late
    assert status == 400 and "aborted" in err["error"]["message"]  # refused at once: no KV computed for nobody


async def test_client_disconnect_aborts_and_frees(pair: EnginePair) -> None:
    url = pair.decode.url  # a decode worker serves fake-host requests locally; 5 ms per step
    body = {"text": "go", "sampling_params": {"max_new_tokens": 100000, "temperature": 0, "ignore_eos": True},
            "stream": True, "bootstrap_host": "2.2.2.2", "bootstrap_room": 0}
    aborted_before = await metric(url, "sglang:num_aborted_requests_total")
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/generate", json=body) as r:
            got = 0
            async for _ in r.content.iter_any():
                got += 1
                if got >= 3:
                    break
        assert await metric(url, "sglang:num_running_reqs") >= 0
    for _ in range(200):
        if (await metric(url, "sglang:num_running_reqs")) == 0 and \
                (await metric(url, "sglang:num_aborted_requests_total")) > aborted_before:
            break
        await asyncio.sleep(0.05)
    assert await metric(url, "sglang:num_running_reqs") == 0
    assert await metric(url, "sglang:num_used_tokens") == 0
    assert await metric(url, "sglang:num_aborted_requests_total") == aborted_before + 1


async def test_a_busy_decode_worker_streams_a_handed_over_first_token_at_the_next_step() -> None:
    """A request handed to a decode worker arrives with its first token (the prefill worker computed it):
    the worker streams it when the next step starts and decodes the request in that step, as SGLang's
    decode worker does, instead of holding a known token back for a whole decode step (300 ms here)."""
    step = 0.3
    pair = await EnginePair(model="emulated", context_length=512,
                            extra_args=[*PD_TIMEOUTS, "--emulate-decode-ms-per-step", str(int(step * 1000))]).astart()
    loop = asyncio.get_running_loop()
    a_token = asyncio.Event()

    async def streamed(s: aiohttp.ClientSession, tokens: int, seen: list[float], each: asyncio.Event) -> None:
        body = {"text": "go", "stream": True, **pd_fields(pair.prefill),
                "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}}
        prefill = asyncio.ensure_future(s.post(pair.prefill.url + "/generate", json={**body, "stream": False}))
        async with s.post(pair.decode.url + "/generate", json=body) as r:
            async for line in r.content:
                if line.startswith(b"data: {"):
                    seen.append(loop.time())
                    each.set()
        async with await prefill as p:
            assert p.status == 200

    try:
        async with aiohttp.ClientSession() as s:
            a_seen: list[float] = []
            a = asyncio.ensure_future(streamed(s, 10, a_seen, a_token))
            for _ in range(3):  # A is decoding, one step after another; a step has just ended
                a_token.clear()
                await asyncio.wait_for(a_token.wait(), 10)
            sent, b_seen = loop.time(), []
            await streamed(s, 3, b_seen, asyncio.Event())  # B, at the start of A's next step
            await a
        # B waits for the step under way (~0.3 s), then its first token goes out; held back, it would
        # come a step later (~0.6 s)
        assert b_seen[0] - sent < 1.5 * step
        assert len(b_seen) == 3 and b_seen[1] - b_seen[0] > 0.5 * step  # then one token per step
    finally:
        pair.stop()


async def test_sixteen_concurrent_requests_complete_batched(pair: EnginePair) -> None:
    url = pair.decode.url
    bodies = [{"text": f"request {i}", "sampling_params": {"max_new_tokens": 60, "temperature": 0},
               "bootstrap_host": "2.2.2.2", "bootstrap_room": 0} for i in range(16)]
    seen = []

    async def watch() -> None:
        while True:
            seen.append(await metric(url, "sglang:num_running_reqs"))
            await asyncio.sleep(0.02)

    watcher = asyncio.ensure_future(watch())
    try:
        results = await asyncio.gather(*(post(url + "/generate", b) for b in bodies))
    finally:
        watcher.cancel()
    assert all(s == 200 and len(r["output_ids"]) == 60 for s, r in results)
    assert max(seen) > 1  # they ran in one batch, not one after another
    alone = [(await post(url + "/generate", b))[1]["output_ids"] for b in bodies[:3]]
    assert alone == [r["output_ids"] for _, r in results[:3]]
    text = (await get(url + "/metrics"))[1]
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage", "sglang:gen_throughput",
                 "sglang:cache_hit_rate", "sglang:prompt_tokens_total", "sglang:generation_tokens_total",
                 "sglang:time_to_first_token_seconds_bucket", "sglang:time_per_output_token_seconds_bucket",
                 "sglang:e2e_request_latency_seconds_bucket"):
        assert name in text, name


async def test_role_switch_flips_idle_workers_and_refuses_busy_ones(both: EngineProcess) -> None:
    pair = EnginePair(model="emulated", context_length=512, extra_args=PD_TIMEOUTS + SLOW)
    await pair.astart()
    try:
        p, d = pair.prefill, pair.decode
        status, ans = await post(both.url + "/pd_role_switch", {"new_role": "decode"})
        assert status == 400 and "not running in PD" in ans["message"]
        status, ans = await post(d.url + "/pd_role_switch", {"new_role": "both"})
        assert status == 400 and "invalid new_role" in ans["message"]
        status, ans = await post(d.url + "/pd_role_switch", {"new_role": "decode"})
        assert status == 200 and ans["message"] == "already in target role"
        long = {"text": "busy", "sampling_params": {"max_new_tokens": 100000, "ignore_eos": True},
                "bootstrap_host": "2.2.2.2", "bootstrap_room": 0}
        busy = asyncio.ensure_future(post(d.url + "/generate", long))
        for _ in range(200):
            if await metric(d.url, "sglang:num_running_reqs") == 1:
                break
            await asyncio.sleep(0.02)
        status, ans = await post(d.url + "/pd_role_switch", {"new_role": "prefill"})
        assert status == 400 and "not idle" in ans["message"] and ans["safe_to_restore"] is True
        await post(d.url + "/abort_request", {"abort_all": True})
        await busy
        # both idle now: swap the roles and serve PD the other way round
        for worker, role in ((p, "decode"), (d, "prefill")):
            status, ans = await post(worker.url + "/pd_role_switch", {"new_role": role})
            assert status == 200 and ans["success"] and ans["new_role"] == role and "elapsed_ms" in ans
        _, info = await get(d.url + "/server_info")
        assert info["disaggregation_mode"] == "decode"  # the launch role, as SGLang reports it
        assert info["internal_states"][0]["disaggregation_mode"] == "prefill"  # the live role
        d.bootstrap_port = info["disaggregation_bootstrap_port"]
        (ps, _), (ds, out) = await pd_post(d, p, "/generate", GEN)
        _, whole = await post(both.url + "/generate", GEN)
        assert ps == 200 and ds == 200 and out["output_ids"] == whole["output_ids"]
        status, _off = await post(both.url + "/pd_role_switch", {"new_role": "prefill"})
        assert status == 400
    finally:
        await asyncio.to_thread(pair.stop)


async def test_role_switch_needs_the_flag() -> None:
    async with EngineProcess(model="emulated", role="decode", enable_pd_role_switch=False) as d:
        status, ans = await post(d.url + "/pd_role_switch", {"new_role": "prefill"})
        assert status == 400 and "enable-pd-role-switch" in ans["message"] and ans["success"] is False
        status, ans = await post(d.url + "/pd_role_switch", None, raw=b"nope")
        assert status == 400 and "JSON" in ans["error"]["message"]


async def test_streamed_errors_and_sse_shape(both: EngineProcess) -> None:
    status, events = await stream(both.url + "/v1/completions", {"prompt": "abc", "max_tokens": 3,
                                                                 "stream_options": {"include_usage": True}})
    assert status == 200 and events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 3
    status, _text = await post(both.url + "/generate", {**GEN, "stream": True, "sampling_params": {"top_k": -7}})
    assert status == 400  # validation happens before the stream starts: a plain JSON error
    assert sse_events("data: {\"a\": 1}\n\ndata: [DONE]\n\n") == [{"a": 1}, "[DONE]"]
