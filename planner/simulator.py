"""Discrete-event simulation of a plan: continuous batching on every replica, KV transfer on every link.

Per replica role:

* ``prefill``: waiting prompts are batched up to ``max_batch_tokens`` (longer prompts are chunked);
  a batch flows through the pipeline stages, each stage a FIFO server, so stage 1 takes the next
  batch while stage 2 works; finished prompts ship their KV to the chosen decode replica.
* ``decode``: a running batch; a request joins at an iteration boundary when its KV has arrived
  and its full length fits in the KV cache (FIFO admission); its first token (computed by prefill)
  is emitted on joining, then one token per iteration of ``decode_step_time(batch, context)``.
* ``both`` (colocated), as the replica's engine setting says: prefill first (SGLang's default):
  waiting prompts run as a prefill iteration (up to its chunk of tokens) that stalls the running
  decode batch, else a decode iteration; or mixed chunks (``mixed_chunk``, SGLang
  ``--enable-mixed-chunk``, vLLM's chunked prefill): every iteration carries the running decodes
  plus up to ``prefill_chunk - batch`` prompt tokens and lasts as long as that whole pass
  (``ReplicaModel.mixed_step_time``), so decodes advance during prefill but every chunk slows them.
  A chunk that continues a prompt attends to (and reads the KV of) the prompt's earlier chunks.

KV transfer: the prompt's KV, split by layer over the stage pairs whose layer ranges overlap, each
part queued on its source node's NIC (FIFO) when it crosses nodes, or over the GPU link when it
does not; compressed parts add a quantize and a dequantize pass.

A request's TTFT ends at its first token, TPOT = (finish - first token) / (output - 1); it attains
the SLO when both are within target. Every admitted request finishes exactly once (the property
tests check it); a request too long for its decode replica's KV cache is refused, not admitted.

``Preemption`` replays a node loss at time t: replicas on the lost nodes die, their requests are
resent (prompt + tokens so far, as the gateway's migration does) on the rescheduled plan, which
takes over routing at t; flipped replicas finish their old-role work before switching; replicas
new in the rescheduled plan start after ``load_s``.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from planner.bisection import narrow
from planner.cost_model import KV_FACTOR, ReplicaModel, kv_segments
from planner.deployment import materialize
from planner.plan import Plan
from planner.work import charge
from planner.workload import SLO, Request, Workload


@dataclass(frozen=True)
class Preemption:
    at: float
    lost_nodes: tuple[str, ...]
    new_plan: Plan
    load_s: float = 30.0  # weight load + start-up of replicas that are new in new_plan


@dataclass
class SimResult:
    requests: int  # arrived
    admitted: int
    finished: int
    attained: int
    ttft: np.ndarray
    tpot: np.ndarray
    e2e: np.ndarray
    duration_s: float
    overloaded: bool = False
    retried: int = 0
    finished_ids: list[int] = field(default_factory=list, repr=False)
    steady_attainment: float = 1.0  # the same share over the requests after the warm-up (WARMUP_SHARE)
    # per finished request, seconds from arrival to the end of its prompt's last prefill pass (before
    # any KV transfer and the wait to join a decode step; a colocated replica's first token): the
    # part of the TTFT the capacity model's prefill queue estimates
    prefill_s: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def attainment(self) -> float:
        return self.attained / self.requests if self.requests else 1.0

    def percentiles(self) -> dict[str, float]:
        def pct(a: np.ndarray, q: float) -> float:
            return float(np.percentile(a, q)) if len(a) else math.nan

        return {f"{name}_p{q}": pct(arr, q) for name, arr in (("ttft", self.ttft), ("tpot", self.tpot),
                                                              ("e2e", self.e2e)) for q in (50, 90, 99)}


class _Req:
    __slots__ = ("arrival", "attempt", "chunk_left", "compression", "decode", "done_at", "first", "gen", "id", "inp",
                 "join_iter", "out", "prefill", "prefilled", "total_out")

    def __init__(self, r: Request) -> None:
        self.id = r.id
        self.arrival = r.arrival
        self.inp = r.input_len
        self.out = r.output_len
        self.total_out = r.output_len
        self.gen = 0  # tokens emitted so far
        self.first: float | None = None
        self.prefilled: float | None = None  # when its prompt's last prefill pass ended (the latest attempt)
        self.done_at: float | None = None
        self.attempt = 0
        self.prefill = self.decode = ""
        self.join_iter = 0
        self.chunk_left = 0
        self.compression = "none"

    def latencies(self) -> tuple[float, float]:
        """(TTFT, TPOT) of a finished request, or TTFT so far of one that has its first token: what the
        SLO judges (an orphan, finished before any token, takes its end as its first token)."""
        first = self.first if self.first is not None else self.done_at
        assert first is not None
        end = self.done_at if self.done_at is not None else first
        return first - self.arrival, (end - first) / (self.total_out - 1) if self.total_out > 1 else 0.0


class _Replica:
    def __init__(self, rid: str, role: str, rm: ReplicaModel, nodes: set[str], max_batch_tokens: int,
                 mixed: bool = False) -> None:
        self.id, self.role, self.rm, self.nodes = rid, role, rm, nodes
        self.pending_role: str | None = None
        self.alive = True
        self.ready_at = 0.0
        self.max_batch_tokens = max_batch_tokens  # prefill tokens per pass (SGLang chunked_prefill_size)
        self.mixed = mixed  # colocated: prefill chunks ride with the decode batch (--enable-mixed-chunk)
        self.prefill_q: deque[_Req] = deque()
        self.stage_free = [0.0] * len(rm.stages)
        self.prefill_busy = False  # stage 0 occupied (prefill role) / a prefill iteration running (both)
        self.in_prefill = 0  # prompts inside the pipeline
        self.wait_q: deque[_Req] = deque()  # decode: KV arrived, not yet admitted
        self.active: list[_Req] = []
        self.finish_heap: list[tuple[int, int, _Req]] = []
        self.iter_no = 0
        self.iterating = False
        self.kv_used = 0.0
        self.ctx_sum = 0.0
        self.capacity = rm.kv_tokens

    def idle(self) -> bool:
        return (not self.prefill_q and not self.wait_q and not self.active and not self.iterating
                and not self.prefill_busy and self.in_prefill == 0)


class Simulator:
    """One run of a plan over a list of requests."""

    def __init__(self, plan: Plan, slo: SLO, *, workload: Workload | None = None, max_batch_tokens: int = 8192,
                 seed: int = 0, overload_factor: float = 8.0, context: dict | None = None) -> None:
        """``context``: overrides of the plan's context (``model``, ``eff``: ``deployment.plan_context``), to
        simulate a device the catalog does not describe, such as the CPU the reference engine runs on."""
        self.slo = slo
        self.context = context or {}
        self.seed = seed
        self.max_batch_tokens = max_batch_tokens
        self.overload_factor = overload_factor
        self.workload = workload
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = 0
        self.now = 0.0
        self.replicas: dict[str, _Replica] = {}
        self.egress_free: dict[str, float] = {}
        self.rng = random.Random(seed + 7919)
        self.finished: list[_Req] = []
        self.finished_ids: set[int] = set()
        self.retried = 0
        self._install(plan, start=0.0, load_s=0.0)

    # -- plan ----------------------------------------------------------------------------------
    def _install(self, plan: Plan, start: float, load_s: float) -> None:
        mat = materialize(plan, workload=self.workload, slo=self.slo, **self.context)
        self.ctx = mat.ctx
        self.cluster = mat.ctx.cluster
        for spec in plan.replicas:
            rep = self.replicas.get(spec.id)
            same = rep is not None and rep.alive and list(rep.rm.stages) == list(mat.models[spec.id].stages)
            chunk = spec.prefill_chunk or self.max_batch_tokens
            mixed = spec.role == "both" and spec.mixed_chunk
            if same:
                assert rep is not None
                rep.max_batch_tokens, rep.mixed = chunk, mixed
                if rep.role != spec.role:
                    rep.pending_role = spec.role
                    if self._old_work_done(rep):
                        rep.role, rep.pending_role = spec.role, None
            else:
                rep = _Replica(spec.id, spec.role, mat.models[spec.id], set(spec.node_ids), chunk, mixed=mixed)
                rep.ready_at = start + load_s
                self.replicas[spec.id] = rep
        live = {r.id for r in plan.replicas}
        for rid, rep in self.replicas.items():
            if rid not in live:
                rep.alive = False
        routes = [(r.prefill, r.decode, r.weight, r.kv_compression) for r in plan.routing]
        self.routes = routes
        w = np.array([r[2] for r in routes], dtype=float)
        self.route_cum = list(np.cumsum(w / w.sum())) if w.sum() > 0 else [1.0] * len(routes)
        self._segments: dict[tuple[str, str], list[tuple[str, str, int]]] = {}

    def _segs(self, p: _Replica, d: _Replica) -> list[tuple[str, str, int]]:
        key = (p.id, d.id)
        if key not in self._segments:
            self._segments[key] = kv_segments(p.rm, d.rm)
        return self._segments[key]

    # -- events --------------------------------------------------------------------------------
    def _push(self, t: float, kind: str, payload: object) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def _dispatch(self, req: _Req) -> None:
        if not self.routes:
            self._refuse(req)
            return
        i = 0
        if len(self.routes) > 1:
            i = min(bisect.bisect_right(self.route_cum, self.rng.random()), len(self.routes) - 1)
        p, d, _, comp = self.routes[i]
        req.prefill, req.decode, req.compression = p, d, comp
        req.attempt += 1
        dec = self.replicas[d]
        if req.inp + req.out > dec.capacity:
            self._refuse(req)
            return
        rep = self.replicas[p]
        req.chunk_left = req.inp
        rep.prefill_q.append(req)
        self._kick(rep)

    def _refuse(self, req: _Req) -> None:
        self.refused += 1

    def _kick(self, rep: _Replica) -> None:
        """Start whatever the replica can start now."""
        if not rep.alive:
            return
        if rep.pending_role and self._old_work_done(rep):
            rep.role, rep.pending_role = rep.pending_role, None
        if self.now < rep.ready_at:
            self._push(rep.ready_at, "wake", rep)
            return
        role = rep.role
        if role == "prefill":
            if not rep.prefill_busy and rep.prefill_q:
                self._start_prefill(rep, pipelined=True)
        elif role == "decode":
            if not rep.iterating:
                self._start_decode_iter(rep)
        elif rep.mixed:  # both, mixed chunks: every iteration carries the decodes and a prefill chunk
            if not rep.iterating:
                self._start_mixed_iter(rep)
        elif not rep.iterating and not rep.prefill_busy:  # both: prefill first, if its KV fits
            head = rep.prefill_q[0] if rep.prefill_q else None
            fits = head is not None and (head.chunk_left < head.inp
                                         or rep.kv_used + head.inp + head.out <= rep.capacity)
            if fits:
                self._start_prefill(rep, pipelined=False)
            else:
                self._start_decode_iter(rep)

    def _take_batch(self, rep: _Replica, budget: int | None = None) -> list[tuple[_Req, int]]:
        budget = rep.max_batch_tokens if budget is None else budget
        batch: list[tuple[_Req, int]] = []
        reserve = 0.0
        while rep.prefill_q and budget > 0:
            req = rep.prefill_q[0]
            if rep.role == "both" and req.chunk_left == req.inp:
                if rep.kv_used + reserve + req.inp + req.out > rep.capacity:
                    break
                reserve += req.inp + req.out
            take = min(req.chunk_left, budget)
            batch.append((req, take))
            budget -= take
            req.chunk_left -= take
            if req.chunk_left == 0:
                rep.prefill_q.popleft()
        if rep.role == "both":
            rep.kv_used += reserve
        return batch

    def _start_prefill(self, rep: _Replica, pipelined: bool) -> None:
        batch = self._take_batch(rep)
        if not batch:
            if rep.role == "both":
                self._start_decode_iter(rep)
            return
        tokens = sum(t for _, t in batch)
        sq, _ = _chunk_attention(batch)
        times = rep.rm.prefill_stage_times(tokens, sq, len(batch))
        times[0] += rep.rm.eff.step_overhead_s
        t = self.now
        if pipelined:
            for s, dur in enumerate(times):
                t = max(t, rep.stage_free[s]) + dur
                rep.stage_free[s] = t
            rep.prefill_busy = True
            rep.in_prefill += 1
            self._push(rep.stage_free[0], "stage0_free", rep)
        else:
            t = self.now + sum(times)
            rep.prefill_busy = True
            rep.in_prefill += 1
        done = [(req, req.attempt) for req, _ in batch if req.chunk_left == 0]
        self._push(t, "prefill_done", (rep, done, pipelined))

    def _start_decode_iter(self, rep: _Replica) -> None:
        # admit arrived KV (decode) in FIFO order while it fits
        while rep.wait_q and rep.role == "decode":
            req = rep.wait_q[0]
            need = req.inp + req.out
            if rep.kv_used + need > rep.capacity:
                break
            rep.wait_q.popleft()
            rep.kv_used += need
            self._join(rep, req)
        if not rep.active:
            rep.iterating = False
            if rep.pending_role and self._old_work_done(rep):
                self._kick(rep)
            return
        b = len(rep.active)
        dur = rep.rm.decode_step_time(b, rep.ctx_sum)
        rep.iterating = True
        self._push(self.now + dur, "decode_iter", rep)

    def _start_mixed_iter(self, rep: _Replica) -> None:
        """Colocated with mixed chunks: one pass over the weights for the running decodes plus up to
        ``max_batch_tokens - batch`` prompt tokens (SGLang's mixed-chunk budget)."""
        b = len(rep.active)
        batch = self._take_batch(rep, max(rep.max_batch_tokens - b, 0)) if rep.prefill_q else []
        if not batch:
            if not b:
                rep.iterating = False
                if rep.pending_role and self._old_work_done(rep):
                    self._kick(rep)
                return
            rep.iterating = True  # nothing to prefill: a plain decode step
            self._push(self.now + rep.rm.decode_step_time(b, rep.ctx_sum), "mixed_iter", (rep, ()))
            return
        tokens = sum(t for _, t in batch)
        sq, prefix = _chunk_attention(batch)
        done = [(req, req.attempt) for req, _ in batch if req.chunk_left == 0]
        dur = rep.rm.mixed_step_time(b, rep.ctx_sum, tokens, sq, len(done), prefix)
        rep.iterating = True
        self._push(self.now + dur, "mixed_iter", (rep, done))

    def _join(self, rep: _Replica, req: _Req) -> None:
        """Request enters the running batch with its first token already produced."""
        if req.first is None:
            req.first = self.now
        if req.gen == 0:
            req.gen = 1
        if req.gen >= req.out:
            self._finish(rep, req, ctx=0.0, held=req.inp + req.out)
            return
        req.join_iter = rep.iter_no
        remaining = req.out - req.gen
        heapq.heappush(rep.finish_heap, (rep.iter_no + remaining, req.id, req))
        rep.active.append(req)
        rep.ctx_sum += req.inp + req.gen

    def _finish(self, rep: _Replica, req: _Req, ctx: float, held: float) -> None:
        rep.kv_used -= held
        rep.ctx_sum -= ctx
        req.done_at = self.now
        tt, tp = req.latencies()
        if tt <= self.slo.ttft_s and tp > self.slo.tpot_s:
            self.late += 1
        if req.id in self.finished_ids:
            raise AssertionError(f"request {req.id} finished twice")
        self.finished_ids.add(req.id)
        self.finished.append(req)

    def _kv_transfer(self, p: _Replica, req: _Req) -> None:
        d = self.replicas[req.decode]
        if not d.alive:
            self._retry(req)
            return
        mode = req.compression
        m = self.ctx.model
        end = self.now + p.rm.kv_compress_time(req.inp, mode)
        start = end
        for src, dst, layers in self._segs(p, d):
            nbytes = req.inp * m.kv_bytes_per_token_layer * layers * KV_FACTOR[mode]
            dur = nbytes / (self.cluster.bandwidth(src, dst) * self.ctx.eff.network) + self.cluster.latency(src, dst)
            if src == dst:
                end = max(end, start + dur)
            else:
                s = max(start, self.egress_free.get(src, 0.0))
                self.egress_free[src] = s + dur
                end = max(end, s + dur)
        end += d.rm.kv_compress_time(req.inp, mode)
        self._push(end, "kv_done", (req, req.attempt))

    def _retry(self, req: _Req) -> None:
        """Resend prompt + tokens so far on the current routing (the gateway's migration)."""
        self.retried += 1
        req.inp += req.gen
        req.out -= req.gen
        req.gen = 0
        if req.out <= 0:
            self._finish_orphan(req)
            return
        self._dispatch(req)

    def _finish_orphan(self, req: _Req) -> None:
        req.done_at = self.now
        if req.id in self.finished_ids:
            raise AssertionError(f"request {req.id} finished twice")
        self.finished_ids.add(req.id)
        self.finished.append(req)

    # -- handlers --------------------------------------------------------------------------------
    def _on(self, kind: str, payload) -> None:
        if kind == "arrive":
            self._dispatch(payload)
        elif kind == "wake":
            self._kick(payload)
        elif kind == "stage0_free":
            rep = payload
            rep.prefill_busy = False
            if rep.alive:
                self._kick(rep)
        elif kind == "prefill_done":
            rep, done, pipelined = payload
            rep.in_prefill -= 1
            if not pipelined:
                rep.prefill_busy = False
            for req, attempt in done:
                if attempt != req.attempt or req.id in self.finished_ids:
                    continue
                req.prefilled = self.now
                if not rep.alive:  # the node died while the prompt was in its pipeline
                    req.attempt += 1
                    self._retry(req)
                elif req.prefill == req.decode:  # colocated: KV reserved when the batch started
                    self._join(rep, req)
                else:  # the first token is emitted when the decode replica takes the request
                    self._kv_transfer(rep, req)
            if rep.alive:
                self._kick(rep)
        elif kind == "kv_done":
            req, attempt = payload
            if attempt != req.attempt:
                return
            d = self.replicas[req.decode]
            if not d.alive or not self.replicas[req.prefill].alive:  # an end of the link died mid-transfer
                req.attempt += 1
                self._retry(req)
                return
            d.wait_q.append(req)
            if not d.iterating:
                self._kick(d)
        elif kind == "decode_iter":
            rep = payload
            rep.iterating = False
            if not rep.alive:
                return
            self._advance_decodes(rep)
            self._kick(rep)
        elif kind == "mixed_iter":
            rep, done = payload
            rep.iterating = False
            live = [(req, a) for req, a in done if a == req.attempt and req.id not in self.finished_ids]
            if not rep.alive:  # the node died during the iteration: its prompts go elsewhere
                for req, _ in live:
                    req.attempt += 1
                    self._retry(req)
                return
            self._advance_decodes(rep)
            for req, _ in live:
                self._join(rep, req)
            self._kick(rep)
        elif kind == "preempt":
            self._preempt(payload)

    def _preempt(self, pre: Preemption) -> None:
        lost = set(pre.lost_nodes)
        victims: list[_Req] = []
        for rep in self.replicas.values():
            if rep.alive and rep.nodes & lost:
                rep.alive = False
                victims.extend(rep.prefill_q)
                victims.extend(rep.wait_q)
                for req in rep.active:
                    req.gen = rep.iter_no - req.join_iter + req.gen  # tokens produced before the loss
                    req.gen = min(req.gen, req.out - 1)
                    victims.append(req)
                rep.prefill_q.clear()
                rep.wait_q.clear()
                rep.active.clear()
                rep.finish_heap.clear()
        # requests in flight (inside a dead prefill pipeline or on a link to a dead decode) are
        # caught when their event fires (attempt check) or retried here if their replica died
        self._install(pre.new_plan, start=self.now, load_s=pre.load_s)
        for rep in self.replicas.values():
            if rep.alive:
                self._kick(rep)
        for req in victims:
            if req.id not in self.finished_ids:
                req.attempt += 1  # invalidate pending events of the dead attempt
                self._retry(req)

    # -- run -------------------------------------------------------------------------------------
    def run(self, requests: list[Request], *, preemption: Preemption | None = None,
            horizon_s: float | None = None, stop_when_failed: bool = False) -> SimResult:
        """Simulate until every admitted request finishes (or overload/horizon stops it).

        ``stop_when_failed``: also stop (as overloaded) once more requests have missed the SLO than the
        attainment target allows: the verdict of a goodput probe is known, and an overloaded plan's
        queues would otherwise take longer to drain than the rest of the run."""
        self.refused = 0
        self.late = 0  # finished within TTFT but over TPOT
        reqs = [_Req(r) for r in requests]
        for r in reqs:
            self._push(r.arrival, "arrive", r)
        if preemption is not None:
            self._push(preemption.at, "preempt", preemption)
        last_arrival = requests[-1].arrival if requests else 0.0
        rate = len(requests) / max(last_arrival, 1e-9)
        wl = self.workload
        slo = self.slo
        e2e_target = slo.ttft_s + slo.tpot_s * (wl.mean_output if wl else 128)
        limit = self.overload_factor * rate * e2e_target + 200
        horizon = horizon_s if horizon_s is not None else math.inf
        overloaded = False
        arrived = 0
        judged = no_first_token = 0  # requests whose TTFT deadline has passed; of them, without a first token
        events = 0
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            if t > horizon:
                overloaded = True
                break
            self.now = t
            if kind == "arrive":
                arrived += 1
                in_system = arrived - len(self.finished) - self.refused
                if in_system > limit:
                    overloaded = True
                    break
            events += 1
            if stop_when_failed and events % 64 == 0:
                cutoff = t - slo.ttft_s
                while judged < len(reqs) and reqs[judged].arrival < cutoff:
                    r = reqs[judged]
                    no_first_token += (r.first is None and r.done_at is None) or r.latencies()[0] > slo.ttft_s
                    judged += 1
                if slo_lost(len(reqs), no_first_token + self.late, slo.attainment):  # refused: no first token
                    overloaded = True
                    break
            self._on(kind, payload)
        charge("sim_event", events)
        return self._result(reqs, overloaded)

    def _advance_decodes(self, rep: _Replica) -> None:
        """One token for every running sequence; the ones that reach their length finish."""
        rep.iter_no += 1
        rep.ctx_sum += len(rep.active)
        while rep.finish_heap and rep.finish_heap[0][0] <= rep.iter_no:
            _, _, req = heapq.heappop(rep.finish_heap)
            req.gen = req.out
            rep.active.remove(req)
            self._finish(rep, req, ctx=req.inp + req.out, held=req.inp + req.out)

    @staticmethod
    def _old_work_done(rep: _Replica) -> bool:
        """Work of the replica's current role is finished, so a pending phase flip can happen."""
        prefill_done = not rep.prefill_q and rep.in_prefill == 0 and not rep.prefill_busy
        decode_done = not rep.wait_q and not rep.active and not rep.iterating
        if rep.role == "prefill":
            return prefill_done
        if rep.role == "decode":
            return decode_done
        return prefill_done and decode_done

    def _result(self, reqs: list[_Req], overloaded: bool) -> SimResult:
        slo = self.slo
        ttft, tpot, e2e, prefill = [], [], [], []
        attained = 0
        cut = reqs[int(WARMUP_SHARE * len(reqs))].id if reqs else 0
        steady = 0
        for r in self.finished:
            tt, tp = r.latencies()
            ttft.append(tt)
            tpot.append(tp)
            e2e.append(r.done_at - r.arrival)
            prefill.append(r.prefilled - r.arrival if r.prefilled is not None else tt)
            if tt <= slo.ttft_s and tp <= slo.tpot_s:
                attained += 1
                steady += r.id >= cut
        n_steady = sum(1 for r in reqs if r.id >= cut)
        return SimResult(len(reqs), len(reqs) - self.refused, len(self.finished), attained, np.array(ttft),
                         np.array(tpot), np.array(e2e), self.now, overloaded, self.retried,
                         sorted(self.finished_ids), steady / n_steady if n_steady else 1.0, np.array(prefill))


def slo_lost(requests: int, failed: int, target: float) -> bool:
    """Whether ``failed`` of ``requests`` already miss the attainment ``target``: the comparison
    ``SimResult.attainment`` is judged by (``(1 - target) * requests`` in floating point is just under
    100 for 0.9 x 1000, and stopped runs exactly at the target)."""
    return (requests - failed) / requests < target


def _chunk_attention(batch: list[tuple[_Req, int]]) -> tuple[float, float]:
    """(causal attention term, prefix tokens read) of a prefill pass: a piece of ``t`` tokens that
    starts ``o`` tokens into its prompt attends to ``o + 1 .. o + t`` keys, so it costs
    ``2 t o + t^2`` in units where a whole prompt of ``s`` tokens costs ``s^2``."""
    sq = prefix = 0.0
    for req, t in batch:
        o = req.inp - req.chunk_left - t
        sq += 2.0 * t * o + float(t) * t
        prefix += o
    return sq, prefix


def simulate(plan: Plan, workload: Workload, slo: SLO, *, duration_s: float | None = None,
             n_requests: int | None = None, seed: int = 0, preemption: Preemption | None = None,
             max_batch_tokens: int = 8192, overload_factor: float = 8.0, stop_when_failed: bool = False
             ) -> SimResult:
    """Simulate ``plan`` under ``workload`` at its rate for ``duration_s`` (or ``n_requests``);
    ``stop_when_failed``: see ``Simulator.run``."""
    if duration_s is None and n_requests is None:
        n_requests = 1000
    reqs = workload.requests(duration_s, n=n_requests, seed=seed)
    charge("sim_request", len(reqs))
    sim = Simulator(plan, slo, workload=workload, max_batch_tokens=max_batch_tokens, seed=seed,
                    overload_factor=overload_factor)
    return sim.run(reqs, preemption=preemption, stop_when_failed=stop_when_failed)


WARMUP_SHARE = 0.2  # requests arriving into a still-empty system; goodput judges the ones after them
MIN_SPAN_LIFETIMES = 2.0  # a judged run's arrivals last this many p90 request lifetimes (see meets_slo)
MIN_REQUESTS = 1000  # fewer hide a slowly growing queue (a replica a few % over its capacity looks fine)


def sim_requests_for(workload: Workload, slo: SLO, rate: float, *, min_duration_s: float = 40.0,
                     max_requests: int = 20000) -> int:
    """Enough requests to reach steady state: ~8 request lifetimes (at the SLO) of arrivals, at least
    ``min_duration_s`` seconds and ``MIN_REQUESTS`` of them."""
    lifetime = slo.ttft_s + slo.tpot_s * workload.mean_output
    duration = max(min_duration_s, 8 * lifetime)
    return int(min(max_requests, max(MIN_REQUESTS, rate * duration)))


def meets_slo(plan: Plan, workload: Workload, slo: SLO, rate: float, *, n_requests: int | None = None,
              seed: int = 0, max_requests: int = 20000) -> bool:
    """Whether ``plan`` serves ``rate`` req/s with the SLO attainment target met (what ``goodput``
    bisects on): not overloaded, the target met over all requests and after the warm-up, and the
    arrivals spanning at least ``MIN_SPAN_LIFETIMES`` x the p90 end-to-end time: a capped number of
    requests at a huge rate is a burst that a lax SLO absorbs, not proof of a steady state (a 135M
    model on GPUs would otherwise "serve" millions of req/s)."""
    n = n_requests or sim_requests_for(workload, slo, rate, max_requests=max_requests)
    res = simulate(plan, workload.with_rate(rate), slo, n_requests=n, seed=seed, stop_when_failed=True)
    if res.overloaded or min(res.attainment, res.steady_attainment) < slo.attainment:
        return False
    return len(res.e2e) == 0 or n / rate >= MIN_SPAN_LIFETIMES * float(np.percentile(res.e2e, 90))


def goodput(plan: Plan, workload: Workload, slo: SLO, *, n_requests: int | None = None, seed: int = 0,
            hi: float | None = None, iters: int = 8, max_requests: int = 20000, passes: float = 0.0,
            deadline: float | None = None, tol: float | None = None, stop_by: float | None = None,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """Highest rate (req/s) at which the simulated SLO attainment meets the target.

    A rate passes when the attainment meets the target over all requests and over the ones after the
    warm-up (a slowly growing queue fails late requests first; an empty start flatters early ones).
    Each probe simulates ``n_requests`` arrivals (default: ``sim_requests_for``) with common random
    numbers, so probes at different rates see the same lengths and the same arrival pattern.

    The search brackets the answer from 0.9x the guess (``hi``, else the plan's own estimate, which
    the simulation usually finds 0-20% optimistic) in three steps of ``BRACKET_STEP``, then doubling
    or halving, and bisects the bracket ``iters`` times. ``passes``: a rate already known to pass (the
    answer is never below it).
    ``deadline`` (on ``clock``, by default ``time.perf_counter``): past it, once some rate has passed,
    the search stops and answers the highest rate shown to pass (a lower bound: a planner racing
    finalists under a time limit); with ``tol``, not before the bracket is that narrow (relative), so
    the answer is within ``tol`` of the full one. ``stop_by`` (on ``clock``): past it, once some rate has
    passed, the search stops whatever ``tol`` (a race's hard stop). Until a rate passes the search runs
    on, so 0 always means "fails".
    """
    lo, up = passes, math.inf

    def done(lo: float, up: float) -> bool:
        if lo <= 0:
            return False
        if stop_by is not None and clock() > stop_by:
            return True
        if deadline is None or clock() <= deadline:
            return False
        return tol is None or up <= lo * (1 + tol)

    def ok(rate: float) -> bool:
        return meets_slo(plan, workload, slo, rate, n_requests=n_requests, seed=seed, max_requests=max_requests)

    estimate = hi or float(plan.expected.get("goodput_rps", 0.0))
    guess = max(estimate if math.isfinite(estimate) and estimate > 0 else 1.0, passes)
    probe = guess * BRACKET_STEP if passes > 0 else guess * 0.9
    steps = 0  # BRACKET_STEP while near the guess, then doubling (or halving) when it is far off
    while True:  # bracket: [lo passes, up fails]
        if done(lo, up):
            return lo
        steps += 1
        factor = BRACKET_STEP if steps <= 3 else 2.0
        if ok(probe):
            lo = probe
            if up < math.inf:
                break
            if probe > 1e5:
                return lo
            probe *= factor
        else:
            up = probe
            if lo > 0:
                break
            probe /= factor
            if probe <= 1e-3:
                return 0.0
    return narrow(ok, lo, up, iters, stop=done)[0]


BRACKET_STEP = 1.1  # the goodput search's bracketing steps (x or /): the estimate is usually within 20%
