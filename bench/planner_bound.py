"""How much better than the best homogeneous colocated plan any plan could be, per dollar, in each scenario.

The planner suite (``bench/planner.py``) asks ThunderServe for 1.3x the best baseline's goodput per
dollar. This script bounds what any plan can reach, under the planner's own capacity model, so a
scenario where ours ties the colocated baseline can be told apart from one where the search falls
short. For each place (cloud, region) of a scenario's catalog it takes the planner's own rent units
(``planner.rent.UnitCatalog``: each instance type cut into its best replicas per role, each with its
capacity at the SLO from the cost model) and computes, per dollar:

- ``colocated``: the best colocated unit (one GPU type, replicas doing both phases; any mix of
  colocated units is a weighted mean of theirs, so no heterogeneous colocated plan does better);
- ``split``: prefill and decode on separate replicas, the cheapest prefill unit and the cheapest
  decode unit of the place, any types: ``1 / (cost per prefill req/s + cost per decode req/s)``, a
  prefill unit's rate capped by what its NICs can ship of the prompts' KV (the rent MIP's network
  constraint, auto compression). KV latency, routing imbalance and whole instances are left out, so
  it is an upper bound;
- ``homogeneous split``: the same with both units of one GPU type (what a DistServe-style baseline can do);
- ``in-node split``: one multi-GPU instance holding both phases (KV over its own GPU link);
- ``any plan``: the best of them all. Capacities add across replicas, so a plan mixing them is a
  weighted mean too (the LP relaxation of the planner's rent MIP, one place at a time).

The ratio ``any plan / colocated`` is then the most a plan can gain over homogeneous colocated
serving per dollar, if the capacity model holds (the simulator, which decides the suite, agrees with it to a
few % on these plans). With ``--results`` (a ``bench/planner.py`` JSON line) the table also shows the suite's
measured ratio over the best baseline and, in the bound's own terms, ours over the colocated baseline
(2026-11-30, ``-8``: 1.085x main against a bound of 1.091x, 1.195x per cloud against 1.193x, 1.033x interactive
against 1.05x: the plans reach what the capacity model allows).

``--length-split 0.5,0.8``: the same bound for a plan that serves prompts shorter than the given quantile of
the prompt length apart from the longer ones (the gateway would route by length: short prompts to the
family best at them, long ones to theirs, each class meeting the SLO alone, both at one place). Under this
model it does not beat serving all prompts together (main suite, 2026-11-30: 0.90-1.04 of ``any plan``):
each class loses the other's batching and must meet the SLO on its own.

``any plan / best of one type`` divides by the best of colocated, homogeneous split and in-node split: the
most a plan can gain over the best baseline of the suite (whose baselines all rent one GPU type, except
HexGen-style colocated mixes, which are weighted means of colocated units), a sharper bound on the suite's
measure than over colocated alone.

    python bench/planner_bound.py                          # the main suite, ~1 min
    python bench/planner_bound.py --suite clouds --results bench/results/planner_clouds_2026-11-29-2.json
Prints a rich table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _suite import planner_suite  # noqa: E402

from planner.cluster import Cluster, Node  # noqa: E402
from planner.cost_model import DEFAULT_EFF  # noqa: E402
from planner.models import load_model  # noqa: E402
from planner.offers import MAX_GPUS  # noqa: E402
from planner.rent import (  # noqa: E402
    NetworkKv,
    Unit,
    UnitCatalog,
    offers_by_place,
    rate_rows,
    shipped_capacity,
    solve_mix,
)
from planner.scheduler import Setting  # noqa: E402
from planner.workload import Lengths, Workload  # noqa: E402

FAMILIES = ("colocated", "split", "homogeneous split", "in-node split")
# what a baseline of one GPU type can be: colocated replicas, a split of one type over the network
# (DistServe-style), or both phases in one instance
HOMOGENEOUS = ("colocated", "homogeneous split", "in-node split")
MIP = "rent MIP"
ANY = "any plan"
HEXGEN = "colocated, any types"  # at the budget of a capped catalog (``--suite scarce``)
ONE_TYPE = "best one type"


def units_by_place(sc, suite, capacity: int | None = None, workload: Workload | None = None
                   ) -> tuple[Setting, dict[tuple[str, str], list[Unit]]]:
    """The scenario's planning setting and, per place (cloud, region) of its catalog (each offer capped
    at ``capacity`` instances when given), the rent step's units within the budget (for ``workload``, by
    default the scenario's)."""
    s = Setting(load_model(sc.model), workload or suite.PROMPTS[sc.prompts], sc.slo(), sc.budget,
                suite.offers_for(sc.cloud, capacity), None, True, sc.gbps, "auto", 0, math.inf, MAX_GPUS, DEFAULT_EFF)
    catalog = UnitCatalog(s.context, ("prefill", "decode", "both"), sc.gbps)
    return s, {place: units for place, kinds in offers_by_place(s.offers, True).items()
               if (units := [u for k in kinds for u in catalog.units(k) if u.cost <= sc.budget and u.capacity > 0])}


def network_kv(s: Setting, sc) -> NetworkKv:
    """The rent MIP's own network terms: a prefill instance's NIC carries its prompts' KV (auto
    compression) to the decode side, at most LINK_UTILISATION busy, and the trip takes TTFT."""
    return NetworkKv.of(s.context(Cluster([Node("x", "A100-80GB", 1)], inter_node_gbps=sc.gbps)), sc.gbps, "auto")


def any_plan_by_place(sc, suite, workload: Workload) -> dict[tuple[str, str], float]:
    """``per_dollar_by_place``'s ``ANY`` alone (no family figures, no rent MIP), for ``workload``."""
    s, places = units_by_place(sc, suite, workload=workload)
    kv = network_kv(s, sc)
    return {place: lp_per_dollar(units, kv) for place, units in places.items()}


def per_dollar_by_place(sc, suite, workload: Workload | None = None) -> dict[tuple[str, str], dict[str, float]]:
    """Req/s per $/h of each family at each place of the scenario's catalog (0 where it has no unit),
    and of the rent MIP's own integer mix at the budget (``MIP``), for ``workload`` (default the scenario's)."""
    s, places = units_by_place(sc, suite, workload=workload)
    kv = network_kv(s, sc)
    out = {}
    for place, units in places.items():
        top = {role: 0.0 for role in ("both", "prefill", "decode", "pd")}
        by_type: dict[str, dict[str, float]] = {}  # the same, per GPU type, for the split roles
        for u in units:
            cap = shipped_capacity(u, kv) if u.role == "prefill" else u.capacity
            top[u.role] = max(top[u.role], cap / u.cost)
            of_type = by_type.setdefault(u.kind.offer.gpu_type, {"prefill": 0.0, "decode": 0.0})
            if u.role in of_type:
                of_type[u.role] = max(of_type[u.role], cap / u.cost)
        rate, cost, _ = solve_mix(units, sc.budget, MAX_GPUS, s.context, sc.gbps, "auto", True)
        out[place] = {"colocated": top["both"], "split": _split(top),
                      "homogeneous split": max(map(_split, by_type.values()), default=0.0), "in-node split": top["pd"],
                      ANY: lp_per_dollar(units, kv), MIP: rate / cost if cost > 0 else 0.0}
    return out


def at_budget_by_place(sc, suite) -> dict[tuple[str, str], dict[str, float]]:
    """Req/s at the budget at each place of a capped catalog (each offer rents at most its Capacity):
    the rent MIP's LP relaxation over every unit (``ANY``: an upper bound on any plan's rate there), its
    integer optimum (``MIP``), and the baselines' best by the same MIP over their own units:
    ``HEXGEN`` colocated units of any types (a heterogeneous colocated mix: once the best type is
    capped, its weighted mean of colocated units is no longer the best type's), ``ONE_TYPE`` the best
    single GPU type with any of its units (colocated, split over the network, in-node split)."""
    s, places = units_by_place(sc, suite, sc.capacity)
    out = {}
    for place, units in places.items():

        def rate(chosen: list[Unit], relax: bool = False) -> float:
            if not chosen:
                return 0.0
            return solve_mix(chosen, sc.budget, MAX_GPUS, s.context, sc.gbps, "auto", True, relax=relax)[0]

        types = {u.kind.offer.gpu_type for u in units}
        out[place] = {ANY: rate(units, relax=True), MIP: rate(units),
                      HEXGEN: rate([u for u in units if u.role == "both"]),
                      ONE_TYPE: max(rate([u for u in units if u.kind.offer.gpu_type == t]) for t in types)}
    return out


def bound_at_budget(sc, suite, by_place: dict | None = None) -> dict:
    """A capped scenario's best place for each figure of ``at_budget_by_place`` (``by_place``, computed
    if not given), and the ratios of ours (relaxed, and the MIP's integer mix) to the best baseline's."""
    by_place = by_place or at_budget_by_place(sc, suite)
    best = {f: max((v[f] for v in by_place.values()), default=0.0) for f in (ANY, MIP, HEXGEN, ONE_TYPE)}
    base = max(best[HEXGEN], best[ONE_TYPE])
    return {**{f: round(v, 3) for f, v in best.items()},
            "bound_vs_homogeneous": round(best[ANY] / base, 3) if base > 0 else math.inf,
            "mip_ratio": round(best[MIP] / base, 3) if base > 0 else math.inf,
            "best_baseline": HEXGEN if best[HEXGEN] >= best[ONE_TYPE] else ONE_TYPE}


def _split(top: dict[str, float]) -> float:
    """Req/s per $/h of the cheapest prefill unit and the cheapest decode unit together."""
    return 1.0 / (1.0 / top["prefill"] + 1.0 / top["decode"]) if top["prefill"] and top["decode"] else 0.0


def lp_per_dollar(units: list[Unit], kv: NetworkKv) -> float:
    """The rent MIP's LP relaxation per dollar: any non-negative amounts of the units at $1/h in all,
    rate_pd within the prefill and the decode capacity and what the prefill NICs can ship, rate_c
    within the colocated (and in-node split) capacity. No budget, GPU or offer-count limits: an upper
    bound on the req/s per $/h of any mix of these units."""
    from scipy.optimize import linprog

    n = len(units)
    c = np.zeros(n + 2)
    c[n:] = -1.0  # maximise rate_pd + rate_c
    a_ub = np.zeros((3, n + 2))
    for r, coeffs in enumerate(rate_rows(units, kv)):  # the rent MIP's own capacity rows
        for i, v in coeffs.items():
            a_ub[r, i] = v
    a_eq = np.zeros((1, n + 2))
    a_eq[0, :n] = [u.cost for u in units]
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(3), A_eq=a_eq, b_eq=[1.0], bounds=[(0, None)] * (n + 2),
                  method="highs")
    return float(-res.fun) if res.status == 0 else 0.0


LENGTH_SAMPLE = 20000  # prompt lengths drawn to cut a workload into classes
CLASS_POINTS = 2000  # ... and kept per class (an empirical distribution)


def length_classes(wl: Workload, share: float) -> tuple[float, Workload, Workload] | None:
    """(share of requests, the short prompts' workload, the long prompts'): prompts under the ``share``
    quantile of the prompt length and the rest, as empirical length distributions with the same outputs;
    None where the cut leaves a class empty (fixed lengths)."""
    x = np.sort(wl.input.sample(np.random.default_rng(0), LENGTH_SAMPLE))
    cut = x[min(int(share * len(x)), len(x) - 1)]
    short, long_ = x[x < cut], x[x >= cut]
    if not len(short) or not len(long_):
        return None

    def thin(v: np.ndarray) -> Lengths:
        return Lengths.empirical(v[:: max(1, len(v) // CLASS_POINTS)])

    return len(short) / len(x), replace(wl, input=thin(short)), replace(wl, input=thin(long_))


def length_split_bound(sc, suite, share: float) -> float:
    """Req/s per $/h of any plan serving the short and the long prompts of ``length_classes`` apart, each
    class by its own best mix of units (``lp_per_dollar``) at one place: the cost of a request is the
    classes' costs weighted by their shares. NaN where the cut leaves a class empty."""
    classes = length_classes(suite.PROMPTS[sc.prompts], share)
    if classes is None:
        return math.nan
    p, short, long_ = classes
    a, b = any_plan_by_place(sc, suite, short), any_plan_by_place(sc, suite, long_)
    both = [(a[place], b[place]) for place in a.keys() & b.keys()]
    return max((1.0 / (p / x + (1 - p) / y) for x, y in both if x > 0 and y > 0), default=0.0)


def bound(sc, suite) -> dict:
    """The best place's figures for each family, and the ratio of the best of any family to colocated."""
    by_place = per_dollar_by_place(sc, suite)
    best = {f: max((v[f] for v in by_place.values()), default=0.0) for f in (*FAMILIES, ANY, MIP)}
    col = best["colocated"]
    one_type = max(best[f] for f in HOMOGENEOUS)
    return {**{f: round(v, 4) for f, v in best.items()},
            "bound_ratio": round(best[ANY] / col, 3) if col > 0 else math.inf,
            # over the best plan of one GPU type, any family: what the suite's best baseline can reach
            "bound_vs_homogeneous": round(best[ANY] / one_type, 3) if one_type > 0 else math.inf,
            "mip_ratio": round(best[MIP] / col, 3) if col > 0 else math.inf,
            "best_single_family": max(FAMILIES, key=lambda f: best[f])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=("main", "interactive", "clouds", "scarce"), default="main")
    ap.add_argument("--results", type=Path, default=None,
                    help="a bench/planner.py JSON result of the same suite: its measured ratios go beside the bound")
    ap.add_argument("--length-split", default="",
                    help="quantiles of the prompt length (e.g. 0.5,0.8): also bound plans serving shorter and longer "
                         "prompts apart")
    args = ap.parse_args()
    shares = [float(x) for x in args.length_split.split(",") if x.strip()]
    suite = planner_suite()
    scenarios: list = suite.SUITES[args.suite]
    capped = any(sc.capacity is not None for sc in scenarios)
    measured: dict[str, float] = {}
    ours_over_colocated: dict[str, float] = {}  # the bound's own terms: ours over the colocated baseline
    if args.results:
        results = orjson.loads(args.results.read_text().strip().splitlines()[-1])
        measured = results.get("ratio_at_budget" if capped else "ratio_vs_best_baseline", {})
        ours_over_colocated = {name: round(g["thunderserve"] / g["colocated"], 3)
                               for name, g in results.get("gpd", {}).items() if g.get("colocated", 0) > 0}
    console = Console(width=200)
    if capped:
        if shares:
            ap.error("--length-split bounds per dollar; a capped suite is judged at the budget")
        print_at_budget(args.suite, scenarios, suite, measured, console)
        return
    splits = [f"length split {f:g} / any plan" for f in shares]

    def figures(sc) -> dict:
        out = bound(sc, suite)
        for f, col in zip(shares, splits, strict=True):
            out[col] = round(length_split_bound(sc, suite, f) / out[ANY], 3) if out[ANY] > 0 else math.nan
        return out

    rows = _rows(scenarios, figures, measured)
    for r in rows:
        if r["scenario"] in ours_over_colocated:
            r["measured_over_colocated"] = ours_over_colocated[r["scenario"]]
    table = _table("The most any plan gains per dollar over homogeneous colocated serving (planner's capacity "
                   "model; req/s per $/h)", ("scenario", *FAMILIES, ANY, "bound: any plan / colocated",
                                              "any plan / best of one type", "best single family",
                                              "rent MIP / colocated", *splits, "suite measured",
                                              "suite: ours / colocated"))
    for r in rows:
        table.add_row(r["scenario"], *(f"{r[f]:.3f}" for f in (*FAMILIES, ANY)),
                      f"{r['bound_ratio']:.3f}x", f"{r['bound_vs_homogeneous']:.3f}x", r["best_single_family"],
                      f"{r['mip_ratio']:.3f}x", *(f"{r[c]:.3f}x" for c in splits),
                      *(f"{r[c]:.3f}x" if c in r else "-" for c in ("measured_ratio", "measured_over_colocated")))
    console.print(table)
    ratios = [r["bound_ratio"] for r in rows if math.isfinite(r["bound_ratio"])]
    summary = {"bench": "planner_bound", "suite": args.suite, "scenarios": len(rows),
               "bound_geomean": suite.geomean(ratios),
               "bound_max": max(ratios, default=None),
               "bound_vs_homogeneous_geomean": suite.geomean([r["bound_vs_homogeneous"] for r in rows]),
               "scenarios_bound_under_1_3": sum(1 for x in ratios if x < 1.3),
               "mip_geomean": suite.geomean([r["mip_ratio"] for r in rows]),
               **({"measured_geomean": suite.geomean([r["measured_ratio"] for r in rows])}
                  if all("measured_ratio" in r for r in rows) else {}),
               **({"measured_over_colocated_geomean": suite.geomean([r["measured_over_colocated"] for r in rows])}
                  if all("measured_over_colocated" in r for r in rows) else {}),
               **{f"{c} geomean": suite.geomean([r[c] for r in rows if math.isfinite(r[c])]) for c in splits},
               **{f"{c} max": max((r[c] for r in rows if math.isfinite(r[c])), default=None) for c in splits},
               "rows": rows}
    print(orjson.dumps(summary).decode())


def _rows(scenarios: list, figures: Callable[[object], dict], measured: dict[str, float]) -> list[dict]:
    """One row per scenario: its figures, and the suite's measured ratio where the results have it."""
    rows = []
    for sc in scenarios:
        rows.append({"scenario": sc.name, **figures(sc)})
        if sc.name in measured:
            rows[-1]["measured_ratio"] = measured[sc.name]
    return rows


def _table(title: str, columns: tuple[str, ...]) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col == "scenario" else "right")
    return table


def print_at_budget(name: str, scenarios: list, suite, measured: dict[str, float], console: Console) -> None:
    """The capped suite's table and JSON line: what ours could serve at the budget over the baselines' best.
    Per dollar the caps do not bind the relaxation (a sliver of the best units is as good per dollar as
    many), so a capped catalog is judged at the budget, as the suite's ``ratio_at_budget``."""
    rows = _rows(scenarios, lambda sc: bound_at_budget(sc, suite), measured)
    table = _table("The most any plan serves at the budget over the best baseline, offers capped (planner's "
                   "capacity model; req/s)", ("scenario", ANY, MIP, HEXGEN, ONE_TYPE, "any plan / best baseline",
                                              "rent MIP / best baseline", "best baseline", "suite measured"))
    for r in rows:
        table.add_row(r["scenario"], *(f"{r[f]:.2f}" for f in (ANY, MIP, HEXGEN, ONE_TYPE)),
                      f"{r['bound_vs_homogeneous']:.3f}x", f"{r['mip_ratio']:.3f}x", r["best_baseline"],
                      f"{r['measured_ratio']:.3f}x" if "measured_ratio" in r else "-")
    console.print(table)
    summary = {"bench": "planner_bound", "suite": name, "scenarios": len(rows), "measure": "at the budget",
               "bound_vs_homogeneous_geomean": suite.geomean([r["bound_vs_homogeneous"] for r in rows]),
               "bound_vs_homogeneous_max": max((r["bound_vs_homogeneous"] for r in rows), default=None),
               "mip_vs_homogeneous_geomean": suite.geomean([r["mip_ratio"] for r in rows]),
               "scenarios_bound_under_1_3": sum(1 for r in rows if r["bound_vs_homogeneous"] < 1.3),
               "rows": rows}
    print(orjson.dumps(summary).decode())


if __name__ == "__main__":
    main()
