"""Sampling parameters (validated, SGLang's names) and the sampler that turns logits into tokens.

The sampler works on numpy rows so every backend shares it: the emulated model never touches torch,
and a torch model hands over ``logits.numpy()``. Log-probabilities are those of the model's own
distribution (before temperature and penalties), as SGLang returns by default.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from replicas.engine.errors import bad_request

GREEDY_EPS = 1e-6


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI, SGLang)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def check_int(value: Any, param: str, low: int | None = None, high: int | None = None) -> int:
    if not _is_int(value):
        raise bad_request(f"{param} must be an integer, got {value!r}", param)
    if low is not None and value < low:
        raise bad_request(f"{param} must be >= {low}, got {value}", param)
    if high is not None and value > high:
        raise bad_request(f"{param} must be <= {high}, got {value}", param)
    return value


def check_number(value: Any, param: str, low: float | None = None, high: float | None = None) -> float:
    if not _is_number(value):
        raise bad_request(f"{param} must be a number, got {value!r}", param)
    if low is not None and value < low:
        raise bad_request(f"{param} must be >= {low}, got {value}", param)
    if high is not None and value > high:
        raise bad_request(f"{param} must be <= {high}, got {value}", param)
    return float(value)


def check_bool(value: Any, param: str) -> bool:
    if not isinstance(value, bool):
        raise bad_request(f"{param} must be true or false, got {value!r}", param)
    return value


def check_stop(value: Any, param: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return [s for s in value if s]
    raise bad_request(f"{param} must be a string or a list of strings, got {value!r}", param)


def parse_sampling_params(raw: Any, prefix: str = "sampling_params") -> SamplingParams:
    """Build SamplingParams from SGLang's ``sampling_params`` dict; unknown keys are ignored (as SGLang)."""
    if raw is None:
        return SamplingParams()
    if not isinstance(raw, dict):
        raise bad_request(f"{prefix} must be an object, got {type(raw).__name__}", prefix)
    p = SamplingParams()
    name = f"{prefix}."
    for key in ("json_schema", "regex", "ebnf", "structural_tag"):
        if raw.get(key) is not None:
            raise bad_request(f"{name}{key}: constrained decoding is not supported by the reference engine",
                              name + key)
    if raw.get("n", 1) not in (1, None):
        raise bad_request(f"{name}n: only n=1 is supported", name + "n")
    if raw.get("max_new_tokens") is not None:
        p.max_new_tokens = check_int(raw["max_new_tokens"], name + "max_new_tokens", low=0)
    if raw.get("min_new_tokens") is not None:
        p.min_new_tokens = check_int(raw["min_new_tokens"], name + "min_new_tokens", low=0)
    if raw.get("temperature") is not None:
        p.temperature = check_number(raw["temperature"], name + "temperature", low=0.0)
    if raw.get("top_p") is not None:
        p.top_p = check_number(raw["top_p"], name + "top_p", low=0.0, high=1.0)
        if p.top_p <= 0:
            raise bad_request(f"{name}top_p must be in (0, 1], got {p.top_p}", name + "top_p")
    if raw.get("top_k") is not None:
        p.top_k = check_int(raw["top_k"], name + "top_k")
        if p.top_k == 0 or p.top_k < -1:
            raise bad_request(f"{name}top_k must be -1 (all) or >= 1, got {p.top_k}", name + "top_k")
    if raw.get("min_p") is not None:
        p.min_p = check_number(raw["min_p"], name + "min_p", low=0.0, high=1.0)
    for key in ("frequency_penalty", "presence_penalty"):
        if raw.get(key) is not None:
            setattr(p, key, check_number(raw[key], name + key, low=-2.0, high=2.0))
    if raw.get("repetition_penalty") is not None:
        p.repetition_penalty = check_number(raw["repetition_penalty"], name + "repetition_penalty", low=0.0)
        if p.repetition_penalty <= 0:
            raise bad_request(f"{name}repetition_penalty must be > 0", name + "repetition_penalty")
    p.stop = check_stop(raw.get("stop"), name + "stop")
    ids = raw.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(_is_int(i) and i >= 0 for i in ids):
            raise bad_request(f"{name}stop_token_ids must be a list of token ids", name + "stop_token_ids")
        p.stop_token_ids = list(ids)
    for key in ("ignore_eos", "skip_special_tokens", "no_stop_trim"):
        if raw.get(key) is not None:
            setattr(p, key, check_bool(raw[key], name + key))
    seed = raw.get("sampling_seed", raw.get("seed"))
    if seed is not None:
        p.seed = check_int(seed, name + "sampling_seed")
    if raw.get("logit_bias") is not None:
        p.logit_bias = check_logit_bias(raw["logit_bias"], name + "logit_bias")
    return p


def check_logit_bias(value: Any, param: str) -> dict[int, float]:
    """OpenAI's (and SGLang's) logit bias: {"token id": bias from -100 to 100}."""
    if not isinstance(value, dict):
        raise bad_request(f"{param} must be an object mapping token ids to biases, got {type(value).__name__}", param)
    out: dict[int, float] = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise bad_request(f"{param}: keys must be token ids (digits), got {key!r}", param)
        out[int(key)] = check_number(bias, param, low=-100.0, high=100.0)
    return out


@dataclass
class TokenChoice:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


class SequenceSampler:
    """Per-sequence sampling state: its RNG and the output token counts the penalties need."""

    def __init__(self, params: SamplingParams, eos_ids: frozenset[int], want_logprob: bool, top_n: int) -> None:
        self.params = params
        self._rng: np.random.Generator | None = None
        self._plain_greedy = params.greedy and not params.penalized and not params.logit_bias
        bias = params.logit_bias
        self._bias_ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        self._bias = np.fromiter(bias.values(), dtype=np.float64, count=len(bias))
        self.counts: Counter[int] = Counter()
        self.generated = 0
        self.want_logprob = want_logprob
        self.top_n = top_n
        blocked = set() if params.ignore_eos else set(eos_ids)
        blocked |= set(params.stop_token_ids)
        self._min_blocked = np.array(sorted(blocked), dtype=np.int64)

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:  # created on first use: greedy requests never pay for seeding one
            seed = self.params.seed  # any integer (OpenAI's is an int64, negative too): numpy takes one >= 0
            self._rng = np.random.default_rng(None if seed is None else seed % 2**64)
        return self._rng

    @property
    def fast_greedy(self) -> bool:
        """Plain argmax is enough: greedy, no penalties, no minimum length to enforce."""
        return self._plain_greedy and self.generated >= self.params.min_new_tokens

    def choose(self, logits: np.ndarray, argmax: int | None = None) -> TokenChoice:
        """Pick the next token from one row of raw logits (float32, vocab-sized)."""
        if argmax is not None and self.fast_greedy:
            token = argmax
        else:
            token = self._sample(logits)
        choice = TokenChoice(token)
        if self.want_logprob:
            logprobs = log_softmax(logits)
            choice.logprob = float(logprobs[token])
            if self.top_n > 0:
                choice.top = top_logprobs(logprobs, self.top_n)
        self.record(token)
        return choice

    def record(self, token: int) -> None:
        """Count a token as generated (also one sampled elsewhere: a prefill worker's first token)."""
        self.counts[token] += 1
        self.generated += 1

    def _sample(self, raw: np.ndarray) -> int:
        p = self.params
        logits = raw.astype(np.float64, copy=True)
        if self._bias_ids.size:  # ids past this model's vocabulary bias nothing
            inside = self._bias_ids < logits.shape[0]
            logits[self._bias_ids[inside]] += self._bias[inside]
        if p.penalized and self.counts:
            ids = np.fromiter(self.counts.keys(), dtype=np.int64)
            cnt = np.fromiter(self.counts.values(), dtype=np.float64)
            if p.repetition_penalty != 1.0:
                sel = logits[ids]
                logits[ids] = np.where(sel > 0, sel / p.repetition_penalty, sel * p.repetition_penalty)
            logits[ids] -= p.frequency_penalty * cnt + p.presence_penalty
        if self.generated < p.min_new_tokens and self._min_blocked.size:
            logits[self._min_blocked[self._min_blocked < logits.shape[0]]] = -np.inf
        if p.greedy:
            return int(np.argmax(logits))
        logits /= p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[0]:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits - np.max(logits))
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs)
            cum = np.cumsum(probs[order])
            cut = int(np.searchsorted(cum, p.top_p)) + 1
            keep = np.zeros_like(probs)
            keep[order[:cut]] = probs[order[:cut]]
            probs = keep / keep.sum()
        if p.min_p > 0:
            probs = np.where(probs >= p.min_p * probs.max(), probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64, copy=False)
    m = np.max(x)
    return x - m - math.log(float(np.exp(x - m).sum()))


def top_logprobs(logprobs: np.ndarray, n: int) -> list[tuple[int, float]]:
    n = min(n, logprobs.shape[0])
    idx = np.argpartition(-logprobs, n - 1)[:n]
    idx = idx[np.argsort(-logprobs[idx])]
    return [(int(i), float(logprobs[i])) for i in idx]
