"""What a deployment must serve: arrivals at a rate, input/output lengths, and latency targets.

Lengths are fixed, drawn from a distribution, or resampled from a trace in the Azure LLM inference
trace format (``TIMESTAMP,ContextTokens,GeneratedTokens``). Arrivals are Poisson, or gamma-distributed
gaps with a coefficient of variation ``cv`` > 1 for bursty traffic. Trace lengths are replayed
through the chosen arrival process at the chosen rate, as the ThunderServe paper does.
"""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_LO, DEFAULT_HI = 1, 1 << 20  # lengths are drawn clipped to these unless a workload says otherwise


class WorkloadError(ValueError):
    """A workload or trace that cannot be used."""


@dataclass(frozen=True)
class SLO:
    """Latency targets (seconds) and the fraction of requests that must meet both."""

    ttft_s: float
    tpot_s: float
    attainment: float = 0.9

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise WorkloadError("TTFT and TPOT targets must be positive seconds")
        if not 0 < self.attainment < 1:
            raise WorkloadError("attainment target must be between 0 and 1 (e.g. 0.9)")

    def to_dict(self) -> dict[str, float]:
        return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "attainment": self.attainment}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SLO:
        return cls(float(d["ttft_s"]), float(d["tpot_s"]), float(d.get("attainment", 0.9)))


@dataclass(frozen=True)
class Lengths:
    """A token-length distribution: fixed, normal/lognormal around a mean, or empirical values."""

    mean: float
    kind: str = "fixed"  # fixed | lognormal | empirical
    cv: float = 0.0  # coefficient of variation for lognormal
    values: tuple[int, ...] = ()
    lo: int = DEFAULT_LO
    hi: int = DEFAULT_HI

    @staticmethod
    def fixed(n: int) -> Lengths:
        return Lengths(float(n), "fixed")

    @staticmethod
    def empirical(values: list[int] | np.ndarray) -> Lengths:
        vals = tuple(int(max(1, v)) for v in values)
        if not vals:
            raise WorkloadError("empty length sample")
        return Lengths(float(np.mean(vals)), "empirical", float(np.std(vals) / max(np.mean(vals), 1e-9)), vals)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            out = np.full(n, self.mean)
        elif self.kind == "lognormal":
            sigma = np.sqrt(np.log1p(self.cv**2))
            out = rng.lognormal(np.log(self.mean) - sigma**2 / 2, sigma, n)
        elif self.kind == "empirical":
            out = np.asarray(self.values, dtype=float)[rng.integers(0, len(self.values), n)]
        else:
            raise WorkloadError(f"unknown length distribution {self.kind!r}")
        return np.clip(np.rint(out), self.lo, self.hi).astype(np.int64)

    @property
    def expected(self) -> float:
        """Mean of the lengths drawn (``sample`` clips to [lo, hi]); the estimators' mean. A lognormal of
        mean 2048 and cv 0.7 clipped at 8192 draws 2036 on average (0.6% less): small, but a decode
        replica whose step slows almost in step with its batch moves its batch several times that."""
        return self._moments[0]

    @property
    def var(self) -> float:
        """Variance of the lengths drawn (clipped like ``expected``)."""
        m1, m2 = self._moments
        return max(m2 - m1 * m1, 0.0)

    @property
    def scv(self) -> float:
        """Squared coefficient of variation of the lengths drawn (0 for fixed lengths)."""
        m1 = self.expected
        return self.var / (m1 * m1) if m1 > 0 else 0.0

    @functools.cached_property
    def _moments(self) -> tuple[float, float]:
        """(E[len], E[len^2]) of the clipped distribution, computed once per distribution."""
        lo, hi = float(self.lo), float(self.hi)
        if self.kind == "fixed":
            x = min(max(self.mean, lo), hi)
            return x, x * x
        if self.kind == "empirical":
            vals = np.clip(np.asarray(self.values, dtype=float), lo, hi)
            return float(vals.mean()), float((vals * vals).mean())
        from statistics import NormalDist

        # lognormal exp(mu + sigma Z): E[X^k; a < X < b] = exp(k mu + k^2 sigma^2 / 2) (Phi(beta - k sigma)
        # - Phi(alpha - k sigma)) with alpha, beta the standardised log bounds; the tails sit at lo and hi
        phi = NormalDist().cdf
        sigma = float(np.sqrt(np.log1p(self.cv**2)))
        mu = float(np.log(self.mean)) - sigma * sigma / 2
        a, b = (math.log(max(lo, 1e-300)) - mu) / sigma, (math.log(hi) - mu) / sigma
        below, above = phi(a), 1.0 - phi(b)
        m = [math.exp(k * mu + k * k * sigma * sigma / 2) * (phi(b - k * sigma) - phi(a - k * sigma)) + below * lo**k
             + above * hi**k for k in (1, 2)]
        return m[0], m[1]

    def quantile(self, q: float) -> float:
        """The q-quantile of the distribution (tokens); memoised, the estimators ask often."""
        cache = self.__dict__.setdefault("_quantiles", {})
        if q not in cache:
            cache[q] = self._quantile(q)
        return cache[q]

    def points(self, n: int) -> np.ndarray:
        """Lengths at ``n`` evenly spread quantiles, ``(i + 0.5) / n`` (one point for a fixed length):
        what the estimators average over a distribution; memoised like ``quantile``."""
        cache = self.__dict__.setdefault("_points", {})
        if n not in cache:
            k = 1 if self.kind == "fixed" else n
            cache[n] = np.array([self.quantile((i + 0.5) / k) for i in range(k)])
        return cache[n]

    def staying_moments(self, n: int) -> tuple[float, float]:
        """(mean, mean square) of the lengths over ``points(n)``, each weighted by ``length - 1``: a sequence
        of length L stays in a decode batch for L - 1 steps, so a running batch holds long ones more often
        than they arrive (length-biased sampling). Plain means where no length passes 1; memoised like
        ``points``."""
        cache = self.__dict__.setdefault("_staying", {})
        if n not in cache:
            pts = self.points(n)
            stay = np.maximum(pts - 1.0, 0.0)
            weight = stay if stay.sum() > 0 else np.ones_like(pts)
            cache[n] = (float((weight * pts).sum() / weight.sum()), float((weight * pts**2).sum() / weight.sum()))
        return cache[n]

    def _quantile(self, q: float) -> float:
        if self.kind == "fixed":
            return self.mean
        if self.kind == "empirical":
            return float(np.percentile(self.values, 100 * q))
        from statistics import NormalDist

        sigma = float(np.sqrt(np.log1p(self.cv**2)))
        return float(min(self.hi, np.exp(np.log(self.mean) - sigma**2 / 2 + sigma * NormalDist().inv_cdf(q))))

    @property
    def p_max(self) -> float:
        """A high quantile used to size memory reserves."""
        if self.kind == "fixed":
            return self.mean
        if self.kind == "empirical":
            return float(np.percentile(self.values, 99))
        return self.mean * (1 + 3 * self.cv)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "mean": round(self.mean, 3)}
        if self.kind == "lognormal":
            d["cv"] = self.cv
        if self.kind == "empirical":
            d["values"] = list(self.values)
        if self.lo != DEFAULT_LO:  # the clip changes the mean the estimators take (``expected``)
            d["lo"] = self.lo
        if self.hi != DEFAULT_HI:
            d["hi"] = self.hi
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Lengths:
        clip = {"lo": int(d.get("lo", DEFAULT_LO)), "hi": int(d.get("hi", DEFAULT_HI))}
        if d.get("kind") == "empirical":
            return replace(cls.empirical(d["values"]), **clip)
        return cls(float(d["mean"]), d.get("kind", "fixed"), float(d.get("cv", 0.0)), **clip)


@dataclass(frozen=True)
class Request:
    id: int
    arrival: float
    input_len: int
    output_len: int


@dataclass(frozen=True)
class Workload:
    """Arrival rate (requests/s), arrival process, and length distributions."""

    rate: float
    input: Lengths = field(default_factory=lambda: Lengths.fixed(512))
    output: Lengths = field(default_factory=lambda: Lengths.fixed(128))
    arrival: str = "poisson"  # poisson | gamma
    cv: float = 1.0  # inter-arrival coefficient of variation (gamma only; 1 == Poisson)
    trace: str = ""  # where the lengths came from, for the record

    @property
    def mean_input(self) -> float:
        """Mean prompt length as drawn (``Lengths.expected``)."""
        return self.input.expected

    @property
    def mean_output(self) -> float:
        """Mean output length as drawn (``Lengths.expected``)."""
        return self.output.expected

    @property
    def arrival_scv(self) -> float:
        return 1.0 if self.arrival == "poisson" else self.cv**2

    def with_rate(self, rate: float) -> Workload:
        return Workload(rate, self.input, self.output, self.arrival, self.cv, self.trace)

    def requests(self, duration_s: float | None = None, *, n: int | None = None, seed: int = 0) -> list[Request]:
        """Requests arriving over ``duration_s`` (or the first ``n``) at this rate.

        Common random numbers: the same seed gives the same lengths and the same unit-rate gaps,
        scaled by 1/rate, so a goodput search over the rate compares like with like.
        """
        if self.rate <= 0:
            return []
        rng = np.random.default_rng(seed)
        count = n if n is not None else int(self.rate * float(duration_s or 0) * 1.5 + 50)
        if self.arrival == "gamma":
            shape = 1.0 / max(self.cv**2, 1e-6)
            gaps = rng.gamma(shape, 1.0 / shape, count)
        else:
            gaps = rng.exponential(1.0, count)
        times = np.cumsum(gaps) / self.rate
        ins = self.input.sample(rng, count)
        outs = self.output.sample(rng, count)
        reqs = []
        for i in range(count):
            if duration_s is not None and times[i] > duration_s:
                break
            reqs.append(Request(i, float(times[i]), int(ins[i]), int(max(1, outs[i]))))
        return reqs

    def to_dict(self) -> dict[str, Any]:
        d = {"rate": self.rate, "arrival": self.arrival, "input": self.input.to_dict(),
             "output": self.output.to_dict()}
        if self.arrival == "gamma":
            d["cv"] = self.cv
        if self.trace:
            d["trace"] = self.trace
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Workload:
        return cls(float(d["rate"]), Lengths.from_dict(d["input"]), Lengths.from_dict(d["output"]),
                   d.get("arrival", "poisson"), float(d.get("cv", 1.0)), d.get("trace", ""))


def load_azure_trace(path: str | Path, limit: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """Input and output token counts from an Azure LLM inference trace CSV (first ``limit`` rows)."""
    p = Path(path).expanduser()
    try:
        with p.open(newline="") as f:
            reader = csv.DictReader(f)
            cols = {c.strip(): c for c in (reader.fieldnames or [])}
            if "ContextTokens" not in cols or "GeneratedTokens" not in cols:
                raise WorkloadError(
                    f"{p}: not an Azure LLM trace: needs columns TIMESTAMP,ContextTokens,GeneratedTokens")
            ins, outs = [], []
            for line, row in enumerate(reader, start=2):
                try:
                    ins.append(int(float(row[cols["ContextTokens"]])))
                    outs.append(int(float(row[cols["GeneratedTokens"]])))
                except (TypeError, ValueError):
                    raise WorkloadError(f"{p}:{line}: token counts must be numbers") from None
                if len(ins) >= limit:
                    break
    except OSError as e:
        raise WorkloadError(f"cannot read trace {p}: {e.strerror or e}") from e
    if not ins:
        raise WorkloadError(f"{p}: trace has no rows")
    return np.asarray(ins), np.asarray(outs)


def workload_from_trace(path: str | Path, rate: float, **kw: Any) -> Workload:
    ins, outs = load_azure_trace(path)
    return Workload(rate, Lengths.empirical(ins), Lengths.empirical(outs), trace=str(path), **kw)
