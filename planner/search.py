"""Upper level of the scheduler: tabu search over how GPUs are grouped into replicas and which phase
each replica serves.

State: a list of GPU groups (each becomes one replica), a phase per group, and the GPUs left idle.
Start: cluster GPUs by bandwidth (a node's GPUs first, then the best-connected nodes) into the
smallest groups that hold the model, and label phases so prefill and decode capacities balance.
Moves (sampled each iteration): flip a phase, move a GPU to another group or out, swap two GPUs of
different nodes, merge two groups, split one, start a group from idle GPUs, dissolve a group.
Each candidate is screened by a capacity bound and the best few are scored exactly (group configs +
routing LP). Tabu list: GPUs and groups touched in the last ``tenure`` moves, plus recently visited
states; aspiration admits a tabu move that beats the best seen. Stop on an iteration cap, ``patience``
iterations without improvement, or the time cap. Deterministic for a seed unless the time cap ends it.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from planner.cluster import Cluster, GpuId
from planner.evaluate import Evaluation, Evaluator, Group, nodes_cost, used_nodes

PHASES_PD = ("prefill", "decode")


@dataclass
class SearchStats:
    iterations: int = 0
    evaluations: int = 0
    improvements: int = 0
    stopped_by: str = ""
    seconds: float = 0.0  # on the search's clock (the planner's: reference seconds of work)


@dataclass
class State:
    groups: list[Group]
    roles: list[str]

    def key(self) -> frozenset:
        return frozenset(zip(self.groups, self.roles, strict=True))

    def copy(self) -> State:
        return State(list(self.groups), list(self.roles))


def phase_class(roles: list[str]) -> str:
    """'colocated' (all both), 'disaggregated' (no both) or 'mixed'."""
    both = sum(1 for r in roles if r == "both")
    return "colocated" if both == len(roles) else "disaggregated" if both == 0 else "mixed"


def _norm(gpus) -> Group:
    return tuple(sorted(gpus))


def _fits_alone(ev: Evaluator, group: Group) -> bool:
    return ev.config(group, "decode") is not None or ev.config(group, "prefill") is not None


def initial_groups(ev: Evaluator, cluster: Cluster) -> list[Group]:
    """Bandwidth clustering: split each node into the smallest groups that hold the model; nodes too
    small alone are merged with their best-connected neighbours until they can."""
    groups: list[Group] = []
    leftovers: list[list[GpuId]] = []
    for node in cluster.nodes:
        gpus = node.gpu_ids()
        size = None
        for k in range(1, node.gpu_count + 1):
            if node.gpu_count % k == 0 and _fits_alone(ev, _norm(gpus[:k])):
                size = k
                break
        if size is None:
            leftovers.append(gpus)
            continue
        groups.extend(_norm(gpus[i : i + size]) for i in range(0, node.gpu_count, size))
    # agglomerate nodes that cannot hold a replica alone, highest bandwidth first
    while leftovers:
        cur = leftovers.pop(0)
        while not _fits_alone(ev, _norm(cur)) and leftovers:
            here = cur[0][0]
            j = max(range(len(leftovers)), key=lambda i: (cluster.bandwidth(here, leftovers[i][0][0]), -i))
            cur = cur + leftovers.pop(j)
        if _fits_alone(ev, _norm(cur)):
            groups.append(_norm(cur))
    return groups


def label_phases(ev: Evaluator, groups: list[Group], phases: tuple[str, ...]) -> list[str]:
    """Phases that balance prefill and decode capacity: groups best at prefill relative to decode
    become prefill replicas, as many as maximises min(prefill capacity, decode capacity)."""
    if phases == ("both",):
        return ["both"] * len(groups)
    caps = []
    for g in groups:
        p, d = ev.config(g, "prefill"), ev.config(g, "decode")
        caps.append((p.capacity if p else 0.0, d.capacity if d else 0.0))
    order = sorted(range(len(groups)), key=lambda i: -(caps[i][0] / max(caps[i][1], 1e-9)))
    best_m, best_val = 1, -1.0
    for m in range(1, len(groups)):
        cp = sum(caps[i][0] for i in order[:m])
        cd = sum(caps[i][1] for i in order[m:])
        if min(cp, cd) > best_val:
            best_m, best_val = m, min(cp, cd)
    roles = ["decode"] * len(groups)
    for i in order[:best_m]:
        roles[i] = "prefill"
    if "both" in phases:
        colo = []
        for g in groups:
            c = ev.config(g, "both")
            colo.append(c.capacity if c else 0.0)
        if sum(colo) > best_val:
            return ["both"] * len(groups)
    if len(groups) == 1:
        return ["both"] if "both" in phases else ["prefill"]
    return roles


class TabuSearch:
    """Tabu search over (grouping, phase) for one cluster."""

    def __init__(self, ev: Evaluator, cluster: Cluster, *, phases: tuple[str, ...] = ("prefill", "decode", "both"),
                 seed: int = 0, max_iters: int = 300, patience: int = 60, tenure: int = 8, neighbours: int = 24,
                 exact_per_iter: int = 6, time_limit_s: float = 20.0, max_phase_moves: int = 16,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.ev = ev
        self.cluster = cluster
        self.phases = phases
        self.rng = random.Random(seed)
        self.max_iters = max_iters
        self.patience = patience
        self.tenure = tenure
        self.neighbours = neighbours
        self.exact_per_iter = exact_per_iter
        self.time_limit_s = time_limit_s  # on ``clock``: the planner's WorkClock, so that a seed gives one plan
        self.clock = clock
        self.max_phase_moves = max_phase_moves
        self.prices = {n.id: n.price_per_hour for n in cluster.nodes}
        self.all_gpus = cluster.gpus()
        self.stats = SearchStats()
        self._seen: dict[frozenset, Evaluation] = {}
        self.best_by_class: dict[str, Evaluation] = {}  # best disaggregated / colocated / mixed plan seen

    # -- evaluation ------------------------------------------------------------------------------
    def score(self, st: State) -> Evaluation:
        k = st.key()
        if k not in self._seen:
            e = self.ev.evaluate(st.groups, st.roles, self.prices)
            self._seen[k] = e
            self.stats.evaluations += 1
            cls = phase_class(st.roles)
            if e.goodput > 0 and (cls not in self.best_by_class or e.score > self.best_by_class[cls].score):
                self.best_by_class[cls] = e
        return self._seen[k]

    def _quick(self, st: State) -> float:
        k = st.key()
        if k in self._seen:
            return self._seen[k].score
        configs = self.ev.configs_for(st.groups, st.roles)
        cost = nodes_cost(used_nodes(st.groups, configs), self.prices)
        return self.ev.score_of(self.ev.bound(st.groups, st.roles, configs), cost)

    # -- moves ---------------------------------------------------------------------------------
    def _idle(self, st: State) -> list[GpuId]:
        used = {g for grp in st.groups for g in grp}
        return [g for g in self.all_gpus if g not in used]

    def _other_phase(self, role: str) -> str:
        options = [p for p in self.phases if p != role]
        return self.rng.choice(options) if options else role

    def _random_move(self, st: State) -> tuple[State, set] | None:
        rng = self.rng
        n = len(st.groups)
        idle = self._idle(st)
        kinds = ["flip", "move", "swap", "merge", "split", "dissolve"] + (["grow", "new"] if idle else [])
        kind = rng.choice(kinds)
        new = st.copy()
        if n == 0 and kind != "new":
            kind = "new" if idle else None
        if kind is None:
            return None
        if kind == "flip":
            if len(self.phases) < 2:
                return None
            i = rng.randrange(n)
            new.roles[i] = self._other_phase(st.roles[i])
            return new, {("group", st.groups[i])}
        if kind == "move":
            i = rng.randrange(n)
            if len(st.groups[i]) < 2:
                return None
            g = rng.choice(st.groups[i])
            rest = _norm(x for x in st.groups[i] if x != g)
            new.groups[i] = rest
            if n > 1 and rng.random() < 0.7:
                j = rng.choice([k for k in range(n) if k != i])
                new.groups[j] = _norm((*st.groups[j], g))
            return new, {("gpu", g)}
        if kind == "swap":
            if n < 2:
                return None
            i, j = rng.sample(range(n), 2)
            a, b = rng.choice(st.groups[i]), rng.choice(st.groups[j])
            if self.cluster.node(a[0]).gpu_type == self.cluster.node(b[0]).gpu_type:
                return None
            new.groups[i] = _norm([*[x for x in st.groups[i] if x != a], b])
            new.groups[j] = _norm([*[x for x in st.groups[j] if x != b], a])
            return new, {("gpu", a), ("gpu", b)}
        if kind == "merge":
            if n < 2:
                return None
            i, j = sorted(rng.sample(range(n), 2))
            merged = _norm((*st.groups[i], *st.groups[j]))
            role = rng.choice([st.roles[i], st.roles[j]])
            new.groups = [g for k, g in enumerate(st.groups) if k not in (i, j)] + [merged]
            new.roles = [r for k, r in enumerate(st.roles) if k not in (i, j)] + [role]
            return new, {("group", st.groups[i]), ("group", st.groups[j])}
        if kind == "split":
            i = rng.randrange(n)
            grp = st.groups[i]
            if len(grp) < 2:
                return None
            nodes = sorted({x[0] for x in grp})
            if len(nodes) > 1:
                cut = rng.randrange(1, len(nodes))
                left = _norm(x for x in grp if x[0] in nodes[:cut])
            else:
                left = _norm(grp[: len(grp) // 2])
            right = _norm(x for x in grp if x not in left)
            new.groups[i] = left
            new.groups.append(right)
            new.roles.append(self._other_phase(st.roles[i]) if rng.random() < 0.5 else st.roles[i])
            return new, {("group", grp)}
        if kind == "dissolve":
            i = rng.randrange(n)
            del new.groups[i]
            del new.roles[i]
            return new, {("group", st.groups[i])}
        if kind == "grow":
            i = rng.randrange(n)
            node = st.groups[i][0][0]
            same = [g for g in idle if g[0] == node] or idle
            g = rng.choice(same)
            new.groups[i] = _norm((*st.groups[i], g))
            return new, {("gpu", g)}
        # new: a group from idle GPUs of one node (or of the best-connected nodes if one is too small)
        node = rng.choice(sorted({g[0] for g in idle}))
        grp = [g for g in idle if g[0] == node]
        if rng.random() < 0.5 and len(grp) > 1:
            grp = grp[: max(1, len(grp) // 2)]
        new.groups.append(_norm(grp))
        new.roles.append(rng.choice(self.phases))
        return new, {("gpu", g) for g in grp}

    def _phase_moves(self, st: State) -> list[tuple[State, set]]:
        """Every single phase flip and every exchange of two groups' phases (cheap to score: the
        group configurations are cached, only the LP changes)."""
        out = []
        n = len(st.groups)
        for i in range(n):
            for role in self.phases:
                if role != st.roles[i]:
                    new = st.copy()
                    new.roles[i] = role
                    out.append((new, {("group", st.groups[i])}))
        for i in range(n):
            for j in range(i + 1, n):
                if st.roles[i] != st.roles[j]:
                    new = st.copy()
                    new.roles[i], new.roles[j] = st.roles[j], st.roles[i]
                    out.append((new, {("group", st.groups[i]), ("group", st.groups[j])}))
        if len(self.phases) >= 2 and "prefill" in self.phases and "decode" in self.phases:
            for i in range(n):  # a pair of groups leaving their phase for prefill + decode together
                for j in range(n):
                    if i != j and (st.roles[i], st.roles[j]) != ("prefill", "decode"):
                        new = st.copy()
                        new.roles[i], new.roles[j] = "prefill", "decode"
                        out.append((new, {("group", st.groups[i]), ("group", st.groups[j])}))
        if len(out) > self.max_phase_moves:  # large pools: a sample, so an iteration stays cheap
            out = self.rng.sample(out, self.max_phase_moves)
        return out

    # -- the loop --------------------------------------------------------------------------------
    def run_multi(self, starts: list[State]) -> Evaluation:
        """Tabu search from each start in turn (restart when one stalls), sharing the budgets."""
        t_start = self.clock()
        t_end = t_start + self.time_limit_s
        iters_left = self.max_iters
        best: Evaluation | None = None
        stats = SearchStats()
        for k, st in enumerate(starts):
            remaining = t_end - self.clock()
            if k > 0 and (remaining <= 0 or iters_left <= 0):
                break
            self.time_limit_s = max(0.05, remaining)
            self.max_iters = iters_left
            self.stats = SearchStats()
            e = self.run(st)
            iters_left -= self.stats.iterations
            stats.iterations += self.stats.iterations
            stats.evaluations += self.stats.evaluations
            stats.improvements += self.stats.improvements
            stats.stopped_by = self.stats.stopped_by
            if best is None or e.score > best.score:
                best = e
        stats.seconds = self.clock() - t_start
        self.stats = stats
        assert best is not None
        return best

    def run(self, start: State) -> Evaluation:
        t0 = self.clock()
        deadline = t0 + self.time_limit_s
        start = State([g for g in start.groups if g], [r for g, r in zip(start.groups, start.roles, strict=True) if g])
        current = start
        cur_eval = self.score(current)
        best = cur_eval
        tabu: deque[set] = deque(maxlen=self.tenure)
        recent: deque[frozenset] = deque(maxlen=4 * self.tenure)
        since = 0
        self.stats.stopped_by = "iterations"
        for it in range(self.max_iters):
            if self.clock() > deadline:
                self.stats.stopped_by = "time"
                break
            self.stats.iterations = it + 1
            cands: list[tuple[float, State, set]] = []
            seen_keys = set()
            for _ in range(self.neighbours * 2):
                if len(cands) >= self.neighbours:
                    break
                mv = self._random_move(current)
                if mv is None:
                    continue
                st, attrs = mv
                st = State([g for g in st.groups if g], [r for g, r in zip(st.groups, st.roles, strict=True) if g])
                k = st.key()
                if k in seen_keys or k == current.key():
                    continue
                seen_keys.add(k)
                cands.append((self._quick(st), st, attrs))
            if not cands:
                since += 1
                if since >= self.patience:
                    self.stats.stopped_by = "patience"
                    break
                continue
            cands.sort(key=lambda c: -c[0])
            exact = [(st, attrs) for _, st, attrs in cands[: self.exact_per_iter]]
            for st, attrs in self._phase_moves(current):
                if st.key() not in seen_keys:
                    seen_keys.add(st.key())
                    exact.append((st, attrs))
            chosen: tuple[Evaluation, State, set] | None = None
            taboo = set().union(*tabu) if tabu else set()
            for st, attrs in exact:
                if chosen is not None and self.clock() > deadline:
                    self.stats.stopped_by = "time"  # one evaluation past the deadline at most, not an iteration's ~20
                    break
                e = self.score(st)
                is_tabu = bool(attrs & taboo) or st.key() in recent
                if is_tabu and e.score <= best.score * (1 + 1e-9):
                    continue  # tabu, and no aspiration
                if chosen is None or e.score > chosen[0].score:
                    chosen = (e, st, attrs)
            if chosen is None:
                since += 1
                if since >= self.patience:
                    self.stats.stopped_by = "patience"
                    break
                continue
            cur_eval, current, attrs = chosen
            tabu.append(attrs)
            recent.append(current.key())
            if cur_eval.score > best.score * (1 + 1e-9):
                best = cur_eval
                since = 0
                self.stats.improvements += 1
            else:
                since += 1
                if since >= self.patience:
                    self.stats.stopped_by = "patience"
                    break
        self.stats.seconds = self.clock() - t0
        return best
