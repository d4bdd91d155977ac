"""Routing between prefill and decode replicas: a transportation LP solved with HiGHS.

Variables ``f_pd`` (requests/s whose prefill runs on p and decode on d) and ``g_c`` (requests/s a
colocated replica c serves alone). Maximise the total rate subject to

* prefill capacity, per pair slack:  sum_d f_pd / cap_p(d) <= 1   for every prefill p, where
  ``cap_p(d)`` is the rate p could take if all its requests went to d (its TTFT budget shrinks by
  that pair's KV-transfer time, so slow links cost prefill capacity too);
* decode capacity:                   sum_p f_pd <= cap_d            for every decode d;
* link capacity:                     sum f_pd * busy_seconds(pd, link) <= utilisation cap, for every
  link (a node's outgoing NIC, or its GPU link for same-node transfers);
* colocated capacity:                g_c <= cap_c.

A small penalty on the KV-transfer time breaks ties toward fast links. The optimum is the plan's
estimated goodput; the flows, normalised, are its routing weights. scipy's ``linprog`` runs HiGHS
(the same solver highspy wraps) without printing HiGHS's banner on stdout.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from planner.work import charge

LINK_UTILISATION = 0.7  # keep links below this; the TTFT budget reserves the queueing this allows


def kv_ttft_seconds(kv_s: float, busy_s: float, long_scale: float, scv: float, link_cap: float) -> float:
    """TTFT a long prompt's KV trip takes on average: its transfer (``kv_s`` for a mean prompt, times
    ``long_scale``) plus the mean M/G/1 wait of a link loaded to ``link_cap`` with ``busy_s`` per mean
    prompt. The rent MIP charges a prefill unit this (a quick estimate, before any routing); the routing
    LP takes the quantile of the whole trip (``capacity.KvLink``) and ranks pairs by this."""
    return kv_s * long_scale + link_cap * busy_s * (1.0 + scv) / (2 * (1 - link_cap))
# The caps a link may be kept under (``Evaluator._link_caps``): each link gets the one where what it carries
# meets what the prefill replicas sending over it take within their TTFT budgets, which reserve the wait
# of a link loaded to its cap (``capacity.KvLink``): a generous TTFT buys link throughput (13B GH200s,
# 2k-token prompts over 40 Gbps, TTFT 4 s: the simulator serves the split with its NIC at ~77%), a slow
# link feeding a slow prefill is kept idler (13B over 5 Gbps, TTFT 4 s: at 70% the link's wait alone
# takes the budget; the simulator serves it with the links at 55%).
LINK_CAPS = tuple(round(0.2 + 0.05 * i, 2) for i in range(16))


def cap_over(load: float, tol: float = 0.0) -> float:
    """The lowest of ``LINK_CAPS`` a link carrying ``load`` fits under (within ``tol``), else the highest."""
    return next((c for c in LINK_CAPS if load <= c * (1 + tol)), LINK_CAPS[-1])


@dataclass
class RoutingProblem:
    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    colocated: list[str] = field(default_factory=list)
    pair_cap: dict[tuple[str, str], float] = field(default_factory=dict)  # prefill capacity via that decode
    decode_cap: dict[str, float] = field(default_factory=dict)
    colocated_cap: dict[str, float] = field(default_factory=dict)
    link_use: dict[Hashable, dict[tuple[str, str], float]] = field(default_factory=dict)  # link -> pair -> s/req
    pair_penalty: dict[tuple[str, str], float] = field(default_factory=dict)  # tie-break, in [0, 1)
    link_cap: float = LINK_UTILISATION  # busy share a link is kept under ...
    link_caps: dict[Hashable, float] = field(default_factory=dict)  # ... unless it has its own

    def cap_of(self, link: Hashable) -> float:
        return self.link_caps.get(link, self.link_cap)


@dataclass
class RoutingSolution:
    total: float  # requests/s
    pairs: dict[tuple[str, str], float]  # (prefill, decode) -> req/s; colocated c as (c, c)
    link_caps: dict[Hashable, float] = field(default_factory=dict)  # each link's cap in the problem
    links_bind: bool = False  # some link is at its cap: a higher cap could route more

    def weights(self) -> dict[tuple[str, str], float]:
        if self.total <= 0:
            return {}
        return {k: v / self.total for k, v in self.pairs.items() if v > 1e-9 * self.total}


@dataclass
class _Rows:
    """The LP's variables (pairs, then colocated replicas) and its rows, in sparse form."""

    pairs: list[tuple[str, str]]
    cols: list[str]
    rows: list[int] = field(default_factory=list)
    cidx: list[int] = field(default_factory=list)
    vals: list[float] = field(default_factory=list)
    ub: list[float] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # per row: "prefill", "decode" or "link"

    def add(self, entries: list[tuple[int, float]], bound: float, kind: str) -> None:
        r = len(self.ub)
        for j, v in entries:
            self.rows.append(r)
            self.cidx.append(j)
            self.vals.append(v)
        self.ub.append(bound)
        self.kinds.append(kind)

    @property
    def n(self) -> int:
        return len(self.pairs) + len(self.cols)

    def matrix(self):
        """The rows as a CSR matrix over the variables."""
        return coo_matrix((self.vals, (self.rows, self.cidx)), shape=(len(self.ub), self.n)).tocsr()


def _rows(prob: RoutingProblem) -> _Rows:
    pairs = [(p, d) for p in prob.prefill for d in prob.decode if prob.pair_cap.get((p, d), 0.0) > 1e-12
             and prob.decode_cap.get(d, 0.0) > 1e-12]
    lp = _Rows(pairs, [c for c in prob.colocated if prob.colocated_cap.get(c, 0.0) > 1e-12])
    pidx: dict[str, list[int]] = {p: [] for p in prob.prefill}
    didx: dict[str, list[int]] = {d: [] for d in prob.decode}
    for j, (p, d) in enumerate(pairs):
        pidx[p].append(j)
        didx[d].append(j)
    for js in pidx.values():
        if js:
            lp.add([(j, 1.0 / prob.pair_cap[pairs[j]]) for j in js], 1.0, "prefill")
    for d, js in didx.items():
        if js:  # as a share of the decode's capacity, like the prefill rows
            lp.add([(j, 1.0 / prob.decode_cap[d]) for j in js], 1.0, "decode")
    index = {pd: j for j, pd in enumerate(pairs)}
    for link, use in prob.link_use.items():
        entries = [(index[pd], s) for pd, s in use.items() if pd in index and s > 0]
        if entries:
            lp.add(entries, prob.cap_of(link), "link")
    return lp


def _solution(prob: RoutingProblem, lp: _Rows, x: np.ndarray, a) -> RoutingSolution:
    x = np.maximum(x[:lp.n], 0.0)
    pairs, cols = lp.pairs, lp.cols
    flows = {pd: float(x[j]) for j, pd in enumerate(pairs) if x[j] > 1e-12}
    flows.update({(c, c): float(x[len(pairs) + k]) for k, c in enumerate(cols) if x[len(pairs) + k] > 1e-12})
    link_rows = [r for r, k in enumerate(lp.kinds) if k == "link"]
    binds = bool(link_rows) and bool(np.any(a[link_rows] @ x >= np.array(lp.ub)[link_rows] * (1 - 1e-6)))
    return RoutingSolution(float(x.sum()), flows, _caps(prob), binds)


def link_loads(prob: RoutingProblem, sol: RoutingSolution) -> dict[Hashable, float]:
    """Busy share of each link under ``sol``'s routing."""
    return {link: sum(sol.pairs.get(pd, 0.0) * s for pd, s in use.items()) for link, use in prob.link_use.items()}


def _caps(prob: RoutingProblem) -> dict[Hashable, float]:
    return {link: prob.cap_of(link) for link in prob.link_use}


def _linprog(cost: np.ndarray, a, ub: np.ndarray | None, bounds: list) -> Any:
    """HiGHS on ``min cost.x, a.x <= ub``, counted on the planner's work clock."""
    res = linprog(cost, A_ub=a, b_ub=ub, bounds=bounds, method="highs")
    charge("lp")
    charge("lp_var", len(cost))
    return res


def solve_routing(prob: RoutingProblem) -> RoutingSolution:
    """Solve the transportation LP; an empty or capacity-less problem gives total 0."""
    lp = _rows(prob)
    if lp.n == 0:
        return RoutingSolution(0.0, {})
    cost = -np.ones(lp.n)
    for j, pd in enumerate(lp.pairs):
        cost[j] += 1e-3 * prob.pair_penalty.get(pd, 0.0)
    bounds = [(0, None)] * len(lp.pairs) + [(0, prob.colocated_cap[c]) for c in lp.cols]
    a = lp.matrix() if lp.ub else None
    res = _linprog(cost, a, np.array(lp.ub) if lp.ub else None, bounds)
    if res.status != 0 or res.x is None:
        return RoutingSolution(0.0, {}, _caps(prob))
    return _solution(prob, lp, res.x, a)


BALANCE_KEEP = 1 - 1e-6  # the balanced routing keeps the LP's optimum (within HiGHS's tolerance): plans
# are checked at that rate, and a 0.1% shortfall overloads every replica the optimum fills by 0.1%


def balance_routing(prob: RoutingProblem, sol: RoutingSolution) -> RoutingSolution:
    """The same total rate, spread evenly: the LP's optimum is a vertex that fills some replicas to their
    capacity and leaves others nearly idle where the binding side (say, prefill) allows many splits
    of the other side's load. Below full load that queues requests on the filled ones while the
    others wait. This LP keeps ``BALANCE_KEEP`` of the total and minimises the highest utilisation
    of each kind (prefill, decode, colocated; links stay under their cap), summed, so every replica
    of a kind runs at most at the busiest one's share."""
    lp = _rows(prob)
    if lp.n == 0 or sol.total <= 0:
        return sol
    kinds = ("prefill", "decode", "colocated")
    u = {k: lp.n + i for i, k in enumerate(kinds)}  # one utilisation variable per kind
    rows, cidx, vals, ub = list(lp.rows), list(lp.cidx), list(lp.vals), list(lp.ub)
    for r, kind in enumerate(lp.kinds):
        if kind in u:  # share <= u_kind (and <= 1 through u's bound)
            rows.append(r)
            cidx.append(u[kind])
            vals.append(-1.0)
            ub[r] = 0.0
    r = len(ub)
    for k, c in enumerate(lp.cols):  # g_c / cap_c <= u_colocated
        rows += [r, r]
        cidx += [len(lp.pairs) + k, u["colocated"]]
        vals += [1.0 / prob.colocated_cap[c], -1.0]
        ub.append(0.0)
        r += 1
    rows += [r] * lp.n  # total >= kept share of the optimum
    cidx += list(range(lp.n))
    vals += [-1.0] * lp.n
    ub.append(-BALANCE_KEEP * sol.total)
    r += 1
    n = lp.n + len(kinds)
    cost = np.zeros(n)
    cost[lp.n:] = 1.0
    for j, pd in enumerate(lp.pairs):  # still prefer fast links among equally balanced routings
        cost[j] = 1e-4 * prob.pair_penalty.get(pd, 0.0) / max(sol.total, 1e-9)
    bounds = [(0, None)] * lp.n + [(0, 1)] * len(kinds)
    a = coo_matrix((vals, (rows, cidx)), shape=(r, n)).tocsr()
    res = _linprog(cost, a, np.array(ub), bounds)
    if res.status != 0 or res.x is None:
        return sol
    return _solution(prob, lp, res.x, lp.matrix())
