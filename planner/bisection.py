"""Searches on a monotone predicate: the bisection the capacity estimates, layer balancing and the
simulator's goodput search share, and the short walk the planner's race uses to place a rate it
already knows roughly."""

from __future__ import annotations

import math
from collections.abc import Callable


def narrow(ok: Callable[[float], bool], lo: float, hi: float, iters: int,
           stop: Callable[[float, float], bool] | None = None) -> tuple[float, float]:
    """Halve ``[lo, hi]`` ``iters`` times (or until ``stop(lo, hi)``) keeping ``ok(lo)`` true and
    ``ok(hi)`` false; returns the bracket."""
    for _ in range(iters):
        if stop is not None and stop(lo, hi):
            break
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def walk(ok: Callable[[float], bool], start: float, step: float, probes: int) -> tuple[float, float]:
    """Step from ``start`` by the factor ``1 + step`` (up while ``ok``, down while not) until a passing and a
    failing rate are adjacent, at most ``probes`` calls; returns ``(lo, up)``: the highest rate that passed
    (0 if none did) and the lowest that failed (inf if none did)."""
    lo, up, rate = 0.0, math.inf, start
    for _ in range(probes):
        if ok(rate):
            lo = rate
        else:
            up = rate
        if lo > 0 and up < math.inf:
            break
        rate = rate * (1 + step) if up == math.inf else rate / (1 + step)
    return lo, up
