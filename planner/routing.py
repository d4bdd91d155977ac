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

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

LINK_UTILISATION = 0.7  # keep links below this; the TTFT budget reserves the queueing this allows
# Caps a link-bound candidate is also routed at (``Evaluator.evaluate_configs``): a busier link queues
# KV longer, which the TTFT budget of each pair then reserves, so a generous TTFT buys link throughput
# (13B, 2k-token prompts, TTFT 4 s over 40 Gbps: the simulator runs NICs at 93% within the SLO).
LINK_UTILISATION_STEPS = (LINK_UTILISATION, 0.8, 0.9, 0.95)


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
    link_cap: float = LINK_UTILISATION  # busy share every link is kept under


@dataclass
class RoutingSolution:
    total: float  # requests/s
    pairs: dict[tuple[str, str], float]  # (prefill, decode) -> req/s; colocated c as (c, c)
    link_cap: float = LINK_UTILISATION  # the problem's link cap
    links_bind: bool = False  # some link is at its cap: a higher cap could route more

    def weights(self) -> dict[tuple[str, str], float]:
        if self.total <= 0:
            return {}
        return {k: v / self.total for k, v in self.pairs.items() if v > 1e-9 * self.total}


def solve_routing(prob: RoutingProblem) -> RoutingSolution:
    """Solve the transportation LP; an empty or capacity-less problem gives total 0."""
    pairs = [(p, d) for p in prob.prefill for d in prob.decode if prob.pair_cap.get((p, d), 0.0) > 1e-12
             and prob.decode_cap.get(d, 0.0) > 1e-12]
    cols = [c for c in prob.colocated if prob.colocated_cap.get(c, 0.0) > 1e-12]
    n = len(pairs) + len(cols)
    if n == 0:
        return RoutingSolution(0.0, {})
    rows, cidx, vals, ub = [], [], [], []
    r = 0
    pidx = {p: [] for p in prob.prefill}
    didx = {d: [] for d in prob.decode}
    for j, (p, d) in enumerate(pairs):
        pidx[p].append(j)
        didx[d].append(j)
    for js in pidx.values():
        if js:
            for j in js:
                rows.append(r)
                cidx.append(j)
                vals.append(1.0 / prob.pair_cap[pairs[j]])
            ub.append(1.0)
            r += 1
    for d, js in didx.items():
        if js:
            for j in js:
                rows.append(r)
                cidx.append(j)
                vals.append(1.0)
            ub.append(prob.decode_cap[d])
            r += 1
    index = {pd: j for j, pd in enumerate(pairs)}
    n_link_rows_start = r
    for use in prob.link_use.values():
        entries = [(index[pd], s) for pd, s in use.items() if pd in index and s > 0]
        if entries:
            for j, s in entries:
                rows.append(r)
                cidx.append(j)
                vals.append(s)
            ub.append(prob.link_cap)
            r += 1
    cost = -np.ones(n)
    for j, pd in enumerate(pairs):
        cost[j] += 1e-3 * prob.pair_penalty.get(pd, 0.0)
    bounds = [(0, None)] * len(pairs) + [(0, prob.colocated_cap[c]) for c in cols]
    a = coo_matrix((vals, (rows, cidx)), shape=(r, n)).tocsr() if r else None
    res = linprog(cost, A_ub=a, b_ub=np.array(ub) if r else None, bounds=bounds, method="highs")
    if res.status != 0 or res.x is None:
        return RoutingSolution(0.0, {}, prob.link_cap)
    x = np.maximum(res.x, 0.0)
    flows = {pd: float(x[j]) for j, pd in enumerate(pairs) if x[j] > 1e-12}
    flows.update({(c, c): float(x[len(pairs) + k]) for k, c in enumerate(cols) if x[len(pairs) + k] > 1e-12})
    n_links = r - n_link_rows_start
    binds = n_links > 0 and bool(np.any(a[n_link_rows_start:] @ x >= prob.link_cap * (1 - 1e-6)))
    return RoutingSolution(float(x.sum()), flows, prob.link_cap, binds)
