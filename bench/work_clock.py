"""Calibrate the planner's work clock (``planner/work.py``) against wall time on this machine.

The planner's deadlines are measured in work done (the kinds of ``planner.work.COST``), so that one
seed gives one plan whatever the machine's load. This runs a spread of planning jobs (rented scenarios
of the planner suites, owned 32- and 64-GPU pools, a reschedule, plain simulations), each as in a fresh
process, counts each job's work and times it, fits the seconds per unit of each kind by
non-negative least squares on the jobs' wall times, and prints, per job, wall seconds and the work
clock's seconds under the current ``COST`` and under the fitted one. Run it on an idle machine:

    python bench/work_clock.py            # ~8 min on the 2-core CI machine
Prints a rich table and, last, one JSON line (the fitted ``COST`` and the per-job ratios).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table
from scipy.optimize import nnls

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _suite import planner_suite  # noqa: E402

from planner import capacity, work  # noqa: E402
from planner.reschedule import reschedule  # noqa: E402
from planner.scheduler import plan_deployment  # noqa: E402
from planner.simulator import goodput  # noqa: E402
from planner.workload import SLO  # noqa: E402

REPEATS = 2  # runs of each job: this VM's speed moves by up to 50% from one second to the next


def jobs() -> list[tuple[str, Callable[[], object]]]:
    """Planning jobs whose work mixes differ: simulation-heavy races, LP-heavy big pools, MIP-heavy renting."""
    b = planner_suite()
    out: list[tuple[str, Callable[[], object]]] = []

    def rented(sc, limit_s: float) -> Callable[[], object]:
        return lambda: plan_deployment(sc.model, b.PROMPTS[sc.prompts], sc.slo(), budget=sc.budget,
                                       offers=b.offers_for(sc.cloud), inter_node_gbps=sc.gbps, time_limit_s=limit_s)

    for idx, cloud in [(0, ""), (3, ""), (5, "lambda"), (7, ""), (9, "runpod"), (11, ""), (13, "vast"), (3, "vast"),
                       (5, "runpod"), (11, "lambda")]:
        sc = b.replace(b.SUITE[idx], cloud=cloud)
        out.append((f"plan {sc.name}", rented(sc, 6.0)))
    sc = b.INTERACTIVE_SUITE[3]  # 70B, long prompts, MLPerf's interactive targets: capacity tables dominate
    out.append((f"plan {sc.name}", rented(sc, 6.0)))
    wl, slo = b.PROMPTS["short"].with_rate(0.0), SLO(1.5, 0.05)
    pool = "8*2xL40S,4*2xRTX3090,2*4xA100-80GB"

    def owned(spec: str, limit_s: float) -> Callable[[], object]:
        return lambda: plan_deployment("llama-2-13b", wl, slo, pool=spec, inter_node_gbps=10, time_limit_s=limit_s)

    out.append(("plan 32-GPU pool", owned(pool, 12.0)))
    out.append(("plan 64-GPU pool", owned("8*4xL40S,4*4xRTX3090,2*8xA100-80GB", 12.0)))
    big = owned(pool, 2.0)()
    out.append(("reschedule 32-GPU pool", lambda: reschedule(big, lost_nodes=[big.instances[0].id])))
    out.append(("simulate 32-GPU plan", lambda: goodput(big, wl, slo, iters=4)))
    for idx, cloud in [(0, "lambda"), (13, "lambda"), (5, "")]:  # races' simulations: colocated, split, hybrid
        sc = b.replace(b.SUITE[idx], cloud=cloud)
        chosen = rented(sc, 2.0)()
        out.append((f"simulate {sc.name}",
                    lambda p=chosen, sc=sc: goodput(p, b.PROMPTS[sc.prompts], sc.slo(), iters=4)))
    return out


def main() -> None:
    rows = []
    for name, job in jobs():
        for run in range(REPEATS):  # each run is a row: this VM's speed varies, and caches may warm up
            capacity._MEMO.clear()  # as in a fresh process (memo hits count their work again, in no time)
            before, t0 = work.counts(), time.perf_counter()
            job()
            wall = time.perf_counter() - t0
            rows.append((f"{name} #{run + 1}", wall, work.since(before)))
    kinds = list(work.COST)
    a = np.array([[c.get(k, 0.0) for k in kinds] for _, _, c in rows])
    y = np.array([w for _, w, _ in rows])
    weights = 1 / np.maximum(y, 0.5)  # relative error: a 1 s job matters as much as a 10 s one
    coef, _ = nnls(a * weights[:, None], y * weights)
    fitted = dict(zip(kinds, (float(f"{c:.3g}") for c in coef), strict=True))
    table = Table(title="work clock vs wall time")
    for col in ("job", "wall s", "clock s (current)", "ratio", "clock s (fitted)", "ratio"):
        table.add_column(col, justify="right" if col != "job" else "left")
    ratios_now, ratios_fit = [], []
    for (name, wall, c), row in zip(rows, a, strict=True):
        now, fit = work.reference_seconds(c), float(row @ coef)
        ratios_now.append(now / wall)
        ratios_fit.append(fit / wall)
        table.add_row(name, f"{wall:.2f}", f"{now:.2f}", f"{now / wall:.2f}", f"{fit:.2f}", f"{fit / wall:.2f}")
    Console(stderr=True).print(table)
    def spread(xs: list[float]) -> dict[str, float]:
        return {"min": round(min(xs), 3), "median": round(statistics.median(xs), 3), "max": round(max(xs), 3)}

    print(orjson.dumps({"bench": "work_clock", "cost_current": work.COST, "cost_fitted": fitted,
                        "ratio_current": spread(ratios_now), "ratio_fitted": spread(ratios_fit),
                        "jobs": {name: {"wall_s": round(w, 3), **{k: c.get(k, 0.0) for k in kinds}}
                                 for name, w, c in rows}}).decode())

if __name__ == "__main__":
    main()
