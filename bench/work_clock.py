"""Calibrate the planner's work clock (``planner/work.py``) against wall time on this machine.

The planner's deadlines are measured in work done (the kinds of ``planner.work.COST``), so that one
seed gives one plan whatever the machine's load. This runs a spread of planning jobs (rented scenarios
of the planner suites, owned 32- and 64-GPU pools, a reschedule, plain simulations), each as in a fresh
process, counts each job's work and times it, fits the seconds per unit of each kind by
non-negative least squares on the jobs' wall times, and prints, per job, wall seconds and the work
clock's seconds under the current ``COST`` and under the fitted one. Run it on an idle machine:

    python bench/work_clock.py            # ~11 min on the 2-core CI machine
    python bench/work_clock.py --from bench/results/work_clock_2026-11-30-2.json \
        --fit mip+mip_resolve colocated_point+mixed_point   # refit a few kinds of a saved run, the rest held
Prints a rich table and, last, one JSON line (the fitted ``COST`` and the per-job ratios).
"""

from __future__ import annotations

import argparse
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
from planner.cost_model import DEFAULT_EFF  # noqa: E402
from planner.models import load_model  # noqa: E402
from planner.offers import MAX_GPUS  # noqa: E402
from planner.parallel import PlanContext  # noqa: E402
from planner.rent import choose_pools  # noqa: E402
from planner.reschedule import reschedule  # noqa: E402
from planner.scheduler import MARGINAL_VALUE, plan_deployment  # noqa: E402
from planner.simulator import goodput  # noqa: E402
from planner.workload import SLO  # noqa: E402

REPEATS = 2  # runs of each job: this VM's speed moves by up to 50% from one second to the next


def jobs() -> list[tuple[str, Callable[[], object]]]:
    """Planning jobs whose work mixes differ: simulation-heavy races, LP-heavy big pools, MIP-heavy renting,
    and rent steps alone (the unit catalog built, then only the MIPs) so the two can be told apart."""
    b = planner_suite()
    out: list[tuple[str, Callable[[], object]]] = []

    def rented(sc, limit_s: float) -> Callable[[], object]:
        return lambda: b.plan_scenario(sc, time_limit=limit_s)

    def rent_step(sc, cache: dict) -> Callable[[], object]:
        spec, offers = load_model(sc.model), b.offers_for(sc.cloud, sc.capacity)
        wl = b.PROMPTS[sc.prompts]
        return lambda: choose_pools(offers, sc.budget, True,
                                    lambda cluster: PlanContext(spec, wl, sc.slo(), cluster, DEFAULT_EFF),
                                    phases=("prefill", "decode", "both"), inter_node_gbps=sc.gbps,
                                    kv_compression="auto", max_gpus=MAX_GPUS, marginal_value=MARGINAL_VALUE,
                                    group_cache=cache)

    for sc in (b.SCARCE_SUITE[8], b.SUITE[0], b.SUITE[7], b.replace(b.SUITE[9], cloud="runpod")):
        out.append((f"rent {sc.name} (catalog built)", lambda sc=sc: rent_step(sc, {})()))  # a fresh catalog
        cached = rent_step(sc, {})
        cached()  # the catalog built once, outside the timing: the runs below are the MIPs alone
        out.append((f"rent {sc.name} (catalog cached)", cached))
    out.append((f"plan {b.SCARCE_SUITE[8].name}", rented(b.SCARCE_SUITE[8], 6.0)))  # capped offers: big MIPs

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


def run_jobs() -> list[tuple[str, float, dict[str, float]]]:
    """(job and run, wall seconds, work counted per kind) for each run of each job."""
    rows = []
    for name, job in jobs():
        for run in range(REPEATS):  # each run is a row: this VM's speed varies, and caches may warm up
            capacity._MEMO.clear()  # as in a fresh process (memo hits count their work again, in no time)
            before, t0 = work.counts(), time.perf_counter()
            job()
            wall = time.perf_counter() - t0
            rows.append((f"{name} #{run + 1}", wall, work.since(before)))
    return rows


def fit(rows: list[tuple[str, float, dict[str, float]]], groups: list[list[str]] | None
        ) -> tuple[dict[str, float], float]:
    """(``COST`` fitted, this machine's seconds per reference second) by non-negative least squares on
    relative error. ``groups`` None: every kind free (the speed is then 1 by definition). Otherwise only
    the kinds named, each group one cost shared in its kinds' current proportions (equal where any is 0),
    the others held at ``COST`` up to one factor, the machine's speed against the reference: a refit of
    a few kinds then moves no other deadline, whatever this machine's speed today."""
    y = np.array([w for _, w, _ in rows])
    weights = 1 / np.maximum(y, 0.5)  # relative error: a 1 s job matters as much as a 10 s one
    if groups is None:
        kinds = list(work.COST)
        a = np.array([[c.get(k, 0.0) for k in kinds] for _, _, c in rows])
        coef, _ = nnls(a * weights[:, None], y * weights)
        return {k: float(f"{v:.3g}") for k, v in zip(kinds, coef, strict=True)}, 1.0
    shares = [{k: (work.COST[k] if all(work.COST[g] > 0 for g in group) else 1.0) for k in group} for group in groups]
    free = {k for group in groups for k in group}
    a = np.array([[sum(work.COST[k] * v for k, v in c.items() if k not in free)]
                  + [sum(w * c.get(k, 0.0) for k, w in share.items()) for share in shares] for _, _, c in rows])
    coef, _ = nnls(a * weights[:, None], y * weights)
    speed = float(coef[0])
    fitted = dict(work.COST)
    for share, scale in zip(shares, coef[1:], strict=True):
        fitted.update({k: float(f"{scale * w / speed:.3g}") for k, w in share.items()})
    return fitted, speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="source", type=Path, help="refit the jobs of a saved run (its JSON line)")
    ap.add_argument("--fit", nargs="+", metavar="KIND[+KIND]", help="fit only these kinds, the others held "
                    "(e.g. mip+mip_resolve colocated_point+mixed_point); default: every kind")
    args = ap.parse_args()
    if args.source:
        saved = orjson.loads(args.source.read_text().strip().splitlines()[-1])["jobs"]
        rows = [(name, j["wall_s"], {k: v for k, v in j.items() if k in work.COST}) for name, j in saved.items()]
    else:
        rows = run_jobs()
    unknown = [k for g in args.fit or [] for k in g.split("+") if k not in work.COST]
    if unknown:
        ap.error(f"unknown kind(s) {', '.join(unknown)}; known: {', '.join(work.COST)}")
    fitted, speed = fit(rows, [g.split("+") for g in args.fit] if args.fit else None)
    table = Table(title="work clock vs wall time" + (f" (this machine {speed:.2f}x the reference)" if args.fit else ""))
    for col in ("job", "wall s", "clock s (current)", "ratio", "clock s (fitted)", "ratio"):
        table.add_column(col, justify="right" if col != "job" else "left")
    ratios_now, ratios_fit = [], []
    for name, wall, c in rows:
        now = work.reference_seconds(c)
        new = sum(fitted[k] * v for k, v in c.items()) * speed  # in this machine's seconds, as wall is
        ratios_now.append(now / wall)
        ratios_fit.append(new / wall)
        table.add_row(name, f"{wall:.2f}", f"{now:.2f}", f"{now / wall:.2f}", f"{new:.2f}", f"{new / wall:.2f}")
    Console(stderr=True).print(table)

    def spread(xs: list[float]) -> dict[str, float]:
        return {"min": round(min(xs), 3), "median": round(statistics.median(xs), 3), "max": round(max(xs), 3)}

    print(orjson.dumps({"bench": "work_clock", "cost_current": work.COST, "cost_fitted": fitted,
                        "fit": args.fit or "all", "speed": round(speed, 3),
                        "ratio_current": spread(ratios_now), "ratio_fitted": spread(ratios_fit),
                        "jobs": {name: {"wall_s": round(w, 3), **{k: c.get(k, 0.0) for k in work.COST}}
                                 for name, w, c in rows}}).decode())


if __name__ == "__main__":
    main()
