"""`tsctl plan`, `tsctl simulate`, `tsctl reschedule`: the planner from the command line.

Thin: parse, call ``planner``, print rich tables (or the Plan JSON with ``--json``). The planner is
imported inside each command so ``import tsctl.main`` stays light (no numpy/scipy search code).
Every planning error is one ``error: ...`` line on stderr and exit status 1.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from planner.offers import MAX_GPUS

console = Console()
STRATEGY_HELP = "thunderserve | colocated | distserve | hexgen | greedy | no-bandwidth"


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def parse_seconds(value: str, name: str) -> float:
    """'2', '2s', '1.5s', '100ms' -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*", value or "")
    if not m:
        _fail(f"{name} must be seconds like 2, 2s or 100ms, not {value!r}", 2)
    assert m is not None
    seconds = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    if seconds <= 0:
        _fail(f"{name} must be positive", 2)
    return seconds


def _planner_errors() -> tuple[type[BaseException], ...]:
    from planner.cluster import PoolError
    from planner.gpus import UnknownGpu
    from planner.models import UnknownModel
    from planner.offers import CatalogError
    from planner.plan import PlanError
    from planner.scheduler import PlanningError
    from planner.workload import WorkloadError

    return (PlanningError, UnknownModel, UnknownGpu, CatalogError, PoolError, WorkloadError, PlanError)


def _workload(rate: float, input_len: int, output_len: int, trace: Path | None) -> Any:
    from planner.workload import Lengths, Workload, workload_from_trace

    if not 0 <= rate < float("inf"):
        _fail(f"--rate must be finite and >= 0 requests/s, not {rate}", 2)
    if trace is not None:
        return workload_from_trace(trace, rate)
    if input_len < 1 or output_len < 1:
        _fail("--input-len and --output-len must be >= 1 token", 2)
    return Workload(rate, Lengths.fixed(input_len), Lengths.fixed(output_len))


# -- tables ------------------------------------------------------------------------------------------
def print_plan(plan: Any, title: str = "Plan") -> None:
    e = plan.expected
    head = Table(title=f"{title}: {plan.model} ({plan.strategy}, seed {plan.seed})", show_header=False)
    head.add_row("cost", f"${plan.cost_per_hour:.2f}/h")
    head.add_row("expected goodput", f"{e.get('goodput_rps', 0):.2f} req/s within the SLO (cost model)")
    if "sim_goodput_rps" in e:
        at_least = "at least " if e.get("sim_goodput_lower_bound") else ""  # measured until the time limit
        head.add_row("simulated goodput", f"{at_least}{e['sim_goodput_rps']:.2f} req/s")
    head.add_row("goodput per $", f"{e.get('goodput_per_dollar', 0):.3f} req/s per $/h")
    if "sim_attainment" in e:
        head.add_row("SLO attainment", f"{e['sim_attainment']:.1%} simulated at {plan.workload.get('rate', 0)} req/s")
    slo = plan.slo
    if slo:
        head.add_row("SLO", f"TTFT {slo.get('ttft_s')}s, TPOT {slo.get('tpot_s')}s, {slo.get('attainment', 0.9):.0%}")
    if "ttft_quantile" in e and "tpot_quantile" in e:
        head.add_row("capacities at", f"TTFT p{100 * e['ttft_quantile']:.1f}, TPOT p{100 * e['tpot_quantile']:.1f}")
    if "plan_seconds" in e:
        head.add_row("planned in", f"{e['plan_seconds']:.2f}s{_cut_short(e)}")
    console.print(head)
    inst = Table(title="Instances")
    for col in ("node", "instance type", "GPUs", "spot", "$/h", "where"):
        inst.add_column(col)
    for i in plan.instances:
        inst.add_row(i.id, i.instance_type, f"{i.gpu_count}x {i.gpu_type}", "yes" if i.spot else "no",
                     f"{i.price_per_hour:.3f}", f"{i.cloud}/{i.region}")
    console.print(inst)
    reps = Table(title="Replicas")
    for col in ("replica", "role", "GPUs", "TP", "PP", "layers"):
        reps.add_column(col)
    for r in plan.replicas:
        gpus = ", ".join(f"{n}:{g}" for n, g in r.gpus)
        reps.add_row(r.id, r.role, gpus, str(r.tp), str(r.pp), "/".join(map(str, r.layer_split)))
    console.print(reps)
    route = Table(title="Routing (share of all requests)")
    for col in ("prefill", "decode", "weight", "KV on the wire"):
        route.add_column(col)
    for r in plan.routing:
        route.add_row(r.prefill, r.decode if r.decode != r.prefill else "(colocated)", f"{r.weight:.3f}",
                      r.kv_compression if r.decode != r.prefill else "-")
    console.print(route)


def _cut_short(e: dict[str, float]) -> str:
    """What the time limit left out of the rent step, so a user knows a longer limit may look further."""
    left = []
    if e.get("rent_places_left"):
        left.append(f"{int(e['rent_places_left'])} places not solved")
    if e.get("second_pass_left"):
        left.append("second rent pass and hand-built plans left out")
    return f" (time limit reached while renting: {'; '.join(left)})" if left else ""


def _emit_json(data: bytes) -> None:
    sys.stdout.write(data.decode() + "\n")
    sys.stdout.flush()


# -- commands ----------------------------------------------------------------------------------------
def plan(
    model: str = typer.Option(..., "--model", help="catalog name (e.g. llama-3.1-70b, smollm2) or a config.json path"),
    budget: float = typer.Option(None, "--budget", help="USD per hour (not needed with --pool)"),
    rate: float = typer.Option(1.0, "--rate", help="requests/s to serve (0: as much as the budget buys)"),
    input_len: int = typer.Option(512, "--input-len", help="prompt tokens"),
    output_len: int = typer.Option(128, "--output-len", help="generated tokens"),
    ttft: str = typer.Option("2s", "--ttft", help="time-to-first-token target, e.g. 2s or 500ms"),
    tpot: str = typer.Option("100ms", "--tpot", help="time-per-output-token target, e.g. 0.1 or 100ms"),
    attainment: float = typer.Option(0.9, "--attainment", help="share of requests that must meet both targets"),
    catalog: list[Path] = typer.Option(None, "--catalog", help="SkyPilot vms.csv (repeatable)"),
    trace: Path = typer.Option(None, "--trace", help="Azure LLM trace CSV for input/output lengths"),
    spot: bool = typer.Option(True, "--spot/--no-spot", help="prefer spot prices where offered"),
    inter_node_gbps: float = typer.Option(None, "--inter-node-gbps", help="bandwidth of every inter-node link"),
    kv_compression: str = typer.Option("auto", "--kv-compression", help="none | int8 | int4 | auto"),
    seed: int = typer.Option(0, "--seed"),
    time_limit: float = typer.Option(20.0, "--time-limit",
                                     help="seconds of planning work, as counted on a reference core: the same "
                                          "plan per seed on any machine (0: no cap)"),
    strategy: str = typer.Option("thunderserve", "--strategy", help=STRATEGY_HELP),
    pool: str = typer.Option(None, "--pool", help="your own GPUs: 2xL40S,4xRTX4090 or a YAML file"),
    max_gpus: int = typer.Option(MAX_GPUS, "--max-gpus", help="most GPUs to rent"),
    disaggregate: bool = typer.Option(False, "--disaggregate", help="prefill and decode replicas only (no colocated)"),
    mixed_chunk: bool = typer.Option(True, "--mixed-chunk/--no-mixed-chunk",
                                     help="colocated replicas may mix prefill chunks into decode steps (SGLang "
                                          "--enable-mixed-chunk); --no-mixed-chunk: prefill first only"),
    simulate_check: bool = typer.Option(True, "--simulate/--no-simulate", help="check the plan in the simulator"),
    out: Path = typer.Option(None, "--out", help="also write the Plan JSON to this file"),
    json_out: bool = typer.Option(False, "--json", help="print the Plan JSON on stdout"),
) -> None:
    """Plan what to rent and how to deploy it (prints the plan; --json for the Plan JSON)."""
    errors = _planner_errors()
    from planner.offers import load_offers
    from planner.scheduler import plan_deployment
    from planner.workload import SLO

    ttft_s, tpot_s = parse_seconds(ttft, "--ttft"), parse_seconds(tpot, "--tpot")
    try:
        slo = SLO(ttft_s, tpot_s, attainment)
        wl = _workload(rate, input_len, output_len, trace)
        offers = None
        if pool is None:
            offers = load_offers(catalog) if catalog else None  # None: SkyPilot's cache, else built-in
        p = plan_deployment(model, wl, slo, budget=budget, offers=offers, pool=pool, strategy=strategy, spot=spot,
                            inter_node_gbps=inter_node_gbps, kv_compression=kv_compression, seed=seed,
                            time_limit_s=time_limit, max_gpus=max_gpus, disaggregate=disaggregate,
                            mixed_chunk=mixed_chunk)
        if simulate_check and rate > 0:
            from planner.simulator import sim_requests_for, simulate

            res = simulate(p, wl, slo, n_requests=min(4000, sim_requests_for(wl, slo, rate)), seed=seed)
            p.expected["sim_attainment"] = round(res.attainment, 4)
            p.expected["slo_attainment"] = round(res.attainment, 4)
    except errors as e:
        _fail(str(e))
    if out is not None:
        out.write_bytes(p.to_json(indent=True))
    if json_out:
        _emit_json(p.to_json(indent=True))
    else:
        print_plan(p)


def _load_plan(path: Path) -> Any:
    from planner.plan import Plan

    try:
        data = path.read_bytes()
    except OSError as e:
        _fail(f"cannot read plan {path}: {e.strerror or e}")
    plan_obj = Plan.from_json(data)
    plan_obj.validate()
    return plan_obj


def _plan_workload(p: Any) -> tuple[Any, Any]:
    """The workload and SLO the plan was made for (defaults where it has none), or one error line."""
    from planner.plan import PlanError
    from planner.workload import SLO, Workload

    try:
        return (Workload.from_dict(p.workload) if p.workload else Workload(1.0),
                SLO.from_dict(p.slo) if p.slo else SLO(2.0, 0.1))
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"the plan's workload or slo is malformed ({e}); fix it or plan again") from e


def simulate(
    plan_path: Path = typer.Option(..., "--plan", help="Plan JSON (from tsctl plan --json/--out)"),
    rate: float = typer.Option(None, "--rate", help="requests/s (default: the plan's)"),
    input_len: int = typer.Option(None, "--input-len"),
    output_len: int = typer.Option(None, "--output-len"),
    trace: Path = typer.Option(None, "--trace", help="Azure LLM trace CSV for lengths"),
    ttft: str = typer.Option(None, "--ttft"),
    tpot: str = typer.Option(None, "--tpot"),
    duration: float = typer.Option(60.0, "--duration", help="seconds of arrivals"),
    seed: int = typer.Option(0, "--seed"),
    find_goodput: bool = typer.Option(True, "--goodput/--no-goodput",
                                      help="also search the highest rate meeting the SLO"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Simulate a plan: SLO attainment, goodput, TTFT/TPOT percentiles."""
    errors = _planner_errors()
    import orjson

    from planner.simulator import goodput
    from planner.simulator import simulate as run_sim
    from planner.workload import SLO, Lengths, Workload, workload_from_trace

    try:
        p = _load_plan(plan_path)
        base, slo0 = _plan_workload(p)
        r = rate if rate is not None else base.rate
        if r is None or r <= 0:
            _fail("--rate must be > 0 (the plan has no rate)", 2)
        if trace is not None:
            wl = workload_from_trace(trace, r)
        else:
            wl = Workload(r, Lengths.fixed(input_len) if input_len else base.input,
                          Lengths.fixed(output_len) if output_len else base.output, base.arrival, base.cv)
        slo = SLO(parse_seconds(ttft, "--ttft") if ttft else slo0.ttft_s,
                  parse_seconds(tpot, "--tpot") if tpot else slo0.tpot_s, slo0.attainment)
        if duration <= 0:
            _fail("--duration must be positive seconds", 2)
        res = run_sim(p, wl, slo, duration_s=duration, seed=seed)
        gp = goodput(p, wl, slo, seed=seed) if find_goodput else None
    except errors as e:
        _fail(str(e))
    summary = {"rate": r, "requests": res.requests, "admitted": res.admitted, "finished": res.finished,
               "slo_attainment": round(res.attainment, 4), "overloaded": res.overloaded,
               **{k: round(v, 4) for k, v in res.percentiles().items()}}
    if gp is not None:
        summary["goodput_rps"] = round(gp, 4)
        summary["goodput_per_dollar"] = round(gp / p.cost_per_hour, 4) if p.cost_per_hour else 0.0
    if json_out:
        _emit_json(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        return
    t = Table(title=f"Simulation of {plan_path.name} at {r} req/s ({res.requests} requests)")
    t.add_column("metric")
    t.add_column("value")
    t.add_row("SLO attainment", f"{res.attainment:.1%} (target {slo.attainment:.0%})" +
              (" [red]overloaded[/red]" if res.overloaded else ""))
    if gp is not None:
        t.add_row("goodput", f"{gp:.2f} req/s ({summary['goodput_per_dollar']} per $/h)")
    for k in ("ttft", "tpot", "e2e"):
        t.add_row(f"{k.upper()} p50 / p90 / p99", " / ".join(f"{summary[f'{k}_p{q}']:.3f}s" for q in (50, 90, 99)))
    console.print(t)


def reschedule(
    plan_path: Path = typer.Option(..., "--plan", help="Plan JSON"),
    lose: list[str] = typer.Option([], "--lose", help="node id lost (repeatable)"),
    moved: list[str] = typer.Option([], "--moved", help="NODE=CLOUD/REGION[@PRICE]: a node that runs somewhere "
                                    "else (a failover region), at that $/h (repeatable)"),
    rate: float = typer.Option(None, "--rate", help="new request rate (default: the plan's)"),
    out: Path = typer.Option(None, "--out", help="write the new Plan JSON here"),
    json_out: bool = typer.Option(False, "--json", help='print {"plan": ..., "changes": ...} as JSON'),
) -> None:
    """Reschedule after losing nodes (or nodes that run elsewhere than planned): keep survivors'
    parallelism, re-decide phases and routing."""
    errors = _planner_errors()
    import orjson

    from planner.reschedule import reschedule as run_reschedule
    from planner.workload import Workload

    try:
        p = _load_plan(plan_path)
        if not lose and not moved:
            _fail("give --lose NODE or --moved NODE=CLOUD/REGION (what changed)")
        placed = [_moved_instance(p, m) for m in moved]
        wl = Workload.from_dict(p.workload).with_rate(rate) if rate is not None and p.workload else None
        new, changes = run_reschedule(p, lost_nodes=lose, placed=placed, workload=wl)
    except errors as e:
        _fail(str(e))
    if out is not None:
        out.write_bytes(new.to_json(indent=True))
    if json_out:
        _emit_json(orjson.dumps({"plan": new.to_dict(), "changes": changes.to_dict()}, option=orjson.OPT_INDENT_2))
        return
    print_plan(new, title="Rescheduled plan")
    t = Table(title=f"What changed (in {changes.seconds * 1000:.0f} ms)")
    t.add_column("change")
    t.add_column("detail")
    t.add_row("lost nodes", ", ".join(changes.lost_nodes) or "-")
    for node, was, now in changes.moved_nodes:
        t.add_row("moved", f"{node}: {was} -> {now}")
    t.add_row("dropped replicas", ", ".join(changes.dropped_replicas) or "-")
    t.add_row("phase flips", ", ".join(f"{r}: {a} -> {b}" for r, a, b in changes.role_flips) or "-")
    for pfx, d, a, b in changes.routing_deltas:
        t.add_row("routing", f"{pfx} -> {d}: {a:.3f} -> {b:.3f}")
    t.add_row("goodput", f"{changes.goodput_before:.2f} -> {changes.goodput_after:.2f} req/s")
    console.print(t)


def _moved_instance(plan: Any, spec: str) -> Any:
    """``NODE=CLOUD/REGION[@PRICE]`` -> the plan's instance NODE as it runs there."""
    import dataclasses

    from planner.plan import PlanError

    node, _, where = spec.partition("=")
    place, _, price = where.partition("@")
    cloud, _, region = place.partition("/")
    if not node or not cloud or not region:
        raise PlanError(f"--moved {spec!r}: expected NODE=CLOUD/REGION or NODE=CLOUD/REGION@PRICE")
    inst = next((i for i in plan.instances if i.id == node), None)
    if inst is None:
        raise PlanError(f"--moved {spec!r}: no node {node!r} in the plan")
    try:
        cost = float(price) if price else inst.price_per_hour
    except ValueError:
        raise PlanError(f"--moved {spec!r}: price {price!r} is not a number") from None
    if cost < 0:
        raise PlanError(f"--moved {spec!r}: price must be >= 0")
    return dataclasses.replace(inst, cloud=cloud, region=region, price_per_hour=cost)
