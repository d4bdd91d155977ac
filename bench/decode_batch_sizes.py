"""Decode batch sizes on the reference engine: a step padded to a fast size against the same step unpadded.

In one run, on the torch backend (``--model``, 1 thread by default):
  1. tuning as the engine's ``--decode-batch-sizes auto`` does it: a decode step timed at every batch size up
     to ``--max-batch``, and the sizes kept (those no larger size beats by 5%);
  2. in-process, per batch size: step time unpadded and padded to the kept sizes, interleaved, best of
     ``--repeats``, at a ``--context``-token context (ratio unpadded / padded: > 1 is a faster step);
  3. over HTTP, one engine process per setting (``off``, then the kept sizes), ``--concurrency`` levels of
     greedy ``ignore_eos`` requests at once (``bench/engine.py``'s prompts): generated tokens/s and the ratio
     padded / unpadded.

    python bench/decode_batch_sizes.py                      # smollm2, ~4 min
    python bench/decode_batch_sizes.py --quick              # fewer sizes and levels, ~1.5 min
Prints rich tables and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from replicas.engine.backends.batch_sizes import kept_sizes, padded  # noqa: E402

console = Console(stderr=True)


def step_times(backend: Any, sizes: tuple[int, ...], batches: list[int], context: int, repeats: int
               ) -> list[dict[str, Any]]:
    """Per batch: best step ms unpadded and padded to ``sizes``, the two timed in alternation."""
    from replicas.engine.backends.kv_cache import TorchDecodeBatch

    kv = backend.prefill([(7 * i) % 1000 + 1 for i in range(context)]).kv
    rows = []
    for n in batches:
        runs = {}
        for label, use in (("off", ()), ("padded", sizes)):
            batch = TorchDecodeBatch(backend.model, backend.kv_layers, use)
            for k in range(n):
                batch.join(k, kv)
            batch.step(dict.fromkeys(range(n), 1))  # builds the batch
            runs[label] = batch
        best = {label: math.inf for label in runs}
        for _ in range(repeats):
            for label, batch in runs.items():
                t = time.perf_counter()
                batch.step(dict.fromkeys(range(n), 1))
                best[label] = min(best[label], time.perf_counter() - t)
        rows.append({"batch": n, "runs_at": padded(n, sizes), "off_ms": round(best["off"] * 1e3, 2),
                     "padded_ms": round(best["padded"] * 1e3, 2), "speedup": round(best["off"] / best["padded"], 3)})
    return rows


def serve(model: str, setting: str, threads: int, levels: list[int], new_tokens: int, max_batch: int
          ) -> dict[int, float]:
    """Generated tokens/s at each concurrency level on one engine process with ``--decode-batch-sizes setting``
    (``bench/engine.py``'s throughput run)."""
    from _suite import bench_module

    rows = asyncio.run(bench_module("engine").throughput(model, threads, levels, new_tokens,
                                                         ["--decode-batch-sizes", setting], max_batch))
    return {r["concurrency"]: r["tok_per_s"] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128, help="prompt tokens per sequence in the in-process steps")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--concurrency", default="1,2,3,4,7,8,11")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--quick", action="store_true", help="max batch 8, levels 3,4,7, 3 repeats, 24 tokens")
    args = ap.parse_args()
    if args.quick:
        args.max_batch, args.repeats, args.concurrency, args.new_tokens = 8, 3, "3,4,7", 24
    levels = [int(c) for c in args.concurrency.split(",")]
    if max(levels) > args.max_batch:
        ap.error("--concurrency levels must not exceed --max-batch")

    import torch

    from replicas.engine.backends.torch_model import TorchBackend

    torch.set_num_threads(args.threads)
    backend = TorchBackend(args.model, threads=args.threads)
    console.log(f"{args.model}: tuning decode batch sizes 1..{args.max_batch}")
    t0 = time.perf_counter()
    tuned = backend.time_batch_sizes(args.max_batch)
    tuning_s = time.perf_counter() - t0
    sizes = kept_sizes(tuned)
    console.log(f"kept {sizes} ({tuning_s:.1f} s); timing steps")
    steps = step_times(backend, sizes, list(range(1, args.max_batch + 1)), args.context, args.repeats)
    del backend
    setting = ",".join(map(str, sizes))
    served = {}
    for label, value in (("off", "off"), ("padded", setting)):
        console.log(f"serving with --decode-batch-sizes {value} at concurrency {levels}")
        served[label] = serve(args.model, value, args.threads, levels, args.new_tokens, args.max_batch)
    serving = [{"concurrency": c, "runs_at": padded(c, sizes), "off_tok_s": round(served["off"][c], 2),
                "padded_tok_s": round(served["padded"][c], 2),
                "ratio": round(served["padded"][c] / served["off"][c], 3)} for c in levels]

    table = Table(title=f"{args.model}: decode step, unpadded vs padded to {setting} (ctx {args.context}, "
                        f"{args.threads} thread(s))")
    for col in ("batch", "runs at", "unpadded ms", "padded ms", "speedup", "tuning ms"):
        table.add_column(col, justify="right")
    for r in steps:
        table.add_row(str(r["batch"]), str(r["runs_at"]), f"{r['off_ms']:.1f}", f"{r['padded_ms']:.1f}",
                      f"{r['speedup']:.2f}x", f"{tuned[r['batch']] * 1e3:.1f}")
    console.print(table)
    table = Table(title=f"{args.model} over HTTP: generated tokens/s, {args.new_tokens} tokens per request")
    for col in ("concurrency", "runs at", "off tok/s", "padded tok/s", "ratio"):
        table.add_column(col, justify="right")
    for r in serving:
        table.add_row(str(r["concurrency"]), str(r["runs_at"]), f"{r['off_tok_s']:.1f}", f"{r['padded_tok_s']:.1f}",
                      f"{r['ratio']:.2f}x")
    console.print(table)
    padded_only = [r["speedup"] for r in steps if r["runs_at"] != r["batch"]]
    print(json.dumps({"bench": "decode_batch_sizes", "model": args.model, "threads": args.threads,
                      "sizes": list(sizes), "tuning_s": round(tuning_s, 2),
                      "tuning_ms": {n: round(t * 1e3, 2) for n, t in tuned.items()},
                      "steps": steps, "serving": serving,
                      "step_speedup_where_padded_min": min(padded_only, default=1.0),
                      "step_speedup_where_padded_max": max(padded_only, default=1.0),
                      "slowest_padded_step_vs_unpadded": min(r["speedup"] for r in steps)}))


if __name__ == "__main__":
    main()
