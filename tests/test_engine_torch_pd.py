"""Real compute (PyTorch): greedy output through a prefill worker + a decode worker equals one worker's,
token for token, with the tiny model (and with SmolLM2, marked slow); batched equals unbatched."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest
from replicas_support import SGLangRouter, metric, pd_post, post, stream

from replicas.process import EnginePair, EngineProcess

pytest.importorskip("torch")

PROMPTS = ["The capital of France is", "Write a haiku about rain.", "1, 2, 3, 4,", "Once upon a time there was"]


def _workers(model: str) -> Iterator[tuple[EngineProcess, EnginePair]]:
    both = EngineProcess(model=model)
    pair = EnginePair(model=model, extra_args=["--pd-bootstrap-timeout-s", "60", "--pd-waiting-timeout-s", "60"])
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(both.start), pool.submit(pair.start)]
        errors = [f.exception() for f in futures]
    try:
        if any(errors):
            raise next(e for e in errors if e is not None)
        yield both, pair
    finally:
        both.stop()
        pair.stop()


@pytest.fixture(scope="module")
def tiny() -> Iterator[tuple[EngineProcess, EnginePair]]:
    yield from _workers("tiny")


async def _check_pd_equals_both(both: EngineProcess, pair: EnginePair, max_new: int,
                                prompts: list[str] = PROMPTS) -> None:
    for prompt in prompts:
        body = {"text": prompt, "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}}
        status, whole = await post(both.url + "/generate", body)
        assert status == 200
        (ps, pbody), (ds, dbody) = await pd_post(pair.prefill, pair.decode, "/generate", body)
        assert ps == 200 and pbody["output_ids"] == []
        assert ds == 200 and dbody["output_ids"] == whole["output_ids"], prompt
        assert dbody["text"] == whole["text"]
    chat = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": max_new,
            "temperature": 0}
    _, whole = await post(both.url + "/v1/chat/completions", chat)
    (ps, _), (ds, dbody) = await pd_post(pair.prefill, pair.decode, "/v1/chat/completions", chat)
    assert ds == 200 and dbody["choices"][0]["message"] == whole["choices"][0]["message"]
    assert dbody["usage"] == whole["usage"]


async def test_tiny_prefill_decode_equals_one_worker(tiny: tuple[EngineProcess, EnginePair]) -> None:
    await _check_pd_equals_both(*tiny, max_new=16)


async def test_tiny_compressed_kv_and_prompt_logprobs(tiny: tuple[EngineProcess, EnginePair]) -> None:
    both, pair = tiny
    body = {"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
            "return_logprob": True, "logprob_start_len": 0}
    _, whole = await post(both.url + "/generate", body)
    (ps, pbody), (ds, dbody) = await pd_post(pair.prefill, pair.decode, "/generate", body)
    # what the router merges: prefill's prompt log-probs first, then decode's (empty) ones
    assert pbody["meta_info"]["input_token_logprobs"] == whole["meta_info"]["input_token_logprobs"]
    assert [x[1] for x in dbody["meta_info"]["output_token_logprobs"]] == whole["output_ids"]
    lps = [x[0] for x in dbody["meta_info"]["output_token_logprobs"]]
    assert lps == pytest.approx([x[0] for x in whole["meta_info"]["output_token_logprobs"]], abs=1e-4)
    for compression in ("int8", "int4"):
        (ps, _), (ds, out) = await pd_post(pair.prefill, pair.decode, "/generate",
                                           {**body, "kv_compression": compression})
        assert ps == 200 and ds == 200 and len(out["output_ids"]) == 8
        assert out["output_ids"][0] == whole["output_ids"][0]  # the first token is prefill's, computed exactly


async def test_tiny_sixteen_concurrent_equal_sequential(tiny: tuple[EngineProcess, EnginePair]) -> None:
    both, _ = tiny
    bodies = [{"text": f"Request number {i}: " + "word " * (i % 5 * 4),
               "sampling_params": {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}} for i in range(16)]
    together = await asyncio.gather(*(post(both.url + "/generate", b) for b in bodies))
    assert all(s == 200 for s, _ in together)
    for body, (_, out) in zip(bodies[:4], together[:4], strict=True):
        assert (await post(both.url + "/generate", body))[1]["output_ids"] == out["output_ids"]


async def test_tiny_behind_the_official_router(tiny: tuple[EngineProcess, EnginePair]) -> None:
    pytest.importorskip("sglang_router")
    both, pair = tiny
    body = {"text": PROMPTS[3], "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}
    _, whole = await post(both.url + "/generate", body)
    async with SGLangRouter([pair.prefill], [pair.decode]) as router:
        status, got = await post(router.url + "/generate", body)
        assert status == 200 and got["output_ids"] == whole["output_ids"]
        status, events = await stream(router.url + "/generate", body)
        assert status == 200 and events[-1] == "[DONE]" and events[-2]["output_ids"] == whole["output_ids"]


async def test_tiny_client_disconnect_frees_the_kv(tiny: tuple[EngineProcess, EnginePair]) -> None:
    both, _ = tiny
    body = {"text": "go on and on", "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}, "stream": True}
    async with aiohttp.ClientSession() as s, s.post(both.url + "/generate", json=body) as r:
        async for _ in r.content.iter_any():
            break  # first tokens arrived: the request holds KV in the batch; now hang up
    for _ in range(400):
        running = await metric(both.url, "sglang:num_running_reqs")
        if running == 0 and await metric(both.url, "sglang:num_used_tokens") == 0:
            break
        await asyncio.sleep(0.05)
    assert await metric(both.url, "sglang:num_running_reqs") == 0
    assert await metric(both.url, "sglang:num_used_tokens") == 0
    assert await metric(both.url, "sglang:num_aborted_requests_total") >= 1


async def test_a_decode_refuses_kv_from_another_model(tiny: tuple[EngineProcess, EnginePair]) -> None:
    _, pair = tiny
    async with EngineProcess(model="emulated", role="prefill") as other:
        (ps, _), (ds, err) = await pd_post(other, pair.decode, "/generate",
                                           {"text": "hello", "sampling_params": {"max_new_tokens": 4}})
        assert ps == 200 and ds == 500 and "runs model emulated" in err["error"]["message"]


@pytest.mark.slow
async def test_smollm2_prefill_decode_equals_one_worker() -> None:
    for both, pair in _workers("smollm2"):
        await _check_pd_equals_both(both, pair, max_new=10, prompts=PROMPTS[:2])
        chat = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 12,
                "temperature": 0}
        (_, _), (_ds, dbody) = await pd_post(pair.prefill, pair.decode, "/v1/chat/completions", chat)
        assert "Paris" in dbody["choices"][0]["message"]["content"]
