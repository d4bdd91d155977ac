"""The reference engine on this CPU: what the planner's cost model is checked against, and what PD costs.

In one run:
  1. timing, in-process on the torch backend: prefill time per prompt length, and decode step time per
     batch size (every sequence at the same context), for ``tiny`` and ``smollm2``; with effective
     GFLOP/s (2 x params x tokens / time) and weight GB/s (weights read per decode step / step time);
  2. the KV hand-over: wire bytes per prompt token for none/int8/int4 (ratio against none, measured
     in the same run) and greedy agreement of a decode continuing from the (de)quantized KV against the
     uncompressed run, over a fixed prompt set (mean fraction of output tokens that match, position by
     position, and the fraction of prompts whose whole output matches);
  3. serving, over HTTP on one engine process: generated tokens/s at concurrency 1, 4 and 16 (ratio
     against concurrency 1), for emulated, tiny and smollm2;
  4. /pd_role_switch on an idle worker: wall time seen by the client and the worker's own elapsed time.

Everything shares this machine's cores with whatever else runs. Prints rich tables and one JSON line.

    python bench/engine.py [--models tiny,smollm2] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from replicas.engine import kv_wire  # noqa: E402
from replicas.process import EngineProcess  # noqa: E402

console = Console(stderr=True)
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the ocean at night.",
    "Explain in one sentence why the sky is blue.",
    "List three fruits that are red:",
    "def fibonacci(n):",
    "Once upon a time, in a village by the mountains,",
    "The three laws of thermodynamics are",
    "Translate to French: Good morning, how are you?",
]


def _median_time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timing(model: str, threads: int, lengths: list[int], batches: list[int], repeats: int) -> dict[str, Any]:
    from replicas.engine.backends.torch_model import TorchBackend

    b = TorchBackend(model, threads=threads)
    params = sum(p.numel() for p in b.model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in b.model.parameters())
    filler = b.tokenizer.encode(" ".join(PROMPTS) * 40)
    b.prefill(filler[:32])  # warm-up
    prefill = []
    for n in lengths:
        ids = filler[:n]
        s = _median_time(lambda ids=ids: b.prefill(ids), repeats)
        prefill.append({"tokens": n, "ms": s * 1e3, "tok_per_s": n / s, "gflops": 2 * params * n / s / 1e9})
    decode = []
    context = 128
    for bs in batches:
        batch = b.new_batch()
        last = {}
        for i in range(bs):
            res = b.prefill(filler[i : i + context])
            batch.join(i, res.kv)
            last[i] = int(res.logits.argmax())
        batch.step(last)  # joins the batch (a one-time rebuild), not timed
        steps = []
        for _ in range(max(3, repeats * 2)):
            t0 = time.perf_counter()
            keys, logits = batch.step(last)
            steps.append(time.perf_counter() - t0)
            last = {k: int(logits[r].argmax()) for r, k in enumerate(keys)}
        s = statistics.median(steps)
        decode.append({"batch": bs, "context": context, "ms_per_step": s * 1e3, "tok_per_s": bs / s,
                       "weight_gb_per_s": weight_bytes / s / 1e9})
    base = decode[0]["ms_per_step"]
    for d in decode:
        d["step_ratio_vs_b1"] = d["ms_per_step"] / base
    return {"model": model, "params": params, "weight_bytes": weight_bytes, "kv_layers": b.kv_layers,
            "kv_heads": b.kv_heads, "head_dim": b.head_dim, "prefill": prefill, "decode": decode, "backend": b}


def kv_agreement(b: Any, new_tokens: int, prompts: list[str]) -> list[dict[str, Any]]:
    """Bytes per token and greedy agreement for each compression, all continuations decoded in one batch."""
    tok = b.tokenizer
    ids = [tok.encode(p) for p in prompts]
    results: dict[str, dict[str, Any]] = {}
    batch = b.new_batch()
    outputs: dict[tuple[str, int], list[int]] = {}
    for i, p in enumerate(ids):
        res = b.prefill(p)
        layers = b.export_kv(res.kv)
        first = int(res.logits.argmax())
        for c in kv_wire.COMPRESSIONS:
            payload = kv_wire.KVPayload(layers=layers, first_token=first, room=i, model=b.fingerprint,
                                        prompt_sha256=kv_wire.prompt_digest(p))
            t0 = time.perf_counter()
            data = kv_wire.encode(payload, c)
            back, _ = kv_wire.decode(data)
            codec_s = time.perf_counter() - t0
            r = results.setdefault(c, {"bytes": 0, "tokens": 0, "codec_s": 0.0})
            r["bytes"] += len(data)
            r["tokens"] += len(p)
            r["codec_s"] += codec_s
            key = (c, i)
            batch.join(hash(key) & 0x7FFFFFFF, b.import_kv(back.layers, p))
            outputs[key] = [first]
    keys = {hash(k) & 0x7FFFFFFF: k for k in outputs}
    for _ in range(new_tokens - 1):
        row_keys, logits = batch.step({h: outputs[k][-1] for h, k in keys.items()})
        for row, h in enumerate(row_keys):
            outputs[keys[h]].append(int(logits[row].argmax()))
    out = []
    for c in kv_wire.COMPRESSIONS:
        match, exact = [], 0
        for i in range(len(ids)):
            ref, got = outputs[("none", i)], outputs[(c, i)]
            same = sum(a == g for a, g in zip(ref, got, strict=True))
            match.append(same / len(ref))
            exact += ref == got
        r = results[c]
        out.append({"compression": c, "bytes_per_token": r["bytes"] / r["tokens"],
                    "body_bytes_per_token": kv_wire.bytes_per_token(b.kv_layers, b.kv_heads, b.head_dim, c),
                    "token_agreement": statistics.mean(match), "exact_outputs": exact / len(ids),
                    "codec_us_per_token": r["codec_s"] / r["tokens"] * 1e6})
    base = out[0]["bytes_per_token"]
    for o in out:
        o["ratio_vs_none"] = o["bytes_per_token"] / base
    return out


async def throughput(model: str, threads: int, levels: list[int], new_tokens: int, extra: list[str] | None = None,
                     max_batch: int | None = None) -> list[dict[str, Any]]:
    """Generated tokens/s of one engine process at each concurrency level (``extra``: more engine flags)."""
    extra = (["--threads", str(threads)] if model != "emulated" else []) + (extra or [])
    out = []
    async with EngineProcess(model=model, max_batch=max_batch or max(levels), extra_args=extra) as eng, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        async def one(i: int) -> int:
            body = {"text": PROMPTS[i % len(PROMPTS)],
                    "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True}}
            async with s.post(eng.url + "/generate", json=body) as r:
                return len((await r.json())["output_ids"])

        await one(0)  # warm-up
        for c in levels:
            t0 = time.perf_counter()
            done = await asyncio.gather(*(one(i) for i in range(c)))
            wall = time.perf_counter() - t0
            out.append({"model": model, "concurrency": c, "tokens": sum(done), "seconds": wall,
                        "tok_per_s": sum(done) / wall})
    base = out[0]["tok_per_s"]
    for o in out:
        o["ratio_vs_c1"] = o["tok_per_s"] / base
    return out


async def role_switch(rounds: int) -> dict[str, Any]:
    async with EngineProcess(model="emulated", role="decode") as eng, aiohttp.ClientSession() as s:
        wall, server = [], []
        for i in range(rounds):
            role = "prefill" if i % 2 == 0 else "decode"
            t0 = time.perf_counter()
            async with s.post(eng.url + "/pd_role_switch", json={"new_role": role}) as r:
                ans = await r.json()
            wall.append((time.perf_counter() - t0) * 1e3)
            assert ans["success"], ans
            server.append(ans["elapsed_ms"])
    return {"rounds": rounds, "wall_ms_median": statistics.median(wall), "wall_ms_max": max(wall),
            "server_ms_median": statistics.median(server), "server_ms_max": max(server)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per engine (the engine default is 1)")
    ap.add_argument("--quick", action="store_true", help="fewer lengths, repeats and tokens")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    lengths = [16, 128] if args.quick else [16, 64, 256, 512]
    batches = [1, 4] if args.quick else [1, 4, 16]
    levels = [1, 4] if args.quick else [1, 4, 16]
    repeats = 2 if args.quick else 3
    result: dict[str, Any] = {"threads": args.threads, "timing": {}, "kv": {}, "throughput": [], "role_switch": {}}

    for m in models:
        console.log(f"{m}: prefill and decode timing")
        t = timing(m, args.threads, lengths, batches, repeats)
        backend = t.pop("backend")
        result["timing"][m] = t
        console.log(f"{m}: KV wire bytes and greedy agreement")
        result["kv"][m] = kv_agreement(backend, 8 if args.quick else 16, PROMPTS[:4] if args.quick else PROMPTS)
        del backend
    for m in ["emulated", *models]:
        console.log(f"{m}: HTTP throughput at concurrency {levels}")
        result["throughput"] += asyncio.run(throughput(m, args.threads, levels, 16 if args.quick else 32))
    console.log("role switch of an idle worker")
    result["role_switch"] = asyncio.run(role_switch(10 if args.quick else 20))

    for m, t in result["timing"].items():
        table = Table(title=f"{m} on this CPU ({t['params'] / 1e6:.1f}M params, {args.threads} thread(s))")
        for col in ("phase", "size", "ms", "tok/s", "effective", "vs batch 1"):
            table.add_column(col, justify="right")
        for p in t["prefill"]:
            table.add_row("prefill", f"{p['tokens']} tok", f"{p['ms']:.1f}", f"{p['tok_per_s']:.0f}",
                          f"{p['gflops']:.1f} GFLOP/s", "")
        for d in t["decode"]:
            table.add_row("decode step", f"batch {d['batch']} @ctx {d['context']}", f"{d['ms_per_step']:.1f}",
                          f"{d['tok_per_s']:.0f}", f"{d['weight_gb_per_s']:.1f} GB/s", f"{d['step_ratio_vs_b1']:.2f}x")
        console.print(table)
    table = Table(title="KV on the wire (prefill -> decode) and greedy agreement with the uncompressed run")
    for col in ("model", "compression", "bytes/token", "vs none", "token agreement", "exact outputs",
                "codec us/token"):
        table.add_column(col, justify="right")
    for m, rows in result["kv"].items():
        for r in rows:
            table.add_row(m, r["compression"], f"{r['bytes_per_token']:.0f}", f"{r['ratio_vs_none']:.3f}",
                          f"{r['token_agreement']:.1%}", f"{r['exact_outputs']:.0%}", f"{r['codec_us_per_token']:.1f}")
    console.print(table)
    table = Table(title="One engine over HTTP: generated tokens/s by concurrency")
    for col in ("model", "concurrency", "tokens", "seconds", "tok/s", "vs concurrency 1"):
        table.add_column(col, justify="right")
    for r in result["throughput"]:
        table.add_row(r["model"], str(r["concurrency"]), str(r["tokens"]), f"{r['seconds']:.2f}",
                      f"{r['tok_per_s']:.1f}", f"{r['ratio_vs_c1']:.2f}x")
    console.print(table)
    rs = result["role_switch"]
    console.print(f"/pd_role_switch of an idle worker: median {rs['wall_ms_median']:.1f} ms wall "
                  f"(max {rs['wall_ms_max']:.1f}), {rs['server_ms_median']:.2f} ms inside the worker")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
