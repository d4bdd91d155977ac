"""Decode batch sizes a step runs at: a batch is padded up to the next one, as SGLang pads to its CUDA graphs.

Why: a CPU's GEMM kernels have slow shapes. On this VM's MKL (fp32, 1 thread) a SmolLM2 decode step
takes 55 ms at batch 1, 89 at 2, 107 at 3 and 82 at 4: three rows cost more than four. Padding a
batch of 3 with one dummy row makes the step 24% faster, and the engine's steps then follow the
roofline the planner's cost model assumes (a larger batch never decodes faster).

``auto`` times a decode step at every size up to ``--max-batch`` (at most ``TUNED_UP_TO``; interleaved
rounds, best per size) and keeps a size unless some larger one is faster by ``MARGIN``. The table is
cached on disk per model, CPU, thread count and torch version, so only the first engine start on a
machine pays for it (~5 s for SmolLM2 at batch 16 here).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

TUNED_UP_TO = 32  # larger batches run unpadded: a row more or less is a few % there, and tuning is paid per size
MARGIN = 0.05  # pad only where a larger size is this much faster: below it, timing noise decides
ROUNDS = 2
CACHE_FILE = "decode_batch_sizes.json"


def parse_batch_sizes(text: str) -> str | tuple[int, ...]:
    """``auto``, ``off``, or a comma list of positive sizes (SGLang's ``--cuda-graph-bs`` spelling)."""
    word = text.strip().lower()
    if word in ("auto", "off"):
        return word
    try:
        sizes = tuple(sorted({int(part) for part in word.split(",") if part.strip()}))
    except ValueError:
        raise ValueError(f"expected auto, off or a comma list of sizes, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise ValueError(f"sizes must be positive integers, got {text!r}")
    return sizes


def padded(rows: int, sizes: tuple[int, ...]) -> int:
    """The smallest size >= ``rows``; ``rows`` itself when no size is that large (or none are given)."""
    return next((s for s in sizes if s >= rows), rows)


def kept_sizes(times: dict[int, float], margin: float = MARGIN) -> tuple[int, ...]:
    """Sizes that no larger size beats by ``margin``. Padding a batch to the next kept size never
    makes its step slower (by these times): if n is dropped, some m > n runs under (1 - margin) t[n],
    and the first kept size k >= n runs within 1/(1 - margin) of the fastest size above it."""
    sizes = sorted(times)
    kept, best_above = [], math.inf
    for n in reversed(sizes):
        if best_above >= (1 - margin) * times[n]:
            kept.append(n)
        best_above = min(best_above, times[n])
    return tuple(sorted(kept))


def time_sizes(step: Callable[[int], None], max_batch: int, rounds: int = ROUNDS) -> dict[int, float]:
    """Best wall time of ``step(n)`` per size, over interleaved rounds (a shared machine only slows runs
    down, and interleaving spreads its slow moments over every size alike)."""
    best = {n: math.inf for n in range(1, max_batch + 1)}
    for n in best:  # warm-up: first calls allocate and pick kernels
        step(n)
    for _ in range(rounds):
        for n in best:
            t = time.perf_counter()
            step(n)
            best[n] = min(best[n], time.perf_counter() - t)
    return best


def machine_key(model_fingerprint: str, threads: int, max_batch: int) -> str:
    """What the kernels' speed per shape depends on: the model, the CPU, threads, torch, the sizes timed."""
    import torch

    return "|".join([model_fingerprint, _cpu_name(), platform.machine(), f"threads={threads}",
                     f"torch={torch.__version__}", f"max_batch={max_batch}"])


def cached_sizes(cache: Path, key: str, tune: Callable[[], tuple[int, ...]]) -> tuple[int, ...]:
    """The sizes stored under ``key``, or ``tune()`` stored there. Engines starting together wait on a
    lock for one tuning (two tuning at once would time each other), and the write is a rename."""
    found = _read(cache).get(key)
    if found is not None:
        return found
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        lock = open(cache.with_name(f".{cache.name}.lock"), "w")
    except OSError:
        return tune()  # a read-only cache only costs every start a tuning
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = _read(cache)
        if key in table:
            return table[key]
        sizes = table[key] = tune()
        try:
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({k: list(v) for k, v in table.items()}, indent=1))
            tmp.replace(cache)
        except OSError:
            pass
        return sizes


def _read(cache: Path) -> dict[str, tuple[int, ...]]:
    """The cached table; empty when missing or unreadable (then it is tuned and rewritten)."""
    try:
        table = json.loads(cache.read_text())
        return {str(k): tuple(int(s) for s in v) for k, v in table.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
