"""Load generator for bench/gateway.py, run as its own process so it never shares a loop with a server.

Two shapes: closed loop (``--concurrency`` requests always in flight, for requests/s at saturation) and
open loop (Poisson arrivals at ``--rate``, for latency at a given load; latency is measured from the
scheduled arrival, so a stalled server cannot hide its queueing). Targets: a router URL (one POST per
request), or ``direct`` PD dispatch done by this client itself (bootstrap fields, both legs at once,
prefill drained), which is the zero-overhead baseline a router is compared against.

``--versus direct`` (open loop only) sends each arrival to the router or direct with even odds, so the
two latency distributions are measured under the same load at the same moments: their difference is
the router's added latency, free of the drift between separate runs on a shared machine.

HTTP goes through the gateway's own lean keep-alive client (``gateway.upstream_http``, ~45 us of CPU per
request against ~200 us for aiohttp's), so the load generator costs little next to what it measures.

Prints one JSON object: {"ok", "errors", "rps", "latencies_ms": {p50, p90, p99, mean}, "error_sample"},
with the direct half under "versus" when ``--versus direct``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.upstream_http import UpstreamPool, address  # the lean keep-alive client

GENERATE = b"/generate"


class Target:
    def __init__(self, args: argparse.Namespace, url: str | None = None) -> None:
        self.url = url or args.url
        pairs = (x.rsplit("@", 1) for x in args.prefill)
        self.prefills = [(address(u), urlsplit(u).hostname, int(p)) for u, p in pairs]
        self.decodes = [address(u) for u in args.decode]
        self.body = {"text": args.prompt, "sampling_params": {"max_new_tokens": args.max_new_tokens,
                                                              "temperature": 0.0}}
        self.raw = orjson.dumps(self.body)
        self.rng = random.Random(7)

    async def one(self, pool: UpstreamPool) -> None:
        if self.url != "direct":
            resp = await pool.post(address(self.url), GENERATE, self.raw, 60.0)
            data = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{resp.status}: {data[:200]!r}")
            return
        p_addr, p_host, p_port = self.rng.choice(self.prefills)
        d_addr = self.rng.choice(self.decodes)
        body = orjson.dumps({**self.body, "bootstrap_host": p_host, "bootstrap_port": p_port,
                             "bootstrap_room": self.rng.getrandbits(63)})
        prefill = await pool.post(p_addr, GENERATE, body, 60.0)  # both legs out back to back
        decode = await pool.post(d_addr, GENERATE, body, 60.0)
        data = await decode.read()
        await prefill.read()
        if decode.status != 200 or prefill.status != 200:
            raise RuntimeError(f"prefill {prefill.status} / decode {decode.status}: {data[:200]!r}")


def summary(lat: list[float], errors: list[str], elapsed: float) -> dict[str, object]:
    a = np.array(lat) * 1000.0 if lat else np.array([float("nan")])
    return {
        "ok": len(lat), "errors": len(errors), "rps": len(lat) / elapsed if elapsed > 0 else 0.0,
        "latencies_ms": {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
                         "p99": float(np.percentile(a, 99)), "mean": float(a.mean())},
        "error_sample": errors[:3],
    }


async def closed_loop(target: Target, session: UpstreamPool, concurrency: int, duration: float,
                      warmup: float) -> dict[str, object]:
    lat: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration

    async def worker() -> None:
        while True:
            t = time.perf_counter()
            if t >= stop_at:
                return
            try:
                await target.one(session)
                if t >= measure_from:
                    lat.append(time.perf_counter() - t)
            except Exception as e:  # counted, not fatal: the bench reports error counts
                if t >= measure_from:
                    errors.append(repr(e)[:200])

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summary(lat, errors, duration)


async def open_loop(targets: list[Target], session: UpstreamPool, rate: float, duration: float,
                    warmup: float) -> list[dict[str, object]]:
    """Poisson arrivals at ``rate``; each goes to one of ``targets`` at random (even odds)."""
    lat: list[list[float]] = [[] for _ in targets]
    errors: list[list[str]] = [[] for _ in targets]
    rng = random.Random(11)
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration
    tasks: set[asyncio.Task[None]] = set()

    async def one(scheduled: float, k: int) -> None:
        try:
            await targets[k].one(session)
            if scheduled >= measure_from:
                lat[k].append(time.perf_counter() - scheduled)
        except Exception as e:
            if scheduled >= measure_from:
                errors[k].append(repr(e)[:200])

    t = start
    while t < stop_at:
        t += rng.expovariate(rate)
        delay = t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(t, rng.randrange(len(targets))))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return [summary(lat[k], errors[k], duration) for k in range(len(targets))]


async def main(args: argparse.Namespace) -> None:
    target = Target(args)
    session = UpstreamPool(connect_timeout=10.0)
    try:
        if args.mode == "closed":
            result = await closed_loop(target, session, args.concurrency, args.duration, args.warmup)
        elif args.versus:
            mine, other = await open_loop([target, Target(args, args.versus)], session, args.rate, args.duration,
                                          args.warmup)
            result = {**mine, "versus": other}
        else:
            [result] = await open_loop([target], session, args.rate, args.duration, args.warmup)
    finally:
        session.close()
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True, help="router base URL, or 'direct'")
    p.add_argument("--prefill", action="append", default=[], help="URL@BOOTSTRAP_PORT (direct mode)")
    p.add_argument("--decode", action="append", default=[], help="URL (direct mode)")
    p.add_argument("--mode", choices=["closed", "open"], default="closed")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--versus", default=None, help="open loop: split arrivals evenly with this target ('direct')")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=1.5)
    p.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog. " * 2)
    p.add_argument("--max-new-tokens", type=int, default=8)
    args = p.parse_args()
    try:
        import uvloop

        uvloop.run(main(args))
    except ImportError:
        asyncio.run(main(args))
