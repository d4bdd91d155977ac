"""How many requests/s one replica can take while meeting the SLO: queueing on top of the roofline.

The scheduler needs a fast, monotone estimate for thousands of candidates; the discrete-event
simulator (``planner.simulator``) is the judge of the final plan. Models, per role:

* prefill: batches of waiting prompts (up to ``max_batch_tokens``); batch size ``k`` from the
  fixed point ``k = 1 + rate * bottleneck(k)``; waiting time tail from the M/G/1 exponential
  approximation ``P(W > t) = rho * exp(-2 (1 - rho) t / (s (ca^2 + cs^2)))``.
  TTFT quantile = own batch latency + waiting quantile. A pipelined prefill replica (PP > 1) also
  keeps its batches in order through the stages: a short prompt behind a long one leaves the last
  stage after it, however idle the first stage is (see ``_pipelined_ttft``).
* decode: continuous batching; the running batch ``b`` solves Little's law
  ``b = rate * output_len * step(b)``; the TPOT quantile is the step time at ``b + z sqrt(b)``;
  the KV cache must hold that many sequences at full length.
* colocated (``both``): prefill has priority (SGLang's default), so decode steps stretch by
  ``1 / (1 - rho_prefill)`` and each request's TPOT carries the prefill stalls of its lifetime, each a
  busy period of the prefill queue.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from statistics import NormalDist

import numpy as np
from scipy.special import betaincc, gammaincc, gammaincinv

from planner import work
from planner.bisection import narrow
from planner.cost_model import ReplicaModel
from planner.workload import SLO, Workload

GRID = 32


# How the SLO's miss budget (1 - attainment) is shared between TTFT and TPOT. Requests missing either
# target are about the larger miss share plus OVERLAP of the smaller (the two overlap: a burst of arrivals
# slows both phases), so shares (a, b) of the budget with max + OVERLAP * min = 1 keep attainment.
# The even split, 0.6 each, is the one the capacity model was calibrated at against the simulator; a
# split plan whose decode side has room can give TTFT more, and one whose prefill side has room TPOT
# (``LEANS``): scarce 70B long prompts over 5 Gbps, TPOT met by 100% of requests, was promised 21.5 req/s
# at the even split and served 24.9 (TTFT met by 91.6%); leaning to TTFT promises 24.8. Leaning to TPOT
# waited for the decode model to hold at other quantiles than the even split's: with a Poisson running
# batch a full decode L40S (7B, short prompts) was promised 3.19 req/s at the even split and 3.26 leaning
# to TPOT where it served ~2.85; with ``_decode_tail_step`` its TPOT quantiles at 91.3%, 94% and 98% are
# within 1% of the simulator's over eight sequences.
OVERLAP = 2.0 / 3.0
EVEN_SHARE = 0.6  # 1 / (1 + OVERLAP)
LEAN_SHARE = 0.2  # the share left to the other target when leaning to one
LEANS = ("even", "ttft", "tpot")


@dataclass(frozen=True)
class Targets:
    """Quantiles the estimator checks: TTFT at ``q_ttft``, TPOT at ``q_tpot`` (``z`` standard deviations
    of a normal batch), so that both hold for ~the SLO share of requests."""

    q_ttft: float
    q_tpot: float
    max_batch_tokens: int = 8192
    z: float = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "z", NormalDist().inv_cdf(self.q_tpot))

    @staticmethod
    def for_slo(slo: SLO, max_batch_tokens: int = 8192, lean: str = "even") -> Targets:
        """The SLO's miss budget split evenly, or leaning to ``ttft`` or ``tpot`` (that target gets the
        larger share)."""
        leaning = 1.0 - OVERLAP * LEAN_SHARE
        shares = {"even": (EVEN_SHARE, EVEN_SHARE), "ttft": (leaning, LEAN_SHARE), "tpot": (LEAN_SHARE, leaning)}
        if lean not in shares:
            raise ValueError(f"lean must be one of {LEANS}, not {lean!r}")
        miss = 1.0 - slo.attainment
        a, b = shares[lean]
        return Targets(1.0 - a * miss, 1.0 - b * miss, max_batch_tokens)


def _decode_steps(wl: Workload) -> float:
    """Decode steps a request spends in a running batch: one per output token but the first, which its
    prefill pass emits (the simulator's and SGLang's). Little's law takes this, not the output length:
    with 128-token outputs the 1-token difference moved a decode replica's batch by up to ~4%."""
    return max(wl.mean_output - 1.0, 1e-3)


def _running_output(wl: Workload) -> tuple[float, float]:
    """(mean, mean square) output length of a sequence in a running decode batch. A sequence stays in
    the batch for ``out - 1`` steps (``_decode_steps``), so the batch holds long outputs more often than
    they arrive (length-biased sampling): with lognormal outputs of cv 0.8 a running sequence has 1.6x
    the mean output. Memoised on the output lengths: every rate a capacity search tries asks for it."""
    return wl.output.staying_moments(RUNNING_POINTS)


RUNNING_POINTS = 64  # output-length quantiles the running batch's length-biased moments are taken over


def _reserved(wl: Workload) -> tuple[float, float]:
    """(mean, mean square) of the KV tokens a running sequence holds: its prompt and its whole output,
    reserved when it is admitted (the simulator's and SGLang's conservative admission), length-biased."""
    m1, m2 = _running_output(wl)
    mean_in = wl.mean_input
    return mean_in + m1, wl.input.var + mean_in * mean_in + 2 * mean_in * m1 + m2


def _kv_batch(rm: ReplicaModel, wl: Workload) -> float:
    """Running sequences the replica's KV cache holds on average."""
    return rm.kv_tokens / max(_reserved(wl)[0], 1.0)


def _mean_context(wl: Workload) -> float:
    """Mean context of a decoding sequence: its prompt and half its output, length-biased."""
    return _context_spread(wl)[0]


def _seen(b: float, z: float = 0.0) -> float:
    """The running batch a decoding request steps in, at ``z`` standard deviations: itself plus the
    others, which are Poisson with the mean ``b`` (M/G/inf as an arriving or present request sees it),
    so ``b + 1 + z sqrt(b)``. The batch of ``b`` alone left decode replicas' 94th-percentile TPOT 5% low
    and their capacity ~8% high against the simulator (``tests/test_planner_simulator.py``)."""
    return b + 1.0 + z * math.sqrt(max(b, 0.0))


MAX_ELASTICITY = 0.8  # a step that slows almost in proportion to the batch has no stable batch; cap it


def _context_spread(wl: Workload) -> tuple[float, float]:
    """(mean, root mean square) context of a sequence in a running decode batch: its prompt and the
    part of its (length-biased) output decoded so far, a uniform share of it."""
    m1, m2 = _running_output(wl)
    mean_in = wl.mean_input
    return mean_in + m1 / 2, math.sqrt(wl.input.var + mean_in * mean_in + mean_in * m1 + m2 / 3.0)


def _decode_tail_step(rm: ReplicaModel, b: float, z: float, context: tuple[float, float],
                      e: float | None = None) -> float:
    """Decode step time a request on a decode replica with mean running batch ``b`` (others) steps at,
    ``z`` standard deviations up (``context``: ``_context_spread``). Two spreads beyond ``_seen``'s
    Poisson count of sequences of the mean context, both measured:

    - the count: a larger batch steps slower, so its sequences stay longer and it stays large (Little's
      law with a step of elasticity ``e = d log step / d log batch``). An Ornstein-Uhlenbeck
      approximation of the batch around ``b`` has variance ``b / (1 - e)``, not ``b``; at ``e`` = 0.3-0.4
      (7B on an L40S and 13B on an RTX 5090, ``tests/test_planner_simulator.py``) the simulator's
      running batch spread ~1.3-1.5x Poisson;
    - the context: each sequence brings its own (its prompt and the output so far), so the context sum
      spreads with the root mean square context, not the mean (lognormal prompts: ~1.2-1.5x the mean).

    With ``_seen``'s batch alone, decode replicas' 94th-percentile TPOT was 3-6% under the simulator's
    over eight sequences, and their capacity ~10% over what they served within the target.
    (``e``: ``_elasticity``, when the caller has it.)
    """
    ctx, rms_ctx = context
    n = b + 1.0
    if z <= 0 or b <= 0:
        return rm.decode_step_time(n, n * ctx)
    spread = z * math.sqrt(b / (1.0 - (_elasticity(rm, b, ctx) if e is None else e)))
    return rm.decode_step_time(n + spread, n * ctx + spread * rms_ctx)


def _elasticity(rm: ReplicaModel, b: float, ctx: float, step: float | None = None) -> float:
    """``d log step / d log batch`` of the decode step a request sees in a running batch of ``b``
    others of mean context ``ctx`` (``step``: that step, when the caller has it), capped at
    ``MAX_ELASTICITY``: how much wider than Poisson the running batch spreads (``_decode_tail_step``,
    ``_kv_fits``)."""
    n = b + 1.0
    step = rm.decode_step_time(n, n * ctx) if step is None else step
    up = rm.decode_step_time(n + 1.0, (n + 1.0) * ctx)
    return min(max(n * (up - step) / step, 0.0), MAX_ELASTICITY)


def _wait_quantile(rho: float, s: float, scv_sum: float, q: float) -> float:
    if rho >= 1:
        return math.inf
    if rho <= 1 - q:
        return 0.0
    return s * scv_sum / (2 * (1 - rho)) * math.log(rho / (1 - q))


def _prefill_queue(rm: ReplicaModel, wl: Workload, rate: float, t: Targets,
                   colocated: bool = False) -> tuple[float, float, float]:
    """(prompts per batch, service time per prompt, utilisation) of a prefill queue at ``rate``: the
    batch holds the prompts that arrive during the batch ahead (a fixed point), within the token budget.
    A prefill replica's stages pipeline its batches (service: the slowest stage); a ``colocated`` one
    runs each pass through all its stages between two decode steps (service: the whole pass). With the
    slowest stage a pipelined (PP2) colocated 30B replica's prefill share of the time was half the
    simulator's, its running batch 20% short, and it was promised 7% more than it served."""
    mean_in = wl.mean_input
    sq = mean_in * mean_in * (1 + wl.input.scv)
    kmax = max(1.0, t.max_batch_tokens / mean_in)
    service = _prefill_service(rm, colocated)
    k = 1.0
    for _ in range(4):
        b = service(k * mean_in, k * sq, max(1, round(k)))
        k = min(kmax, 1.0 + rate * b)
    b = service(k * mean_in, k * sq, max(1, round(k)))
    return k, b / k, rate * b / k


def _prefill_service(rm: ReplicaModel, colocated: bool):
    """How long a prefill batch holds the replica (``_prefill_queue``): its slowest stage on a prefill
    replica, whose stages pipeline batches; its whole pass on a ``colocated`` one."""
    return rm.prefill_time if colocated else rm.prefill_bottleneck


def prefill_max_rate(rm: ReplicaModel, wl: Workload, t: Targets, colocated: bool = False) -> float:
    """Prompts/s a replica prefills at full batches (``colocated``: as in ``_prefill_queue``)."""
    mean_in = wl.mean_input
    kmax = max(1.0, t.max_batch_tokens / mean_in)
    sq = mean_in * mean_in * (1 + wl.input.scv)
    return kmax / _prefill_service(rm, colocated)(kmax * mean_in, kmax * sq, max(1, round(kmax)))


def _prefill_ttft_array(rm: ReplicaModel, wl: Workload, rates: np.ndarray, t: Targets,
                        pipelined: bool = False, link: KvLink | None = None) -> np.ndarray:
    """TTFT quantile of an unpipelined prefill queue at many rates at once: the batch fixed point of
    ``_prefill_queue`` (vectorised), then ``max(a long prompt's pass in an average batch, the mean pass + the M/G/1
    wait quantile)`` (a test holds it equal to a scalar restatement); or with ``pipelined``, a
    pipelined prefill replica's (``_pipelined_ttft``). With a ``link``, the quantile of the prefill's
    TTFT plus the KV trip to the decode replica (``_linked_ttft``)."""
    mean_in = wl.mean_input
    sq = mean_in * mean_in * (1 + wl.input.scv)
    kmax = max(1.0, t.max_batch_tokens / mean_in)

    def passes(k: np.ndarray, tokens: np.ndarray, sum_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return rm.prefill_array(tokens, sum_sq, np.maximum(1.0, np.round(k)))

    k = np.ones_like(rates)
    for _ in range(4):
        b = passes(k, k * mean_in, k * sq)[1]
        k = np.minimum(kmax, 1.0 + rates * b)
    lat, b = passes(k, k * mean_in, k * sq)
    if pipelined:
        return _pipelined_ttft(rm, wl, rates, k, b, t, link)
    if link is not None:
        return _linked_ttft(rm, wl, rates, k, b, t, link)
    s = b / k
    rho = rates * s
    scv_sum = wl.arrival_scv + wl.input.scv
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(rho >= 1, np.inf,
                     np.where(rho <= 1 - t.q_ttft, 0.0,
                              s * scv_sum / (2 * (1 - np.minimum(rho, 1 - 1e-12)))
                              * np.log(np.maximum(rho, 1e-300) / (1 - t.q_ttft))))
    long_in = wl.input.quantile(t.q_ttft)
    own = passes(k, (k - 1) * mean_in + long_in, (k - 1) * mean_in**2 + long_in**2)[0]
    return np.maximum(own, lat + w)


INPUT_POINTS = 16  # prompt lengths (evenly spread quantiles) a pipelined prefill's TTFT tail is averaged over
MATES_POINTS = 8  # ... and batch-mates' token totals


def _own_passes(rm: ReplicaModel, wl: Workload, rates: np.ndarray, k: np.ndarray, b: np.ndarray, t: Targets
                ) -> tuple[np.ndarray, np.ndarray]:
    """(a prompt's own prefill pass, over the spread of its length and of its batch-mates' tokens:
    ``(rates, MATES_POINTS * INPUT_POINTS)``; the prompt's length at each point).

    The batch-mates: the prompts that arrived while the batch ahead of it held the first stage, a
    Poisson count over that batch's time, which varies (each batch's time follows from the count
    before it: cv^2 = rho / (k (1 - rho^2))) and is length-biased (a request more likely arrives during
    a long one); their tokens a gamma with the count's mean and variance, at MATES_POINTS quantiles;
    the batch holds at most max_batch_tokens. With short prompts a batch holds tens of them and a
    pipeline carries it through every stage: mates at their mean had PP4 replicas' 94th percentile up
    to 2x low."""
    mean_in = wl.mean_input
    per_token_sq = mean_in * (1 + wl.input.scv)  # E[len^2] / E[len]
    rho_1 = np.minimum(rates * b / k, 0.99)
    cv2 = rho_1 / (k * (1 - rho_1**2))
    count = (k - 1) * (1 + cv2)
    count_var = count + count**2 * cv2
    tokens_mean = count * mean_in
    tokens_var = count_var * mean_in**2 + count * wl.input.var
    shape = np.maximum(tokens_mean**2 / np.maximum(tokens_var, 1e-12), 1e-9)
    scale = tokens_var / np.maximum(tokens_mean, 1e-12)
    q = (np.arange(MATES_POINTS) + 0.5) / MATES_POINTS
    mates = scale[:, None] * gammaincinv(shape[:, None], q[None, :])  # (rates, MATES_POINTS)
    lens = wl.input.points(INPUT_POINTS)
    mates = np.minimum(mates[:, :, None], np.maximum(t.max_batch_tokens - lens, 0.0)[None, None, :])
    tokens = (mates + lens).reshape(len(rates), -1)
    sum_sq = (mates * per_token_sq + lens**2).reshape(len(rates), -1)
    rows = 1.0 + np.round(mates / mean_in).reshape(len(rates), -1)
    own = rm.prefill_array(tokens.ravel(), sum_sq.ravel(), rows.ravel())[0].reshape(tokens.shape)
    return own, np.tile(lens, MATES_POINTS)


def _queue_wait(wl: Workload, rates: np.ndarray, k: np.ndarray, b: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(utilisation, whether it is under 1, utilisation capped under 1 as a column, the mean of the
    wait when there is one, as a column) of a prefill queue of batches ``k`` prompts taking ``b``: its
    M/G/1 wait, none with probability ``rho``'s complement, else exponential (``_pipelined_ttft``,
    ``_linked_ttft``)."""
    s = b / k
    rho = rates * s
    rho_c = np.minimum(rho, 1 - 1e-9)[:, None]
    return rho, rho < 1, rho_c, (s * (wl.arrival_scv + wl.input.scv) / (2 * (1 - rho_c[:, 0])))[:, None]


def _pipelined_ttft(rm: ReplicaModel, wl: Workload, rates: np.ndarray, k: np.ndarray, b: np.ndarray,
                    t: Targets, link: KvLink | None = None) -> np.ndarray:
    """TTFT quantile of a prefill replica whose stages pipeline successive batches (PP > 1).

    Batches keep their order through the stages, so a batch leaves the last stage no earlier than the
    one ahead of it: a short prompt that enters behind a long one waits out the long one's whole
    latency, not just its first stage (at 20% load of the first stage, a PP8 70B replica's 94th
    percentile was 1.2 s over the M/G/1 estimate in the simulator). Two independent delays:

    * the first stage's queue: ``P(W > w) = rho exp(-w / m)`` (the M/G/1 tail above), added to the
      request's own latency over the spread of prompt lengths and of its batch-mates' tokens (a long
      prompt's own pass and a wait are summed, not maxed);
    * batches still in the pipeline: those that entered ``tau`` before with latency ``L`` hold the
      request past ``x`` when ``L + b - tau > x``; Poisson batch arrivals make their count Poisson with
      mean ``rate / k * E[(L + b - x)+]``, so none does with probability ``exp(-that)``.

    Within 0.2 s of the simulator's 94th percentile up to ~70% load on PP2-PP8 replicas of 13B-70B
    with 2k-token prompts, where the M/G/1 estimate alone was up to 1.5 s short, and within 15% with
    256-token prompts, where batch-mates at their mean count left it 15-90% low
    (``tests/test_planner_simulator.py``).

    With a ``link``, a prompt's KV trip follows its last stage (``KvLink``): its transfer adds to its
    own latency, and the link's wait to the first stage's (``_two_wait_tail``) and, over a few of its
    quantiles, to the batches still in the pipeline."""
    work.charge("prefill_tail", 1 if link is None else 3)  # a link's wait shifts the pipeline term 4 more times
    # (~4.3 ms with a link, ~1.7 without)
    own, lens = _own_passes(rm, wl, rates, k, b, t)
    rho, ok, rho_c, m = _queue_wait(wl, rates, k, b)
    if link is not None:
        ahead, link_m = link.batch_terms(k, rho)
        own = own + link.transfer(lens, wl.mean_input)[None, :] + ahead[:, None]
    batch_rate = rates / k
    reach = own + b[:, None]
    decay = 1.0 / np.maximum(m, 1e-12)
    share = np.full(own.shape[1], 1.0 / own.shape[1])  # each (mates, prompt length) point's weight: a mean as a matmul

    def free(x: np.ndarray) -> np.ndarray:  # no batch ahead still in the pipeline at x
        return np.exp(-batch_rate * (np.maximum(reach - x[:, None], 0.0) @ share))

    def tail(x: np.ndarray) -> np.ndarray:
        late = x[:, None] - own
        if link is None:
            waited = np.where(late < 0, 1.0, rho_c * np.exp(-late * decay)) @ share
            return 1.0 - (1.0 - waited) * free(x)
        waited = _two_wait_tail(late, rho_c, m, link.utilisation, link_m[:, None]) @ share
        shifted = sum(free(x - link_m * e) for e in LINK_WAIT_POINTS) / len(LINK_WAIT_POINTS)
        return 1.0 - (1.0 - waited) * ((1 - link.utilisation) * free(x) + link.utilisation * shifted)

    hi = own.max(axis=1) + b + m[:, 0] * (math.log(1.0 / (1 - t.q_ttft)) + 1) + 1.0
    return _tail_quantile(tail, ok, hi, t.q_ttft)


# Quantiles of an exponential (in units of its mean) that stand for a KV link's wait where a closed form
# is out of reach (``_pipelined_ttft``'s batches ahead in the pipeline).
LINK_WAIT_POINTS = tuple(-math.log(1.0 - (j + 0.5) / 4) for j in range(4))


@dataclass(frozen=True)
class KvLink:
    """The trip a prompt's KV takes from its prefill replica to its decode replica: ``mean_s`` for a
    mean prompt (a prompt's length scales it), over a link busy ``busy_s`` per mean prompt and loaded to
    ``utilisation`` (its cap in the routing). The link is a FIFO queue (the simulator's NIC, one transfer
    at a time) that a prefill batch's prompts join together (``batch_terms``). Its wait's tail, not its
    mean, is what a TTFT quantile sees: 13B over 5 Gbps with 2k-token prompts, the link at 55-70%,
    waited 1.5-1.9x its mean at the 91st percentile, and plans that reserved the mean were promised up
    to 1.27x what they served."""

    mean_s: float
    busy_s: float
    utilisation: float
    scv: float  # of the link's service: the prompts' lengths

    def batch_terms(self, k: np.ndarray, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the mean wait behind its batch-mates' transfers, the mean of the link's wait when there is
        one) for prompts that finish their prefill in batches, ``k`` at a time when it is busy (a share
        ``rho`` of batches; the others start from an idle queue with one prompt): a batch queues as one
        job of its transfers (M/G/1 with batch service: none with probability ``utilisation``, else
        exponential of mean ``busy (k + scv) / (2 (1 - utilisation))``), and a prompt then waits for the
        ``(k - 1) / 2`` mates ahead of it on average. With one prompt per batch, the M/G/1 wait of
        single transfers."""
        busy = np.minimum(rho, 1.0)
        k = 1.0 + busy * (k - 1.0)
        ahead = (k - 1.0) / 2.0 * self.busy_s
        return ahead, self.busy_s * (k * (1.0 - busy**2) + self.scv) / (2.0 * (1.0 - self.utilisation))

    def transfer(self, lengths: np.ndarray, mean_length: float) -> np.ndarray:
        return self.mean_s * lengths / mean_length


def _two_wait_tail(y: np.ndarray, a: np.ndarray | float, m1: np.ndarray | float, b: float, m2: np.ndarray | float
                   ) -> np.ndarray:
    """``P(W1 + W2 > y)`` for independent waits that are exponential of mean ``m1`` (``m2``) with
    probability ``a`` (``b``) and none otherwise: the prefill queue's and the KV link's."""
    y = np.asarray(y, dtype=float)
    pos = np.maximum(y, 0.0)
    m1, m2 = np.maximum(m1, 1e-12), np.maximum(m2, 1e-12)  # a link that carries nothing: no wait
    e1 = np.exp(-pos / m1)
    e2 = np.exp(-pos / m2)
    diff = m1 - m2
    near = np.abs(diff) < 1e-9 * np.maximum(m1, m2)
    with np.errstate(divide="ignore", invalid="ignore"):
        both = np.where(near, (1.0 + pos / m1) * e1, (m1 * e1 - m2 * e2) / np.where(near, 1.0, diff))
    tail = a * (1 - b) * e1 + (1 - a) * b * e2 + a * b * both
    return np.where(y < 0, 1.0, tail)


def _tail_quantile(tail, ok: np.ndarray, hi: np.ndarray, q: float) -> np.ndarray:
    """Per rate, the ``q`` quantile of a delay whose survival function (vectorised over rates) is
    ``tail``: the bracket ``[0, hi]`` grown until its top passes, then bisected (inf where not ``ok``)."""
    lo = np.zeros_like(hi)
    for _ in range(60):  # the bracket's top must pass (a saturated rate is inf anyway)
        grow = ok & (tail(hi) > 1 - q)
        if not grow.any():
            break
        hi = np.where(grow, hi * 2, hi)
    for _ in range(28):  # to ~1e-8 of the bracket
        mid = (lo + hi) / 2
        above = tail(mid) > 1 - q
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return np.where(ok, hi, np.inf)


def _linked_ttft(rm: ReplicaModel, wl: Workload, rates: np.ndarray, k: np.ndarray, b: np.ndarray, t: Targets,
                 link: KvLink) -> np.ndarray:
    """TTFT quantile of an unpipelined prefill replica's prompts when each then takes ``link`` to its
    decode replica: over the spread of prompt lengths, a prompt's pass in an average batch plus its
    transfer, plus the prefill queue's wait and the link's (``_two_wait_tail``). Adding the parts'
    quantiles instead would count two unlikely waits at once; adding the link's mean wait missed its
    tail where the link dominates."""
    work.charge("prefill_tail", 2)  # ~2.7 ms where a pipelined replica's tail without a link takes ~1.7
    mean_in = wl.mean_input
    own, lens = _own_passes(rm, wl, rates, k, b, t)
    rho, ok, rho_c, m = _queue_wait(wl, rates, k, b)
    ahead, link_m = link.batch_terms(k, rho)
    trip = own + link.transfer(lens, mean_in)[None, :] + ahead[:, None]
    share = np.full(own.shape[1], 1.0 / own.shape[1])

    def tail(x: np.ndarray) -> np.ndarray:
        return _two_wait_tail(x[:, None] - trip, rho_c, m, link.utilisation, link_m[:, None]) @ share

    miss = math.log(1.0 / (1 - t.q_ttft)) + 1
    hi = trip.max(axis=1) + (m[:, 0] + link_m) * miss + 1.0
    return _tail_quantile(tail, ok, hi, t.q_ttft)


def prefill_curve(rm: ReplicaModel, wl: Workload, t: Targets, link: KvLink | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Rates (req/s) and the TTFT quantile at each, for a prefill-only replica (pipelined when it has
    more than one stage): a monotone table to read capacities from. With a ``link``: the TTFT of its
    prompts once their KV has crossed it."""
    hi = prefill_max_rate(rm, wl, t)
    rates = np.linspace(0.0, hi, GRID + 1)[1:] * 0.995
    ttft = _prefill_ttft_array(rm, wl, rates, t, pipelined=len(rm.stages) > 1, link=link)
    ttft = np.maximum.accumulate(np.where(np.isfinite(ttft), ttft, 1e9))
    return rates, ttft


def linked_prefill_curve(rm: ReplicaModel, wl: Workload, t: Targets, link: KvLink
                         ) -> tuple[np.ndarray, np.ndarray]:
    """``prefill_curve`` through ``link``, memoised: a search routes many pairs over identical links."""
    return memoised(("linked", shape_key(rm), wl, t, link), lambda: prefill_curve(rm, wl, t, link))


def rate_for_slack(rates: np.ndarray, ttft: np.ndarray, slack: float) -> float:
    """Highest rate whose TTFT quantile stays within ``slack`` seconds (0 if none)."""
    if slack <= 0 or ttft[0] > slack:
        return 0.0
    idx = int(np.searchsorted(ttft, slack, side="right")) - 1
    if idx >= len(rates) - 1:
        return float(rates[-1])
    r0, r1, t0, t1 = rates[idx], rates[idx + 1], ttft[idx], ttft[idx + 1]
    return float(r0 + (r1 - r0) * (slack - t0) / (t1 - t0)) if t1 > t0 else float(r0)


TABLE_POINTS = 65  # running-batch grid of the step-time tables


@dataclass(frozen=True)
class StepTable:
    """Step times at a grid of running batches in [0, KV-limited batch], for one replica and workload:
    they do not depend on the rate, and a capacity search probes a dozen rates, each solving a fixed
    point over the batch, so the steps are computed once, all at once (``decode``: decode-only step;
    ``mixed``/``chunk``: a mixed step and the prompt tokens it carries, for a mixed-chunk policy).
    Steps are the ones a request sees in a running batch of mean ``batch`` others (``_seen``)."""

    batch: np.ndarray
    decode: np.ndarray
    chunk: np.ndarray | None = None
    mixed: np.ndarray | None = None
    lone_prefill: tuple[float, float] = (0.0, 0.0)  # (mean, mean square) of one prompt's prefill pass alone

    @staticmethod
    def build(rm: ReplicaModel, wl: Workload, chunk: int = 0) -> StepTable:
        b_mem = _kv_batch(rm, wl)
        b = np.linspace(0.0, max(b_mem, 0.0), TABLE_POINTS)
        ctx = _mean_context(wl)
        if not chunk:  # the prefill-first grid starts just above an empty batch
            b[0] = 1e-9
        seen = b + 1.0  # the batch a request steps in: itself and b others (``_seen``)
        decode = rm.decode_step_array(seen, seen * ctx)
        if not chunk:
            prompts = wl.input.points(INPUT_POINTS)
            lone = rm.prefill_array(prompts, prompts * prompts, np.ones_like(prompts))[0]
            return StepTable(b, decode, lone_prefill=(float(lone.mean()), float((lone * lone).mean())))
        c = np.maximum(chunk - b, 1.0)
        s2 = wl.mean_input * (1 + wl.input.scv)
        mixed = rm.mixed_step_array(seen, seen * ctx, c, c * s2, np.maximum(1.0, np.round(c / wl.mean_input)),
                                    np.maximum(0.0, (s2 - c) / 2))
        return StepTable(b, decode, c, mixed)

    def first_root(self, excess: np.ndarray, exact) -> float | None:
        """The smallest grid-resolved batch where ``excess`` (sampled on the grid; ``exact`` computes it
        anywhere) turns non-positive: linear between grid points, bisected where a side is infinite."""
        hits = np.nonzero(excess[1:] <= 0)[0]
        if len(hits) == 0:
            return None
        k = int(hits[0]) + 1
        lo, hi, e_lo, e_hi = float(self.batch[k - 1]), float(self.batch[k]), float(excess[k - 1]), float(excess[k])
        # the first cell starts at an empty batch, where the step time jumps (no decode step at all):
        # not a line, so it is bisected like a cell with an infinite side
        if k > 1 and math.isfinite(e_lo) and e_lo > e_hi:
            return lo + (hi - lo) * e_lo / (e_lo - e_hi)
        return narrow(lambda x: exact(x) > 0, lo, hi, 12)[1]


def _decode_batch(rm: ReplicaModel, wl: Workload, rate: float, stretch: float = 1.0,
                  table: StepTable | None = None) -> float | None:
    """Running batch at ``rate`` (Little's law fixed point), or None if it would exceed memory."""
    b_mem = _kv_batch(rm, wl)
    out = _decode_steps(wl)
    ctx = _mean_context(wl)

    def excess(b: float) -> float:
        return rate * out * rm.decode_step_time(_seen(b), _seen(b) * ctx) * stretch - b

    if b_mem < 1:
        return None
    table = table or StepTable.build(rm, wl)
    ex = rate * out * table.decode * stretch - table.batch
    if ex[-1] > 0:
        return None
    return table.first_root(ex, excess)


def _kv_fits(rm: ReplicaModel, wl: Workload, b: float, z: float,
             reserved: tuple[float, float] | None = None, e: float | None = None) -> bool:
    """The KV cache holds a running batch of mean size ``b`` at full length (what admission reserves),
    with a z-sigma margin (``reserved``: ``_reserved(wl)``, ``e``: ``_elasticity``, when the caller has
    them). The sequences' count spreads ``1 / (1 - e)`` times wider than Poisson (``_elasticity``: a
    larger batch steps slower and stays large, as in ``_decode_tail_step``), each sequence's
    reservation by its own lengths: ``b Var(X) + b / (1 - e) E[X]^2``. When the reservations reach the
    cache, prompts queue for admission and TTFT falls off a cliff: with a Poisson count a cache-bound
    13B replica on a GH200 (short prompts, 0.5 s / 50 ms, 256-token mixed chunks) was promised 12.8
    req/s and served 12.2 (the mean of eight sequences); now 12.6."""
    per, sq = reserved or _reserved(wl)
    b = max(b, 1e-9)
    e = _elasticity(rm, b, _mean_context(wl)) if e is None else e
    return b * per + z * math.sqrt(b * (sq - per * per) + b / (1.0 - e) * per * per) <= rm.kv_tokens


def decode_tpot(rm: ReplicaModel, wl: Workload, rate: float, t: Targets) -> float:
    """TPOT quantile of a decode replica at ``rate`` (inf when memory or compute cannot keep up)."""
    b = _decode_batch(rm, wl, rate)
    if b is None:
        return math.inf
    context = _context_spread(wl)
    e = _elasticity(rm, b, context[0])
    if not _kv_fits(rm, wl, b, t.z, e=e):
        return math.inf
    return _decode_tail_step(rm, b, t.z, context, e)


def _bisect_rate(ok, hi: float, iters: int = 16) -> float:
    if hi <= 0 or not ok(hi * 1e-4):
        return 0.0
    lo = hi * 1e-4
    if ok(hi):
        return hi
    return narrow(ok, lo, hi, iters)[0]


def decode_capacity(rm: ReplicaModel, wl: Workload, slo: SLO, t: Targets) -> float:
    """Highest rate (req/s) a decode replica takes with its TPOT quantile within the target.

    The largest mean running batch ``b`` whose quantile step as a request sees it (``_decode_tail_step``:
    itself and the others, ``b`` on average, spread wider than Poisson) is within the TPOT target, and
    whose sequences fit in the KV cache, gives the rate by Little's law: ``rate = b / (decode_steps *
    step(b + 1))`` (``_decode_steps``: the output length less the token the prefill pass emits).
    """
    context, reserved = _context_spread(wl), _reserved(wl)
    ctx = context[0]

    def ok(b: float) -> bool:
        e = _elasticity(rm, b, ctx)
        return _kv_fits(rm, wl, b, t.z, reserved, e) and _decode_tail_step(rm, b, t.z, context, e) <= slo.tpot_s

    if not ok(0.05):
        return 0.0
    lo, hi = 0.05, max(1.0, _kv_batch(rm, wl))
    lo = hi if ok(hi) else narrow(ok, lo, hi, 40)[0]
    return lo / (_decode_steps(wl) * rm.decode_step_time(_seen(lo), _seen(lo) * ctx))


TTFT_POINTS = 64  # prompt lengths (evenly spread quantiles) a colocated replica's TTFT tail is taken over
RESIDUAL_POINTS = 8  # ... and points of the decode step in progress when a prompt arrives


def _colocated_ttft(rm: ReplicaModel, wl: Workload, rate: float, t: Targets, step: float) -> float:
    """TTFT quantile of a prefill-first colocated replica: the sum of the rest of the decode step in
    progress when the prompt arrives (uniform over ``step``, when the replica is decoding: ``1 - rho``
    of the time), the prefill queue's wait (none with probability ``1 - rho``, else exponential, the
    M/G/1 tail of ``_wait_quantile``) and its own pass (a prompt of each length in an average batch).
    The prefill queue's ``max(own pass, mean pass + wait)`` plus a whole decode step put the 94th
    percentile 6-16% low at a tight TTFT with long prompts (70B on 4x H100, 0.45 s: the wait and a
    long prompt's pass add up) and 21-29% high with short ones (70B, 0.5 s); this sum is within 3% of
    the simulator there and on 7B long prompts on an L40S, and up to 13% high on 70B short prompts."""
    k, s, rho = _prefill_queue(rm, wl, rate, t, colocated=True)
    if rho >= 1:
        return math.inf
    mean_in = wl.mean_input
    lengths = wl.input.points(TTFT_POINTS)
    batch = max(1.0, round(k))
    own = rm.prefill_array((k - 1) * mean_in + lengths, (k - 1) * mean_in**2 + lengths**2,
                           np.full_like(lengths, batch))[0]
    rest = np.concatenate([[0.0], (np.arange(RESIDUAL_POINTS) + 0.5) / RESIDUAL_POINTS * step])
    weight = np.concatenate([[rho], np.full(RESIDUAL_POINTS, (1 - rho) / RESIDUAL_POINTS)]) / own.size
    before = (own[None, :] + rest[:, None]).ravel()  # its own pass after the step in progress
    weight = np.repeat(weight, own.size)
    theta = s * (wl.arrival_scv + wl.input.scv) / (2 * (1 - rho))  # the wait's exponential tail
    miss = 1 - t.q_ttft

    def within(x: float) -> bool:
        late = np.where(x < before, 1.0, rho * np.exp(-np.maximum(x - before, 0.0) / max(theta, 1e-12)))
        return float(weight @ late) <= miss

    hi = float(before.max()) + theta * max(math.log(max(rho, 1e-12) / miss), 0.0) + 1e-6
    return narrow(lambda x: not within(x), 0.0, hi, 40, stop=lambda lo, up: up - lo <= 1e-3 * up)[1]


def colocated_point(rm: ReplicaModel, wl: Workload, rate: float, t: Targets, tpot_target: float,
                    table: StepTable | None = None) -> tuple[float, float]:
    """(TTFT quantile, share of requests over the TPOT target) of a replica doing both phases.

    Prefill runs first, so the prompts queued behind a request when it starts decoding, and each
    prompt arriving during its decode, stall it for a busy period of the prefill queue
    (``_busy_periods``); short outputs suffer most, so the TPOT violation share is averaged over the
    output-length distribution.
    """
    _, _, rho = _prefill_queue(rm, wl, rate, t, colocated=True)
    if rho >= 0.98:
        return math.inf, 1.0
    stretch = 1.0 / (1.0 - rho)
    ctx = _mean_context(wl)
    table = table or StepTable.build(rm, wl)
    b = _decode_batch(rm, wl, rate, stretch, table)
    if b is None:
        return math.inf, 1.0
    own_step = rm.decode_step_time(b + 1.0, (b + 1.0) * ctx)  # a step of the mean batch and the request
    if not _kv_fits(rm, wl, b, t.z, e=_elasticity(rm, b, ctx, own_step)):
        return math.inf, 1.0
    ttft = _colocated_ttft(rm, wl, rate, t, own_step)
    bq = _seen(b, t.z)
    step = rm.decode_step_time(bq, bq * ctx)
    if step >= tpot_target:
        return ttft, 1.0
    # each prompt arriving while the request decodes stalls it for a busy period of the prefill queue
    # (a Poisson count of fixed batch latencies missed both the long prompts and the busy periods: a
    # 70B replica's TPOT violations were 0.8-4% where the simulator saw 6-15%)
    gaps = _output_gaps(wl)
    arrivals = rate * gaps * step
    stall, spread = _busy_periods(arrivals, table.lone_prefill, rho)
    # ... and the prompts that arrived during its own mean TTFT (M/G/1 wait and prefill) are prefilled
    # before its first decode step (``colocated_mixed_point``: the same, in mixed steps)
    lone, lone_sq = table.lone_prefill
    queued = rate * (lone + rate * lone_sq / (2 * (1 - rho)))
    first, first_spread = _busy_periods(np.array(queued), table.lone_prefill, rho)
    viol = np.where(gaps >= 1, _gamma_tail(arrivals + queued, stall + first, spread + first_spread,
                                           (tpot_target - step) * gaps), 0.0)
    return ttft, float(viol.mean())


def _busy_periods(arrivals: np.ndarray, job: tuple[float, float], rho: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean, variance) of the total length of the busy periods that ``arrivals`` jobs (a Poisson
    mean) start in a queue at utilisation ``rho``: each lasts its job (``job``: mean, mean square)
    plus the jobs arriving meanwhile, E[B] = E[s] / (1 - rho), E[B^2] = E[s^2] / (1 - rho)^3."""
    return arrivals * job[0] / (1.0 - rho), arrivals * job[1] / (1.0 - rho) ** 3


def _given_any(arrivals: np.ndarray, mean: np.ndarray, var: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P(at least one of ``arrivals`` Poisson events), and the first two moments of a total with mean
    ``mean`` and variance ``var`` given at least one): the stall tails put an atom at "none arrived"."""
    hit = np.maximum(-np.expm1(-arrivals), 1e-300)  # exact for few arrivals too
    return hit, mean / hit, (var + mean * mean) / hit


def _gamma_tail(arrivals: np.ndarray, mean: np.ndarray, var: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """P(a compound Poisson total over ``arrivals`` events exceeds ``allowed``): none with probability
    exp(-arrivals), else gamma with the total's first two moments given at least one."""
    hit, m1, m2 = _given_any(arrivals, mean, var)
    spread = np.maximum(m2 - m1 * m1, 1e-18)
    shape, scale = m1 * m1 / spread, np.maximum(spread / np.maximum(m1, 1e-18), 1e-18)
    with np.errstate(invalid="ignore"):  # gammaincc(0, 0) where the total is 0: no stall, masked below
        tail = hit * gammaincc(shape, np.maximum(allowed, 0.0) / scale)
    return np.where(allowed < 0, 1.0, np.where(mean > 0, tail, 0.0))


def _beta_tail(arrivals: np.ndarray, mean: np.ndarray, var: np.ndarray, limit: float) -> np.ndarray:
    """P(a share in [0, 1] exceeds ``limit``): 0 with probability exp(-arrivals) (nothing arrived),
    else beta with the share's first two moments given that something did."""
    if limit >= 1:
        return np.zeros_like(mean)
    hit, m1, m2 = _given_any(arrivals, mean, var)
    m1 = np.clip(m1, 1e-9, 1 - 1e-9)
    spread = np.clip(m2 - m1 * m1, 1e-18, m1 * (1 - m1) * 0.999)
    common = m1 * (1 - m1) / spread - 1
    return np.where(mean > 0, hit * betaincc(m1 * common, (1 - m1) * common, max(limit, 0.0)), 0.0)


def _output_gaps(wl: Workload) -> np.ndarray:
    """Token gaps (output length - 1) at evenly spread quantiles of the output length."""
    return np.maximum(wl.output.points(12) - 1.0, 0.0)


def _colocated_capacity(rm: ReplicaModel, wl: Workload, slo: SLO, t: Targets) -> float:
    if _kv_batch(rm, wl) < 1:
        return 0.0
    return _bisect_rate(_colocated_ok(rm, wl, slo, t), _colocated_rate_bound(rm, wl, t))


def _colocated_rate_bound(rm: ReplicaModel, wl: Workload, t: Targets) -> float:
    """No prefill-first colocated replica serves more than its prefill at full batches, nor more than
    it decodes with the KV cache full."""
    b_mem = _kv_batch(rm, wl)
    full = b_mem / (_decode_steps(wl) * rm.decode_step_time(b_mem, b_mem * _mean_context(wl)))
    return min(prefill_max_rate(rm, wl, t, colocated=True), full)


def _colocated_ok(rm: ReplicaModel, wl: Workload, slo: SLO, t: Targets) -> Callable[[float], bool]:
    """Whether a prefill-first colocated replica meets the SLO at a rate (one point of its capacity search)."""
    table = StepTable.build(rm, wl)

    def ok(r: float) -> bool:
        work.charge("colocated_point")
        ttft, viol = colocated_point(rm, wl, r, t, slo.tpot_s, table)
        return ttft <= slo.ttft_s and viol <= 1 - t.q_tpot

    return ok


# -- colocated with mixed chunks ---------------------------------------------------------------------
# SGLang ``--enable-mixed-chunk`` (and vLLM's chunked prefill): every iteration carries the running
# decodes plus up to ``chunk - batch`` prompt tokens, so decodes keep producing a token per
# iteration while prompts are prefilled, but each iteration that carries a chunk lasts as long as
# that chunk. A smaller chunk protects TPOT and costs prefill efficiency and TTFT. The engine's best
# setting for a workload is one of these (plus SGLang's default, prefill first without mixing).
MIXED_CHUNKS = (256, 512, 1024, 2048)


@dataclass(frozen=True)
class ColocatedPolicy:
    """How a colocated replica schedules prefill against decode: ``mixed`` False is SGLang's default
    (a waiting prompt's prefill pass stalls the running decodes; ``chunk`` 0 = the engine's chunk)."""

    mixed: bool = False
    chunk: int = 0


PREFILL_FIRST = ColocatedPolicy()


def _mixed_terms(rm: ReplicaModel, wl: Workload, b: float, chunk: int,
                 seen: float | None = None) -> tuple[float, float, float]:
    """(prompt tokens per mixed step, mixed step time, decode-only step time) at running batch ``b``:
    the chunk leaves room for ``b`` decodes; the steps carry ``seen`` decodes, by default as a request
    sees them (itself and ``b`` others, ``_seen``)."""
    ctx = _mean_context(wl)
    c = max(chunk - b, 1.0)
    s2 = wl.mean_input * (1 + wl.input.scv)  # E[s^2] / E[s]: the causal term per prompt token
    # a chunk of c prompt tokens costs c * E[s^2]/E[s] in attention (whole or split prompts alike)
    # and reads the KV of the earlier chunks of a split prompt
    prefix = max(0.0, (s2 - c) / 2)
    seen = b + 1.0 if seen is None else seen
    tm = rm.mixed_step_time(seen, seen * ctx, c, c * s2, max(1, round(c / wl.mean_input)), prefix)
    td = rm.decode_step_time(seen, seen * ctx)
    return c, tm, td


def _mixed_tpot(rm: ReplicaModel, wl: Workload, rate: float, b: float, chunk: int) -> tuple[float, float]:
    """(mean TPOT, share of time in mixed steps) at running batch ``b``: inf when prefill cannot keep up."""
    c, tm, td = _mixed_terms(rm, wl, b, chunk)
    n_m = rate * wl.mean_input / c  # mixed steps per second
    u = n_m * tm
    if u >= 0.98:
        return math.inf, u
    n_d = (1 - u) / td if td > 0 else 0.0
    return 1.0 / (n_m + n_d), u


def _mixed_batch(rm: ReplicaModel, wl: Workload, rate: float, chunk: int, table: StepTable) -> float | None:
    """Running batch of a mixed-chunk replica at ``rate``: the smallest fixed point of Little's law with
    the mean TPOT (past it a bigger batch leaves less of the chunk to prompts, so the excess is not
    monotone): the first batch on the grid that keeps up, refined below it. None: none keeps up."""
    assert table.chunk is not None and table.mixed is not None
    out = _decode_steps(wl)

    def excess(b: float) -> float:
        tp, _ = _mixed_tpot(rm, wl, rate, b, chunk)
        return rate * out * tp - b if math.isfinite(tp) else math.inf

    n_m = rate * wl.mean_input / table.chunk
    u = n_m * table.mixed
    with np.errstate(divide="ignore", invalid="ignore"):
        n_d = np.where(table.decode > 0, (1 - u) / np.where(table.decode > 0, table.decode, 1.0), 0.0)
        excess_grid = np.where(u < 0.98, rate * out / (n_m + n_d), np.inf) - table.batch
    return table.first_root(excess_grid, excess)


def colocated_mixed_point(rm: ReplicaModel, wl: Workload, rate: float, t: Targets, tpot_target: float,
                          chunk: int, table: StepTable | None = None) -> tuple[float, float]:
    """(TTFT quantile, share of requests over the TPOT target) of a colocated replica with mixed chunks.

    The running batch ``b`` solves Little's law with the mean TPOT; a request whose decode spans
    ``G`` iterations shares ``N`` of them with prefill chunks: the busy period of the prompts queued
    behind it when it starts decoding, and those of the prompt queue that start while it decodes alone
    (a beta share of ``G``); its TPOT is
    ``(N * mixed step + (G - N) * decode step) / G``. TTFT: FIFO queue of prompts served ``chunk``
    tokens per mixed step (M/G/1 tail) plus the long prompt's own steps.
    """
    b_mem = _kv_batch(rm, wl)
    if b_mem < 1 or chunk <= 1:
        return math.inf, 1.0
    b = _mixed_batch(rm, wl, rate, chunk, table or StepTable.build(rm, wl, chunk))
    if b is None:
        return math.inf, 1.0
    if not _kv_fits(rm, wl, b, t.z):
        return math.inf, 1.0
    tpot_mean, u = _mixed_tpot(rm, wl, rate, b, chunk)
    c, tm, td = _mixed_terms(rm, wl, _seen(b, t.z) - 1.0, chunk)  # the others at the quantile
    td = max(td, rm.decode_step_time(1.0, wl.mean_input))
    # TTFT: the queue of prompt tokens drains c per mixed step
    s_req = wl.mean_input / c * tm
    w = _wait_quantile(u, s_req, wl.arrival_scv + wl.input.scv, t.q_ttft)
    long_in = wl.input.quantile(t.q_ttft)
    ttft = max(math.ceil(long_in / c) * tm, math.ceil(wl.mean_input / c) * tm + w)
    if td >= tpot_target:
        return ttft, 1.0
    gaps = _output_gaps(wl)
    # in mixed steps: a prompt is len / c of them, and each one arriving while the request decodes
    # alone (a 1 - u share of its lifetime) starts a busy period of mixed steps. The request decodes
    # through them, so its G iterations alternate idle and busy runs: the busy share has the busy
    # periods' mean over G, varies (1 - f)^2 times less than their total (renewal-reward, f the mean
    # share) and lies in [0, 1] (beta). A normal count over the lifetime had the violations 5-20x low.
    work = (wl.mean_input / c, wl.mean_input**2 * (1 + wl.input.scv) / c**2)
    arrivals = rate * gaps * tpot_mean * (1 - u)
    busy, spread = _busy_periods(arrivals, work, u)
    g = np.maximum(gaps, 1.0)
    # the prompts that arrived while the request waited and prefilled (its mean TTFT: M/G/1 wait and
    # its own steps) are queued behind it when it starts decoding: it first decodes through the busy
    # period they make, once (not renewed: its whole variance counts)
    queued = rate * s_req * (1 + u * (wl.arrival_scv + wl.input.scv) / (2 * (1 - u)))
    first, first_spread = _busy_periods(np.array(queued), work, u)
    renewed = np.minimum(busy / g, 0.999)
    share = np.minimum((busy + first) / g, 0.999)
    variance = spread * ((1 - renewed) / g) ** 2 + first_spread / g**2
    allowed = (tpot_target - td) / max(tm - td, 1e-9)  # the busy share a request's TPOT allows
    viol = np.where(gaps >= 1, _beta_tail(arrivals + queued, share, variance, allowed), 0.0)
    return ttft, float(viol.mean())


def _colocated_mixed_capacity(rm: ReplicaModel, wl: Workload, slo: SLO, t: Targets, chunk: int) -> float:
    if _kv_batch(rm, wl) < 1:
        return 0.0
    return _bisect_rate(_mixed_ok(rm, wl, slo, t, chunk), mixed_rate_bound(rm, wl, chunk), iters=10)


def _mixed_ok(rm: ReplicaModel, wl: Workload, slo: SLO, t: Targets, chunk: int) -> Callable[[float], bool]:
    """Whether a colocated replica with mixed chunks meets the SLO at a rate (one point of its capacity search)."""
    table = StepTable.build(rm, wl, chunk)

    def ok(r: float) -> bool:
        work.charge("mixed_point")
        ttft, viol = colocated_mixed_point(rm, wl, r, t, slo.tpot_s, chunk, table)
        return ttft <= slo.ttft_s and viol <= 1 - t.q_tpot

    return ok


def mixed_rate_bound(rm: ReplicaModel, wl: Workload, chunk: int) -> float:
    """No colocated replica with mixed chunks serves more than its prefill alone, chunk after chunk."""
    _, tm0, _ = _mixed_terms(rm, wl, 0.0, chunk, seen=0.0)
    return chunk / (wl.mean_input * tm0)


def best_colocated(rms: Sequence[ReplicaModel], wl: Workload, slo: SLO, t: Targets,
                   chunks: Sequence[int] = MIXED_CHUNKS) -> tuple[float, int, ColocatedPolicy]:
    """(capacity, index, policy) of the best colocated replica among shapes of one GPU group (its TP
    choices) under its best scheduling policy: SGLang's default (prefill first) or mixed chunks of one
    of ``chunks`` tokens (what an operator would tune; none: an engine without chunked prefill).
    Prefill-first capacities first, then the mixed-chunk policies in the order of their upper bounds,
    skipping those that cannot win."""
    best: tuple[float, int, ColocatedPolicy] | None = None
    for i, rm in enumerate(rms):
        if best is not None and not _may_beat(rm, wl, best[0], _colocated_rate_bound(rm, wl, t),
                                              partial(_colocated_ok, rm, wl, slo, t)):
            continue
        cap = colocated_capacity(rm, wl, slo, t)
        if best is None or cap > best[0] * 1.001:
            best = (cap, i, PREFILL_FIRST)
    if best is None:
        raise ValueError("best_colocated needs at least one replica shape")
    tries = sorted(((mixed_rate_bound(rm, wl, c), i, c) for i, rm in enumerate(rms) for c in chunks),
                   reverse=True)
    for bound, i, chunk in tries:
        if bound <= best[0] * 1.001:
            break
        if not _may_beat(rms[i], wl, best[0], bound, partial(_mixed_ok, rms[i], wl, slo, t, chunk)):
            continue
        cap = colocated_mixed_capacity(rms[i], wl, slo, t, chunk)
        if cap > best[0] * 1.001:
            best = (cap, i, ColocatedPolicy(True, chunk))
    return best


def may_serve_colocated(rms: Sequence[ReplicaModel], wl: Workload, slo: SLO, t: Targets, rate: float,
                        chunks: Sequence[int] = MIXED_CHUNKS) -> bool:
    """Whether ``best_colocated`` over these shapes and ``chunks`` may come out above ``rate`` x 1.001:
    some shape meets the SLO there under some policy whose bound allows it (so, the SLO's test being
    monotone in the rate, none can if this says no)."""
    for rm in rms:
        tries = [(_colocated_rate_bound(rm, wl, t), partial(_colocated_ok, rm, wl, slo, t))]
        tries += [(mixed_rate_bound(rm, wl, c), partial(_mixed_ok, rm, wl, slo, t, c)) for c in chunks]
        if any(_may_beat(rm, wl, rate, bound, ok) for bound, ok in tries):
            return True
    return False


def _may_beat(rm: ReplicaModel, wl: Workload, best: float, bound: float,
              ok: Callable[[], Callable[[float], bool]]) -> bool:
    """Whether a shape and policy (its capacity at most ``bound``) may serve more than ``best`` x 1.001
    (the margin a capacity must beat to win): the SLO is met there. One point instead of a capacity
    search (~12-18 points) for the many that lose; the capacity of one that may win is still searched
    whole (and memoised), so the values do not depend on which shapes were tried before."""
    return bound > best * 1.001 and (best <= 0 or (_kv_batch(rm, wl) >= 1 and ok()(best * 1.001)))


# -- memo ----------------------------------------------------------------------------------------------
# A colocated replica's capacity depends only on its shape (GPU type, TP and layers per stage, PP links),
# the model, the efficiencies, the workload and the SLO. The rent step meets the same shape many times
# (a 1-GPU H100 replica from the 1x, 2x and 8x H100 offers of every region), and each capacity is a
# bisection over rates of a fixed-point search: computing it once per shape keeps planning inside its
# time limit. Bounded; cleared when full.
# Each entry keeps the work its computation counted (``planner.work``) and the plan (clock epoch) that
# last paid for it; the first hit in another plan counts that work again: the planner's clock is work
# done, so a capacity known from an earlier plan in the same process must cost a plan's deadlines what
# it would cost in a fresh process (once), or a later plan would search further and differ.
_MEMO: dict[tuple, tuple[float, dict[str, float], int]] = {}
_MEMO_MAX = 20000


def shape_key(rm: ReplicaModel) -> tuple:
    """What a replica's capacity depends on besides the workload and SLO (not which nodes it is on);
    kept on the replica model (its stages and links do not change), since searches ask it often."""
    key = rm.__dict__.get("_shape_key")
    if key is None:
        key = rm.__dict__["_shape_key"] = (
            rm.model, rm.eff, tuple((st.gpu, st.tp, st.layers, st.first, st.last) for st in rm.stages),
            tuple((round(b, 3), round(lat, 9)) for b, lat in rm.pp_links))
    return key


def memoised(key: tuple, compute):
    """``compute()``, kept under ``key`` with the work it counted, which a later plan counts again once
    (see above); the capacities here and ``parallel.balance_layers``' splits."""
    try:
        hit = _MEMO.get(key)
    except TypeError:  # an unhashable workload (e.g. lengths from a trace as arrays): no memo
        return compute()
    if hit is not None:
        value, done, paid_in = hit
        if paid_in != work.epoch():
            work.replay(done)
            _MEMO[key] = (value, done, work.epoch())
        return value
    if len(_MEMO) >= _MEMO_MAX:
        _MEMO.clear()
    before = work.counts()
    value = compute()
    _MEMO[key] = (value, work.since(before), work.epoch())
    return value


def colocated_capacity(rm: ReplicaModel, wl: Workload, slo: SLO, t: Targets) -> float:
    """Req/s at the SLO of a colocated replica with SGLang's default (prefill-first) scheduling."""
    return memoised(("pf", shape_key(rm), wl, slo, t), lambda: _colocated_capacity(rm, wl, slo, t))


def colocated_mixed_capacity(rm: ReplicaModel, wl: Workload, slo: SLO, t: Targets, chunk: int) -> float:
    """Req/s at the SLO of a colocated replica with mixed chunks of ``chunk`` tokens."""
    return memoised(("mix", chunk, shape_key(rm), wl, slo, t),
                 lambda: _colocated_mixed_capacity(rm, wl, slo, t, chunk))
