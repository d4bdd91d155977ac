"""Token generation across pairs: retry before the first token, migrate after it.

The gateway sends SGLang-native ``/generate`` with ``input_ids`` and reads the worker's stream of
output ids. Every id produced so far is kept, so when an attempt fails, before or after the client
has seen bytes, the next attempt on a new pair is ``input_ids = prompt_ids + output_ids`` with the
remaining token budget: with greedy sampling the continuation is exactly what the dead worker would
have produced, and the client's stream goes on with nothing missing or repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.context import Gateway
from gateway.errors import ApiError
from gateway.sse import sse_payloads
from gateway.upstream import UpstreamError, bootstrap_fields, error_param
from gateway.upstream_http import UpstreamIOError

log = logging.getLogger("gateway.generation")

_READ_ERRORS = (UpstreamIOError,)


@dataclass
class Logprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def upstream_to_api(err: UpstreamError) -> ApiError:
    """What the client is told when no attempt is left."""
    if err.timeout:
        return ApiError(504, f"upstream timed out: {err.message}", code="upstream_timeout")
    if err.status is not None and 400 <= err.status < 500 and err.status not in (408, 429):
        return ApiError(err.status, err.message, param=error_param(err.body), code="upstream_rejected")
    return ApiError(502, f"upstream failed: {err.message}", code="upstream_error")


def _chunk_ids(chunk: dict[str, Any], seen: int) -> tuple[list[int], bool]:
    """New output ids in one stream event and whether the event's lists are cumulative (SGLang's
    default) rather than only the new items (``--incremental-streaming-output``)."""
    ids = chunk.get("output_ids")
    if not ids:
        return [], True
    meta = chunk.get("meta_info") or {}
    total = meta.get("completion_tokens")
    if isinstance(total, int) and total == seen + len(ids) and len(ids) != total:
        return ids, False
    return ids[seen:], True


def _chunk_logprobs(chunk: dict[str, Any], seen: int, cumulative: bool) -> list[Logprob]:
    meta = chunk.get("meta_info") or {}
    lps = meta.get("output_token_logprobs")
    if not lps:
        return []
    tops = meta.get("output_top_logprobs") or []
    start = seen if cumulative else 0
    out = []
    for i, item in enumerate(lps[start:], start):
        top = tops[i] if i < len(tops) and tops[i] else []
        out.append(Logprob(int(item[1]), float(item[0]), [(int(t[1]), float(t[0])) for t in top]))
    return out


@dataclass
class Step:
    """One event of a worker's stream, as seen by the generation."""

    ids: list[int]  # output ids new in this event
    chunk: dict[str, Any]  # the event itself
    raw: bytes  # ... and its bytes as the worker sent them
    offset: int  # output ids produced by earlier attempts (0 until a migration)
    cumulative: bool  # the event's lists hold the whole attempt's output (SGLang's default), not just the new


class TokenGeneration:
    """One prompt's generation, possibly spread over several pairs.

    ``extra`` holds further /generate fields to send on every attempt (a native client's own options).
    """

    def __init__(self, gw: Gateway, prompt_ids: list[int], sampling: dict[str, Any], max_new_tokens: int,
                 logprobs: int | None = None, extra: dict[str, Any] | None = None) -> None:
        self.gw = gw
        self.extra = extra or {}
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.logprobs = logprobs  # None = not requested; else how many top alternatives
        self.output_ids: list[int] = []
        self.output_logprobs: list[Logprob] = []
        self.finish_reason: str | None = None
        self.matched_stop: Any = None
        self.attempts = 0
        self.migrations = 0
        self.pairs_used: list[str] = []
        self.delivered = False  # set by the caller once bytes of this answer reached the client

    def _body(self, pair_bootstrap: dict[str, Any] | None) -> bytes:
        sampling = dict(self.sampling)
        done = len(self.output_ids)
        sampling["max_new_tokens"] = self.max_new_tokens - done
        if done and "min_new_tokens" in sampling:  # a continuation owes only what is still missing
            sampling["min_new_tokens"] = max(0, sampling["min_new_tokens"] - done)
        body: dict[str, Any] = {**self.extra, "input_ids": self.prompt_ids + self.output_ids,
                                "sampling_params": sampling, "stream": True}
        if self.logprobs is not None:
            body["return_logprob"] = True
            body["top_logprobs_num"] = self.logprobs
            body["logprob_start_len"] = -1
        if pair_bootstrap:
            body.update(pair_bootstrap)
        return orjson.dumps(body)

    async def tokens(self) -> AsyncIterator[list[int]]:
        """New output ids as they come; ends when the generation has finished. Raises ApiError."""
        async with contextlib.aclosing(self.steps()) as steps:
            async for step in steps:
                if step.ids:
                    yield step.ids

    async def steps(self) -> AsyncIterator[Step]:
        """Every event of the answer, across attempts; ends when the generation has finished. Raises ApiError."""
        gw = self.gw
        avoid: set = set()
        tokens = len(self.prompt_ids) + self.max_new_tokens
        while True:
            if len(self.output_ids) >= self.max_new_tokens:  # the last attempt died right after its last token
                self.finish_reason = "length"
                gw.workload.record(len(self.prompt_ids), len(self.output_ids))
                return
            pair = await gw.choose_pair(avoid)  # 503 no_workers when none comes
            self.pairs_used.append(pair.label())
            ex = gw.exchange(pair, b"/generate", tokens, stream=True)
            outcome: bool | None = None
            try:
                resp = await ex.open(self._body(None if pair.colocated else bootstrap_fields(pair)))
                seen = 0
                offset = len(self.output_ids)
                async for payload in sse_payloads(resp):
                    chunk = orjson.loads(payload)
                    if "error" in chunk:
                        raise UpstreamError(f"{pair.decode.role} worker {pair.decode.name} stream error: "
                                            f"{chunk['error']}", worker=pair.decode)
                    ids, cumulative = _chunk_ids(chunk, seen)
                    if self.logprobs is not None:
                        self.output_logprobs.extend(_chunk_logprobs(chunk, seen, cumulative))
                    seen += len(ids)
                    finish = (chunk.get("meta_info") or {}).get("finish_reason")
                    self.output_ids.extend(ids)
                    yield Step(ids, chunk, payload, offset, cumulative)
                    if finish:
                        self._finish(finish, pair)
                        break
                if self.finish_reason is None:
                    raise UpstreamError(f"{pair.decode.role} worker {pair.decode.name} ended the stream early",
                                        worker=pair.decode)
                outcome = True
                gw.workload.record(len(self.prompt_ids), len(self.output_ids))
                return
            except UpstreamError as e:
                err = e
                outcome = False if e.worker is pair.decode else None
            except _READ_ERRORS as e:
                err = ex.failure(e)
                outcome = False if err.worker is pair.decode else None
            except orjson.JSONDecodeError as e:
                err = UpstreamError(f"worker {pair.decode.name} sent a malformed event: {e}", worker=pair.decode)
                outcome = False
            finally:
                await ex.close(outcome)
            await self._next_attempt(err, avoid)

    def _finish(self, finish: dict[str, Any] | str, pair: Any) -> None:
        kind = finish.get("type") if isinstance(finish, dict) else str(finish)
        if kind == "abort":
            message = finish.get("message", "aborted") if isinstance(finish, dict) else "aborted"
            raise UpstreamError(f"worker {pair.decode.name} aborted the request: {message}", worker=pair.decode)
        self.finish_reason = "length" if kind == "length" else "stop"
        if isinstance(finish, dict):
            self.matched_stop = finish.get("matched")

    async def _next_attempt(self, err: UpstreamError, avoid: set) -> None:
        """Decide whether to go on after a failed attempt (raises ApiError if not)."""
        gw = self.gw
        if err.worker is not None:
            avoid.add(err.worker)
        if not err.retryable:
            raise upstream_to_api(err)
        if self.delivered or self.output_ids:
            self.migrations += 1
            if self.migrations > gw.cfg.max_migrations:
                raise upstream_to_api(err)
            gw.metrics.migrations.inc()
            log.warning("migrating after %d tokens (%s)", len(self.output_ids), err.message)
        else:
            self.attempts += 1
            if self.attempts >= gw.cfg.max_attempts:
                raise upstream_to_api(err)
            gw.metrics.retries.inc()
            log.warning("retrying on a new pair (%s)", err.message)
            await asyncio.sleep(gw.retry_backoff_s(self.attempts))
