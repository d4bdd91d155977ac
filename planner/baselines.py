"""Baselines at the same budget, each the best its own method can do, and two ablations of ours.

* ``colocated`` (vLLM-style): one GPU type, as many instances as the budget buys, identical replicas
  doing both phases; the best GPU type, replica size (TP) and engine scheduling (prefill first, or
  chunked prefill mixed with decode at the best chunk size) are searched.
* ``distserve`` (DistServe-style): one GPU type, prefill and decode replicas with their own TP and
  the best prefill:decode split by DistServe's own estimate, no KV compression; its two placements:
  high node-affinity (its routing ignores the network, as DistServe's planner does) and, on
  multi-GPU instances, low node-affinity (prefill and decode in every node, KV over the GPU link);
  the one that fits the network is used.
* ``hexgen`` (HexGen-style): heterogeneous instances, asymmetric TP/PP replicas, but every replica
  does both phases (no phase split); rent choice and grouping search restricted to colocated.
* ``greedy`` (ablation): our rent choice and initial grouping/phases, no tabu search.
* ``no-bandwidth`` (ablation): our full search, but blind to link bandwidth in routing and
  scoring (KV transfer time and link capacity treated as free); deployed as chosen.

Each returns (evaluator, evaluation) for ``planner.scheduler.build_plan``. When the user owns the
pool, the homogeneous baselines use its largest single-GPU-type subset.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from planner.cluster import Cluster, Node
from planner.evaluate import Evaluation, Evaluator, Group
from planner.offers import Offer, offers_per_shape
from planner.parallel import SPLIT_SIZES, best_node_split
from planner.scheduler import Setting, plan_thunderserve


def homogeneous_clusters(s: Setting) -> list[Cluster]:
    """One cluster per instance shape (GPU type and count) and place: as many instances as the budget
    buys and the provider has (or the pool's own)."""
    if s.pool is not None:
        by_type: dict[str, list[Node]] = {}
        for n in s.pool.nodes:
            by_type.setdefault(n.gpu_type, []).append(n)
        return [Cluster(nodes, s.pool.inter_node_gbps, s.pool.links_gbps) for nodes in by_type.values()]
    assert s.offers is not None and s.budget is not None
    # Per (GPU type, GPU count), the places that offer it, cheapest first: the cheapest place buys at
    # least as many of the same instance as any other, so a dearer place gets its own cluster only
    # while the cheaper ones are capped by what the provider can give (the catalog's Capacity column).
    by_shape: dict[tuple[str, int], list[list[tuple[Offer, float, bool]]]] = {}
    for (_cloud, _region, gpu, count), choices in sorted(offers_per_shape(s.offers, s.spot).items()):
        by_shape.setdefault((gpu, count), []).append(choices)  # places in (cloud, region) order
    out = []
    for (gpu, count), places in sorted(by_shape.items()):
        for choices in sorted(places, key=lambda c: c[0][1]):  # cheapest place first; ties: (cloud, region)
            price = choices[0][1]
            affordable = math.floor(s.budget / price + 1e-9)
            nodes = _homogeneous_nodes(s, gpu, count, choices)
            if nodes:
                out.append(Cluster(nodes, inter_node_gbps=s.inter_node_gbps))
            caps = [o.capacity for o, _, _ in choices]
            if None not in caps and sum(caps) < affordable:  # type: ignore[arg-type]
                continue  # the provider cannot give all the budget buys here: another place may add to it
            break
    return out


def _homogeneous_nodes(s: Setting, gpu: str, count: int, choices: list[tuple[Offer, float, bool]]) -> list[Node]:
    """Instances of one shape at one place, cheapest offer first, each up to its capacity, as many as
    the budget buys (and, for a demanded rate, no more than it needs)."""
    assert s.budget is not None
    want = max(1, s.max_gpus // count)
    if s.workload.rate > 0:  # like ours: no more instances than the demand needs (with headroom)
        want = min(want, _instances_for_rate(s, gpu, count, choices[0][1]))
    nodes: list[Node] = []
    left = s.budget
    for offer, price, is_spot in choices:
        k = min(math.floor(left / price + 1e-9), want - len(nodes))
        if offer.capacity is not None:
            k = min(k, offer.capacity)
        for _ in range(max(0, k)):
            nodes.append(Node(f"n{len(nodes)}", gpu, count, price, is_spot, offer.region, "", offer.cloud,
                              offer.instance_type))
        left -= max(0, k) * price
    return nodes


def _instances_for_rate(s: Setting, gpu: str, count: int, price: float) -> int:
    """Instances of a type whose colocated capacity reaches the rent headroom over the demand."""
    from planner.parallel import configure_group
    from planner.scheduler import RENT_HEADROOM

    node = Node("x0", gpu, count, price)
    best = 0.0
    for size in (1, 2, 4, 8):
        if size > count or count % size:
            continue
        cfg = configure_group(s.context(Cluster([node])), node.gpu_ids()[:size], "both")
        if cfg is not None:
            best = max(best, cfg.capacity * (count // size))
    if best <= 0:
        return 1 << 30
    return max(1, math.ceil(RENT_HEADROOM * s.workload.rate / best))


def _cut(cluster: Cluster, size: int) -> list[Group] | None:
    """Groups of ``size`` GPUs: whole nodes per group when size >= GPUs per node, else slices of nodes."""
    per_node = cluster.nodes[0].gpu_count
    groups: list[Group] = []
    if size <= per_node:
        if per_node % size:
            return None
        for n in cluster.nodes:
            ids = n.gpu_ids()
            groups.extend(tuple(ids[i : i + size]) for i in range(0, per_node, size))
        return groups
    if size % per_node:
        return None
    k = size // per_node
    for i in range(0, len(cluster.nodes) - k + 1, k):
        groups.append(tuple(g for n in cluster.nodes[i : i + k] for g in n.gpu_ids()))
    return groups


def _sizes(cluster: Cluster) -> list[int]:
    per_node = cluster.nodes[0].gpu_count
    total = per_node * len(cluster.nodes)
    return [s for s in (1, 2, 4, 8, 16, 32) if s <= total]


def _better(a: tuple[Evaluator, Evaluation] | None, b: tuple[Evaluator, Evaluation]) -> tuple[Evaluator, Evaluation]:
    return b if a is None or b[1].score > a[1].score else a


def promising_clusters(s: Setting, clusters: list[Cluster], split: bool, keep: int) -> list[Cluster]:
    """The ``keep`` homogeneous clusters that look best per dollar for colocated replicas (``split``
    False) or a prefill/decode split (True), judged by the smallest replica each type can hold (its
    configuration is usually cached by the rent step) and the next size up (a replica that barely
    holds the model has little room for KV); the scheduler plans only these by hand-style.
    ``clusters``: ``homogeneous_clusters(s)``, computed once for both kinds."""
    scored = []
    for cluster in clusters:
        ev = s.evaluator(cluster, kv="none")
        # per GPU; an owned pool's free nodes rank by capacity alone
        price = max(cluster.nodes[0].price_per_hour / cluster.nodes[0].gpu_count, 1e-9)
        value, tried = 0.0, 0
        for size in _sizes(cluster):
            groups = _cut(cluster, size)
            if not groups or ev.config(groups[0], "decode" if split else "both") is None:
                continue
            if split:
                p, d = ev.config(groups[0], "prefill"), ev.config(groups[0], "decode")
                if p is not None and d is not None and p.capacity > 0 and d.capacity > 0:
                    value = max(value, 1.0 / (size * price) / (1.0 / p.capacity + 1.0 / d.capacity))
            else:
                value = max(value, ev.config(groups[0], "both").capacity / (size * price))  # type: ignore[union-attr]
            tried += 1
            if tried == 2:
                break
        scored.append((value, cluster))
    scored.sort(key=lambda vc: -vc[0])
    return [c for v, c in scored[:keep] if v > 0]


def colocated(s: Setting, clusters: list[Cluster] | None = None) -> tuple[Evaluator, Evaluation | None]:
    best = None
    for cluster in homogeneous_clusters(s) if clusters is None else clusters:
        ev = s.evaluator(cluster, kv="none")
        prices = {n.id: n.price_per_hour for n in cluster.nodes}
        for size in _sizes(cluster):
            groups = _cut(cluster, size)
            if not groups or ev.config(groups[0], "both") is None:
                continue
            best = _better(best, (ev, ev.evaluate(groups, ["both"] * len(groups), prices)))
    return best if best else (None, None)  # type: ignore[return-value]


def distserve(s: Setting, clusters: list[Cluster] | None = None) -> tuple[Evaluator, Evaluation | None]:
    """DistServe's two placements, as its paper prescribes by cluster: high node-affinity (prefill and
    decode instances anywhere, KV over the network, which its planner assumes is fast) and, for
    multi-GPU instances, low node-affinity (each node holds prefill and decode instances, so KV moves
    over the node's own GPU link). The operator picks the placement that suits the network: the one
    that scores better with the links counted."""
    best = None
    for cluster in homogeneous_clusters(s) if clusters is None else clusters:
        blind = s.evaluator(cluster, bandwidth_aware=False, kv="none")
        aware = s.evaluator(cluster, kv="none")
        prices = {n.id: n.price_per_hour for n in cluster.nodes}
        # (score with the links counted, the evaluator it is planned with, placement, the aware evaluation)
        options = []
        for ev, placement in ((blind, _distserve_high_affinity(cluster, blind)),
                              (aware, _distserve_low_affinity(cluster, blind))):
            if placement is not None:
                options.append((aware.evaluate(*placement, prices), ev, placement))
        if not options:
            continue
        seen, ev, (groups, roles) = max(options, key=lambda o: o[0].score)
        # low node-affinity is planned link-aware: its evaluation is the one already made
        best = _better(best, (ev, seen if ev is aware else ev.evaluate(groups, roles, prices)))
    return best if best else (None, None)  # type: ignore[return-value]


def _distserve_high_affinity(cluster: Cluster, blind: Evaluator) -> tuple[list[Group], list[str]] | None:
    """Prefill groups then decode groups, sizes and split by DistServe's own bandwidth-blind estimate."""
    total = len(cluster.gpus())
    choice = None
    for ps in _sizes(cluster):
        pg = _cut(cluster, ps)
        if not pg or blind.config(pg[0], "prefill") is None:
            continue
        pcap = blind.config(pg[0], "prefill").capacity  # type: ignore[union-attr]
        for ds in _sizes(cluster):
            dg = _cut(cluster, ds)
            if not dg or blind.config(dg[0], "decode") is None:
                continue
            dcap = blind.config(dg[0], "decode").capacity  # type: ignore[union-attr]
            # n_p prefill groups then decode groups from what is left, on whole units of the larger size
            for n_p in range(1, total // ps):
                groups = _pack(cluster, ps, n_p, ds)
                if groups is None:
                    continue
                n_d = len(groups) - n_p
                if n_d < 1:
                    continue
                value = min(n_p * pcap, n_d * dcap)  # DistServe's own (bandwidth-blind) estimate
                if choice is None or value > choice[0]:
                    choice = (value, groups, n_p)
    if choice is None:
        return None
    _, groups, n_p = choice
    return groups, ["prefill"] * n_p + ["decode"] * (len(groups) - n_p)


def _distserve_low_affinity(cluster: Cluster, blind: Evaluator) -> tuple[list[Group], list[str]] | None:
    """Every node the same mix of prefill and decode instances (DistServe's low node-affinity
    placement), chosen by DistServe's own estimate; None when a node cannot hold one of each."""
    per_node = cluster.nodes[0].gpu_count
    node0 = cluster.nodes[0].gpu_ids()
    caps: dict[str, dict[int, float]] = {"prefill": {}, "decode": {}}
    for role, sizes in caps.items():
        for k in SPLIT_SIZES:
            c = blind.config(tuple(node0[:k]), role) if k < per_node else None
            if c is not None:
                sizes[k] = c.capacity
    choice = best_node_split(per_node, caps["prefill"], caps["decode"])
    if choice is None:
        return None
    _, ps, n_p, ds, n_d = choice
    groups: list[Group] = []
    roles: list[str] = []
    for node in cluster.nodes:
        ids = node.gpu_ids()
        for j in range(n_p):
            groups.append(tuple(ids[j * ps:(j + 1) * ps]))
            roles.append("prefill")
        for j in range(n_d):
            groups.append(tuple(ids[n_p * ps + j * ds:n_p * ps + (j + 1) * ds]))
            roles.append("decode")
    return groups, roles


def _pack(cluster: Cluster, ps: int, n_p: int, ds: int) -> list[Group] | None:
    """n_p prefill groups of ps GPUs first, then as many decode groups of ds GPUs as fit after them."""
    gpus = cluster.gpus()
    per_node = cluster.nodes[0].gpu_count
    groups: list[Group] = []
    pos = 0
    for size, count in ((ps, n_p), (ds, 10**9)):
        made = 0
        while made < count and pos + size <= len(gpus):
            if size >= per_node and pos % per_node:
                pos += per_node - pos % per_node  # multi-node groups start on a node boundary
                continue
            if size < per_node and (pos % per_node) + size > per_node:
                pos += per_node - pos % per_node
                continue
            groups.append(tuple(gpus[pos : pos + size]))
            pos += size
            made += 1
        if size == ps and made < n_p:
            return None
    return groups


def hexgen(s: Setting) -> tuple[Evaluator, Evaluation]:
    return plan_thunderserve(s, phases=("both",))


def greedy(s: Setting) -> tuple[Evaluator, Evaluation]:
    return plan_thunderserve(s, tabu=False)


def no_bandwidth(s: Setting) -> tuple[Evaluator, Evaluation]:
    return plan_thunderserve(s, bandwidth_aware=False)


BASELINES: dict[str, Callable[[Setting], tuple[Evaluator, Evaluation | None]]] = {
    "colocated": colocated,
    "distserve": distserve,
    "hexgen": hexgen,
    "greedy": greedy,
    "no-bandwidth": no_bandwidth,
}

__all__ = ["BASELINES"]
