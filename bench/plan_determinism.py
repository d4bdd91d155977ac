"""Do a suite's plans depend on the process that makes them? Each scenario's plan, per strategy, made in fresh
processes under different string hash seeds (``PYTHONHASHSEED``: the order sets of node ids and GPU types
iterate in), compared by what would be deployed and what it promises, not by when it was made.

    python bench/plan_determinism.py --suite scarce --strategies thunderserve,no-bandwidth   # ~10 min on 2 cores
    python bench/plan_determinism.py --scenarios '70b' --hash-seeds 0,1,2

Why: the planner is deterministic per ``--seed`` on its work clock, and the controller re-plans in a process of
its own; a plan that follows the hash seed flips between runs of the same code (the scarce 70B no-bandwidth
plan did, until the search summed a set of nodes' prices in hash order no more). Prints a rich table and, last,
one JSON line: how many plans were compared, which differ, and which fell back on wall time (a machine over
3x slower than the work clock allows: those may differ, and are not counted as differing).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _suite import planner_suite  # noqa: E402


def fingerprint(plan: dict) -> str:
    """A digest of a plan's JSON without its creation time and wall-clock timings (``expected``'s
    ``*_seconds`` but the work clock's ``plan_work_seconds``): equal when the same plan was made."""
    kept = {k: v for k, v in plan.items() if k != "created_at"}
    kept["expected"] = {k: v for k, v in plan.get("expected", {}).items()
                        if not k.endswith("_seconds") or k == "plan_work_seconds"}
    return hashlib.sha256(orjson.dumps(kept, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]


def plan_one(suite: str, index: int, strategy: str, time_limit: float) -> dict:
    """Plan one scenario as ``bench/planner.py`` does; what to compare across processes."""
    m = planner_suite()
    plan = m.plan_scenario(m.SUITES[suite][index], strategy, time_limit)
    e = plan.expected
    return {"fingerprint": fingerprint(plan.to_dict()), "work_s": e.get("plan_work_seconds"),
            "gpd": e.get("goodput_per_dollar"), "wall_bound": bool(e.get("wall_clock_bound")),
            "shape": " ".join(m.plan_shape(plan).values())}


def _in_process(suite: str, index: int, strategy: str, time_limit: float, hash_seed: int) -> dict:
    """``plan_one`` in a fresh interpreter under ``hash_seed``."""
    cmd = [sys.executable, __file__, "--one", suite, str(index), strategy, str(time_limit)]
    res = subprocess.run(cmd, capture_output=True, env={**os.environ, "PYTHONHASHSEED": str(hash_seed)},
                         cwd=ROOT, timeout=600)
    if res.returncode != 0:
        return {"error": res.stderr.decode(errors="replace").strip().splitlines()[-1:]}
    return orjson.loads(res.stdout.splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--one":
        _, _, suite, index, strategy, limit = sys.argv
        print(orjson.dumps(plan_one(suite, int(index), strategy, float(limit))).decode())
        return
    m = planner_suite()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=tuple(m.SUITES), default="main")
    ap.add_argument("--strategies", default="thunderserve,no-bandwidth")
    ap.add_argument("--scenarios", default="", help="only scenarios whose name contains this piece")
    ap.add_argument("--hash-seeds", default="0,1", help="PYTHONHASHSEED values, one process each")
    ap.add_argument("--time-limit", type=float, default=8.0)
    ap.add_argument("--jobs", type=int, default=2, help="processes at once (at most the number of cores)")
    args = ap.parse_args()
    seeds = [int(x) for x in args.hash_seeds.split(",")]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    suite = m.SUITES[args.suite]
    picked = [i for i, sc in enumerate(suite) if args.scenarios.lower() in sc.name.lower()]
    runs = [(i, strat, h) for i in picked for strat in strategies for h in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        outs = list(pool.map(lambda r: _in_process(args.suite, r[0], r[1], args.time_limit, r[2]), runs))
    found = {run: out for run, out in zip(runs, outs, strict=True)}

    table = Table(title=f"{args.suite} suite: the same plan under hash seeds {args.hash_seeds}?")
    for col in ("scenario", "strategy", "plan", "same", "work s"):
        table.add_column(col)
    differing, wall_bound, errors = [], [], []
    for i in picked:
        for strat in strategies:
            got = [found[(i, strat, h)] for h in seeds]
            name = f"{suite[i].name} / {strat}"
            if any("error" in g for g in got):
                errors.append(name)
                table.add_row(suite[i].name, strat, "error", "-", "-")
                continue
            same = len({g["fingerprint"] for g in got}) == 1
            bound = any(g["wall_bound"] for g in got)
            if bound:
                wall_bound.append(name)
            elif not same:
                differing.append(name)
            table.add_row(suite[i].name, strat, got[0]["shape"], "yes" if same else ("wall" if bound else "NO"),
                          " / ".join(f"{g['work_s']}" for g in got))
    Console(width=200).print(table)
    print(orjson.dumps({"bench": "plan_determinism", "suite": args.suite, "hash_seeds": seeds,
                        "strategies": strategies, "time_limit_s": args.time_limit,
                        "plans": len(picked) * len(strategies), "differing": differing,
                        "wall_bound": wall_bound, "errors": errors}).decode())


if __name__ == "__main__":
    main()
