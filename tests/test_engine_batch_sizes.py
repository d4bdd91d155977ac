"""Decode batch sizes: which sizes tuning keeps, how a batch pads, the flag, and the on-disk cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from replicas.engine.backends.batch_sizes import cached_sizes, kept_sizes, padded, parse_batch_sizes
from replicas.engine.config import parse_args

# Measured on this VM (SmolLM2, fp32, 1 thread), ms: three rows cost more than four.
MEASURED = {1: 54, 2: 84, 3: 102, 4: 75, 5: 86, 6: 85, 7: 97, 8: 87, 9: 96, 10: 98, 11: 108, 12: 99}


def test_tuning_drops_sizes_a_larger_one_beats_and_padding_never_slows_a_step() -> None:
    sizes = kept_sizes(MEASURED)
    assert sizes == (1, 4, 5, 6, 8, 9, 10, 12)  # 7 -> 8 saves 10%; 6 -> 8 would not save 5%
    for n, t in MEASURED.items():
        assert MEASURED[padded(n, sizes)] <= t
    assert kept_sizes({1: 10, 2: 10.2, 3: 9.9}) == (1, 2, 3)  # within the margin: noise, no padding
    assert kept_sizes({1: 10, 2: 20, 3: 30, 4: 5}) == (4,)


def test_a_batch_pads_to_the_next_size_or_stays_as_it_is_past_the_last() -> None:
    assert [padded(n, (1, 4, 8)) for n in range(1, 11)] == [1, 4, 4, 4, 8, 8, 8, 8, 9, 10]
    assert padded(3, ()) == 3


def test_the_flag_takes_auto_off_or_a_list_and_refuses_anything_else(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args([]).decode_batch_sizes == "auto"
    assert parse_args(["--decode-batch-sizes", "off"]).decode_batch_sizes == "off"
    assert parse_args(["--cuda-graph-bs", "8,1,4,4"]).decode_batch_sizes == (1, 4, 8)
    for bad in ("0,4", "1,two", ""):
        with pytest.raises(SystemExit):
            parse_args(["--decode-batch-sizes", bad])
        assert "--decode-batch-sizes" in capsys.readouterr().err
    with pytest.raises(ValueError, match="positive"):
        parse_batch_sizes("-1")


def test_the_cache_tunes_once_per_key_and_survives_a_corrupt_file(tmp_path: Path) -> None:
    cache = tmp_path / "sizes.json"
    calls: list[str] = []

    def tune(result: tuple[int, ...]) -> tuple[int, ...]:
        calls.append("tuned")
        return result

    assert cached_sizes(cache, "a", lambda: tune((1, 4))) == (1, 4)
    assert cached_sizes(cache, "a", lambda: tune((9,))) == (1, 4)  # from disk
    assert cached_sizes(cache, "b", lambda: tune((2,))) == (2,)
    assert json.loads(cache.read_text()) == {"a": [1, 4], "b": [2]} and len(calls) == 2
    cache.write_text("{not json")
    assert cached_sizes(cache, "a", lambda: tune((1, 8))) == (1, 8)
    assert len(calls) == 3 and not list(tmp_path.glob("*.tmp"))  # no temporary file left behind


def test_auto_times_the_model_once_per_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch backend with ``auto`` tunes on the first start and reads the cache on the next."""
    pytest.importorskip("torch")
    from replicas.engine.backends import torch_model

    monkeypatch.setattr(torch_model, "cache_dir", lambda: tmp_path)
    first = torch_model.TorchBackend("tiny", threads=1, decode_batch_sizes="auto", max_batch=6)
    assert first.decode_batch_sizes and first.decode_batch_sizes[-1] == 6  # the largest size is always kept
    table = json.loads((tmp_path / "decode_batch_sizes.json").read_text())
    assert list(table.values()) == [list(first.decode_batch_sizes)]
    monkeypatch.setattr(torch_model.TorchBackend, "time_batch_sizes", lambda *a, **k: pytest.fail("tuned twice"))
    again = torch_model.TorchBackend("tiny", threads=1, decode_batch_sizes="auto", max_batch=6)
    assert again.decode_batch_sizes == first.decode_batch_sizes
    assert again.new_batch().sizes == first.decode_batch_sizes
    fixed = torch_model.TorchBackend("tiny", threads=1, decode_batch_sizes=(2, 4), max_batch=6)
    assert fixed.new_batch().sizes == (2, 4)


def test_engines_starting_together_tune_once(tmp_path: Path) -> None:
    """Two tunings at once would time each other; the lock makes the later starts wait and read."""
    import threading
    import time

    calls: list[int] = []

    def tune() -> tuple[int, ...]:
        calls.append(1)
        time.sleep(0.3)
        return (1, 4)

    found: list[tuple[int, ...]] = []
    threads = [threading.Thread(target=lambda: found.append(cached_sizes(tmp_path / "s.json", "k", tune)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and found == [(1, 4)] * 4
