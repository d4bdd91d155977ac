"""Continuous batching: one loop that admits new requests between decode steps of the running batch.

Each iteration the loop (on the event loop) makes a plan: sequences that finished leave the batch,
waiting ones are admitted up to ``max_batch`` and the prefill-token budget, the running ones decode one
token. The plan runs on one worker thread (torch releases the GIL, so HTTP keeps flowing), or inline
for the emulated model. Results come back to the loop, which appends tokens and applies stop rules;
a request that arrives meanwhile joins at the next step. New sequences decode from the step after
their prefill, so a first token that already finishes a request is never extended. A decode worker's
request arrives with its KV and first token (computed by the prefill worker): the first token is
streamed when the plan admits it, and it joins that step's decode (as SGLang's decode worker does),
instead of waiting a whole step for a token already known.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from replicas.engine.backends.base import Backend
from replicas.engine.metrics import EngineMetrics
from replicas.engine.sampling import TokenChoice
from replicas.engine.sequence import Mode, Sequence

log = logging.getLogger("replicas.engine.scheduler")


@dataclass
class StepPlan:
    leave: list[int] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    admit: list[Sequence] = field(default_factory=list)
    join: list[Sequence] = field(default_factory=list)  # handed-over KV entering the batch before the decode

    @property
    def empty(self) -> bool:
        return not (self.leave or self.decode or self.admit)


@dataclass
class StepResult:
    decoded: list[tuple[Sequence, TokenChoice]] = field(default_factory=list)
    prefilled: list[tuple[Sequence, TokenChoice]] = field(default_factory=list)
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)
    # decoded, but picking its token failed: its row leaves the batch, the rest of the batch goes on
    evicted: list[tuple[Sequence, Exception]] = field(default_factory=list)
    prefill_tokens: int = 0


class Scheduler:
    def __init__(self, backend: Backend, max_batch: int, max_prefill_tokens: int, metrics: EngineMetrics) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.metrics = metrics
        self.batch = backend.new_batch()
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}
        self._leaving: list[int] = []
        self._computing: list[Sequence] = []
        self._wake = asyncio.Event()
        self._executor = None if backend.inline else ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        self._task: asyncio.Task[None] | None = None
        self._recent: deque[tuple[float, int]] = deque()
        self.kv_tokens = 0

    # -- public API (event loop) ---------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="scheduler")

    async def close(self) -> None:
        for seq in [*self.waiting, *self.running.values(), *self._computing]:
            seq.abort("server shutting down")
        self.waiting.clear()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._executor:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.metrics.num_requests.inc()
        self._update_gauges()
        self._wake.set()

    def abort(self, seq: Sequence, message: str = "client disconnected") -> None:
        """Stop a sequence wherever it is and free its KV (at the next step for a running one)."""
        if seq.finished:
            return
        seq.abort(message)
        self.metrics.num_aborted.inc()
        try:
            self.waiting.remove(seq)
        except ValueError:
            pass
        if self.running.pop(seq.key, None) is not None:
            self._leaving.append(seq.key)
        self._wake.set()

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running or self._computing)

    def gen_throughput(self, window_s: float = 5.0) -> float:
        now = time.monotonic()
        while self._recent and now - self._recent[0][0] > window_s:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / window_s

    # -- the loop ------------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            plan = self._plan()
            if plan.empty:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._computing = plan.admit
            try:
                if self._executor is None:
                    result = self._compute(plan)
                    delay = self.backend.prefill_delay_s(result.prefill_tokens)
                    if plan.decode:
                        delay += self.backend.decode_delay_s()
                    if delay > 0:
                        await asyncio.sleep(delay)
                else:
                    result = await loop.run_in_executor(self._executor, self._compute, plan)
            except Exception as e:  # the batch is in an unknown state: fail what it held, start a fresh one
                log.exception("engine step failed")
                victims = [*plan.admit, *self.running.values()]
                self.running.clear()
                self._leaving = []
                self.batch = self.backend.new_batch()
                result = StepResult(failed=[(s, e) for s in victims])
            finally:
                self._computing = []
            self._apply(result)
            await asyncio.sleep(0)  # let HTTP handlers run between steps even when compute is inline

    def _plan(self) -> StepPlan:
        plan = StepPlan(leave=self._leaving)
        self._leaving = []
        for key, seq in list(self.running.items()):
            if seq.finished:  # ended outside the loop (shutdown, failure): free its row
                del self.running[key]
                plan.leave.append(key)
        plan.decode = list(self.running.values())
        slots = self.max_batch - len(self.running)
        budget = self.max_prefill_tokens
        while self.waiting and slots > 0:
            seq = self.waiting[0]
            if seq.mode != Mode.DECODE and plan.admit and len(seq.prompt_ids) > budget:
                break
            self.waiting.popleft()
            if seq.finished:
                continue
            if seq.mode == Mode.DECODE:  # its KV and first token came from the prefill worker: nothing to compute
                if self._first_token(seq):  # it goes on: decode it in this step
                    plan.join.append(seq)
                    plan.decode.append(seq)
                    self.running[seq.key] = seq
                    slots -= 1
                continue
            plan.admit.append(seq)
            budget -= len(seq.prompt_ids)
            if seq.mode != Mode.PREFILL:
                slots -= 1
        return plan

    def _compute(self, plan: StepPlan) -> StepResult:
        """Worker thread: leave, one decode step for the running batch, then prefill the admitted."""
        result = StepResult()
        for key in plan.leave:
            self.batch.leave(key)
        if plan.leave and not plan.decode:
            self.batch.compact()
        for seq in plan.join:
            self.batch.join(seq.key, seq.kv)
            seq.kv = None
        if plan.decode:
            keys, logits = self.batch.step({s.key: s.output_ids[-1] for s in plan.decode})
            by_key = {s.key: s for s in plan.decode}
            argmax = logits.argmax(axis=1) if logits.size else np.zeros(0, dtype=np.int64)
            for row, key in enumerate(keys):
                seq = by_key[key]
                try:  # one sequence's sampling must not fail the batch it shares
                    result.decoded.append((seq, seq.sampler.choose(logits[row], int(argmax[row]))))
                except Exception as e:
                    log.exception("sampling failed for %s", key)
                    result.evicted.append((seq, e))
        for seq in plan.admit:
            try:
                result.prefilled.append((seq, self._admit(seq)))
                result.prefill_tokens += len(seq.prompt_ids)
            except Exception as e:
                log.exception("prefill failed")
                result.failed.append((seq, e))
        self.kv_tokens = self.batch.kv_tokens()
        return result

    def _first_token(self, seq: Sequence) -> bool:
        """Stream a handed-over request's first token now (event loop); False when that token ended it."""
        choice = seq.first_choice
        assert choice is not None  # the engine submits a handed-over request with it
        now = time.monotonic()
        if seq.max_new_tokens <= 0:
            seq.first_token_at = now
            seq.finish({"type": "length", "length": 0})
        else:
            seq.sampler.record(choice.token)
            seq.add_token(choice)
            self.metrics.observe_first_token(seq, now)
            self._generated(now, 1)
            if seq.finished:
                self._done(seq)
        if seq.finished:
            seq.kv = None
            return False
        return True

    def _generated(self, now: float, tokens: int) -> None:
        self._recent.append((now, tokens))
        self.metrics.generation_tokens.inc(tokens)

    def _admit(self, seq: Sequence) -> TokenChoice:
        """Worker thread: prefill a prompt; keep its KV in the batch, or for a prefill worker, to hand over."""
        out = self.backend.prefill(seq.prompt_ids, seq.logits_rows())
        if seq.item.return_logprob:
            seq.set_input_logprobs(out.prompt_logits)
        choice = seq.sampler.choose(out.logits, int(out.logits.argmax()))
        if seq.mode == Mode.PREFILL:
            seq.handoff_layers = self.backend.export_kv(out.kv)
        else:
            self.batch.join(seq.key, out.kv)
        return choice

    def _apply(self, result: StepResult) -> None:
        from replicas.engine.errors import ApiError

        now = time.monotonic()
        generated = 0
        for seq, err in result.failed:  # never joined the batch, or the batch was replaced
            self.running.pop(seq.key, None)
            seq.fail(ApiError(500, f"engine step failed: {err!r}"))
        for seq, err in result.evicted:
            self.running.pop(seq.key, None)
            self._leaving.append(seq.key)
            seq.fail(ApiError(500, f"sampling failed: {err!r}"))
        for seq, choice in result.prefilled:
            if seq.finished:  # aborted while computing
                if seq.mode != Mode.PREFILL:
                    self._leaving.append(seq.key)
                continue
            if seq.mode == Mode.PREFILL:
                seq.first_choice = choice
                seq.first_token_at = now
                seq.finish({"type": "length", "length": 0})
                continue
            if seq.max_new_tokens <= 0:
                seq.first_token_at = now
                seq.finish({"type": "length", "length": 0})
                self._leaving.append(seq.key)
                continue
            seq.add_token(choice)
            generated += 1
            self.metrics.observe_first_token(seq, now)
            if seq.finished:
                self._leaving.append(seq.key)
                self._done(seq)
            else:
                self.running[seq.key] = seq
        for seq, choice in result.decoded:
            if seq.finished:
                continue
            seq.add_token(choice)
            generated += 1
            if seq.finished:
                self.running.pop(seq.key, None)
                self._leaving.append(seq.key)
                self._done(seq)
        if generated:
            self._generated(now, generated)
        if result.prefill_tokens:
            self.metrics.prompt_tokens.inc(result.prefill_tokens)
        self._update_gauges()

    def _done(self, seq: Sequence) -> None:
        self.metrics.observe_finished(seq)

    def _update_gauges(self) -> None:
        self.metrics.num_running.set(len(self.running))
        self.metrics.num_queue.set(len(self.waiting))
        self.metrics.num_used_tokens.set(self.kv_tokens)
