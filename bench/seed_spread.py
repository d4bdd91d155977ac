"""How much one arrival sequence moves a scenario's verdict: each strategy's plan, its goodput per $/h on
seeds 0..N-1 (seed 0 is the sequence the planner races its finalists on; the suite averages 1-3), and
ThunderServe's ratio to the best baseline on each seed and on the mean of all.

    python bench/seed_spread.py 'llama-2-13b $20/h long 40G' --seeds 8   # ~1.5 min for 3 strategies
    python bench/seed_spread.py '30b $30/h long 5G lambda' --suite clouds --strategies thunderserve,hexgen

Prints a rich table and, last, one JSON line. A scenario is picked by its name as ``bench/planner.py`` prints it, or a
piece of one; plans are made exactly as that suite makes them (8 s limit).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _suite import planner_suite


def main() -> None:
    suite_mod = planner_suite()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", help="a piece of the scenario's name, e.g. '13b $20/h long 40G'")
    ap.add_argument("--suite", choices=tuple(suite_mod.SUITES), default="main")
    ap.add_argument("--strategies", default="thunderserve,colocated,distserve,hexgen")
    ap.add_argument("--seeds", type=int, default=8, help="arrival sequences 0..N-1")
    ap.add_argument("--time-limit", type=float, default=8.0)
    args = ap.parse_args()

    from planner.simulator import goodput

    suite = suite_mod.SUITES[args.suite]
    matches = ([sc for sc in suite if args.scenario.lower() == sc.name.lower()]  # a whole name, else a piece
               or [sc for sc in suite if args.scenario.lower() in sc.name.lower()])
    if len(matches) != 1:
        names = ", ".join(sc.name for sc in matches) or "none"
        raise SystemExit(f"error: '{args.scenario}' names {len(matches)} scenarios of the {args.suite} suite "
                         f"({names}); give a piece of exactly one name")
    sc = matches[0]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    seeds = list(range(args.seeds))
    wl, slo = suite_mod.PROMPTS[sc.prompts], sc.slo()
    gpd: dict[str, list[float]] = {}
    shapes: dict[str, str] = {}
    for strat in strategies:
        plan = suite_mod.plan_scenario(sc, strat, args.time_limit)
        shapes[strat] = " ".join(suite_mod.plan_shape(plan).values())
        gpd[strat] = [goodput(plan, wl, slo, iters=6, seed=k) / plan.cost_per_hour for k in seeds]

    baselines = [b for b in strategies if b in suite_mod.BASELINES]
    compared = "thunderserve" in gpd and bool(baselines)
    per_seed = ([gpd["thunderserve"][i] / max(gpd[b][i] for b in baselines) for i in range(len(seeds))]
                if compared else [])
    of_means = (statistics.fmean(gpd["thunderserve"]) / max(statistics.fmean(gpd[b]) for b in baselines)
                if compared else None)
    table = Table(title=f"{sc.name}: goodput per $/h on each arrival sequence")
    for col in ("strategy", "plan", *[f"seed {k}" for k in seeds], "mean", "sd %"):
        table.add_column(col)
    for strat in strategies:
        mean = statistics.fmean(gpd[strat])
        sd = 100 * statistics.pstdev(gpd[strat]) / mean if mean > 0 else 0.0
        table.add_row(strat, shapes[strat], *[f"{x:.3f}" for x in gpd[strat]], f"{mean:.3f}", f"{sd:.1f}")
    if of_means is not None:
        table.add_row("ours / best baseline", "", *[f"{r:.3f}" for r in per_seed], f"{of_means:.3f}", "")
    Console(width=220).print(table)
    print(orjson.dumps({
        "bench": "seed_spread", "scenario": sc.name, "seeds": seeds, "plans": shapes,
        "gpd": {k: [round(x, 4) for x in v] for k, v in gpd.items()},
        "ratio_per_seed": [round(r, 3) for r in per_seed],
        "ratio_of_means": round(of_means, 3) if of_means is not None else None,
    }).decode())


if __name__ == "__main__":
    main()
