"""SGLang's own router (sglang-router, PD mode) in front of one prefill and one decode reference worker:
/generate and /v1/chat/completions, streaming and not, give what a single colocated worker gives."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from replicas_support import SGLangRouter, post, stream

from replicas.process import EnginePair, EngineProcess

pytest.importorskip("sglang_router")


@pytest.fixture(scope="module")
def workers() -> Iterator[tuple[EngineProcess, EnginePair]]:
    with EngineProcess(model="emulated") as both:
        pair = EnginePair(model="emulated").start()
        try:
            yield both, pair
        finally:
            pair.stop()


GEN = {"text": "Router, route this.", "sampling_params": {"max_new_tokens": 20, "temperature": 0}}
CHAT = {"model": "emulated", "messages": [{"role": "user", "content": "Hello through the router"}],
        "max_tokens": 15, "temperature": 0}


def _chat_text(events: list) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in events if c != "[DONE]" and c["choices"])


async def test_router_in_front_of_a_pd_pair(workers: tuple[EngineProcess, EnginePair]) -> None:
    both, pair = workers
    _, want_gen = await post(both.url + "/generate", GEN)
    _, want_chat = await post(both.url + "/v1/chat/completions", CHAT)
    async with SGLangRouter([pair.prefill], [pair.decode]) as router:
        status, got = await post(router.url + "/generate", GEN)
        assert status == 200 and got["output_ids"] == want_gen["output_ids"] and got["text"] == want_gen["text"]
        status, events = await stream(router.url + "/generate", GEN)
        assert status == 200 and events[-1] == "[DONE]" and events[-2]["text"] == want_gen["text"]
        status, chat = await post(router.url + "/v1/chat/completions", CHAT)
        want = want_chat["choices"][0]["message"]["content"]
        assert status == 200 and chat["choices"][0]["message"]["content"] == want
        status, events = await stream(router.url + "/v1/chat/completions", CHAT)
        assert status == 200 and events[-1] == "[DONE]"
        assert _chat_text(events) == want_chat["choices"][0]["message"]["content"]
        # logprobs: the router merges prefill's prompt log-probs in front of decode's
        status, lp = await post(router.url + "/generate", {**GEN, "return_logprob": True})
        assert status == 200 and len(lp["meta_info"]["input_token_logprobs"]) == 1
        assert len(lp["meta_info"]["output_token_logprobs"]) == 20
        # concurrent requests through the router all pair up on their own rooms
        results = await asyncio.gather(*(post(router.url + "/generate", GEN) for _ in range(8)))
        assert all(s == 200 and r["output_ids"] == want_gen["output_ids"] for s, r in results)
        # a bad request is refused by the workers with a 4xx, and the router passes it on
        status, _ = await post(router.url + "/generate", {**GEN, "sampling_params": {"max_new_tokens": -1}})
        assert 400 <= status < 500
