"""Continuous batching on the torch backend: sequences joining and leaving a running batch decode exactly
the greedy tokens they would decode alone (left padding + masks + per-row positions are correct)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from replicas.engine.backends.batch_sizes import padded  # noqa: E402
from replicas.engine.backends.kv_cache import TorchDecodeBatch  # noqa: E402
from replicas.engine.backends.torch_model import TorchBackend  # noqa: E402


@pytest.fixture(scope="module")
def tiny() -> TorchBackend:
    return TorchBackend("tiny", threads=1)


def _alone(backend: TorchBackend, ids: list[int], n: int) -> list[int]:
    res = backend.prefill(ids)
    batch = backend.new_batch()
    batch.join(0, res.kv)
    out = [int(res.logits.argmax())]
    while len(out) < n:
        _, logits = batch.step({0: out[-1]})
        out.append(int(logits[0].argmax()))
    return out


@pytest.mark.parametrize("sizes", [(), (2, 4, 8)], ids=["unpadded", "padded-to-sizes"])
def test_staggered_joins_and_leaves_match_unbatched_greedy(tiny: TorchBackend, sizes: tuple[int, ...]) -> None:
    """Also with decode batch sizes: the dummy rows padding 1-5 sequences up to 2, 4 or 8 change no token."""
    tok = tiny.tokenizer
    prompts = [tok.encode(t) for t in ("Hi", "A much longer prompt about sailing ships and the open sea",
                                       "Numbers: 1 2 3 4", "x", "The quick brown fox jumps over the lazy dog")]
    lengths = [12, 5, 20, 9, 15]  # rows leave at different steps
    expected = [_alone(tiny, p, n) for p, n in zip(prompts, lengths, strict=True)]

    batch = TorchDecodeBatch(tiny.model, tiny.kv_layers, sizes)
    outputs: dict[int, list[int]] = {}
    joins = {0: [0, 1], 3: [2], 6: [3, 4]}  # step -> sequences that join before it (continuous batching)
    step = 0
    while len(outputs) < len(prompts) or any(len(outputs[k]) < lengths[k] for k in outputs):
        for k in joins.get(step, []):
            res = tiny.prefill(prompts[k])
            outputs[k] = [int(res.logits.argmax())]
            batch.join(k, res.kv)
        live = {k: o[-1] for k, o in outputs.items() if len(o) < lengths[k]}
        if live:
            keys, logits = batch.step(live)
            assert sorted(keys) == sorted(live) and len(logits) == len(live)
            assert batch.cache is not None and batch.cache.layers[0].buf_k.shape[0] == padded(len(live), sizes)
            for row, k in enumerate(keys):
                outputs[k].append(int(logits[row].argmax()))
                if len(outputs[k]) == lengths[k]:
                    batch.leave(k)
        step += 1
    assert [outputs[k] for k in range(len(prompts))] == expected


def test_imported_kv_continues_like_local_prefill(tiny: TorchBackend) -> None:
    """What a decode worker does with a prefill worker's KV (float32 on the wire) changes nothing."""
    ids = tiny.tokenizer.encode("Once upon a time in a small village")
    local = _alone(tiny, ids, 10)
    res = tiny.prefill(ids)
    layers = tiny.export_kv(res.kv)
    assert len(layers) == tiny.kv_layers and layers[0][0].shape == (tiny.kv_heads, len(ids), tiny.head_dim)
    batch = tiny.new_batch()
    batch.join(1, tiny.import_kv([(k.copy(), v.copy()) for k, v in layers], ids))
    out = [int(res.logits.argmax())]
    while len(out) < 10:
        _, logits = batch.step({1: out[-1]})
        out.append(int(logits[0].argmax()))
    assert out == local
    assert np.isfinite(res.logits).all()


def test_a_model_folder_loads_like_the_builtin(tiny: TorchBackend, tmp_path: object) -> None:
    """``--model PATH``: a saved HF folder (weights + tokenizer) serves the same greedy tokens."""
    folder = str(tmp_path)
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.tok.save_pretrained(folder)
    other = TorchBackend(folder, threads=1, context_length=256)
    ids = tiny.tokenizer.encode("A saved model folder")
    assert _alone(other, ids, 8) == _alone(tiny, ids, 8)
    assert other.context_length == 256
    assert other.fingerprint == tiny.fingerprint  # same weights: a PD pair may load them from different places


def test_dummy_rows_hold_no_kv_tokens_and_go_when_the_batch_empties(tiny: TorchBackend) -> None:
    batch = TorchDecodeBatch(tiny.model, tiny.kv_layers, (4,))
    prompts = [tiny.tokenizer.encode(t) for t in ("one", "two words", "three words here")]
    for k, ids in enumerate(prompts):
        batch.join(k, tiny.prefill(ids).kv)
    keys, logits = batch.step({0: 1, 1: 1, 2: 1})
    assert keys == [0, 1, 2] and logits.shape[0] == 3 and batch.dummies == 1
    assert batch.kv_tokens() == sum(len(p) + 1 for p in prompts)  # real rows only
    for k in range(3):
        batch.leave(k)
    batch.compact()
    assert batch.cache is None and batch.dummies == 0 and batch.kv_tokens() == 0


def test_leaving_frees_the_batch_kv(tiny: TorchBackend) -> None:
    batch = tiny.new_batch()
    for k, text in enumerate(("first prompt", "second, longer prompt here")):
        batch.join(k, tiny.prefill(tiny.tokenizer.encode(text)).kv)
    batch.step({0: 1, 1: 1})
    assert batch.kv_tokens() > 0 and batch.cache is not None
    batch.leave(0)
    batch.leave(1)
    batch.compact()
    assert batch.kv_tokens() == 0 and batch.cache is None
