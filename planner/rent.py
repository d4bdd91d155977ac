"""What to rent: a choice of instances under the hourly budget, made as a small integer program.

For every place (cloud, region) the catalog offers, each instance type is turned into *units*: the
smallest set of its instances that holds whole replicas of the model (several replicas when an
instance has many GPUs, several instances per replica when one is too small), once per phase
(prefill, decode, colocated), each with its capacity at the SLO from the cost model, plus, for
multi-GPU instances, one unit holding both prefill and decode replicas (KV over the node's own GPU
link, so it needs no network). The MIP (HiGHS,
through ``scipy.optimize.milp``) picks how many units of each kind to rent to maximise the served
rate ``rate_pd + rate_colocated`` with ``rate_pd <= prefill capacity`` (each prefill unit at the
lesser of its compute, within the TTFT its KV's trip over the network leaves, and what its own NICs
ship of the KV), ``rate_pd <= decode capacity``, and
total price <= budget (with no demanded rate, the mix worth most by the race's rule: ``best_mix``).
This is Mélange's bin-packing idea extended to phases; the tabu search then
refines grouping and phases on the pool it returns. Places with the same offers and prices are solved
once, places whose best mix is the same rental (the same instances at the same prices) give one pool,
and places are solved most promising first, skipping those whose mix could not be worth a place among
the pools kept (``worth_bound``: the best unit rate per dollar times what the place can spend).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from planner.cluster import DEFAULT_GBPS, Cluster, GpuId, Node
from planner.cost_model import KV_FACTOR, auto_kv_mode
from planner.offers import Offer, offers_per_shape
from planner.parallel import (
    SPLIT_SIZES,
    PlanContext,
    ReplicaConfig,
    best_node_split,
    colocated_may_serve,
    configure_group,
)
from planner.routing import LINK_UTILISATION, kv_ttft_seconds
from planner.work import charge


class BudgetTooSmall(ValueError):
    """Not even one replica of the model fits in the budget."""


@dataclass(frozen=True)
class InstanceChoice:
    offer: Offer
    price: float
    spot: bool


@dataclass
class Unit:
    """``instances`` instances of one type, holding ``len(groups)`` replicas of one role."""

    kind: InstanceChoice
    instances: int
    gpus_per_replica: int
    replicas: int
    role: str
    capacity: float  # req/s of all its replicas at the SLO
    config: ReplicaConfig = field(repr=False, default=None)  # type: ignore[assignment]
    layout: tuple[tuple[str, int], ...] = ()  # role "pd": (role, GPUs) of each group inside the instance

    @property
    def cost(self) -> float:
        return self.kind.price * self.instances

    @property
    def gpus(self) -> int:
        return self.kind.offer.gpu_count * self.instances


@dataclass
class PoolChoice:
    """A rented pool: the instances and the replica groups the MIP had in mind for them."""

    site: tuple[str, str]
    cluster: Cluster
    groups: list[list[tuple[str, int]]]
    roles: list[str]


def _site_bandwidth(inter_node_gbps: float | None) -> float:
    return inter_node_gbps if inter_node_gbps is not None else DEFAULT_GBPS["zone"]


class UnitCatalog:
    """Units per instance type, cached across places by what they depend on."""

    def __init__(self, ctx_factory, phases: tuple[str, ...], gbps: float, group_cache: dict | None = None) -> None:
        self.ctx_factory = ctx_factory  # Cluster -> PlanContext
        self.phases = phases
        self.gbps = gbps
        self._cache: dict[tuple, list[tuple]] = {}
        self._groups = group_cache if group_cache is not None else {}  # shared by the planner's passes

    def _configure(self, gpu_type: str, count: int, n_inst: int, per: int, role: str) -> ReplicaConfig | None:
        """The replica of ``per`` GPUs over ``n_inst`` instances of ``count`` GPUs, for ``role``."""
        key = self._key(gpu_type, count, n_inst, per, role)
        if key not in self._groups:
            self._groups[key] = configure_group(*self._group(gpu_type, count, n_inst, per), role)
        return self._groups[key]

    def _key(self, gpu_type: str, count: int, n_inst: int, per: int, role: str) -> tuple:
        # a replica inside one instance does not depend on how many GPUs the instance has: 1x, 2x and 8x
        # offers of a type share the configuration of their 1-, 2- or 4-GPU replicas
        return ("unit", gpu_type, count if per > count else per, n_inst, per, role, self.gbps)

    def _group(self, gpu_type: str, count: int, n_inst: int, per: int) -> tuple[PlanContext, list[GpuId]]:
        nodes = [Node(f"t{i}", gpu_type, count if per > count else per, 1.0, region="x") for i in range(n_inst)]
        ctx = self.ctx_factory(Cluster(nodes, inter_node_gbps=self.gbps))
        return ctx, [g for node in nodes for g in node.gpu_ids()][:per]

    def _may_win(self, gpu_type: str, count: int, n_inst: int, per: int, rate: float) -> bool:
        """Whether a colocated replica of this shape may serve more than ``rate`` (``colocated_may_serve``):
        a shape that must beat a smaller one per instance is screened before its capacity is searched
        (most lose: a 7B model's 2-, 4- and 8-GPU colocated replicas on one instance). A shape known
        already is judged by its capacity."""
        key = self._key(gpu_type, count, n_inst, per, "both")
        if key in self._groups:
            cfg = self._groups[key]
            return cfg is not None and cfg.capacity > rate * 1.001
        return colocated_may_serve(*self._group(gpu_type, count, n_inst, per), rate)

    def shapes(self, gpu_type: str, count: int) -> list[tuple]:
        """(instances, gpus per replica, replicas, role, capacity of the unit, config[, layout]) per role:
        the best way to cut this instance type into replicas of that role; role ``pd`` is one instance
        holding prefill and decode replicas (``layout``), so its KV never leaves the node."""
        key = (gpu_type, count)
        if key in self._cache:
            return self._cache[key]
        out = []
        for role in self.phases:
            best = None
            for per in [k for k in (1, 2, 4, 8) if k <= count and count % k == 0] + [count * n for n in (2, 4, 8)]:
                n_inst = max(1, per // count)
                reps = max(1, count // per) if per <= count else 1
                if role == "both" and best is not None and not self._may_win(
                        gpu_type, count, n_inst, per, best[4] / best[0] * n_inst / reps):
                    if per >= count:
                        break  # it holds the model (it cannot serve the rate) and bigger groups only cost more
                    continue
                cfg = self._configure(gpu_type, count, n_inst, per, role)
                if cfg is None or cfg.capacity <= 0:
                    continue
                cap = cfg.capacity * reps
                value = cap / n_inst
                if best is None or value > best[4] / best[0] * 1.001:
                    best = (n_inst, per, reps, role, cap, cfg)
                if per >= count:
                    break  # bigger groups only cost more once the model fits
            if best is not None:
                out.append(best)
        if "prefill" in self.phases and "decode" in self.phases and count >= 2:
            pd = self._pd_in_node(gpu_type, count)
            if pd is not None:
                out.append(pd)
        self._cache[key] = out
        return out

    def units(self, kind: InstanceChoice) -> list[Unit]:
        """The units one instance type at one price is cut into, one per role (``shapes``)."""
        shapes = self.shapes(kind.offer.gpu_type, kind.offer.gpu_count)
        return [Unit(kind, n_inst, per, reps, role, cap, cfg, layout[0] if layout else ())
                for n_inst, per, reps, role, cap, cfg, *layout in shapes]

    def _pd_in_node(self, gpu_type: str, count: int):
        """One instance split into prefill and decode replicas (KV over the node's GPU link, no NIC):
        the split with the most served rate, min(prefill capacity, decode capacity)."""
        configs = {(role, k): self._configure(gpu_type, count, 1, k, role)
                   for role in ("prefill", "decode") for k in SPLIT_SIZES if k < count}
        caps = {key: c.capacity for key, c in configs.items() if c is not None}
        split = best_node_split(count, {k: c for (r, k), c in caps.items() if r == "prefill"},
                                {k: c for (r, k), c in caps.items() if r == "decode"})
        if split is None:
            return None
        rate, ps, n_p, ds, n_d = split
        layout = (("prefill", ps),) * n_p + (("decode", ds),) * n_d
        return 1, count, n_p + n_d, "pd", rate, configs[("prefill", ps)], layout


def choose_pools(offers: list[Offer], budget: float, spot: bool, ctx_factory, *, phases: tuple[str, ...],
                 inter_node_gbps: float | None, kv_compression: str, max_gpus: int, top: int = 3,
                 bandwidth_aware: bool = True, rate_cap: float = math.inf, in_node_top: int = 1,
                 marginal_value: float | None = None, group_cache: dict | None = None, prune: bool = True,
                 past_limit: Callable[[], bool] | None = None, stats: dict[str, float] | None = None
                 ) -> list[PoolChoice]:
    """The best ``top`` pools (one per place) by MIP-estimated rate per dollar (or ``marginal_value``);
    raises BudgetTooSmall.

    ``rate_cap``: no need to rent for more than this rate (the demand with headroom); the cheapest
    mix that reaches it wins, so a small demand does not spend the whole budget.
    ``in_node_top``: also the best pools whose KV never crosses the network (only colocated units and
    instances holding both phases): the MIP's view of KV over the network is coarse (a NIC budget,
    no TTFT cost), so the search gets that alternative to weigh too.
    ``marginal_value``: None ranks places by rate per dollar (the aim is a demanded rate at least cost);
    a number ranks them by rate / cost^marginal_value, the race's own rule when the aim is the most
    goodput the budget buys (``scheduler._worth``). Per dollar, a place with one cheap good offer and
    little else (a capped provider) outranks a place whose mix spends the budget on twice the rate.
    ``prune``: skip the places whose mix could not be worth a place among those kept (``worth_bound``):
    the same pools, fewer MIPs; off only to check exactly that.
    ``past_limit``: once it says so and a mix is found, the places not yet solved are left (the plan's
    time limit holds on big catalogs; the most promising places were solved first); how many goes to
    ``stats["rent_places_left"]``."""
    gbps = _site_bandwidth(inter_node_gbps)
    units_cat = UnitCatalog(ctx_factory, phases, gbps, group_cache)
    by_site = offers_by_place(offers, spot)
    solved: set[tuple] = set()  # places' offer signatures
    places: list[tuple[float, float, tuple[str, str], list[Unit], list[Unit]]] = []
    cheapest_replica = math.inf
    kv: NetworkKv | None = None
    for site, kinds in by_site.items():
        sig = tuple(sorted((k.offer.gpu_type, k.offer.gpu_count, round(k.price, 4),
                            -1 if k.offer.capacity is None else k.offer.capacity) for k in kinds))
        if sig in solved:
            continue
        solved.add(sig)
        units = []
        for u in (u for k in kinds for u in units_cat.units(k)):
            cheapest_replica = min(cheapest_replica, u.cost)
            if u.cost <= budget and u.gpus <= max_gpus:
                units.append(u)
        if not units:
            continue
        if kv is None:
            kv = network_kv(units[0], ctx_factory, gbps, kv_compression, bandwidth_aware)
        # the in-node alternative (colocated units and instances holding both phases), where there is one
        local = [u for u in units if u.role in ("pd", "both")]
        if not (in_node_top and any(u.role == "pd" for u in local)):
            local = []
        places.append((worth_bound(units, kv, budget, rate_cap, marginal_value),
                       worth_bound(local, kv, budget, rate_cap, marginal_value) if local else 0.0, site, units, local))
    # by rental: the first place (by name) that rents it; a second copy would only take a place among
    # the pools searched (two RunPod regions once pushed Lambda's GH200s, the best 70B mix, out)
    results: dict[tuple, tuple[float, tuple[str, str], float, float, list[tuple[Unit, int]]]] = {}
    in_node: dict[tuple, tuple[float, tuple[str, str], float, float, list[tuple[Unit, int]]]] = {}
    # most promising places first; a place whose mix could not be worth a place among those kept is not solved
    # (branch and bound over places: the same pools as solving every place, fewer MIPs)
    ordered = sorted(places, key=lambda p: (-p[0], p[2]))
    for k, (bound, local_bound, site, units, local) in enumerate(ordered):
        if results and past_limit is not None and past_limit():
            if stats is not None:
                stats["rent_places_left"] = stats.get("rent_places_left", 0.0) + len(ordered) - k
            break
        if prune and _beaten(bound, results, top) and (not local or _beaten(local_bound, in_node, in_node_top)):
            continue
        rate, cost, picks = best_mix(units, budget, max_gpus, ctx_factory, gbps, kv_compression, bandwidth_aware,
                                     rate_cap, marginal_value)
        if rate > 0:
            _keep_first_place(results, picks, (worth(rate, cost, marginal_value), site, rate, cost, picks))
        crosses = any(u.role in ("prefill", "decode") for u, _ in picks)  # else the same answer
        if crosses and local:
            r2, c2, p2 = best_mix(local, budget, max_gpus, ctx_factory, gbps, kv_compression, bandwidth_aware,
                                  rate_cap, marginal_value)
            if r2 > 0:
                _keep_first_place(in_node, p2, (worth(r2, c2, marginal_value), site, r2, c2, p2))
    if not results:
        what = f"${cheapest_replica:.2f}/h" if math.isfinite(cheapest_replica) else "no offer that holds it"
        raise BudgetTooSmall(f"budget ${budget:.2f}/h is too small for one replica of the model (cheapest: {what})")
    chosen = sorted(results.values(), key=_rank)[:top] + sorted(in_node.values(), key=_rank)[:in_node_top]
    return [_pool_from_picks(site, picks) for _, site, _, _, picks in chosen]


def worth_bound(units: list[Unit], kv: NetworkKv, budget: float, rate_cap: float,
                marginal_value: float | None) -> float:
    """No mix of these units is worth more (``worth``): its rate per dollar is at most the best
    colocated (or in-node) unit's, or, for a prefill-decode split, what the best prefill and the best
    decode unit per dollar serve together (a rate r costs at least r/a + r/b); and its cost is at most
    the budget, or what a capped provider has to rent."""
    def per_dollar(role: str, cap) -> float:
        return max((cap(u) / u.cost for u in units if u.role == role), default=0.0)

    colocated = max(per_dollar("both", lambda u: u.capacity), per_dollar("pd", lambda u: u.capacity))
    a, b = per_dollar("prefill", lambda u: shipped_capacity(u, kv)), per_dollar("decode", lambda u: u.capacity)
    rho = max(colocated, a * b / (a + b) if a > 0 and b > 0 else 0.0)
    if marginal_value is None:
        return rho
    if marginal_value > 1:
        return math.inf  # worth then falls with cost: no bound from the most a place can spend
    kinds = {id(u.kind): u.kind for u in units}
    most = budget
    if all(k.offer.capacity is not None for k in kinds.values()):
        most = min(budget, sum(k.offer.capacity * k.price for k in kinds.values()))
    bound = rho * most ** (1 - marginal_value)
    if math.isfinite(rate_cap) and rho > 0:  # rate <= rate_cap too: rate / cost^mv peaks where rho * cost = cap
        bound = min(bound, rate_cap ** (1 - marginal_value) * rho**marginal_value)
    return bound


def _beaten(bound: float, found: dict[tuple, tuple], top: int) -> bool:
    """Whether ``top`` mixes found are each worth more than ``bound``."""
    if len(found) < top:
        return False
    kth = sorted((f[0] for f in found.values()), reverse=True)[top - 1]
    return bound * (1 + 1e-9) < kth


def _keep_first_place(found: dict[tuple, tuple], picks: list[tuple[Unit, int]], entry: tuple) -> None:
    """One entry per rental, from the first place by name that rents it (places are solved by promise)."""
    key = _rental(picks)
    if key not in found or entry[1] < found[key][1]:
        found[key] = entry


def network_kv(unit: Unit, ctx_factory, gbps: float, kv_mode: str, bandwidth_aware: bool) -> NetworkKv:
    """The KV's cost to a prefill unit as the MIP weighs it (``solve_mix``)."""
    if not bandwidth_aware:
        return NetworkKv(0.0)
    ctx = ctx_factory(Cluster([Node("x", unit.kind.offer.gpu_type, 1)], inter_node_gbps=gbps))
    return NetworkKv.of(ctx, gbps, kv_mode)


def offers_by_place(offers: list[Offer], spot: bool) -> dict[tuple[str, str], list[InstanceChoice]]:
    """The offers of each instance shape worth renting (the cheapest, and dearer ones while the cheaper
    are capped by their capacity), grouped by place (cloud, region): what one pool may rent."""
    out: dict[tuple[str, str], list[InstanceChoice]] = {}
    for (cloud, region, _gpu, _count), choices in sorted(offers_per_shape(offers, spot).items()):
        out.setdefault((cloud, region), []).extend(InstanceChoice(o, price, is_spot) for o, price, is_spot in choices)
    return out


def rate_rows(units: list[Unit], kv: NetworkKv) -> list[dict[int, float]]:
    """The mix's served rates within its capacities, as rows ``<= 0`` over [x_u..., rate_pd, rate_c]:
    rate_pd within the prefill units' shipped capacity and within the decode units', rate_c within the
    colocated and in-node split units'."""
    n = len(units)
    return [{n: 1.0, **{i: -shipped_capacity(u, kv) for i, u in enumerate(units) if u.role == "prefill"}},
            {n: 1.0, **{i: -u.capacity for i, u in enumerate(units) if u.role == "decode"}},
            {n + 1: 1.0, **{i: -u.capacity for i, u in enumerate(units) if u.role in ("both", "pd")}}]


def worth(rate: float, cost: float, marginal_value: float | None) -> float:
    """A plan's rank value: rate per dollar, or rate / cost^marginal_value (the race's rule to first
    order when the aim is the most goodput; ``choose_pools``, ``scheduler._worth``)."""
    return rate / cost ** (1.0 if marginal_value is None else marginal_value)


def _rank(found: tuple) -> tuple:
    """Most worth first (``worth``), then the most rate, then the place's name (a stable order)."""
    return -found[0], -found[2], found[1]


def _rental(picks: list[tuple[Unit, int]]) -> tuple:
    """What a mix rents, wherever it is: cloud, instance type, price, and the replicas cut from it."""
    return tuple(sorted((u.kind.offer.cloud, u.kind.offer.instance_type, round(u.kind.price, 4), u.role, u.instances,
                         u.gpus_per_replica, u.layout, n) for u, n in picks))


def kv_seconds_per_request(ctx: PlanContext, gbps: float, mode: str) -> float:
    """A mean prompt's KV over the network (no compression passes or latency: the MIP's NIC budget)."""
    nbytes = ctx.workload.mean_input * ctx.model.kv_bytes_per_token

    def transfer_s(q: str) -> float:
        return nbytes * KV_FACTOR[q] / (gbps * 1e9 / 8 * ctx.eff.network)

    return transfer_s(auto_kv_mode(transfer_s, ctx.slo.ttft_s) if mode == "auto" else mode)


@dataclass(frozen=True)
class NetworkKv:
    """What a prompt's KV crossing the network costs a prefill unit: ``seconds`` of one NIC per mean
    prompt, and TTFT: a long prompt's transfer (the targets' quantile of the prompt length) and the
    queueing of a NIC at the link cap come out of the TTFT its prefill queue may use, with half a TPOT
    for the wait to join a decode step, as the routing LP charges a pair
    (``Evaluator.pair_prefill_capacity``)."""

    seconds: float
    ttft_s: float = math.inf
    tpot_s: float = 0.0
    long_scale: float = 1.0  # the quantile prompt's length over the mean's
    scv: float = 0.0  # of the prompt length

    @staticmethod
    def of(ctx: PlanContext, gbps: float, mode: str) -> NetworkKv:
        wl, t = ctx.workload, ctx.targets
        assert t is not None
        return NetworkKv(kv_seconds_per_request(ctx, gbps, mode), ctx.slo.ttft_s, ctx.slo.tpot_s,
                         wl.input.quantile(t.q_ttft) / wl.mean_input, wl.input.scv)

    def ttft_left(self, nics: int) -> float:
        """The TTFT a prefill replica's queue may use when its KV leaves through ``nics`` NICs at once
        (a replica over several instances ships each one's layers from its own)."""
        kv = self.seconds / max(nics, 1)
        return self.ttft_s - kv_ttft_seconds(kv, kv, self.long_scale, self.scv, LINK_UTILISATION) - 0.5 * self.tpot_s


def shipped_capacity(unit: Unit, kv: NetworkKv) -> float:
    """A prefill unit's req/s: its compute within the TTFT the KV's trip leaves (``NetworkKv``), or what
    its own NICs can ship of the prompts' KV (at most LINK_UTILISATION busy each), whichever is less.
    Per unit, not summed over the pool: a fast prefill node's KV cannot leave through a slow one's NIC
    (a pool-wide NIC budget once rented three 4xH100 prefill nodes beside three 2xRTX4090 ones at
    5 Gbps, 24 req/s by the MIP, 8 by the routing LP). Without the TTFT the KV takes, 70B prefill units
    over 5 Gbps were rated for a 7 s TTFT their queue gets ~4 s of: the MIP's mix promised 0.73 req/s
    per $/h and the search's best split on that pool served 0.58."""
    if kv.seconds <= 0:
        return unit.capacity
    compute = unit.capacity
    cfg = unit.config
    if cfg is not None and cfg.curve is not None:
        compute = cfg.prefill_capacity(kv.ttft_left(unit.instances)) * unit.replicas
    return min(compute, LINK_UTILISATION * unit.instances / kv.seconds)


CAPPED_MIP_GAP = 1e-2  # relative optimality gap of the rent MIP when some offer is capped


WORTH_STEPS = 3  # re-solves of a place's MIP towards the mix worth most (``best_mix``)


def best_mix(units: list[Unit], budget: float, max_gpus: int, ctx_factory, gbps: float, kv_mode: str,
             bandwidth_aware: bool, rate_cap: float = math.inf, marginal_value: float | None = None
             ) -> tuple[float, float, list[tuple[Unit, int]]]:
    """A place's mix: the most rate within the budget (``solve_mix``), or, given ``marginal_value``, the
    mix worth most by the race's rule (``worth``: rate / cost^marginal_value), which need not spend
    the whole budget. Worth is not linear in the unit counts, so it is approached as Dinkelbach's
    method approaches a ratio: from the most-rate mix, each step prices every dollar at the worth's
    slope there (``marginal_value`` x rate / cost: the rate a dollar must buy to pay for itself) and
    re-solves; on a concave rate-cost frontier each step is worth at least the last, and the best mix
    met is kept either way. Maximising rate alone rented, on RunPod's US capacity-limited offers for
    the 70B tight-TPOT scenario, an MI300X and an RTX 4090 node for the last $1.20 of $40 (0.9% more
    rate by the MIP's own model; by the bandwidth-blind ablation's mix, 72 GPUs of H100 and L40S, it
    served 8% less per dollar); the mix worth most, L40S and an A100 node for $38.76, served 7% more
    per dollar than the most-rate one (0.757 vs 0.710 req/s per $/h, the scarce suite)."""
    rate, cost, picks = solve_mix(units, budget, max_gpus, ctx_factory, gbps, kv_mode, bandwidth_aware, rate_cap)
    if marginal_value is None or rate <= 0:
        return rate, cost, picks
    best = cur = (rate, cost, picks)
    seen = {_rental(picks)}
    for _ in range(WORTH_STEPS):
        price = marginal_value * cur[0] / cur[1]
        cur = solve_mix(units, budget, max_gpus, ctx_factory, gbps, kv_mode, bandwidth_aware, rate_cap,
                        price_weight=price)
        rental = _rental(cur[2])
        if cur[0] <= 0 or rental in seen:
            break
        seen.add(rental)
        if worth(cur[0], cur[1], marginal_value) > worth(best[0], best[1], marginal_value):
            best = cur
    return best


def solve_mix(units: list[Unit], budget: float, max_gpus: int, ctx_factory, gbps: float, kv_mode: str,
              bandwidth_aware: bool, rate_cap: float = math.inf, relax: bool = False, price_weight: float = 0.0
              ) -> tuple[float, float, list[tuple[Unit, int]]]:
    """MIP over unit counts; variables [x_u..., rate_pd, rate_c]: the most rate, less ``price_weight``
    req/s for each $/h spent (``best_mix``). ``relax``: its LP relaxation (fractional unit counts: an
    upper bound on the rate of any mix, for ``bench/planner_bound.py``; its picks and cost are then the
    rounded counts', not the relaxation's)."""
    n = len(units)
    kv = network_kv(units[0], ctx_factory, gbps, kv_mode, bandwidth_aware)
    c = np.zeros(n + 2)
    c[n] = -1.0
    c[n + 1] = -1.0
    scale = rate_cap if math.isfinite(rate_cap) else max(u.capacity for u in units)
    # each $/h spent costs ``price_weight`` req/s, plus a tie-break: among equal rates, the cheaper pool
    c[:n] = [(price_weight + 1e-3 * scale / max(budget, 1e-9)) * u.cost for u in units]
    rows, lo, hi = [], [], []

    def row(coeffs: dict[int, float], lb: float, ub: float) -> None:
        r = np.zeros(n + 2)
        for i, v in coeffs.items():
            r[i] = v
        rows.append(r)
        lo.append(lb)
        hi.append(ub)

    row({i: u.cost for i, u in enumerate(units)}, -np.inf, budget)
    row({i: u.gpus for i, u in enumerate(units)}, -np.inf, max_gpus)
    limited = _by_limited_kind(units)
    for kind_units in limited.values():  # the provider's capacity per instance type
        row({i: u.instances for i, u in kind_units}, -np.inf, kind_units[0][1].kind.offer.capacity)
    for coeffs in rate_rows(units, kv):
        row(coeffs, -np.inf, 0.0)
    if math.isfinite(rate_cap):
        row({n: 1.0, n + 1: 1.0}, -np.inf, rate_cap)
    ub = [min(max_gpus // u.gpus, math.floor(budget / u.cost + 1e-9)) for u in units] + [np.inf, np.inf]
    # capacity rows make the MIP much harder (a 230-unit RunPod place: 0.02 s uncapped, 1 s capped at 1e-3);
    # the rates it weighs are the capacity model's, which the search and the race refine anyway
    gap = CAPPED_MIP_GAP if limited else 1e-3
    with _stdout_to_stderr():
        res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=[int(not relax)] * n + [0, 0],
                   bounds=Bounds([0] * (n + 2), ub), options={"time_limit": 5.0, "mip_rel_gap": gap})
    charge("mip_resolve" if price_weight > 0 else "mip")
    if res.x is None:
        return 0.0, 0.0, []
    x = np.rint(res.x[:n]).astype(int)
    picks = [(u, int(k)) for u, k in zip(units, x, strict=True) if k > 0]
    rate = float(res.x[n] + res.x[n + 1])
    cost = sum(u.cost * k for u, k in picks)
    return rate, cost, picks


def _by_limited_kind(units: list[Unit]) -> dict[int, list[tuple[int, Unit]]]:
    """Units grouped by instance kind, for the kinds whose offer says how many exist."""
    groups: dict[int, list[tuple[int, Unit]]] = {}
    for i, u in enumerate(units):
        if u.kind.offer.capacity is not None:
            groups.setdefault(id(u.kind), []).append((i, u))
    return groups


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """HiGHS's MIP code sometimes prints diagnostics from C on file descriptor 1; keep them off stdout,
    where `tsctl plan --json` writes the plan."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _pool_from_picks(site: tuple[str, str], picks: list[tuple[Unit, int]]) -> PoolChoice:
    nodes: list[Node] = []
    groups: list[list[tuple[str, int]]] = []
    roles: list[str] = []
    for unit, count in sorted(picks, key=lambda p: (p[0].kind.offer.gpu_type, p[0].role)):
        o = unit.kind.offer
        for _ in range(count):
            ids = []
            for _ in range(unit.instances):
                nid = f"n{len(nodes)}"
                nodes.append(Node(nid, o.gpu_type, o.gpu_count, unit.kind.price, unit.kind.spot, o.region, "",
                                  o.cloud, o.instance_type))
                ids.append(nid)
            gpus = [(nid, i) for nid in ids for i in range(o.gpu_count)]
            if unit.layout:  # prefill and decode replicas inside the instance
                pos = 0
                for role, size in unit.layout:
                    groups.append(gpus[pos : pos + size])
                    roles.append(role)
                    pos += size
                continue
            per = unit.gpus_per_replica
            for r in range(unit.replicas):
                groups.append(gpus[r * per : (r + 1) * per])
                roles.append(unit.role)
    return PoolChoice(site, Cluster(nodes), groups, roles)
