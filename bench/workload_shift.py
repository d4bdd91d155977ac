"""What the lightweight reschedule is worth when the workload shifts (ThunderServe's second mechanism).

A deployment is planned for one length mix; then the mix shifts (prompt-heavy: RAG-style long prompts and
short answers; generation-heavy: short prompts and long answers). On the new mix, the simulator's goodput of:
- ``kept``: the old plan as it is (phases and routing made for the old mix): the baseline;
- ``rescheduled``: ``planner.reschedule`` for the observed mix (what the controller does on a shift: phases
  flipped and routing re-solved on the same replicas, no weight reload), and how long it took;
- ``replanned``: a full plan for the new mix on the same GPUs (regrouping means reloading weights: the
  costly restart the reschedule avoids), as the upper reference.

    python bench/workload_shift.py [--time-limit 10]

Prints a table and one JSON line (ratios rescheduled/kept and rescheduled/replanned per scenario, their
geometric means).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's planner, not bench/planner.py

from planner.reschedule import reschedule
from planner.scheduler import plan_deployment
from planner.simulator import goodput
from planner.workload import SLO, Lengths, Workload

MIXES = {
    "chat": Workload(1.0, Lengths(256, "lognormal", 0.8), Lengths(256, "lognormal", 0.8)),
    "prompt-heavy": Workload(1.0, Lengths(2048, "lognormal", 0.5), Lengths(64, "lognormal", 0.5)),
    "generation-heavy": Workload(1.0, Lengths(64, "lognormal", 0.5), Lengths(1024, "lognormal", 0.5)),
}
# (model, GPUs owned, SLO): pools where phases can be split, at SLOs both mixes can meet
SETUPS = [
    ("llama-2-7b", "4xL40S,4xL4", SLO(4.0, 0.1)),
    ("llama-3.1-8b", "2xA100-80GB,4xA10G", SLO(4.0, 0.1)),
    ("llama-2-13b", "4xL40S,2xA100-80GB", SLO(6.0, 0.15)),
]
SHIFTS = [("chat", "prompt-heavy"), ("chat", "generation-heavy"), ("prompt-heavy", "generation-heavy"),
          ("generation-heavy", "prompt-heavy")]


def roles(plan) -> str:
    count = {r: sum(1 for x in plan.replicas if x.role == r) for r in ("prefill", "decode", "both")}
    return f"{count['prefill']}P/{count['decode']}D" + (f"/{count['both']}C" if count["both"] else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--time-limit", type=float, default=10.0, help="planning time cap (s) of each full plan")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = []
    for model, pool, slo in SETUPS:
        for before, after in SHIFTS:
            old = plan_deployment(model, MIXES[before], slo, pool=pool, seed=args.seed, time_limit_s=args.time_limit,
                                  disaggregate=True)
            t0 = time.perf_counter()
            moved, changes = reschedule(old, workload=MIXES[after], slo=slo)
            resched_s = time.perf_counter() - t0
            fresh = plan_deployment(model, MIXES[after], slo, pool=pool, seed=args.seed,
                                    time_limit_s=args.time_limit, disaggregate=True)
            wl = MIXES[after]
            g = {name: goodput(p, wl, slo, seed=args.seed) for name, p in
                 (("kept", old), ("rescheduled", moved), ("replanned", fresh))}
            rows.append({"model": model, "pool": pool, "shift": f"{before} -> {after}", "roles_before": roles(old),
                         "roles_after": roles(moved), "roles_replanned": roles(fresh),
                         "role_flips": len(changes.role_flips), "reschedule_s": round(resched_s, 3),
                         **{f"goodput_{k}": round(v, 3) for k, v in g.items()},
                         "rescheduled_over_kept": round(g["rescheduled"] / g["kept"], 3) if g["kept"] else None,
                         "rescheduled_over_replanned": round(g["rescheduled"] / g["replanned"], 3)
                         if g["replanned"] else None})
            print(json.dumps(rows[-1]), flush=True)
    table = Table(title="workload shift: simulated goodput (req/s) on the new mix")
    for col in ("model", "pool", "shift", "phases", "flips", "kept", "rescheduled", "replanned", "x kept",
                "x replanned", "resched s"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], r["pool"], r["shift"], f"{r['roles_before']} -> {r['roles_after']} "
                      f"({r['roles_replanned']})", str(r["role_flips"]), f"{r['goodput_kept']:.2f}",
                      f"{r['goodput_rescheduled']:.2f}", f"{r['goodput_replanned']:.2f}",
                      f"{r['rescheduled_over_kept']}", f"{r['rescheduled_over_replanned']}", f"{r['reschedule_s']:.2f}")
    Console(width=200).print(table)

    def gmean(key: str) -> float | None:
        xs = [r[key] for r in rows if r[key]]
        return round(math.exp(sum(math.log(x) for x in xs) / len(xs)), 3) if xs else None

    print(json.dumps({"bench": "workload_shift", "scenarios": len(rows),
                      "rescheduled_over_kept_gmean": gmean("rescheduled_over_kept"),
                      "rescheduled_over_replanned_gmean": gmean("rescheduled_over_replanned"),
                      "reschedule_s_max": max(r["reschedule_s"] for r in rows), "rows": rows}))


if __name__ == "__main__":
    main()
