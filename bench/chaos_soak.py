"""What a user sees while the cloud keeps taking spot nodes away: requests lost and latency, against the same
deployment left alone.

One `tsctl up --local` deployment (embedded Redis, controller, gateway, node agents in their own process groups,
the reference engine) serves a steady load of streaming chat requests (``--streams`` clients, each sending its next
request when the last ends). First ``--duration`` seconds undisturbed (the baseline), then ``--duration`` seconds
in which a node is preempted (SIGKILL of its process group, `tsctl chaos preempt`, as a spot reclaim does without
warning) at exponential intervals of mean ``--interval`` seconds, a ready node picked at random each time; with
``--controller-outage S`` the controller is also SIGKILLed a third of the way in and restarted S seconds later
(losses in between wait for the new controller); with ``--crash-services`` the controller, the embedded Redis and
the gateway are SIGKILLed in turn (`tsctl chaos crash`) and come back by themselves (their keepalives). The
controller reschedules, the gateway retries and migrates, replacements are rented within the budget. A request
counts as failed on any non-200 answer, an error event in its stream, a stream that ends without ``[DONE]``, or a
client-side error.

    python bench/chaos_soak.py [--duration 90] [--interval 15] [--streams 4] [--engine-model emulated] [--any-phases]
        [--controller-outage 15] [--crash-services]

Prints a rich table and one final JSON line (latencies of the chaos phase as ratios over the baseline's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from rich.console import Console
from rich.table import Table

TSCTL = [sys.executable, "-m", "tsctl"]


class Deployment:
    """A local deployment driven through `tsctl`, in a TS_HOME of its own."""

    def __init__(self, home: Path, name: str) -> None:
        self.name = name
        self.env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | {"TS_HOME": str(home)}
        self.home = home

    def tsctl(self, *args: str, timeout: float = 300) -> str:
        proc = subprocess.run([*TSCTL, *args, "-d", self.name], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"tsctl {' '.join(args)} failed: {proc.stderr[-2000:]}")
        return proc.stdout

    def status(self) -> dict[str, Any]:
        return json.loads(self.tsctl("status", "--json", "--events", "500"))

    def record(self) -> dict[str, Any]:
        return json.loads((self.home / "deployments" / self.name / "deployment.json").read_text())


class Phase:
    """One phase's outcomes: per request, its TTFT and end-to-end seconds, or why it failed."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ttft: list[float] = []
        self.e2e: list[float] = []
        self.failures: list[str] = []

    def summary(self) -> dict[str, Any]:
        def q(xs: list[float], p: float) -> float:
            return round(float(np.percentile(xs, p)), 4) if xs else float("nan")

        return {"ok": len(self.e2e), "failed": len(self.failures), "ttft_p50_s": q(self.ttft, 50),
                "ttft_p99_s": q(self.ttft, 99), "e2e_p50_s": q(self.e2e, 50), "e2e_p99_s": q(self.e2e, 99),
                "failure_sample": self.failures[:3]}


async def one_request(http: aiohttp.ClientSession, url: str, key: str, model: str, text: str,
                      max_tokens: int) -> tuple[float, float]:
    """Stream one chat completion; (TTFT, E2E) seconds, or an exception saying what went wrong."""
    t0 = time.monotonic()
    ttft = None
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    async with http.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                         timeout=aiohttp.ClientTimeout(total=180)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        done = False
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error'].get('message', '')[:200]}")
            if ttft is None and any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                ttft = time.monotonic() - t0
        if not done:
            raise RuntimeError("stream ended without [DONE]")
    return (ttft if ttft is not None else time.monotonic() - t0), time.monotonic() - t0


async def load(phase: Phase, url: str, key: str, model: str, streams: int, until: float, max_tokens: int) -> None:
    async def client(i: int) -> None:
        n = 0
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < until:
                n += 1
                try:
                    ttft, e2e = await one_request(http, url, key, model, f"client {i} request {n}: tell a story",
                                                  max_tokens)
                    phase.ttft.append(ttft)
                    phase.e2e.append(e2e)
                except Exception as e:
                    phase.failures.append(f"{type(e).__name__}: {e}")

    await asyncio.gather(*(client(i) for i in range(streams)))


async def chaos(dep: Deployment, until: float, interval: float, rng: random.Random, log: list[dict[str, Any]]) -> None:
    """Preempt a random ready node at exponential intervals until ``until``."""
    while True:
        wait = rng.expovariate(1.0 / interval)
        if time.monotonic() + wait >= until:
            return
        await asyncio.sleep(wait)
        snap = await asyncio.to_thread(dep.status)
        ready = sorted(n["id"] for n in snap["nodes"] if n["status"] == "ready")
        if not ready:
            log.append({"t": time.monotonic(), "node": None})
            continue
        victim = rng.choice(ready)
        await asyncio.to_thread(dep.tsctl, "chaos", "preempt", victim)
        log.append({"t": time.monotonic(), "node": victim, "ready_before": len(ready)})


async def controller_outage(dep: Deployment, start_in: float, outage_s: float, log: list[dict[str, Any]]) -> None:
    """SIGKILL the controller ``start_in`` seconds from now (a crash), restart it ``outage_s`` later: nodes lost
    meanwhile are found by the new controller, which adopts the living ones from Redis."""
    await asyncio.sleep(start_in)
    pid = dep.record()["controller_pid"]
    if pid > 0:  # os.kill(0, ...) would signal our own process group
        os.kill(pid, signal.SIGKILL)
        log.append({"t": time.monotonic(), "controller": "killed"})
    await asyncio.sleep(outage_s)
    await asyncio.to_thread(dep.tsctl, "restart", "controller")
    log.append({"t": time.monotonic(), "controller": "restarted"})


async def service_crashes(dep: Deployment, phase_s: float, log: list[dict[str, Any]]) -> None:
    """`tsctl chaos crash` the controller a quarter into the chaos phase, the embedded Redis at half, the gateway at
    three quarters (SIGKILL, as an OOM kill would); their keepalives restart them, nobody runs `tsctl restart`.
    Streams in flight on the gateway when it dies are lost (the client's connection goes with it); new
    connections wait in the socket."""
    for wait, service in ((0.25, "controller"), (0.25, "redis"), (0.25, "gateway")):
        await asyncio.sleep(wait * phase_s)
        await asyncio.to_thread(dep.tsctl, "chaos", "crash", service)
        log.append({"t": time.monotonic(), "crashed": service})


async def run(args: argparse.Namespace, dep: Deployment) -> dict[str, Any]:
    rec = dep.record()
    url, key = rec["gateway_url"], rec["api_key"]
    async with aiohttp.ClientSession() as http, http.get(url + "/v1/models",
                                                          headers={"Authorization": f"Bearer {key}"}) as r:
        model = (await r.json())["data"][0]["id"]
    base, hit = Phase("baseline"), Phase("chaos")
    await load(base, url, key, model, args.streams, time.monotonic() + args.duration, args.max_tokens)
    base_slo = (await asyncio.to_thread(dep.status)).get("slo") or {}
    preemptions: list[dict[str, Any]] = []
    until = time.monotonic() + args.duration
    outage: list[dict[str, Any]] = []
    crashes: list[dict[str, Any]] = []
    await asyncio.gather(load(hit, url, key, model, args.streams, until, args.max_tokens),
                         chaos(dep, until, args.interval, random.Random(args.seed), preemptions),
                         *([controller_outage(dep, args.duration / 3, args.controller_outage, outage)]
                           if args.controller_outage > 0 else []),
                         *([service_crashes(dep, args.duration, crashes)] if args.crash_services else []))
    snap = await asyncio.to_thread(dep.status)
    kinds = [e["kind"] for e in snap["events"]]
    down = (outage[0]["t"], outage[1]["t"]) if len(outage) == 2 else (math.inf, -math.inf)
    return {"baseline": base.summary(), "chaos": hit.summary(),
            "preemptions": sum(1 for p in preemptions if p["node"]),
            "reschedules": kinds.count("reschedule"), "replacements": kinds.count("replan"),
            "role_switches": kinds.count("role_switch"), "controller_restarts": kinds.count("controller.started") - 1,
            "service_crashes": [c["crashed"] for c in crashes], "service_restarts": kinds.count("service.restarted"),
            "workload_shifts": kinds.count("workload_shift"),
            "workload_shifts_kept": kinds.count("workload_shift.kept"),
            "preempted_while_controller_down": sum(bool(p["node"]) and down[0] <= p["t"] <= down[1]
                                                   for p in preemptions),
            "slo_missed": kinds.count("slo.missed"), "slo_met": kinds.count("slo.met"),
            "gateway_slo": {"baseline": base_slo, "chaos": snap.get("slo") or {}},
            "spend_per_hour": snap["spend_per_hour"], "budget_per_hour": snap["budget_per_hour"]}


def _gateway_view(slo: dict[str, Any]) -> str:
    """The gateway's own view at the end of a phase: the share of its last 120 s within the plan's SLO."""
    if slo.get("attainment") is None:
        return "-"
    return f"{slo['attainment']:.1%} of {slo['judged']:.0f}"


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b and b == b and a == a else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of each phase")
    ap.add_argument("--interval", type=float, default=15.0, help="mean seconds between preemptions")
    ap.add_argument("--streams", type=int, default=4, help="concurrent streaming clients")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--engine-model", default="emulated", help="the reference engine's model: emulated, tiny, smollm2")
    ap.add_argument("--budget", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--controller-outage", type=float, default=0.0,
                    help="seconds the controller is down (SIGKILLed a third into the chaos phase, then `tsctl "
                         "restart controller`); 0: it stays up")
    ap.add_argument("--crash-services", action="store_true",
                    help="`tsctl chaos crash` the controller a quarter into the chaos phase, the embedded Redis at "
                         "half, the gateway at three quarters; their keepalives restart them")
    ap.add_argument("--any-phases", action="store_true",
                    help="let the planner choose colocated replicas too (`tsctl up --any-phases`; default: split)")
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="ts-chaos-"))
    dep = Deployment(home, "chaos")
    t0 = time.monotonic()
    dep.tsctl("up", "--local", "--budget", str(args.budget), "--engine-model", args.engine_model, "--port", "0",
              *(["--any-phases"] if args.any_phases else []), timeout=600)
    up_s = time.monotonic() - t0
    try:
        out = asyncio.run(run(args, dep))
    finally:
        dep.tsctl("down", timeout=300)
    b, c = out["baseline"], out["chaos"]
    table = Table(title=f"chaos soak: {args.streams} streams, {args.duration:.0f} s a phase, a node preempted every "
                        f"~{args.interval:.0f} s ({out['preemptions']} preemptions)")
    for col in ("phase", "ok", "failed", "TTFT p50", "TTFT p99", "E2E p50", "E2E p99",
                "gateway: in SLO, 120 s"):
        table.add_column(col)
    for name, s in (("baseline", b), ("chaos", c)):
        table.add_row(name, str(s["ok"]), str(s["failed"]), f"{s['ttft_p50_s']:.3f}s", f"{s['ttft_p99_s']:.3f}s",
                      f"{s['e2e_p50_s']:.3f}s", f"{s['e2e_p99_s']:.3f}s", _gateway_view(out["gateway_slo"][name]))
    Console().print(table)
    print(f"logs: {home / 'deployments' / dep.name}")
    print(f"up in {up_s:.1f}s; reschedules {out['reschedules']}, replacements {out['replacements']}, role switches "
          f"{out['role_switches']}; slo.missed {out['slo_missed']}, slo.met {out['slo_met']}; spend "
          f"${out['spend_per_hour']}/h of ${out['budget_per_hour']}/h")
    result = {"bench": "chaos_soak", **vars(args), **out, "up_seconds": round(up_s, 1),
              "failed_ratio": ratio(c["failed"], c["ok"] + c["failed"]),
              "ttft_p99_ratio": ratio(c["ttft_p99_s"], b["ttft_p99_s"]),
              "e2e_p50_ratio": ratio(c["e2e_p50_s"], b["e2e_p50_s"]),
              "e2e_p99_ratio": ratio(c["e2e_p99_s"], b["e2e_p99_s"])}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
