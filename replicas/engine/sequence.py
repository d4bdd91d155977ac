"""One generation request inside the engine: its prompt, sampler, output so far, and how it ends.

The scheduler's worker thread only samples into ``TokenChoice`` objects; everything here (appending
tokens, detokenizing, stop checks, waking the HTTP handler) runs on the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from replicas.engine.errors import ApiError
from replicas.engine.sampling import SamplingParams, SequenceSampler, TokenChoice
from replicas.engine.tokenizer import IncrementalDetokenizer, Tokenizer

_keys = itertools.count(1)


class Mode(StrEnum):
    LOCAL = "local"  # prefill and decode here (role both, or SGLang's fake bootstrap host)
    PREFILL = "prefill"  # compute the prompt's KV + first token, hand them to a decode worker
    DECODE = "decode"  # continue from the KV a prefill worker sent


@dataclass
class GenerateItem:
    """One parsed request (a batch request becomes several), independent of the HTTP route."""

    input_ids: list[int]
    params: SamplingParams
    rid: str
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    bootstrap_room: int | None = None
    kv_compression: str | None = None
    input_field: str = "input_ids"  # the request field the prompt came from, for error messages


@dataclass
class Sequence:
    item: GenerateItem
    mode: Mode
    tokenizer: Tokenizer
    context_length: int
    key: int = field(default_factory=lambda: next(_keys))
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float | None] = field(default_factory=list)
    output_top: list[list[tuple[int, float]] | None] = field(default_factory=list)
    input_logprobs: list[tuple[float | None, int]] | None = None
    text: str = ""
    finish_reason: dict[str, Any] | None = None
    error: ApiError | None = None
    aborted: bool = False
    # Handed between the loop and the worker thread: KV to join the batch with, the first token a
    # prefill worker sampled (decode mode), the KV to hand over (prefill mode).
    kv: Any = None
    first_choice: TokenChoice | None = None
    handoff_layers: Any = None
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None

    def __post_init__(self) -> None:
        p = self.item.params
        self.sampler = SequenceSampler(p, self.tokenizer.eos_token_ids, self.item.return_logprob,
                                       self.item.top_logprobs_num)
        self.detok = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens)
        self._changed = asyncio.Event()
        self._stop_tail = max((len(s) for s in p.stop), default=0)

    # -- state ---------------------------------------------------------------------------------------
    @property
    def prompt_ids(self) -> list[int]:
        return self.item.input_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    @property
    def max_new_tokens(self) -> int:
        return min(self.item.params.max_new_tokens, self.context_length - len(self.prompt_ids))

    def logits_rows(self) -> int:
        """How many final positions of the prompt need logits: 1, or more for prompt log-probs."""
        if not self.item.return_logprob or self.mode == Mode.DECODE:
            return 1
        return len(self.prompt_ids) - self.logprob_start() + 1

    def logprob_start(self) -> int:
        start = self.item.logprob_start_len
        n = len(self.prompt_ids)
        return n - 1 if start < 0 else min(start, n - 1)

    # -- updates (event loop) ------------------------------------------------------------------------
    def add_token(self, choice: TokenChoice) -> None:
        """Append one sampled token and apply the stop rules (EOS, stop ids, stop strings, length)."""
        if self.finished:
            return
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        p = self.item.params
        token = choice.token
        self.output_ids.append(token)
        self.output_logprobs.append(choice.logprob)
        self.output_top.append(choice.top)
        if (token in self.tokenizer.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            self.text += self.detok.flush()
            self.finish({"type": "stop", "matched": token})
            return
        delta = self.detok.add(token)
        self.text += delta
        if delta and p.stop and self._apply_stop_strings(len(delta)):
            return
        if len(self.output_ids) >= self.max_new_tokens:
            self.text += self.detok.flush()
            if p.stop:
                self._apply_stop_strings(len(self.text))
            if not self.finished:
                self.finish({"type": "length", "length": len(self.output_ids)})
            return
        self.notify()

    def _apply_stop_strings(self, delta_len: int) -> bool:
        p = self.item.params
        start = max(0, len(self.text) - delta_len - self._stop_tail + 1)
        hits = [(pos, s) for s in p.stop if (pos := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        pos, s = min(hits)
        self.text = self.text[: pos + len(s)] if p.no_stop_trim else self.text[:pos]
        self.finish({"type": "stop", "matched": s})
        return True

    def set_input_logprobs(self, rows: Any) -> None:
        """Prompt log-probs from the prefill's logits rows (see PrefillResult.prompt_logits)."""
        from replicas.engine.sampling import log_softmax

        ids = self.prompt_ids
        n = len(ids)
        start = self.logprob_start()
        out: list[tuple[float | None, int]] = []
        first_row = n - (0 if rows is None else rows.shape[0])
        for j in range(start, n):
            r = j - 1 - first_row
            if j == 0 or rows is None or r < 0:
                out.append((None, ids[j]))
            else:
                out.append((float(log_softmax(rows[r])[ids[j]]), ids[j]))
        self.input_logprobs = out

    def finish(self, reason: dict[str, Any]) -> None:
        if self.finished:
            return
        self.finish_reason = reason
        self.finished_at = time.monotonic()
        self.notify()

    def fail(self, err: ApiError) -> None:
        if self.finished:
            return
        self.error = err
        self.finished_at = time.monotonic()
        self.notify()

    def abort(self, message: str = "aborted") -> None:
        self.aborted = True
        self.finish({"type": "abort", "message": message})

    def notify(self) -> None:
        self._changed.set()

    async def changed(self) -> None:
        """Wait until something new happened (tokens, finish); several tokens may have arrived."""
        await self._changed.wait()
        self._changed.clear()

    async def wait_finished(self) -> None:
        while not self.finished:
            await self.changed()
