"""Bisection on a monotone predicate: the one loop the capacity estimates, layer balancing and the
simulator's goodput search share."""

from __future__ import annotations

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
