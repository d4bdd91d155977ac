"""Fit the cost model's efficiency constants to the GPU measurements in ``bench/results``.

Reads the JSON lines ``bench/gpu_cost_model_check.py`` wrote (``bench/results/gpu_cost_model_*.json``), keeps
the points a serving engine runs the same way (decode and mixed steps, captured as CUDA graphs; prefills of
2,048 tokens and more, where eager launch overhead is small), and compares the GPU-only prediction of
``ReplicaModel`` (its per-pass host overhead taken off) with each measurement, for the current
``DEFAULT_EFF``, for the plain datasheet roofline it replaced, and over a grid of (compute, memory,
roofline_p, layer_overhead_s). Prints a table and, last, one JSON line. No GPU needed.

    python bench/fit_efficiency.py
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.cost_model import DEFAULT_EFF, Efficiency, ReplicaModel, Stage
from planner.gpus import GPUS
from planner.models import load_model

RESULTS = Path(__file__).resolve().parent / "results"
DATASHEET_ROOFLINE = replace(DEFAULT_EFF, compute=0.6, memory=0.8, roofline_p=math.inf, layer_overhead_s=6e-6)
GRID = {"compute": (0.5, 0.55, 0.6), "memory": (0.6, 0.65, 0.7, 0.75, 0.8), "roofline_p": (math.inf, 3.0, 2.0, 1.5),
        "layer_overhead_s": (6e-6, 20e-6, 35e-6)}


def load_points() -> list[dict]:
    """Measured points as (model, GPU, kind, shape, measured ms), de-duplicated across files."""
    seen, out = set(), []
    for f in sorted(RESULTS.glob("gpu_cost_model_*.json")):
        j = json.loads(f.read_text())
        if j.get("smoke"):
            continue
        ctx = j["decode_context"]
        for p in j["points"]:
            kind, name = p["kind"], p["point"]
            if kind == "prefill":
                n = int(re.search(r"(\d+) tok", name).group(1))
                if n < 2048:
                    continue
                shape = {"tokens": n}
            elif kind == "decode":
                shape = {"batch": int(re.search(r"b=(\d+)", name).group(1)), "context": ctx}
            else:
                b, c = map(int, re.search(r"b=(\d+)\+(\d+)", name).groups())
                shape = {"batch": b, "chunk": c, "context": ctx}
            key = (j["model"], j["catalog_gpu"], kind, tuple(sorted(shape.items())))
            if key in seen:
                continue
            seen.add(key)
            out.append({"model": j["model"], "gpu": j["catalog_gpu"], "kind": kind, **shape,
                        "measured_ms": p["measured_ms"]})
    return out


def predict_ms(eff: Efficiency, pt: dict) -> float:
    """GPU-only prediction (ms) of one point: the model's host overhead per pass taken off."""
    spec = replace(load_model(pt["model"]), dtype_bytes=2)
    rm = ReplicaModel(spec, [Stage("n0", GPUS[pt["gpu"]], 1, spec.layers, True, True)], [], eff)
    if pt["kind"] == "prefill":
        t = rm.prefill_time(pt["tokens"], float(pt["tokens"] ** 2), 1)
    elif pt["kind"] == "decode":
        t = rm.decode_step_time(pt["batch"], pt["batch"] * (pt["context"] + 1))
    else:
        t = rm.mixed_step_time(pt["batch"], pt["batch"] * (pt["context"] + 1), pt["chunk"], float(pt["chunk"] ** 2), 1)
    return (t - eff.step_overhead_s) * 1e3


def errors(eff: Efficiency, points: list[dict]) -> tuple[float, float]:
    """(mean, worst) relative error."""
    errs = [abs(predict_ms(eff, p) - p["measured_ms"]) / p["measured_ms"] for p in points]
    return sum(errs) / len(errs), max(errs)


def main() -> None:
    points = load_points()
    if not points:
        sys.exit(f"no GPU results in {RESULTS}: run bench/gpu_cost_model_check.py on a GPU first")
    fits = []
    for c, m, p, lo in itertools.product(*GRID.values()):
        eff = replace(DEFAULT_EFF, compute=c, memory=m, roofline_p=p, layer_overhead_s=lo)
        fits.append((errors(eff, points), {"compute": c, "memory": m, "roofline_p": p, "layer_overhead_s": lo}))
    fits.sort(key=lambda f: f[0][0])
    default, datasheet = errors(DEFAULT_EFF, points), errors(DATASHEET_ROOFLINE, points)
    print(f"{len(points)} points from {RESULTS}")
    print(f"{'setting':48} {'mean err':>9} {'worst':>7}")
    print(f"{'DEFAULT_EFF (what the planner uses)':48} {default[0]:9.1%} {default[1]:7.1%}")
    print(f"{'datasheet roofline (0.6, 0.8, max, 6 us)':48} {datasheet[0]:9.1%} {datasheet[1]:7.1%}")
    for (mean, worst), v in fits[:5]:
        label = f"fit c={v['compute']} m={v['memory']} p={v['roofline_p']} lo={v['layer_overhead_s'] * 1e6:.0f}us"
        print(f"{label:48} {mean:9.1%} {worst:7.1%}")
    print("\npoint                                       measured  default  datasheet")
    for p in points:
        shape = ",".join(f"{k}={p[k]}" for k in ("tokens", "batch", "chunk") if k in p)
        print(f"{p['model'] + ' ' + p['gpu'] + ' ' + p['kind'] + ' ' + shape:43} {p['measured_ms']:9.2f} "
              f"{predict_ms(DEFAULT_EFF, p):8.2f} {predict_ms(DATASHEET_ROOFLINE, p):10.2f}")
    print(json.dumps({"bench": "fit_efficiency", "points": len(points),
                      "default": {"mean": round(default[0], 4), "worst": round(default[1], 4)},
                      "datasheet_roofline": {"mean": round(datasheet[0], 4), "worst": round(datasheet[1], 4)},
                      "best_fit": {**{k: (v if math.isfinite(v) else "inf") for k, v in fits[0][1].items()},
                                   "mean": round(fits[0][0][0], 4), "worst": round(fits[0][0][1], 4)}}))


if __name__ == "__main__":
    main()
