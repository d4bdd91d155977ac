"""Gateway overhead against the official sglang-router, on the same fast SGLang-protocol workers.

In one run, against one set of emulated-model workers (P prefill + D decode processes, PD mode):
  (a) direct: the load generator does PD dispatch itself (the zero-overhead baseline),
  (b) sglang-router in PD mode (`python -m sglang_router.launch_router --pd-disaggregation ...`),
  (c) this gateway in PD mode (`python -m gateway --prefill ... --decode ... --no-auth`).
For each: requests/s at saturation (closed loop, --concurrency in flight), and the router process's CPU
time per request in that window (the cost that decides throughput once cores are shared). Then added
latency at half load (Poisson arrivals at half of (a)'s saturation rate): each arrival goes to the
router or direct with even odds, in one run, and the router's added p50/p99 is the difference of the
two latency distributions measured side by side. Requests are SGLang-native non-streaming /generate.

Everything (workers, routers, load generator) shares this machine's cores, so absolute numbers say
little; the ratios, measured in the same run, are the result. Prints a rich table and one JSON line.

    python bench/gateway.py [--prefill 2] [--decode 2] [--concurrency 32] [--duration 8] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from gateway.launcher import GatewayProcess  # noqa: E402
from replicas.process import EngineProcess, free_port  # noqa: E402

LOADGEN = Path(__file__).resolve().parent / "_loadgen.py"
console = Console(stderr=True)


def run_load(url: str, mode: str, args: argparse.Namespace, extra: list[str], rate: float | None = None,
             cpu_of: list[int] | None = None) -> dict:
    """One load-generator run; with ``cpu_of``, also the CPU seconds those processes used during it."""
    cmd = [sys.executable, str(LOADGEN), "--url", url, "--mode", mode, "--duration", str(args.duration),
           "--warmup", str(args.warmup), "--concurrency", str(args.concurrency),
           "--max-new-tokens", str(args.max_new_tokens), *extra]
    if rate is not None:
        cmd += ["--rate", f"{rate:.3f}"]
    procs = [psutil.Process(pid) for pid in cpu_of or []]
    lg = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(args.warmup)  # count CPU over the measured window only
    cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
    t0 = time.perf_counter()
    out, err = lg.communicate(timeout=args.duration + args.warmup + 120)
    cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - cpu0
    window = time.perf_counter() - t0
    if lg.returncode != 0:
        raise RuntimeError(f"load generator failed: {err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    if procs:
        served = result["rps"] * window
        result["router_cpu_us_per_req"] = 1e6 * cpu / served if served else float("nan")
    return result


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _post_ok(url: str) -> bool:
    body = json.dumps({"text": "warm", "sampling_params": {"max_new_tokens": 2}}).encode()
    req = urllib.request.Request(url + "/generate", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def sglang_router(prefills: list[EngineProcess], decodes: list[EngineProcess], policy: str):
    port = free_port()
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation", "--host", "127.0.0.1",
           "--port", str(port), "--policy", policy, "--log-level", "warn", "--prometheus-port", str(free_port())]
    for p in prefills:
        cmd += ["--prefill", p.url, str(p.bootstrap_port)]
    for d in decodes:
        cmd += ["--decode", d.url]
    log = tempfile.NamedTemporaryFile(prefix="sglang-router-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _post_ok(url):  # registration of the workers happens after the router listens
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sglang-router did not come up: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.3)
        yield url, [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextmanager
def thunderserve_gateway(prefills: list[EngineProcess], decodes: list[EngineProcess]):
    args: list[str] = []
    for p in prefills:
        args += ["--prefill", p.url, str(p.bootstrap_port)]
    for d in decodes:
        args += ["--decode", d.url]
    gw = GatewayProcess([*args, "--no-auth", "--log-level", "warning"])
    gw.start()
    try:
        gw.wait_ready()
        while not _post_ok(gw.url):
            time.sleep(0.2)
        yield gw.url, [gw.proc.pid]  # type: ignore[union-attr]
    finally:
        gw.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill", type=int, default=2, help="prefill worker processes")
    ap.add_argument("--decode", type=int, default=2, help="decode worker processes")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight at saturation")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds measured per phase")
    ap.add_argument("--warmup", type=float, default=1.5)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1, help="repeat everything (order rotated); medians reported")
    ap.add_argument("--router-policy", default="random", help="sglang-router --policy (random is its cheapest)")
    args = ap.parse_args()

    extra = ["--max-batch", "128"]
    prefills = [EngineProcess("emulated", role="prefill", extra_args=extra) for _ in range(args.prefill)]
    decodes = [EngineProcess("emulated", role="decode", extra_args=extra) for _ in range(args.decode)]
    for e in prefills + decodes:
        e.start()
    direct = [a for p in prefills for a in ("--prefill", f"{p.url}@{p.bootstrap_port}")]
    direct += [a for d in decodes for a in ("--decode", d.url)]
    routers = {"sglang-router": lambda: sglang_router(prefills, decodes, args.router_policy),
               "gateway": lambda: thunderserve_gateway(prefills, decodes)}
    sat: dict[str, list[dict]] = {"direct": [], **{n: [] for n in routers}}
    half: dict[str, list[dict]] = {n: [] for n in routers}
    try:
        for rnd in range(args.rounds):
            order = ["direct", *routers][rnd % 3:] + ["direct", *routers][:rnd % 3]
            for name in order:
                console.log(f"round {rnd + 1}: {name} at saturation")
                if name == "direct":
                    sat[name].append(run_load("direct", "closed", args, direct))
                    continue
                with routers[name]() as (url, pids):
                    sat[name].append(run_load(url, "closed", args, [], cpu_of=pids))
            rate = 0.5 * sat["direct"][-1]["rps"]
            for name in (n for n in order if n != "direct"):
                console.log(f"round {rnd + 1}: {name} vs direct at half load ({rate:.0f} req/s, arrivals split)")
                with routers[name]() as (url, _):
                    half[name].append(run_load(url, "open", args, ["--versus", "direct", *direct], rate))
    finally:
        for e in prefills + decodes:
            e.stop()
    report(args, sat, half)


def _median(rows: list[dict], *path: str) -> float:
    values = []
    for r in rows:
        v: Any = r
        for p in path:
            v = v[p]
        values.append(float(v))
    return statistics.median(values)


def report(args: argparse.Namespace, sat: dict[str, list[dict]], half: dict[str, list[dict]]) -> None:
    rps = {n: _median(rows, "rps") for n, rows in sat.items()}
    cpu = {n: _median(rows, "router_cpu_us_per_req") for n, rows in sat.items() if n != "direct"}
    lat: dict[str, dict[str, float]] = {}
    for n, rows in half.items():
        lat[n] = {q: _median(rows, "latencies_ms", q) for q in ("p50", "p99")}
        lat[n].update({f"direct_{q}": _median(rows, "versus", "latencies_ms", q) for q in ("p50", "p99")})
        lat[n].update({f"added_{q}": lat[n][q] - lat[n][f"direct_{q}"] for q in ("p50", "p99")})
    errors = {n: sum(r["errors"] for r in sat[n] + half.get(n, [])) for n in sat}
    rate = 0.5 * rps["direct"]
    table = Table(title=f"PD /generate over {args.prefill}P+{args.decode}D emulated workers: saturation with "
                        f"{args.concurrency} in flight; half load = {rate:.0f} req/s, arrivals split evenly "
                        f"between the router and direct")
    for col in ("target", "req/s @ sat", "vs direct", "vs sglang-router", "router CPU us/req",
                "p50 ms (direct)", "p99 ms (direct)", "added p50 ms", "added p99 ms", "errors"):
        table.add_column(col, justify="right")
    for n in rps:
        row = [n, f"{rps[n]:.0f}", f"{rps[n] / rps['direct']:.2f}", f"{rps[n] / rps['sglang-router']:.2f}"]
        if n == "direct":
            row += ["-", "-", "-", "-", "-"]
        else:
            row += [f"{cpu[n]:.0f}", f"{lat[n]['p50']:.2f} ({lat[n]['direct_p50']:.2f})",
                    f"{lat[n]['p99']:.2f} ({lat[n]['direct_p99']:.2f})", f"{lat[n]['added_p50']:+.2f}",
                    f"{lat[n]['added_p99']:+.2f}"]
        table.add_row(*row, str(errors[n]))
    Console().print(table)
    result = {
        "bench": "gateway",
        "workers": {"prefill": args.prefill, "decode": args.decode, "model": "emulated"},
        "concurrency": args.concurrency, "half_load_rps": round(rate, 1), "rounds": args.rounds,
        "rps": {n: round(v, 1) for n, v in rps.items()},
        "router_cpu_us_per_req": {n: round(v, 1) for n, v in cpu.items()},
        "half_load_ms": {n: {k: round(v, 3) for k, v in d.items()} for n, d in lat.items()},
        "gateway_vs_router_rps": round(rps["gateway"] / rps["sglang-router"], 3),
        "gateway_vs_direct_rps": round(rps["gateway"] / rps["direct"], 3),
        "gateway_vs_router_cpu": round(cpu["gateway"] / cpu["sglang-router"], 3),
        "errors": errors,
        "goal_met": {"rps_at_least_router": rps["gateway"] >= rps["sglang-router"],
                     "added_p99_under_2ms": lat["gateway"]["added_p99"] < 2.0},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
