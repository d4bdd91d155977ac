"""Exact best deployment of a small pool (a handful of GPUs), to check the tabu search against.

Every way to split the GPUs into groups (and idle GPUs) is enumerated; for each split, every phase
vector is ranked by the capacity bound and scored with the routing LP in bound order until the
bound cannot beat the best found (branch and bound, so the result is exact under the same
objective as the search). Feasible only for small pools: Bell(n + 1) splits.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from planner.cluster import Cluster, GpuId
from planner.evaluate import Evaluation, Evaluator, Group, nodes_cost


def _partitions(items: list[GpuId]) -> Iterator[list[list[GpuId]]]:
    """All set partitions of ``items`` (restricted growth strings)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first], *part]
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]


def exhaustive_best(ev: Evaluator, cluster: Cluster, phases: tuple[str, ...] = ("prefill", "decode", "both"),
                    max_gpus: int = 7) -> Evaluation | None:
    """The best-scoring (grouping, phases) of the whole cluster; GPUs may be left idle."""
    gpus = cluster.gpus()
    if len(gpus) > max_gpus:
        raise ValueError(f"{len(gpus)} GPUs is too many to enumerate (max {max_gpus})")
    prices = {n.id: n.price_per_hour for n in cluster.nodes}
    best: Evaluation | None = None
    idle_token: GpuId = ("__idle__", -1)
    for part in _partitions([idle_token, *gpus]):
        groups: list[Group] = [tuple(sorted(b)) for b in part if idle_token not in b]
        if not groups:
            continue
        options = []
        for g in groups:
            roles = [r for r in phases if ev.config(g, r) is not None]
            if not roles:
                break
            options.append(roles)
        else:
            used = {n for g in groups for n, _ in g}
            cost = nodes_cost(used, prices)
            vectors = sorted(itertools.product(*options), key=lambda rs: -ev.bound(groups, list(rs)))
            for rs in vectors:
                if best is not None and ev.score_of(ev.bound(groups, list(rs)), cost) <= best.score * (1 + 1e-9):
                    break
                e = ev.evaluate(groups, list(rs), prices)
                if best is None or e.score > best.score:
                    best = e
    return best
