"""Reference engine pieces in-process: KV wire format, sampling params, tokenizers, emulated model, batching."""

from __future__ import annotations

import numpy as np
import pytest

from replicas.engine import kv_wire
from replicas.engine.backends.emulated import EmulatedBackend
from replicas.engine.errors import ApiError
from replicas.engine.protocol import parse_chat, parse_completion, parse_generate
from replicas.engine.sampling import SamplingParams, SequenceSampler, parse_sampling_params
from replicas.engine.tokenizer import ByteTokenizer, IncrementalDetokenizer


def _payload(tokens: int = 9, layers: int = 3, heads: int = 2, dim: int = 64, seed: int = 0) -> kv_wire.KVPayload:
    rng = np.random.default_rng(seed)
    arrays = [(rng.standard_normal((heads, tokens, dim)).astype(np.float32) * 3,
               rng.standard_normal((heads, tokens, dim)).astype(np.float32)) for _ in range(layers)]
    arrays[0][0][:, 0, :] = 0.0  # an all-zero group must survive quantization
    return kv_wire.KVPayload(layers=arrays, first_token=42, room=7, model="m:abc",
                             prompt_sha256=kv_wire.prompt_digest(list(range(tokens))), first_logprob=-0.5,
                             first_top=[(42, -0.5), (3, -1.5)])


def test_kv_wire_uncompressed_round_trip_is_exact() -> None:
    p = _payload()
    back, header = kv_wire.decode(kv_wire.encode(p, "none"))
    assert header["version"] == kv_wire.WIRE_VERSION and header["compression"] == "none"
    assert (back.first_token, back.room, back.model, back.first_top) == (42, 7, "m:abc", [(42, -0.5), (3, -1.5)])
    for (k, v), (k2, v2) in zip(p.layers, back.layers, strict=True):
        assert np.array_equal(k, k2) and np.array_equal(v, v2)


@pytest.mark.parametrize(("compression", "max_rel_err"), [("int8", 1 / 127), ("int4", 1 / 7)])
def test_kv_wire_quantized_within_one_step_per_group(compression: str, max_rel_err: float) -> None:
    p = _payload()
    data = kv_wire.encode(p, compression)
    back, _ = kv_wire.decode(data)
    group = kv_wire.group_size_for(64)
    assert group == 64
    for (k, _), (k2, _) in zip(p.layers, back.layers, strict=True):
        groups = k.reshape(-1, group)
        err = np.abs(groups - k2.reshape(-1, group)).max(axis=1)
        scale = np.abs(groups).max(axis=1)
        assert np.all(err <= scale * max_rel_err * 0.5 * 1.01 + 1e-6)  # rounding: half a step (+fp16 scale)
    assert np.all(back.layers[0][0][:, 0, :] == 0.0)


def test_kv_wire_bytes_per_token_matches_the_encoding() -> None:
    for compression in kv_wire.COMPRESSIONS:
        small, big = kv_wire.encode(_payload(tokens=4), compression), kv_wire.encode(_payload(tokens=20), compression)
        per_token = (len(big) - len(small)) / 16  # headers are the same size but for digits of body_bytes
        assert per_token == pytest.approx(kv_wire.bytes_per_token(3, 2, 64, compression), rel=0.01)
    assert kv_wire.bytes_per_token(30, 3, 64, "int4") < kv_wire.bytes_per_token(30, 3, 64, "int8") / 1.8


def test_kv_wire_rejects_garbage_and_other_versions() -> None:
    data = bytearray(kv_wire.encode(_payload(), "int8"))
    with pytest.raises(kv_wire.WireError, match="magic"):
        kv_wire.decode(b"XXXX" + bytes(data[4:]))
    data[4] = 99
    with pytest.raises(kv_wire.WireError, match="version 99"):
        kv_wire.decode(bytes(data))
    with pytest.raises(kv_wire.WireError, match="too short"):
        kv_wire.decode(b"TS")
    good = kv_wire.encode(_payload(), "none")
    with pytest.raises(kv_wire.WireError, match="body has"):
        kv_wire.decode(good[:-5])


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ({"max_new_tokens": -3}, "sampling_params.max_new_tokens"),
        ({"max_new_tokens": "ten"}, "sampling_params.max_new_tokens"),
        ({"max_new_tokens": True}, "sampling_params.max_new_tokens"),
        ({"temperature": -1}, "sampling_params.temperature"),
        ({"top_p": 0}, "sampling_params.top_p"),
        ({"top_k": 0}, "sampling_params.top_k"),
        ({"stop": 5}, "sampling_params.stop"),
        ({"regex": "a+"}, "sampling_params.regex"),
        ("fast please", "sampling_params"),
    ],
)
def test_sampling_params_errors_name_the_field(raw: object, param: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_sampling_params(raw)
    assert err.value.status == 400 and err.value.param == param


def test_sampler_greedy_penalties_and_min_tokens() -> None:
    logits = np.array([0.0, 5.0, 4.9, -1.0], dtype=np.float32)
    greedy = SequenceSampler(SamplingParams(temperature=0), frozenset({3}), want_logprob=True, top_n=2)
    c = greedy.choose(logits, int(logits.argmax()))
    assert c.token == 1 and c.top is not None and c.top[0][0] == 1 and c.logprob == pytest.approx(c.top[0][1])
    penalized = SequenceSampler(SamplingParams(temperature=0, presence_penalty=1.0), frozenset(), False, 0)
    assert [penalized.choose(logits).token for _ in range(2)] == [1, 2]
    eos_first = np.array([0.0, 0.0, 0.0, 9.0], dtype=np.float32)
    blocked = SequenceSampler(SamplingParams(temperature=0, min_new_tokens=1), frozenset({3}), False, 0)
    assert blocked.choose(eos_first, 3).token != 3
    assert blocked.choose(eos_first, 3).token == 3
    seeded = [SequenceSampler(SamplingParams(temperature=1.0, seed=5), frozenset(), False, 0).choose(logits).token
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_byte_tokenizer_streams_multibyte_text_exactly() -> None:
    tok = ByteTokenizer()
    text = "naïve café 日本 ✓"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in p for p in pieces)


def test_hf_tokenizer_incremental_detokenization_matches_full_decode() -> None:
    pytest.importorskip("transformers")
    from replicas.engine.model_store import smollm2_dir
    from replicas.engine.tokenizer import HFTokenizer

    tok = HFTokenizer(str(smollm2_dir()))
    text = "Hello, world! Ünïcödé and emoji 🚀 in one line.\nSecond line: 12345."
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    streamed = "".join(detok.add(i) for i in ids) + detok.flush()
    assert streamed == tok.decode(ids)
    chat = tok.chat_ids([{"role": "user", "content": "hi"}])
    assert tok.decode(chat, skip_special_tokens=False).rstrip().endswith("assistant")


def _greedy(backend: EmulatedBackend, ids: list[int], n: int) -> list[int]:
    res = backend.prefill(ids)
    batch = backend.new_batch()
    batch.join(1, res.kv)
    out = [int(res.logits.argmax())]
    while len(out) < n:
        _, logits = batch.step({1: out[-1]})
        out.append(int(logits[0].argmax()))
    return out


def test_emulated_continuation_equals_the_uninterrupted_run() -> None:
    b = EmulatedBackend()
    prompt = b.tokenizer.encode("Tell me about the sea.")
    full = _greedy(b, prompt, 40)
    for cut in (1, 7, 23):
        assert _greedy(b, prompt + full[:cut], 40 - cut) == full[cut:]
    text = b.tokenizer.decode(full)
    assert text.isascii() and text.strip()
    assert all(t not in b.tokenizer.eos_token_ids for t in full)


def test_parse_generate_batches_rooms_and_field_errors() -> None:
    tok = ByteTokenizer()
    parsed = parse_generate({"text": ["a", "bb"], "bootstrap_host": "h", "bootstrap_port": 9, "bootstrap_room": 10,
                             "sampling_params": {"max_new_tokens": 3}, "log_metrics": True}, tok, 100)
    assert parsed.batch and [i.bootstrap_room for i in parsed.items] == [10, 11]
    assert [i.input_ids for i in parsed.items] == [[97], [98, 98]]
    cases = [
        ({"text": "x", "input_ids": [1]}, "text"),
        ({"input_ids": [1, "2"]}, "input_ids"),
        ({"input_ids": [999]}, "input_ids"),
        ({"text": "x" * 100}, "text"),
        ({"text": "x", "bootstrap_room": -1}, "bootstrap_room"),
        ({"text": "x", "bootstrap_room": "r"}, "bootstrap_room"),
        ({"text": "x", "stream": "yes"}, "stream"),
        ({"text": ""}, "text"),
    ]
    for body, param in cases:
        with pytest.raises(ApiError) as err:
            parse_generate(body, tok, 100)
        assert err.value.status == 400 and err.value.param == param, body
    with pytest.raises(ApiError, match="JSON object"):
        parse_generate([1, 2], tok, 100)


def test_parse_openai_requests() -> None:
    tok = ByteTokenizer()
    chat = parse_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                       "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}, tok, 4096)
    assert chat.stream and chat.include_usage and chat.items[0].params.max_new_tokens == 5
    assert parse_completion({"prompt": "abc"}, tok, 4096).items[0].params.max_new_tokens == 16
    for body, param in [({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]},
                                                         "messages[0].role"),
                        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
                        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
                        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature")]:
        with pytest.raises(ApiError) as err:
            parse_chat(body, tok, 4096)
        assert err.value.param == param
    with pytest.raises(ApiError) as err:
        parse_completion({"prompt": 3}, tok, 4096)
    assert err.value.param == "prompt"


def test_concurrent_first_use_converts_smollm2_once(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines starting together on a cold cache wait for one conversion (the real one is ~45 s of CPU)."""
    import threading
    import time
    from pathlib import Path

    from replicas.engine import model_store

    monkeypatch.setenv("THUNDERSERVE_CACHE", str(tmp_path))
    calls: list[int] = []

    def fake_convert(target: Path) -> None:
        calls.append(1)
        time.sleep(0.3)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(model_store, "_convert_smollm2", fake_convert)
    found: list[Path] = []
    threads = [threading.Thread(target=lambda: found.append(model_store.smollm2_dir())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(found)) == 1 and (found[0] / "config.json").exists()


def test_a_negative_seed_samples_like_any_other_seed() -> None:
    """OpenAI's seed is an int64: a negative one reached numpy's RNG, which takes none, and the step failed."""
    logits = np.linspace(0.0, 1.0, 50, dtype=np.float32)

    def draws(seed: int) -> list[int]:
        sampler = SequenceSampler(SamplingParams(temperature=1.0, seed=seed), frozenset(), False, 0)
        return [sampler.choose(logits).token for _ in range(8)]

    assert draws(-5) == draws(-5) and draws(-(2**63)) == draws(-(2**63))
    assert draws(-5) != draws(5)


async def test_one_sequence_whose_sampling_fails_leaves_the_batch_and_the_rest_go_on() -> None:
    """A sampling error in a decode step fails that request alone (it leaves the batch); the three it was
    batched with finish with the tokens they get alone. Before, any error in the step failed the whole batch."""
    from replicas.engine.config import EngineConfig
    from replicas.engine.engine import Engine

    engine = Engine(EngineConfig(model="emulated", context_length=512))
    await engine.load()
    try:
        async def run(prompts: list[str], poison: int | None) -> list[object]:
            body = {"text": prompts, "sampling_params": {"max_new_tokens": 12, "temperature": 0}}
            items = parse_generate(body, engine.tokenizer, engine.context_length).items
            seqs = [await engine.start(item) for item in items]
            if poison is not None:
                sampler, calls = seqs[poison].sampler, []
                real = sampler.choose

                def failing(*args: object, **kw: object) -> object:
                    calls.append(1)
                    if len(calls) == 3:
                        raise RuntimeError("sampler broke")
                    return real(*args, **kw)
                sampler.choose = failing  # type: ignore[method-assign]
            for seq in seqs:
                await seq.wait_finished()
            return [seq.error.message if seq.error else list(seq.output_ids) for seq in seqs]

        prompts = [f"request number {i}" for i in range(4)]
        alone = await run(prompts, None)
        together = await run(prompts, poison=1)
        assert isinstance(together[1], str) and "sampler broke" in together[1]
        assert [together[i] for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]
        assert engine.scheduler is not None and not engine.scheduler.running  # the failed row left the batch
        assert await run(prompts[:1], None) == alone[:1]  # and the engine goes on serving
    finally:
        await engine.close()


def test_logit_bias_moves_the_choice_greedy_or_sampled() -> None:
    logits = np.array([0.0, 3.0, 1.0, 2.0], dtype=np.float32)
    favour = SamplingParams(temperature=0, logit_bias={2: 100.0})
    assert SequenceSampler(favour, frozenset(), False, 0).choose(logits, 1).token == 2  # not the plain argmax
    ban = SamplingParams(temperature=1.0, seed=3, logit_bias={1: -100.0, 99: 5.0})  # 99: past the vocabulary
    sampler = SequenceSampler(ban, frozenset(), False, 0)
    assert 1 not in {sampler.choose(logits).token for _ in range(50)}
    assert parse_sampling_params({"logit_bias": {"2": 1.5}}).logit_bias == {2: 1.5}
    for bad in ({"x": 1}, {"2": 200}, [2]):
        with pytest.raises(ApiError) as err:
            parse_sampling_params({"logit_bias": bad})
        assert err.value.param == "sampling_params.logit_bias"
    tok = ByteTokenizer()  # as SGLang: an id outside the vocabulary is a 400 naming the field
    with pytest.raises(ApiError) as err:
        parse_generate({"text": "hi", "sampling_params": {"logit_bias": {str(tok.vocab_size): 1}}}, tok, 64)
    assert err.value.param == "sampling_params.logit_bias"
    with pytest.raises(ApiError) as err:
        parse_completion({"prompt": "hi", "logit_bias": {str(tok.vocab_size): 1}}, tok, 64)
    assert err.value.param == "logit_bias"
    assert parse_chat({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"7": -3}}, tok,
                      64).items[0].params.logit_bias == {7: -3.0}
