"""The workload the gateways really see, and whether it has shifted away from what the plan was made for.

Gateways add up, per 10 s bucket in Redis (``StateStore.record_workload``), the requests they finished and the
sums and sums of squares of their prompt and output lengths. The controller reads a window of buckets back
(``StateStore.workload_window``) and turns it into a planner ``Workload`` (lognormal lengths with the observed
mean and spread): when the mean prompt or output length has moved by more than a ratio from the plan's, it runs
the lightweight reschedule for the observed mix (ThunderServe's answer to a workload shift: flip phases and
re-route, no weight reload).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.state import LATENCY_BOUNDS_S, LATENCY_KEYS
from planner.workload import Lengths, Workload

OBSERVED = "observed"  # the start of a Workload's ``trace`` when the gateways measured it
_FIXED_CV = 0.05  # a spread this small is one length


@dataclass(frozen=True)
class WorkloadSample:
    """What the gateways counted over ``seconds``: finished requests and their length sums."""

    seconds: float
    requests: float = 0.0
    input_sum: float = 0.0
    input_sq: float = 0.0
    output_sum: float = 0.0
    output_sq: float = 0.0
    judged: float = 0.0  # requests timed against the plan's SLO (TTFT known), and those that met it
    slo_met: float = 0.0
    ttft_hist: tuple[float, ...] = ()  # counts per ``LATENCY_BOUNDS_S`` bucket (and one past the last)
    tpot_hist: tuple[float, ...] = ()

    @classmethod
    def from_counts(cls, seconds: float, counts: dict[str, float]) -> WorkloadSample:
        """From ``StateStore`` field totals (``WORKLOAD_FIELDS``)."""
        scalars = ("requests", "input_sum", "input_sq", "output_sum", "output_sq", "judged", "slo_met")
        return cls(seconds, *(counts.get(k, 0.0) for k in scalars),
                   ttft_hist=tuple(counts.get(k, 0.0) for k in LATENCY_KEYS["ttft"]),
                   tpot_hist=tuple(counts.get(k, 0.0) for k in LATENCY_KEYS["tpot"]))

    @property
    def attainment(self) -> float | None:
        """The share of judged requests that met both targets; None when none was judged."""
        return self.slo_met / self.judged if self.judged else None

    def latency_quantile(self, what: str, q: float) -> float | None:
        """The upper bound of the bucket holding the ``q`` quantile of ``what`` ("ttft" or "tpot"): the quantile is
        at most this (inf past the last bound); None when nothing was timed."""
        hist = self.ttft_hist if what == "ttft" else self.tpot_hist
        total = sum(hist)
        if not total:
            return None
        seen = 0.0
        for i, count in enumerate(hist):
            seen += count
            if seen >= q * total:
                return LATENCY_BOUNDS_S[i] if i < len(LATENCY_BOUNDS_S) else math.inf
        return math.inf

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_input(self) -> float:
        return self.input_sum / self.requests if self.requests else 0.0

    @property
    def mean_output(self) -> float:
        return self.output_sum / self.requests if self.requests else 0.0


def _lengths(n: float, total: float, squares: float) -> Lengths:
    """Lognormal lengths with the sample's mean and coefficient of variation (one length when they hardly vary)."""
    mean = max(1.0, total / n)
    var = max(0.0, squares / n - (total / n) ** 2)
    cv = math.sqrt(var) / mean
    return Lengths.fixed(round(mean)) if cv < _FIXED_CV else Lengths(mean, "lognormal", round(cv, 3))


def to_workload(sample: WorkloadSample, rate: float) -> Workload:
    """The planner's Workload for what was observed, at ``rate`` (the deployment's target: the rate the plan
    is asked to serve stays the user's; the lengths are what the gateways measured)."""
    if sample.requests <= 0:
        raise ValueError("no request observed")
    return Workload(rate, _lengths(sample.requests, sample.input_sum, sample.input_sq),
                    _lengths(sample.requests, sample.output_sum, sample.output_sq),
                    trace=f"{OBSERVED}: {sample.requests:.0f} requests over {sample.seconds:.0f} s "
                          f"({sample.rate:.2f} req/s)")


def is_observed(workload: dict) -> bool:
    """Whether a plan's workload (its JSON) was measured by the gateways rather than asked for."""
    return str(workload.get("trace", "")).startswith(OBSERVED)


def shift(planned: Workload, observed: Workload, ratio: float) -> str | None:
    """How the length mix moved, when the mean prompt or output length changed by more than ``ratio`` (either
    way); None when it did not."""
    moved = []
    for what, a, b in (("prompt", planned.mean_input, observed.mean_input),
                       ("output", planned.mean_output, observed.mean_output)):
        if a > 0 and b > 0 and max(a / b, b / a) > ratio:
            moved.append(f"mean {what} {a:.0f} -> {b:.0f} tokens")
    return ", ".join(moved) or None
