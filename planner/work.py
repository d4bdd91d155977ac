"""The planner's clock: work done, counted, instead of wall time.

The planner is time-capped (the tabu search, the split of the time between pools, the race of the
finalists all stop at a deadline), and a wall-clock deadline made its answer depend on the machine and
on its load: the same ``--seed`` gave a different plan from one run to the next (a loaded bench once
picked a 0.92x mix where an idle run picked six colocated GH200s). This clock advances by the work the
planner has done: simulated events and requests, routing LPs, cost-model passes, replica
configurations, KV quantiles, layer splits, offers scanned, rent MIPs, each at what it costs on a
reference core (``COST``, fitted on this project's 2-core CI machine by ``bench/work_clock.py``).
So the same inputs and seed give the same plan on any machine and under any load; a faster machine
answers sooner, a slower one later. Work that a cache saves from an earlier plan in the same process
is counted anyway, once per plan (``replay``).

The clock never runs slower than (wall time - ``WALL_GRACE_S``) / ``WALL_SLACK``: on a machine (or
under a load) more than that much slower than the reference, the time cap still holds, and
determinism is given up (the plan's ``expected`` says ``wall_clock_bound``).

Counts are process-wide (one planner at a time per process: the CLI, a bench worker, the controller's
re-plan thread); a second planner running at the same time in another thread only makes both stop
earlier.
"""

from __future__ import annotations

import time

# reference seconds per unit of work, per kind (``bench/work_clock.py`` fits them)
COST = {
    "sim_event": 6.2e-6,  # one event of the discrete-event simulator (arrival, step end, KV arrival, ...)
    "sim_request": 14e-6,  # one simulated request (drawn, judged, its latencies summarised)
    "lp": 3.3e-3,  # one routing LP solved (HiGHS through scipy)
    "lp_var": 0.0,  # ... per variable: fits to 0 at the sizes planned (the fixed cost dominates)
    "roof": 0.0,  # one roofline pass of the cost model: fits to 0 (its callers' counts carry the time)
    "roof_array": 9.4e-6,  # one vectorised roofline pass (a capacity table over many batch sizes)
    # one rent MIP solved, and one re-solve towards the mix worth most (``rent.best_mix``): their counts
    # move together, so one cost is fitted to both (a place with capped offers, big MIPs, runs ~2.5x it)
    "mip": 13e-3,
    "mip_resolve": 13e-3,
    # one rate tried by a colocated replica's capacity search, prefill-first and mixed chunks (their
    # counts move together too: the split follows a profile, 0.72 to 0.49 ms): the rent step's unit
    # catalog is mostly these (~50 ms a colocated unit of a 7B model)
    "colocated_point": 0.58e-3,
    "mixed_point": 0.40e-3,
    "config": 17.5e-6,  # one replica configuration looked up for a group (the search's evaluations)
    "kv_quantile": 47e-6,  # one KV-transfer quantile of a prefill-decode pair (the routing LP's inputs)
    "layer_balance": 1.1e-3,  # one split of a model's layers over pipeline stages (a 60-step bisection)
    "offer": 46e-6,  # one catalog offer scanned for the cheapest of its kind
    # one pipelined prefill's TTFT quantiles at a curve's rates (a 28-step bisection); fitted at 0.7e-3, plus
    # the 0.6 ms a curve took more once the tail was taken over 8 batch-mate x 16 prompt-length points
    # (1.6 ms a curve, 0.97 ms over 32 prompt lengths alone)
    "prefill_tail": 1.3e-3,
}
WALL_SLACK = 3.0
WALL_GRACE_S = 1.0  # setup the counts do not see (parsing offers, building contexts) is not a slow machine
_KINDS = tuple(COST)
COUNTS = dict.fromkeys(_KINDS, 0.0)  # the roofline passes (the hottest path) add to it directly
_epoch = [0]


def charge(kind: str, n: float = 1.0) -> None:
    """Count ``n`` units of ``kind`` of work."""
    COUNTS[kind] += n


def counts() -> dict[str, float]:
    """The work counted so far in this process, per kind."""
    return dict(COUNTS)


def since(before: dict[str, float]) -> dict[str, float]:
    """The work counted since ``before`` (a ``counts()``), the kinds that moved."""
    return {k: COUNTS[k] - v for k, v in before.items() if COUNTS[k] != v}


def epoch() -> int:
    """Which clock (one per plan or reschedule) was made last: caches count saved work once per epoch."""
    return _epoch[0]


def replay(done: dict[str, float]) -> None:
    """Count again work that a cache saved from an earlier epoch (see ``capacity.memoised``): the clock
    stays the same whether or not an earlier plan in this process had already done it."""
    for k, v in done.items():
        COUNTS[k] += v


def reference_seconds(c: dict[str, float]) -> float:
    return sum(COST[k] * v for k, v in c.items())


class WorkClock:
    """Reference seconds of work since it was made, callable like ``time.perf_counter``; never slower
    than (wall time - ``WALL_GRACE_S``) / ``WALL_SLACK``."""

    def __init__(self) -> None:
        _epoch[0] += 1
        self._start = counts()
        self._wall0 = time.perf_counter()
        self.wall_bound = False  # whether wall time ever drove the clock (the plan may then vary)

    def __call__(self) -> float:
        work = reference_seconds(since(self._start))
        wall = (time.perf_counter() - self._wall0 - WALL_GRACE_S) / WALL_SLACK
        if wall > work:
            self.wall_bound = True
            return wall
        return work
