"""How fast the provisioner layer gets, loses and gives back machines, on this machine (LocalProvisioner).

Measured in one run, each against a baseline measured in the same run:

- budget ledger: reserve+release pairs per second through the Lua check-and-reserve, against plain HSET+HDEL
  of the same keys (what the atomic budget check costs);
- bring-up: ``acquire`` -> ``ready`` event of a virtual node (new process group, agent, /health), against
  starting the same agent by hand and polling its /health (what the provisioner adds);
- loss detection: SIGKILL of the node's group -> ``preempted`` event (process-exit path), against a hung
  node (SIGSTOP) -> ``preempted`` event (heartbeat-expiry path, bounded below by the heartbeat TTL);
- release: SIGTERM -> group gone -> ``terminated`` event.

    python bench/provisioner.py [--nodes 4] [--rounds 3] [--heartbeat-ttl 1.5]

Prints a rich table and one final JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
from rich.console import Console
from rich.table import Table

from planner.embedded_redis import EmbeddedRedis
from planner.state import StateStore
from provisioner.base import NodeRequest
from provisioner.budget import BudgetLedger
from provisioner.health import agent_healthy
from provisioner.local import LocalProvisioner

TYPES = ["local-L4", "local-A10G", "local-L40S", "local-T4"]


async def ledger_rates(state: StateStore, pairs: int) -> tuple[float, float]:
    ledger = BudgetLedger(state)
    await ledger.set_limit(1000.0)
    t0 = time.perf_counter()
    for i in range(pairs):
        await ledger.reserve(f"b{i % 8}", 0.5)
        await ledger.release(f"b{i % 8}")
    lua = pairs / (time.perf_counter() - t0)
    key = state.key("bench", "plain")
    t0 = time.perf_counter()
    for i in range(pairs):
        await state.r.hset(key, f"b{i % 8}", 500000)
        await state.r.hdel(key, f"b{i % 8}")
    plain = pairs / (time.perf_counter() - t0)
    return lua, plain


async def direct_agent_start(redis_url: str, deployment: str, workdir: Path, i: int) -> float:
    """Baseline bring-up: the same agent command, started and polled by hand."""
    port_file = workdir / f"direct{i}.port"
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "replicas.agent", "--node-id", f"direct{i}", "--host", "127.0.0.1", "--port", "0",
        "--port-file", str(port_file), "--redis-url", redis_url, "--deployment", deployment, "--gpu-type", "L4",
        "--gpu-count", "1", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        async with aiohttp.ClientSession() as session:
            while True:
                text = port_file.read_text().strip() if port_file.exists() else ""
                if text.isdigit() and await agent_healthy(session, f"http://127.0.0.1:{text}", 1.0):
                    return time.perf_counter() - t0
                await asyncio.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def run(args: argparse.Namespace) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="ts-bench-prov-"))
    with EmbeddedRedis() as redis_server:
        state = StateStore.from_url(redis_server.url, "bench")
        lua, plain = await ledger_rates(state, args.ledger_pairs)
        ledger = BudgetLedger(state)
        await ledger.set_limit(100.0)
        prov = LocalProvisioner(state, ledger, redis_url=redis_server.url, workdir=workdir,
                                heartbeat_ttl_s=args.heartbeat_ttl, monitor_interval_s=0.05)
        await prov.start()
        events = prov.watch()

        async def next_kind(kind: str, node_id: str | None = None) -> object:
            while True:
                ev = await events.next(120)
                if ev.kind == kind and (node_id is None or ev.node_id == node_id):
                    return ev

        bring_up: list[float] = []
        direct: list[float] = []
        exit_detect: list[float] = []
        hb_detect: list[float] = []
        release: list[float] = []
        try:
            for r in range(args.rounds):
                direct += await asyncio.gather(*(direct_agent_start(redis_server.url, "bench", workdir, r * 100 + i)
                                                 for i in range(args.nodes)))  # as many at once, as below
                ids = [f"r{r}n{i}" for i in range(args.nodes)]
                for i, node_id in enumerate(ids):
                    await prov.acquire(NodeRequest(node_id, instance_type=TYPES[i % len(TYPES)]))
                for _ in ids:
                    bring_up.append((await next_kind("ready")).timing["elapsed_s"])
                await asyncio.sleep(args.heartbeat_ttl)  # let every agent heartbeat before the losses
                await prov.preempt(ids[0], "bench: SIGKILL")
                exit_detect.append((await next_kind("preempted", ids[0])).timing["detect_s"])
                rec = await state.get_node(ids[1])
                os.killpg(int(rec.provider_ref.split("=")[1]), signal.SIGSTOP)
                t0 = time.monotonic()
                ev = await next_kind("preempted", ids[1])
                assert "heartbeat expired" in ev.reason, ev.reason
                hb_detect.append(time.monotonic() - t0)
                for node_id in ids[2:]:
                    t0 = time.monotonic()
                    await prov.release(node_id)
                    release.append(time.monotonic() - t0)
        finally:
            await prov.close()
            await state.wipe()
            await state.close()

    med = statistics.median
    table = Table(title=f"LocalProvisioner on this machine ({args.rounds} rounds x {args.nodes} nodes, "
                        f"heartbeat TTL {args.heartbeat_ttl:g}s)")
    for col in ("what", "measured", "baseline (same run)", "ratio"):
        table.add_column(col, justify="right")
    table.add_row("ledger reserve+release /s", f"{lua:,.0f}", f"{plain:,.0f} (plain HSET+HDEL)", f"{lua / plain:.2f}")
    table.add_row("bring-up, acquire -> ready (median)", f"{med(bring_up) * 1000:.0f} ms",
                  f"{med(direct) * 1000:.0f} ms (agents by hand)", f"{med(bring_up) / med(direct):.2f}")
    table.add_row("loss seen, SIGKILL -> event (median)", f"{med(exit_detect) * 1000:.1f} ms",
                  f"{med(hb_detect) * 1000:.0f} ms (hung node, heartbeat)", f"{med(exit_detect) / med(hb_detect):.3f}")
    table.add_row("release, SIGTERM -> gone (median)", f"{med(release) * 1000:.0f} ms", "", "")
    Console().print(table)
    return {
        "bench": "provisioner",
        "nodes": args.nodes, "rounds": args.rounds, "heartbeat_ttl_s": args.heartbeat_ttl,
        "ledger_pairs_per_s": round(lua), "plain_pairs_per_s": round(plain), "ledger_vs_plain": round(lua / plain, 3),
        "bring_up_ms_median": round(med(bring_up) * 1000, 1), "bring_up_ms_max": round(max(bring_up) * 1000, 1),
        "direct_agent_ms_median": round(med(direct) * 1000, 1),
        "bring_up_vs_direct": round(med(bring_up) / med(direct), 3),
        "exit_detect_ms_median": round(med(exit_detect) * 1000, 2),
        "heartbeat_detect_ms_median": round(med(hb_detect) * 1000, 1),
        "exit_vs_heartbeat_detect": round(med(exit_detect) / med(hb_detect), 4),
        "release_ms_median": round(med(release) * 1000, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=4, help="virtual nodes per round (>= 3)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--heartbeat-ttl", type=float, default=1.5)
    p.add_argument("--ledger-pairs", type=int, default=2000)
    args = p.parse_args()
    if args.nodes < 3:
        p.error("--nodes must be at least 3 (one preempted, one hung, one released)")
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
