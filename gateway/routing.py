"""Routing tables and pair selection: the plan's weights combined with live load.

A ``RoutingTable`` is immutable once built; the gateway swaps the reference to a new one on a plan
update, so a request that holds the old table keeps a consistent view while new requests use the new.

Selection is power-of-two-choices inside the weights: draw two pairs with probability proportional
to their plan weight; the first draw is kept unless its busier worker is clearly more loaded,
*relative to its share of the plan*, than the second's (more than ``BALANCE_REL`` times, plus
``BALANCE_ABS``; the idea of sglang-router's balance thresholds). So in normal operation the split is
the plan's weights, as the planner intended; a worker that falls behind (slow, overloaded, stuck)
stops attracting new requests.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.config import StaticWorker
from gateway.workers import TOKENS_PER_REQUEST_EQUIV, Worker, WorkerPool
from planner.plan import Plan
from planner.state import ReplicaRecord

BALANCE_REL = 1.5  # the first draw loses only if its load/share exceeds 1.5x the second's ...
BALANCE_ABS = 4.0  # ... plus 4 (requests per unit of share): normal fluctuations do not move traffic


class NoWorkers(Exception):
    """No usable pair in the table (all down, breakers open, or an empty plan)."""


@dataclass(frozen=True, eq=False)
class Pair:
    """A (prefill, decode) route; a colocated worker is the pair (w, w)."""

    prefill: Worker
    decode: Worker
    weight: float
    bootstrap_port: int | None = None
    workers: tuple[Worker, ...] = field(init=False)  # the distinct workers: one if colocated

    def __post_init__(self) -> None:
        object.__setattr__(self, "workers", (self.prefill,) if self.colocated else (self.prefill, self.decode))

    @property
    def colocated(self) -> bool:
        return self.prefill is self.decode

    def label(self) -> str:
        return self.prefill.name if self.colocated else f"{self.prefill.name}->{self.decode.name}"


class RoutingTable:
    """The weighted pairs of one plan version."""

    def __init__(self, pairs: Iterable[Pair], version: int = 0, model: str | None = None, source: str = "") -> None:
        self.pairs = [p for p in pairs if p.weight > 0]
        self.version = version
        self.model = model
        self.source = source
        total = sum(p.weight for p in self.pairs)
        self._cum = list(itertools.accumulate(p.weight / total for p in self.pairs)) if total > 0 else []
        share: dict[Worker, float] = {}
        for p in self.pairs:
            for w in p.workers:
                share[w] = share.get(w, 0.0) + p.weight / total
        self.share = share

    # -- views -------------------------------------------------------------------------------------
    def workers(self) -> set[Worker]:
        return set(self.share)

    def ready(self) -> dict[str, object]:
        """Readiness: one ready prefill and one ready decode, or one ready colocated worker."""
        by_role: dict[str, list[Worker]] = {"prefill": [], "decode": [], "both": []}
        for w in self.share:
            by_role.setdefault(w.role, []).append(w)
        counts = {role: {"healthy": sum(w.ready for w in ws), "total": len(ws)} for role, ws in by_role.items()}
        ok = (counts["prefill"]["healthy"] > 0 and counts["decode"]["healthy"] > 0) or counts["both"]["healthy"] > 0
        return {"ready": ok, **counts}

    def describe(self) -> dict[str, object]:
        return {
            "version": self.version,
            "model": self.model,
            "source": self.source,
            "pairs": [
                {"prefill": p.prefill.name, "decode": p.decode.name, "weight": round(p.weight, 6),
                 "prefill_url": p.prefill.url, "decode_url": p.decode.url, "bootstrap_port": p.bootstrap_port}
                for p in self.pairs
            ],
        }

    # -- selection -----------------------------------------------------------------------------------
    def _score(self, pair: Pair) -> float:
        # No +1 for the request being placed: at zero load every pair ties, so the weights decide alone.
        share = self.share
        score = 0.0
        for w in pair.workers:  # a plain loop: this runs twice per request
            s = (w.outstanding + w.outstanding_tokens / TOKENS_PER_REQUEST_EQUIV) / share[w]
            if s > score:
                score = s
        return score

    @staticmethod
    def _usable(pair: Pair, avoid: set[Worker]) -> bool:
        for w in pair.workers:
            if w.healthy is False or (w.breaker.opened_at is not None and not w.breaker.allows()):
                return False
            if avoid and w in avoid:
                return False
        return True

    def _draw(self, rng: random.Random, avoid: set[Worker]) -> Pair:
        pairs, cum = self.pairs, self._cum
        last = len(pairs) - 1
        for _ in range(4):  # fast path: most draws hit a usable pair
            p = pairs[min(bisect.bisect_left(cum, rng.random()), last)] if last else pairs[0]
            if self._usable(p, avoid):
                return p
        candidates = [p for p in pairs if self._usable(p, avoid)]
        if not candidates and avoid:  # everything left was avoided: a transient failure may have passed
            candidates = [p for p in pairs if self._usable(p, set())]
        if not candidates:
            raise NoWorkers("no healthy (prefill, decode) pair available")
        return rng.choices(candidates, weights=[p.weight for p in candidates])[0]

    def choose(self, rng: random.Random, avoid: set[Worker] | None = None) -> Pair:
        """A pair for one request: two weighted draws; the second replaces the first only if the first is
        clearly more loaded relative to its plan share."""
        if not self.pairs:
            raise NoWorkers("the routing table is empty (no plan, or no ready replicas)")
        avoid = avoid or set()
        a = self._draw(rng, avoid)
        b = self._draw(rng, avoid)
        if a is b or self._score(a) <= BALANCE_REL * self._score(b) + BALANCE_ABS:
            return a
        return b


def uniform_pairs(workers: Iterable[tuple[str, str, int | None, str]], pool: WorkerPool) -> list[Pair]:
    """Every prefill x decode pair plus each colocated worker, weighted evenly; ``workers`` are (url, role,
    bootstrap port, name)."""
    workers = list(workers)
    prefills = [(pool.get(url, "prefill", name), port) for url, role, port, name in workers if role == "prefill"]
    decodes = [pool.get(url, "decode", name) for url, role, _, name in workers if role == "decode"]
    both = [pool.get(url, "both", name) for url, role, _, name in workers if role == "both"]
    pairs = [Pair(p, d, 1.0, port) for (p, port), d in itertools.product(prefills, decodes)]
    return pairs + [Pair(w, w, 1.0) for w in both]


def static_table(workers: list[StaticWorker], pool: WorkerPool, model: str | None = None) -> RoutingTable:
    """Command-line workers with uniform weights: every prefill x decode pair, plus each colocated worker."""
    pairs = uniform_pairs(((w.url, w.role, w.bootstrap_port, "") for w in workers), pool)
    return RoutingTable(pairs, version=0, model=model, source="static")


def plan_table(plan: Plan, replicas: dict[str, ReplicaRecord], pool: WorkerPool) -> RoutingTable:
    """The plan's routing over the replicas that are ready and reachable.

    A route whose replica is missing, not ``ready``, has no URL, or still serves another role than
    the plan gives it (a role switch the controller has not finished) is dropped and the remaining
    weights renormalise; a plan without routing entries falls back to uniform over all pairs. If no
    route survives while the plan's replicas could still serve in the roles they serve now (the plan
    wants a decode replica that is still booting, and the one standing in for it is still decoding),
    those pairs are used, uniformly, until the plan's own routes are ready: serving beats waiting.
    """
    def worker(rid: str, role: str) -> Worker | None:
        rec = replicas.get(rid)
        if rec is None or rec.status != "ready" or not rec.url or rec.role != role:
            return None
        return pool.get(rec.url, role, name=rid)

    roles = {r.id: r.role for r in plan.replicas}
    routes = [(r.prefill, r.decode, r.weight) for r in plan.routing]
    if not routes:
        ps = [r.id for r in plan.replicas if r.role == "prefill"]
        ds = [r.id for r in plan.replicas if r.role == "decode"]
        routes = [(p, d, 1.0) for p, d in itertools.product(ps, ds)]
        routes += [(r.id, r.id, 1.0) for r in plan.replicas if r.role == "both"]
    pairs: list[Pair] = []
    for p_id, d_id, weight in routes:
        if p_id == d_id and roles.get(p_id) == "both":
            w = worker(p_id, "both")
            if w is not None:
                pairs.append(Pair(w, w, weight))
            continue
        p, d = worker(p_id, "prefill"), worker(d_id, "decode")
        if p is not None and d is not None:
            pairs.append(Pair(p, d, weight, replicas[p_id].bootstrap_port))
    if not pairs:  # the ready replicas as they serve now
        live = (replicas[r.id] for r in plan.replicas if r.id in replicas)
        pairs = uniform_pairs(((r.url, r.role, r.bootstrap_port, r.id) for r in live if r.status == "ready" and r.url),
                              pool)
    return RoutingTable(pairs, version=plan.version, model=plan.model, source="plan")
