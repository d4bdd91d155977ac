"""What the gateway serves, counted for the controller: finished requests, their prompt and output lengths, their
TTFT and TPOT (histograms) and whether they met the plan's SLO.

The request path only adds to a few floats; a background task adds them to the shared 10 s bucket in Redis every
``FLUSH_S`` (``StateStore.record_workload``, HINCRBYFLOAT, so every gateway's counts sum). The controller reads
the buckets back to see the workload shift (``planner.observed_workload``) and whether the SLO is met live
(``Controller.check_slo``), and ``tsctl status`` shows both. A flush that fails (Redis away)
keeps the counts for the next one.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import re
from typing import Any

from planner.state import LATENCY_BOUNDS_S, LATENCY_KEYS, WORKLOAD_FIELDS, StateStore

log = logging.getLogger("gateway")

FLUSH_S = 5.0
STREAM_TAIL_BYTES = 4096  # how much of a relayed stream's end is searched for its lengths
_PROMPT = re.compile(rb'"prompt_tokens":\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens":\s*(\d+)')


def _last_int(pattern: re.Pattern[bytes], data: bytes) -> int | None:
    """The last match (a stream's final event carries the totals)."""
    found = pattern.findall(data)
    return int(found[-1]) if found else None


class StreamTail:
    """The last ``STREAM_TAIL_BYTES`` (at least) of a stream relayed chunk by chunk, wherever the chunks split its
    final event (which carries the lengths). Trimmed once per ``STREAM_TAIL_BYTES`` added, so keeping it costs
    a constant per byte however small the chunks are."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def add(self, chunk: bytes) -> None:
        self._buf += chunk
        if len(self._buf) > 2 * STREAM_TAIL_BYTES:
            del self._buf[:-STREAM_TAIL_BYTES]

    def data(self) -> bytes:
        return bytes(self._buf)


def slo_targets(slo: dict[str, Any] | None) -> tuple[float, float] | None:
    """(TTFT, TPOT) in seconds from a plan's ``slo``; None when the plan has none (e.g. a hand-written one)."""
    try:
        return float(slo["ttft_s"]), float(slo["tpot_s"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None


class WorkloadMeter:
    def __init__(self) -> None:
        self.counts = dict.fromkeys(WORKLOAD_FIELDS, 0.0)
        self.slo: tuple[float, float] | None = None  # (TTFT, TPOT) targets of the plan in use

    def timed(self, ttft_s: float, tpot_s: float | None) -> None:
        """One answered request's TTFT (arrival at the gateway to its first token) and TPOT (mean time per output
        token after the first; None with one token), judged against the plan's SLO when there is one."""
        c = self.counts
        c[LATENCY_KEYS["ttft"][bisect.bisect_left(LATENCY_BOUNDS_S, ttft_s)]] += 1
        if tpot_s is not None:
            c[LATENCY_KEYS["tpot"][bisect.bisect_left(LATENCY_BOUNDS_S, tpot_s)]] += 1
        if self.slo is not None:
            ttft_max, tpot_max = self.slo
            c["judged"] += 1
            c["slo_met"] += ttft_s <= ttft_max and (tpot_s is None or tpot_s <= tpot_max)

    def timed_span(self, ttft_s: float, e2e_s: float, output_tokens: int) -> None:
        """``timed`` from when the first and the last token went out."""
        self.timed(ttft_s, (e2e_s - ttft_s) / (output_tokens - 1) if output_tokens > 1 else None)

    def record(self, prompt_tokens: int, output_tokens: int) -> None:
        """One finished request."""
        c = self.counts
        c["requests"] += 1
        c["input_sum"] += prompt_tokens
        c["input_sq"] += prompt_tokens * prompt_tokens
        c["output_sum"] += output_tokens
        c["output_sq"] += output_tokens * output_tokens

    def record_answer(self, data: bytes, ttft_s: float | None = None, e2e_s: float | None = None) -> None:
        """A pass-through answer's lengths, from decode's last ``prompt_tokens`` and ``completion_tokens``
        (SGLang's ``meta_info``, or OpenAI's ``usage``) in ``data``: a JSON body, or the end of a stream; with its
        timing when it was streamed (a whole answer's first token is not seen). Best effort: the gateway does not
        parse what it relays, so an answer without them is not counted."""
        prompt = _last_int(_PROMPT, data)
        output = _last_int(_COMPLETION, data)
        if prompt is not None and output is not None:
            self.record(prompt, output)
            if ttft_s is not None and e2e_s is not None:
                self.timed_span(ttft_s, e2e_s, output)

    async def flush(self, state: StateStore) -> None:
        """Add what was counted since the last flush to Redis (kept here if Redis fails)."""
        if not any(self.counts.values()):
            return
        taken, self.counts = self.counts, dict.fromkeys(WORKLOAD_FIELDS, 0.0)
        try:
            await state.record_workload(taken)
        except Exception:
            for k, v in taken.items():
                self.counts[k] += v
            raise

    async def run(self, state: StateStore, every_s: float = FLUSH_S) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.flush(state)
            except Exception as e:  # Redis away: the counts wait for the next flush
                log.warning("cannot record the workload in Redis: %s", e)
