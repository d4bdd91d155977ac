"""The openai client against the gateway over real tiny-model workers in PD (1 prefill, 2 decode).

The last test kills the decode worker in the middle of a stream: the client's stream must complete,
and (greedy) its text must equal that of an uninterrupted run.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import urllib.request
from collections.abc import Iterator

import openai
import orjson
import pytest

from gateway.launcher import GatewayProcess
from replicas.process import EngineProcess

pytestmark = pytest.mark.slow
KEY, ADMIN = "test-key", "test-admin"
CHAT = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[GatewayProcess, list[EngineProcess]]]:
    engines = [EngineProcess("tiny", role="prefill"), EngineProcess("tiny", role="decode"),
               EngineProcess("tiny", role="decode")]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        errors = [f.exception() for f in [pool.submit(e.start) for e in engines]]
    if any(errors):
        for e in engines:
            e.stop()
        raise next(e for e in errors if e is not None)
    p, d0, d1 = engines
    gw = GatewayProcess(["--prefill", p.url, str(p.bootstrap_port), "--decode", d0.url, "--decode", d1.url,
                         "--api-key", KEY, "--admin-key", ADMIN])
    try:
        gw.start()
        gw.wait_ready()
        yield gw, engines
    finally:
        gw.stop()
        for e in engines:
            e.stop()


@pytest.fixture(scope="module")
def client(cluster: tuple[GatewayProcess, list[EngineProcess]]) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster[0].url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def metric(gw: GatewayProcess, name: str) -> float:
    text = urllib.request.urlopen(gw.url + "/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_models_and_auth_errors(cluster: tuple[GatewayProcess, list[EngineProcess]], client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=cluster[0].url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=CHAT, max_tokens=4)
    assert err.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, temperature=5)
    assert err.value.body["param"] == "temperature"  # type: ignore[index]


def test_chat_stream_and_not_agree(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40, temperature=0)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 40 and whole.usage.prompt_tokens > 10
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=40, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 40


def test_completions_stop_strings_and_logprobs(client: openai.OpenAI) -> None:
    prompt = "Once upon a time"
    ref = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0).choices[0].text
    stop = ref[len(ref) // 2: len(ref) // 2 + 3]
    cut = ref[: ref.index(stop)]
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0, stop=[stop])
    assert whole.choices[0].text == cut and whole.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0, stop=[stop],
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut
    echo = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0, echo=True)
    assert echo.choices[0].text.startswith(prompt)
    lp = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                        top_logprobs=2)
    content = lp.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(content) == 8 and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
    assert content[0].logprob == pytest.approx(max(t.logprob for t in content[0].top_logprobs))


def test_logit_bias_reaches_the_workers(client: openai.OpenAI) -> None:
    """OpenAI's logit_bias goes through the gateway to both PD workers (SGLang's sampling param of the same
    name): +100 on one token makes it every token, the prefill worker's first one included; -100 bans it.
    It used to be dropped silently."""
    forced = {"905": 100}  # " world" in SmolLM2's vocabulary
    one = client.completions.create(model="tiny", prompt="Hello", max_tokens=1, temperature=0, logit_bias=forced)
    six = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0, logit_bias=forced)
    piece = one.choices[0].text
    assert piece.strip() and six.choices[0].text == piece * 6
    banned = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0,
                                       logit_bias={"905": -100})
    assert piece not in banned.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="Hello", max_tokens=2, logit_bias={"905": 101})
    assert err.value.body["param"] == "logit_bias.905"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="Hello", max_tokens=2, logit_bias={"10000000": 5})
    assert err.value.body["param"] == "logit_bias"  # type: ignore[index]


def test_decode_killed_mid_stream_resumes_exactly(cluster: tuple[GatewayProcess, list[EngineProcess]],
                                                  client: openai.OpenAI) -> None:
    gw, (_, d0, d1) = cluster
    n = 300
    ref = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=n, temperature=0)
    migrations_before = metric(gw, "ts_gateway_migrations_total")
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=n, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    parts: list[str] = []
    killed: EngineProcess | None = None
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
        if killed is None and len(parts) == 5:
            req = urllib.request.Request(gw.url + "/admin/workers", headers={"Authorization": f"Bearer {ADMIN}"})
            workers = orjson.loads(urllib.request.urlopen(req, timeout=10).read())["workers"]
            [busy] = [w["url"] for w in workers if w["role"] == "decode" and w["outstanding"] > 0]
            killed = d0 if busy == d0.url else d1
            os.kill(killed.pid, signal.SIGSTOP)  # freeze it at once, mid-stream; then kill it
            os.kill(killed.pid, signal.SIGKILL)
    assert killed is not None and not killed.running
    assert "".join(parts) == ref.choices[0].message.content
    assert usage is not None and usage.completion_tokens == n
    assert metric(gw, "ts_gateway_migrations_total") == migrations_before + 1
