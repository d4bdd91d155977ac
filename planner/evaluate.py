"""Score one candidate deployment (GPU groups + their phases) on a cluster: configure each group,
price the KV links between every prefill and decode replica, and solve the routing LP.

Group configurations and pair terms are cached by what they depend on (which nodes, how many GPUs
on each, the role), so the tabu search pays for each distinct group once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field, replace

from planner.capacity import LEANS, KvLink, Targets, linked_prefill_curve, rate_for_slack, shape_key
from planner.cluster import GpuId
from planner.cost_model import KV_FACTOR, ReplicaModel, auto_kv_mode, kv_bytes, kv_segments
from planner.parallel import PlanContext, ReplicaConfig, configure_group, role_capacity
from planner.routing import (
    LINK_CAPS,
    LINK_UTILISATION,
    RoutingProblem,
    RoutingSolution,
    balance_routing,
    cap_over,
    kv_ttft_seconds,
    link_loads,
    solve_routing,
)
from planner.work import charge

Group = tuple[GpuId, ...]
LINK_CAP_REFINES = 2  # re-routings with links lowered to the caps over what they carry (``_route_steps``)


@dataclass
class PairTerms:
    kv_time: float  # seconds to move one mean prompt's KV, compress + transfer + decompress
    compression: str
    link_use: list[tuple[tuple[str, str], float]]  # (link key, busy seconds per request)

    @property
    def busy(self) -> float:
        """Seconds per request on the busiest link: the one whose wait the pair's TTFT budget reserves."""
        return max((b for _, b in self.link_use), default=0.0)


def busiest_link(terms: PairTerms) -> Hashable | None:
    """The link a pair's KV is busiest on (``PairTerms.busy``)."""
    return max(terms.link_use, key=lambda use: use[1])[0] if terms.link_use else None


@dataclass
class Evaluation:
    """What a candidate is worth, with everything needed to write it down as a Plan."""

    goodput: float  # estimated req/s within the SLO
    cost: float  # $/h of the nodes it uses
    score: float
    groups: list[Group]
    roles: list[str]
    configs: list[ReplicaConfig | None]
    routing: RoutingSolution
    compression: dict[tuple[int, int], str] = field(default_factory=dict)  # (prefill idx, decode idx) -> mode
    targets: Targets | None = None  # the quantiles ``configs``' capacities and the routing are at

    def quantiles(self) -> dict[str, float]:
        """The TTFT and TPOT quantiles the capacities were checked at, for a plan's ``expected``."""
        if self.targets is None:
            return {}
        return {"ttft_quantile": self.targets.q_ttft, "tpot_quantile": self.targets.q_tpot}


def used_nodes(groups: list[Group], configs: list[ReplicaConfig | None]) -> set[str]:
    """The nodes a candidate pays for: those of its groups that hold a replica."""
    return {n for g, c in zip(groups, configs, strict=True) if c is not None for n, _ in g}


def nodes_cost(nodes: Iterable[str], prices: dict[str, float]) -> float:
    """The $/h of a set of nodes, the same whatever order the set iterates in: a plain sum over a set of
    node ids rounds by the string hash order, which changes per process (``PYTHONHASHSEED``), and so
    broke ties between equal-valued candidates differently from one run to the next."""
    return math.fsum(prices.get(n, 0.0) for n in nodes)


def group_key(group: Group) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(Counter(n for n, _ in group).items()))


class Evaluator:
    """Caches group configurations and pair terms; evaluates candidates with the routing LP."""

    def __init__(self, ctx: PlanContext, *, kv_compression: str = "auto", bandwidth_aware: bool = True,
                 objective: str = "per_dollar", min_rate: float = 0.0, shared_cache: dict | None = None) -> None:
        if kv_compression not in ("auto", *KV_FACTOR):
            raise ValueError(f"kv_compression must be auto, none, int8 or int4, not {kv_compression!r}")
        self.ctx = ctx
        self.kv_compression = kv_compression
        self.bandwidth_aware = bandwidth_aware
        self.objective = objective  # per_dollar (renting) | goodput (owned pool)
        self.min_rate = min_rate
        # group configurations depend on the group's shape, not on which cluster it is in: share them
        self._configs: dict[tuple, tuple[ReplicaConfig, tuple[str, ...]] | None] = (
            shared_cache if shared_cache is not None else {})
        self._pairs: dict[tuple, PairTerms] = {}
        self._leaned: dict[tuple, tuple[float, object]] = {}
        self._pair_rates: dict[tuple, float] = {}
        assert ctx.targets is not None
        self.targets = {lean: ctx.targets if lean == "even" else
                        Targets.for_slo(ctx.slo, ctx.targets.max_batch_tokens, lean) for lean in LEANS}

    # -- groups --------------------------------------------------------------------------------
    def _class_key(self, group: Group) -> tuple:
        """What a group's configuration depends on: GPU type and count per node, and the links between
        its nodes (not which nodes they are: identical nodes give identical replicas)."""
        cl = self.ctx.cluster
        per = group_key(group)
        nodes = sorted(per, key=lambda nc: (cl.node(nc[0]).gpu_type, nc[1], nc[0]))
        shape = tuple((cl.node(n).gpu_type, c) for n, c in nodes)
        links = tuple(sorted(round(cl.bandwidth(a, b)) for i, (a, _) in enumerate(nodes) for b, _ in nodes[i + 1 :]))
        return shape, links, tuple(n for n, _ in nodes)

    def config(self, group: Group, role: str) -> ReplicaConfig | None:
        charge("config")
        shape, links, nodes = self._class_key(group)
        key = (shape, links, role)
        if key not in self._configs:
            cfg = configure_group(self.ctx, list(group), role)
            self._configs[key] = None if cfg is None else (cfg, nodes)
        hit = self._configs[key]
        if hit is None:
            return None
        cfg, cached_nodes = hit
        if set(cfg.gpus) == set(group):
            return cfg
        # Same shape on other nodes or GPU indices: identical hardware, so re-label the GPUs.
        node_map = dict(zip(cached_nodes, nodes, strict=True))
        pool: dict[str, list[GpuId]] = {}
        for g in sorted(group):
            pool.setdefault(g[0], []).append(g)
        taken: Counter[str] = Counter()
        gpus = []
        for node, _ in cfg.gpus:
            target = node_map[node]
            gpus.append(pool[target][taken[target]])
            taken[target] += 1
        rm = cfg.rm
        if node_map and any(a != b for a, b in node_map.items()):
            rm = ReplicaModel(rm.model, [replace(st, node=node_map[st.node]) for st in rm.stages], rm.pp_links, rm.eff)
        return ReplicaConfig(tuple(gpus), cfg.tp, cfg.pp, cfg.layer_split, role, rm, cfg.capacity, cfg.curve,
                             cfg.policy)

    # -- links ---------------------------------------------------------------------------------
    def pair_terms(self, p: ReplicaConfig, d: ReplicaConfig) -> PairTerms:
        key = (tuple(s.node for s in p.rm.stages), p.tp, p.layer_split, tuple(s.node for s in d.rm.stages), d.tp,
               d.layer_split)
        if key not in self._pairs:
            self._pairs[key] = self._pair_terms(p.rm, d.rm)
        return self._pairs[key]

    def _pair_terms_mode(self, prm: ReplicaModel, drm: ReplicaModel, mode: str) -> PairTerms:
        """Pair terms with a given compression (checking a plan's own per-link choice)."""
        return self._pair_terms(prm, drm, mode)

    def _pair_terms(self, prm: ReplicaModel, drm: ReplicaModel, mode: str | None = None) -> PairTerms:
        """KV transfer terms of a (prefill, decode) pair with ``mode`` (default: the evaluator's setting)."""
        ctx = self.ctx
        cl, m, tokens = ctx.cluster, ctx.model, ctx.workload.mean_input
        segs = kv_segments(prm, drm)
        terms: dict[str, PairTerms] = {}

        def transfer_s(mode: str) -> float:
            per_src: dict[str, float] = {}
            uses = []
            for src, dst, layers in segs:
                bw = cl.bandwidth(src, dst) * ctx.eff.network
                busy = kv_bytes(m, tokens, layers, mode) / bw
                per_src[src] = per_src.get(src, 0.0) + busy + cl.latency(src, dst)
                uses.append(((("nic" if src != dst else "gpu"), src), busy))
            t = max(per_src.values(), default=0.0)
            t += prm.kv_compress_time(tokens, mode) + drm.kv_compress_time(tokens, mode)
            terms[mode] = PairTerms(t, mode, uses)
            return t

        mode = mode or self.kv_compression
        if mode == "auto":
            mode = auto_kv_mode(transfer_s, ctx.slo.ttft_s)
        if mode not in terms:
            transfer_s(mode)
        return terms[mode]

    def _kv_quantile(self, terms: PairTerms, link_cap: float, q_ttft: float) -> float:
        """KV time of a long prompt (the ``q_ttft`` quantile) plus the queueing a link loaded to ``link_cap`` adds."""
        charge("kv_quantile")
        wl = self.ctx.workload
        scale = wl.input.quantile(q_ttft) / wl.mean_input
        return kv_ttft_seconds(terms.kv_time, terms.busy, scale, wl.input.scv, link_cap)

    # -- candidates ----------------------------------------------------------------------------
    def score_of(self, goodput: float, cost: float) -> float:
        shortfall = min(1.0, goodput / self.min_rate) ** 2 if self.min_rate > 0 else 1.0
        if self.objective == "goodput":
            return goodput * shortfall
        return (goodput / cost if cost > 0 else goodput) * shortfall

    def configs_for(self, groups: list[Group], roles: list[str]) -> list[ReplicaConfig | None]:
        return [self.config(g, r) for g, r in zip(groups, roles, strict=True)]

    def bound(self, groups: list[Group], roles: list[str],
              configs: list[ReplicaConfig | None] | None = None) -> float:
        """A fast upper bound on goodput (no links, full TTFT slack) to pre-screen candidates
        (``configs``: the groups' configurations when the caller has them already)."""
        return self._bound_of(configs if configs is not None else self.configs_for(groups, roles))

    @staticmethod
    def _bound_of(configs: list[ReplicaConfig | None]) -> float:
        cp = cd = cc = 0.0
        for cfg in configs:
            if cfg is None:
                continue
            if cfg.role == "prefill":
                cp += cfg.capacity
            elif cfg.role == "decode":
                cd += cfg.capacity
            else:
                cc += cfg.capacity
        return cc + min(cp, cd)

    def evaluate(self, groups: list[Group], roles: list[str], node_prices: dict[str, float]) -> Evaluation:
        return self.evaluate_configs(groups, roles, self.configs_for(groups, roles), node_prices)

    def leaned(self, cfg: ReplicaConfig | None, lean: str) -> ReplicaConfig | None:
        """``cfg`` with its capacity at the quantiles of ``lean`` (``capacity.LEANS``)."""
        return self.at_targets(cfg, self.targets[lean])

    def at_targets(self, cfg: ReplicaConfig | None, targets: Targets) -> ReplicaConfig | None:
        """``cfg`` (configured at the even split) with its capacity at ``targets``' quantiles; a colocated
        replica keeps the even split (its TTFT and TPOT come from one queue, and its model is calibrated
        there)."""
        if cfg is None or targets == self.targets["even"] or cfg.role == "both":
            return cfg
        key = (shape_key(cfg.rm), cfg.role, targets)
        if key not in self._leaned:
            cap, curve, _ = role_capacity(replace(self.ctx, targets=targets), cfg.rm, cfg.role)
            self._leaned[key] = (cap, curve)
        cap, curve = self._leaned[key]
        return replace(cfg, capacity=cap, curve=curve)  # type: ignore[arg-type]

    def evaluate_configs(self, groups: list[Group], roles: list[str], configs: list[ReplicaConfig | None],
                         node_prices: dict[str, float]) -> Evaluation:
        """Route between given replica configurations (rescheduling keeps each replica's parallelism).

        Capacities are at the even split of the SLO's miss budget: the search compares candidates
        there, and ``lean`` re-routes the few it keeps."""
        prob, pair_terms, compression = self._problem(configs)
        sol = self._route_steps(prob, pair_terms, self.targets["even"])
        cost = nodes_cost(used_nodes(groups, configs), node_prices)
        return Evaluation(sol.total, cost, self.score_of(sol.total, cost), list(groups), list(roles), configs, sol,
                          compression, self.targets["even"])

    def lean(self, e: Evaluation) -> Evaluation:
        """``e`` routed again with the SLO's miss budget leaning to one target (``capacity.Targets.for_slo``)
        when that serves more: to TTFT when its decode replicas have room (more prompts may then miss
        TTFT), to TPOT when its prefill replicas have room. For the candidates the search keeps and the
        plan written down, not for every candidate: it is one or two more routing LPs each. Not where
        the links are ignored (a hand-built DistServe candidate is ranked by what its links carry, not
        by that routing)."""
        even = self.targets["even"]
        if not self.bandwidth_aware or e.targets != even or all(c is None or c.role != "prefill" for c in e.configs):
            return e
        best = e
        for lean, side in (("ttft", "decode"), ("tpot", "prefill")):
            if self._full(e, side):  # the other side cannot take more: leaning away from it cannot help
                continue
            leaned = [self.leaned(c, lean) for c in e.configs]
            if self._bound_of(leaned) <= best.goodput * (1 + 1e-9):
                continue
            prob, pair_terms, _ = self._problem(leaned)
            sol = self._route_steps(prob, pair_terms, self.targets[lean])
            if sol.total > best.goodput * (1 + 1e-9):
                best = replace(e, goodput=sol.total, score=self.score_of(sol.total, e.cost), configs=leaned,
                               routing=sol, targets=self.targets[lean])
        return best

    @staticmethod
    def _full(e: Evaluation, role: str) -> bool:
        """The routing fills the capacity of ``e``'s replicas of ``role`` (prefill or decode)."""
        caps = {f"g{i}": c.capacity for i, c in enumerate(e.configs) if c is not None and c.role == role}
        side = 0 if role == "prefill" else 1
        routed = sum(f for pair, f in e.routing.pairs.items() if pair[side] in caps)
        return routed >= sum(caps.values()) * (1 - 1e-6)

    def _route_steps(self, prob: RoutingProblem, pair_terms: dict[tuple[str, str], tuple[ReplicaConfig, PairTerms]],
                     targets: Targets) -> RoutingSolution:
        """Route with each link capped where it carries what its prefill replicas take (``_link_caps``),
        then, while that routes more, again with each link that has room capped at the lowest cap over
        what it carries: its prefills may send part of their load over other links (a decode replica on
        their own node), and a link kept idler leaves its pairs more TTFT (the first routing stays
        feasible, so this only adds)."""
        caps = self._link_caps(prob, pair_terms, targets)
        sol = self._route(prob, pair_terms, caps, targets)
        for _ in range(LINK_CAP_REFINES):
            loads = link_loads(prob, sol)
            lower = {link: min(cap_over(load, 1e-9), caps[link]) for link, load in loads.items()}
            if lower == caps:
                break
            other = self._route(prob, pair_terms, lower, targets)
            if other.total <= sol.total * (1 + 1e-9):
                break
            caps, sol = lower, other
        return sol

    def _link_caps(self, prob: RoutingProblem, pair_terms: dict[tuple[str, str], tuple[ReplicaConfig, PairTerms]],
                   targets: Targets) -> dict[Hashable, float]:
        """Per link, the cap of ``LINK_CAPS`` that lets the most through it: the lower of what it carries
        at the cap and what the prefill replicas sending over it take when their TTFT budgets reserve
        its wait at that cap (each at its best decode pair). The first rises with the cap, the second
        falls, so the best cap is at their crossing, found by bisection. A link the prefills cannot
        fill at the lowest cap is kept there; when decode replicas bind instead, the links carry less
        than their caps and their waits are overcounted (conservative)."""
        caps: dict[Hashable, float] = {}
        for link, use in prob.link_use.items():
            busy = max(use.values())
            if busy <= 0:  # carries nothing: its wait is none at any cap
                caps[link] = LINK_CAPS[0]
                continue
            pairs = [(pd, pair_terms[pd]) for pd in use]

            lo, hi = 0, len(LINK_CAPS)  # the first cap whose link carries all the prefills take: in [lo, hi]
            while lo < hi:
                mid = (lo + hi) // 2
                if LINK_CAPS[mid] / busy >= self._prefill_rate(pairs, LINK_CAPS[mid], targets):
                    hi = mid
                else:
                    lo = mid + 1
            if lo == len(LINK_CAPS):
                caps[link] = LINK_CAPS[-1]
            elif lo == 0 or LINK_CAPS[lo - 1] / busy < self._prefill_rate(pairs, LINK_CAPS[lo], targets):
                caps[link] = LINK_CAPS[lo]
            else:
                caps[link] = LINK_CAPS[lo - 1]
        return caps

    def _problem(self, configs: list[ReplicaConfig | None]) -> tuple[
            RoutingProblem, dict[tuple[str, str], tuple[ReplicaConfig, PairTerms]], dict[tuple[int, int], str]]:
        """The routing LP of replicas ``configs`` (group ``i`` is ``g{i}``), its pairs' KV terms and the
        KV compression of each (prefill index, decode index); capacities are set per link cap by ``_route``."""
        prob = RoutingProblem()
        ids = [f"g{i}" for i in range(len(configs))]
        compression: dict[tuple[int, int], str] = {}
        pair_terms: dict[tuple[str, str], tuple[ReplicaConfig, PairTerms]] = {}
        for i, cfg in enumerate(configs):
            if cfg is None:
                continue
            if cfg.role == "prefill":
                prob.prefill.append(ids[i])
            elif cfg.role == "decode":
                prob.decode.append(ids[i])
                prob.decode_cap[ids[i]] = cfg.capacity
            else:
                prob.colocated.append(ids[i])
                prob.colocated_cap[ids[i]] = cfg.capacity
        index = {ids[i]: i for i in range(len(configs))}
        for p in prob.prefill:
            pc = configs[index[p]]
            for d in prob.decode:
                dc = configs[index[d]]
                assert pc is not None and dc is not None
                terms = self.pair_terms(pc, dc)
                compression[(index[p], index[d])] = terms.compression
                pair_terms[(p, d)] = (pc, terms)
                if self.bandwidth_aware:
                    for link, busy in terms.link_use:  # a pair's KV may leave one NIC in several segments
                        use = prob.link_use.setdefault(link, {})
                        use[(p, d)] = use.get((p, d), 0.0) + busy
        return prob, pair_terms, compression

    def balanced(self, e: Evaluation) -> Evaluation:
        """``e`` with its routing spread evenly over the replicas of each phase at (nearly) the same
        total (``routing.balance_routing``): what is written into a plan and served, not what is searched."""
        if e.routing.total <= 0 or not any(c is not None and c.role != "both" for c in e.configs):
            return e
        prob, pair_terms, _ = self._problem(e.configs)
        self._cap_links(prob, pair_terms, e.routing.link_caps, e.targets or self.targets["even"])
        return replace(e, routing=balance_routing(prob, e.routing))

    def _prefill_rate(self, pairs: list[tuple[tuple[str, str], tuple[ReplicaConfig, PairTerms]]], link_cap: float,
                      targets: Targets) -> float:
        """What the prefill replicas of ``pairs`` take, each at its best pair, with their links at ``link_cap``."""
        best: dict[str, float] = {}
        for (p, _), (pc, terms) in pairs:
            best[p] = max(best.get(p, 0.0), self._pair_rate(pc, terms, link_cap, targets))
        return sum(best.values())

    def _route(self, prob: RoutingProblem, pair_terms: dict[tuple[str, str], tuple[ReplicaConfig, PairTerms]],
               link_caps: dict[Hashable, float], targets: Targets) -> RoutingSolution:
        """Solve the routing LP with each link capped at ``link_caps``: each pair's prefill capacity is
        what its TTFT budget allows after the KV transfer and its link's wait at that cap."""
        self._cap_links(prob, pair_terms, link_caps, targets)
        return solve_routing(prob)

    def _cap_links(self, prob: RoutingProblem, pair_terms: dict[tuple[str, str], tuple[ReplicaConfig, PairTerms]],
                   link_caps: dict[Hashable, float], targets: Targets) -> None:
        """Set ``prob``'s link caps and each pair's prefill capacity (and tie-break) at the cap of its
        busiest link."""
        prob.link_caps = dict(link_caps)
        for pd, (pc, terms) in pair_terms.items():
            cap = prob.cap_of(busiest_link(terms))
            prob.pair_cap[pd], kv = self.pair_prefill_capacity(pc, terms, cap, targets)
            prob.pair_penalty[pd] = min(0.99, kv / self.ctx.slo.ttft_s)

    def pair_prefill_capacity(self, pc: ReplicaConfig, terms: PairTerms, link_cap: float = LINK_UTILISATION,
                              targets: Targets | None = None) -> tuple[float, float]:
        """(rate prefill ``pc`` takes when its requests decode over ``terms``' link, the TTFT that link
        costs on average): the rate whose TTFT quantile (``targets``', default the even split's, as
        ``pc``'s curve must be), with each prompt's KV transfer and the wait of links loaded to
        ``link_cap`` (``capacity.KvLink``), fits its TTFT budget less half a TPOT (the wait to join a
        decode step). Ignoring bandwidth, its own curve's."""
        t = self.targets["even"] if targets is None else targets
        if not self.bandwidth_aware:
            return pc.prefill_capacity(self._prefill_slack), 0.0
        return self._pair_rate(pc, terms, link_cap, t), self._kv_quantile(terms, link_cap, t.q_ttft)

    @property
    def _prefill_slack(self) -> float:
        """A prefill's TTFT budget: the target less half a TPOT (the wait to join a decode step)."""
        slo = self.ctx.slo
        return slo.ttft_s - 0.5 * slo.tpot_s

    def _pair_rate(self, pc: ReplicaConfig, terms: PairTerms, link_cap: float, t: Targets) -> float:
        """``pair_prefill_capacity``'s rate, cached by what it depends on: a link's cap is chosen by
        bisection over many pairs of the same shapes (``_link_caps``)."""
        if pc.curve is None:
            return 0.0
        key = (shape_key(pc.rm), t, terms.kv_time, terms.busy, link_cap)
        rate = self._pair_rates.get(key)
        if rate is None:
            wl = self.ctx.workload
            link = KvLink(terms.kv_time, terms.busy, link_cap, wl.input.scv)
            rates, ttft = linked_prefill_curve(pc.rm, wl, t, link)
            rate = self._pair_rates[key] = rate_for_slack(rates, ttft, self._prefill_slack)
        return rate
