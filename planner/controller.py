"""The controller: keeps the running cluster equal to the plan in Redis, and heals it after a loss.

One controller acts at a time (a lease in Redis); it is restartable: everything it needs (its config,
the plan, the nodes, the replicas) is in Redis, and the provisioner adopts the nodes a previous
controller left running. The loop:

- reconcile, every ``tick_s`` and after every node event: rent the plan's nodes that do not exist yet,
  start the plan's replicas on ready nodes through their agents, switch the role of a replica whose
  role differs from the plan's (after draining), stop replicas and release nodes the plan dropped;
- on a workload shift (the gateways' measured mean prompt or output length moved past a ratio from the plan's,
  ``check_workload``): the same lightweight reschedule for the observed mix, published when re-deciding phases
  pays; later re-plans then plan for the observed workload;
- on a lost node (preempted, terminated, failed, or found dead on restart): the lightweight reschedule
  (``planner.reschedule``: survivors keep their GPUs and parallelism; only phases and routing change),
  published at once so gateways route around the loss; then replacement capacity within the budget,
  folded into the plan when it is ready. Replacements in progress are recorded in Redis meta
  (``controller_replacements``: lost node -> replacement node), so a successor resumes them instead of
  releasing a half-rented node as unplanned or forgetting the lost capacity.

The lease is renewed every ``lease_ttl_s / 5``; a controller that cannot renew it (Redis unreachable, or
another controller took it) steps down before it could expire, and ``serve`` waits to take it again.
Every decision goes to the events stream with its reason and timing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from planner.offers import MAX_GPUS
from planner.plan import Instance, Plan, ReplicaSpec, replica_number
from planner.state import NodeRecord, ReplicaRecord, StateStore

log = logging.getLogger("planner.controller")

LOST = ("preempted", "terminated", "failed")
LIVE = ("pending", "ready")
CONFIG_META_KEY = "controller_config"
REPLACEMENTS_META_KEY = "controller_replacements"  # lost node id -> its replacement's id ("" = not chosen yet)
SCALE_UPS_META_KEY = "controller_scale_ups"  # node id -> the Instance being rented to meet the SLO (not yet folded in)
SCALED_NODES_META_KEY = "controller_scaled_nodes"  # node ids scale-ups folded in, oldest first (scale down gives back)
SCALED_AT_META_KEY = "controller_scaled_at"  # when the last scale up or down was decided (kept by a successor)
# A multi-node SGLang replica's rank 0 listens on its --dist-init-addr port and the next ~8 (SGLang's ZMQ
# sockets), so replicas are 16 ports apart: 20000-28191, clear of the engine ports the SkyPilot task opens
# (30000-30031) and of Linux's ephemeral range (32768-), where the agents draw engine ports.
DIST_INIT_PORT_BASE = 20000
DIST_INIT_PORT_STRIDE = 16
DIST_INIT_PORT_SLOTS = 512


@dataclass
class ControllerConfig:
    """What the deployment was asked for; stored in Redis meta so a restarted controller knows it."""

    model: str  # planner catalog name (e.g. "llama-3.1-8b", "smollm2")
    budget: float  # $/h for everything rented
    provider: str = "local"  # local | skypilot
    engine: str = "reference"  # what agents run: reference (CPU engine) | sglang
    engine_model: str = ""  # the engine's --model: reference smollm2|tiny|emulated; sglang a model path
    rate: float = 0.0  # requests/s to plan for; 0 = as much as the budget buys
    input_len: int = 256
    output_len: int = 64
    ttft_s: float = 2.0
    tpot_s: float = 0.2
    attainment: float = 0.9
    spot: bool = True
    disaggregate: bool = False  # only prefill and decode replicas (no colocated ones)
    catalogs: list[str] = field(default_factory=list)
    kv_compression: str = "auto"
    seed: int = 0
    plan_time_limit_s: float = 10.0
    max_nodes: int = MAX_GPUS  # the most GPUs the plan rents
    max_batch: int | None = None
    replace_lost: bool = True
    replace_retry_s: float = 30.0  # wait before asking again after a refused or failed replacement
    replace_max_failures: int = 5  # replacements that fail to come up before giving up (budget refusals wait)
    replace_ready_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0
    workdir: str = ""
    # a workload shift: the gateways' measured length mix, over the last window, against the plan's
    workload_check_s: float = 15.0  # how often to look at the live SLO and the length mix (0: never)
    follow_workload: bool = True  # act on a shift of the length mix (False: only the live SLO is watched)
    workload_window_s: float = 120.0
    workload_min_requests: int = 50  # fewer in the window: too few to say
    workload_shift_ratio: float = 1.5  # a mean prompt or output length this many times the plan's (or 1/x)
    workload_min_gain: float = 0.1  # re-decide phases only for this much more goodput than keeping them
    # a missed live SLO: rent one more instance within the budget and max_nodes (``planner.scale_up``), then
    # wait this long (the window must see the new capacity) before judging again
    scale_up: bool = False
    scale_up_cooldown_s: float = 120.0
    # ... and gives back the newest node it rented once the SLO has been met with room (p90 TTFT and TPOT at most
    # half their targets) this long, and the plan without it is still estimated to serve twice the served rate
    scale_down_after_s: float = 300.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ControllerConfig:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


def workload_of(cfg: ControllerConfig) -> Any:
    """The (Workload, SLO) pair the deployment was asked to serve."""
    from planner.workload import SLO, Lengths, Workload

    return (
        Workload(cfg.rate, Lengths.fixed(cfg.input_len), Lengths.fixed(cfg.output_len)),
        SLO(cfg.ttft_s, cfg.tpot_s, cfg.attainment),
    )


def offers_of(cfg: ControllerConfig) -> list[Any] | None:
    """Offers to rent from: the given catalogs; the local catalog with --local; else the planner's default.

    With the local provider every node runs on this machine, and the provisioner records its nodes (the
    replacements of lost ones too) in cloud and region ``local``: the offers say so as well, whatever
    the catalog file is called, or a replacement would look like a node in another cloud, behind a slow
    cross-cloud link, and the re-plan would route almost nothing to it."""
    from dataclasses import replace

    from planner.offers import load_offers

    if cfg.provider == "local":
        from provisioner.catalog import LOCAL_PLACE, default_local_catalog_path

        offers = load_offers(cfg.catalogs or [default_local_catalog_path()])
        return [replace(o, cloud=LOCAL_PLACE, region=LOCAL_PLACE) for o in offers]
    if cfg.catalogs:
        return load_offers(cfg.catalogs)
    return None


def plan_for_config(cfg: ControllerConfig) -> Plan:
    """A fresh plan for the configured model, workload and budget (CPU-bound: run it in a thread)."""
    from planner.scheduler import plan_deployment

    workload, slo = workload_of(cfg)
    return plan_deployment(
        cfg.model, workload, slo, budget=cfg.budget, offers=offers_of(cfg), spot=cfg.spot,
        kv_compression=cfg.kv_compression, seed=cfg.seed, time_limit_s=cfg.plan_time_limit_s,
        max_gpus=cfg.max_nodes, disaggregate=cfg.disaggregate,
    )


def dist_init_port(replica_id: str) -> int:
    """Rank 0's --dist-init-addr port for a replica, fixed by its id so every rank (and a restarted
    controller) agrees on it. Two replicas share one only if their numbers are equal mod 512."""
    n = replica_number(replica_id)
    if n is None:
        n = zlib.crc32(replica_id.encode())
    return DIST_INIT_PORT_BASE + DIST_INIT_PORT_STRIDE * (n % DIST_INIT_PORT_SLOTS)


def dist_init_addr(head: NodeRecord, replica_id: str) -> str | None:
    """``host:port`` of a multi-node replica's rank 0: the host of its node's agent URL (None if it has none)."""
    host = urlsplit(head.agent_url).hostname
    if not host:
        return None
    port = dist_init_port(replica_id)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def rank_bodies(spec: ReplicaSpec, body: dict[str, Any], addr: str) -> list[dict[str, Any]]:
    """The start request of each rank of a multi-node replica, in rank order (``spec.node_ids``): the same
    engine command everywhere, with this node's GPUs and rank (the agent's launch hints)."""
    return [{**body, "gpus": [g for n, g in spec.gpus if n == node_id],
             "extra_args": {"nnodes": len(spec.node_ids), "node_rank": rank, "node_ids": list(spec.node_ids),
                            "dist_init_addr": addr, "layer_split": list(spec.layer_split)}}
            for rank, node_id in enumerate(spec.node_ids)]


class Controller:
    """Reconciles the plan with reality. Construct with a started StateStore and a provisioner."""

    def __init__(self, state: StateStore, provisioner: Any, config: ControllerConfig, *, tick_s: float = 0.5,
                 owner: str | None = None, lease_ttl_s: float = 5.0) -> None:
        self.state = state
        self.provisioner = provisioner
        self.cfg = config
        self.tick_s = tick_s
        self.lease_ttl_s = lease_ttl_s
        self.owner = owner or f"controller-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.plan: Plan | None = None
        self.lease_lost = asyncio.Event()  # set when this controller stepped down without being told to stop
        self._plan_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        # replica ids with a start/stop/switch in flight, counted: two tasks can hold one id (a survivors'
        # stop and a start), and the id stays busy until both end
        self._busy: Counter[str] = Counter()
        self._replacing: dict[str, str] = {}  # lost node id -> replacement node id ("" until chosen); in Redis too
        self._replace_running: set[str] = set()  # lost node ids with a replace() task in this process
        self._persist_lock = asyncio.Lock()
        self._losing: set[str] = set()  # node ids with a handle_lost in flight
        self._refused: set[str] = set()  # node ids whose acquire was refused (logged once)
        self._unplaceable: set[frozenset[Instance]] = set()  # node moves a re-plan could not take (tried once)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._agents: dict[str, Any] = {}
        self._shift_considered: Any = None  # an observed Workload judged not worth re-deciding phases for
        self._slo_missed = False  # whether the last SLO check saw the attainment target missed
        self._scaling: dict[str, Instance] = {}  # node id -> instance rented to meet the SLO; in Redis too
        self._scaled_at = 0.0  # when the last scale up or down was decided (time.time()); in Redis too
        self._scale_refused = ""  # the last refusal said (said once)
        self._roomy_since: float | None = None  # since when the SLO has been met with room (time.time())
        self._draining: set[str] = set()  # nodes a scale down dropped from the plan, left to finish their requests

    # -- planning -----------------------------------------------------------------------------------
    def _workload(self) -> Any:
        """The (Workload, SLO) to plan for: the one the gateways measured once a shift was acted on (in the
        plan), else the one the deployment was asked for."""
        from planner.observed_workload import is_observed
        from planner.workload import Workload

        asked, slo = workload_of(self.cfg)
        if self.plan is not None and is_observed(self.plan.workload):
            return Workload.from_dict(self.plan.workload), slo
        return asked, slo

    def make_plan(self) -> Plan:
        return plan_for_config(self.cfg)

    async def _publish(self, plan: Plan, kind: str, reason: str, **data: Any) -> int:
        version = await self.state.publish_plan(plan)
        self.plan = plan
        await self.state.emit(kind, reason, plan_version=version, **data)
        log.info("%s: plan v%d (%s)", kind, version, reason)
        return version

    async def _rescheduled(self, plan: Plan, workload: Any = None, **change: Any) -> tuple[Plan, Any, float]:
        """The lightweight reschedule of ``plan`` after ``change`` (``lost_nodes``, ``new_instances`` or
        ``placed``) for the deployment's SLO and workload (or ``workload``), in a thread; with its solve time
        in ms."""
        from planner.reschedule import reschedule

        planned, slo = self._workload()
        workload = workload or planned
        t0 = time.perf_counter()
        new_plan, changes = await asyncio.to_thread(reschedule, plan, workload=workload, slo=slo, **change)
        return new_plan, changes, round((time.perf_counter() - t0) * 1000, 2)

    # -- main loop ------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Act as the controller until ``stop`` is set or the lease is lost; nodes stay up for a successor."""
        await self._wait_for_lease(stop)
        if stop.is_set():
            return
        lease = asyncio.create_task(self._keep_lease(stop))
        events = self.provisioner.watch()
        watcher: asyncio.Task[None] | None = None
        try:
            await self.state.set_meta(**{CONFIG_META_KEY: asdict(self.cfg)})
            await self.provisioner.start()
            await self.state.emit("controller.started", "took the lease", owner=self.owner)
            await asyncio.to_thread(_warm_up)  # so the first reschedule after a loss pays no imports
            self.plan = await self.state.get_plan()
            if self.plan is None:
                t0 = time.perf_counter()
                plan = await asyncio.to_thread(self.make_plan)
                await self._publish(plan, "plan.created", "initial plan", plan_s=time.perf_counter() - t0,
                                    cost_per_hour=plan.cost_per_hour, replicas=len(plan.replicas))
            await self._resume_replacements()  # before the first pass, so it releases none of them
            await self._resume_scale_ups()
            watcher = asyncio.create_task(self._follow_events(events))
            if self.cfg.workload_check_s > 0:
                self._spawn(self._watch_workload(stop), "workload-watch")
            while not stop.is_set() and not self.lease_lost.is_set():
                self._wake.clear()  # before the pass: a wake-up during it runs the next pass at once
                try:
                    await self.reconcile()
                except Exception:  # one bad pass must not kill the controller; the next one retries
                    log.exception("reconcile failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wait_any(stop), self.tick_s)
        finally:
            lease.cancel()
            if watcher is not None:
                watcher.cancel()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(lease, *([watcher] if watcher else []), *self._tasks, return_exceptions=True)
            events.close()
            for agent in self._agents.values():
                await agent.close()
            with contextlib.suppress(Exception):  # Redis may be what failed; the lease then expires by itself
                await self.state.release_leader(self.owner)

    async def _wait_any(self, stop: asyncio.Event) -> None:
        waits = [asyncio.create_task(e.wait()) for e in (stop, self._wake, self.lease_lost)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _wait_for_lease(self, stop: asyncio.Event) -> None:
        announced = False
        while not stop.is_set():
            try:
                if await self.state.acquire_leader(self.owner, ttl_s=self.lease_ttl_s):
                    return
            except Exception as e:  # Redis unreachable: keep trying, it is the only way forward
                log.warning("cannot reach Redis for the controller lease: %s", e)
            else:
                if not announced:
                    log.warning("another controller holds the lease; waiting")
                    announced = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def _keep_lease(self, stop: asyncio.Event) -> None:
        """Renew the lease every ttl/5. Step down (``lease_lost``) when another controller holds it, or when
        it could not be renewed for 0.6 ttl: it may expire soon after, and two controllers must not act."""
        renewed = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(self.lease_ttl_s / 5)
            try:
                held = await self.state.acquire_leader(self.owner, ttl_s=self.lease_ttl_s)
            except Exception as e:
                if time.monotonic() - renewed < 0.6 * self.lease_ttl_s:
                    log.warning("cannot renew the controller lease (%s); retrying", e)
                    continue
                log.error("could not renew the controller lease for %.1f s (%s); stepping down",
                          time.monotonic() - renewed, e)
                held = False
            else:
                if not held:
                    log.error("another controller holds the lease; stepping down")
            if not held:
                self.lease_lost.set()
                return
            renewed = time.monotonic()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_task_error)
        return task

    async def _follow_events(self, events: Any) -> None:
        async for ev in events:
            if ev.kind in LOST:
                self._spawn(self.handle_lost([ev.node_id], seen_at=ev.at, cause=f"{ev.kind}: {ev.reason}"),
                            f"lost-{ev.node_id}")
            self._wake.set()

    # -- workload shift --------------------------------------------------------------------------------
    async def _watch_workload(self, stop: asyncio.Event) -> None:
        """Every ``workload_check_s``: is the SLO met live, and has the length mix the gateways serve moved away
        from the plan's?"""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.cfg.workload_check_s)
            if stop.is_set():
                return
            try:
                sample = await self.state.workload_window(self.cfg.workload_window_s)
                await self.check_slo(sample)
                if self.cfg.scale_up:
                    await self.check_scale_up(sample)
                    await self.check_scale_down(sample)
                if self.cfg.follow_workload:
                    await self.check_workload(sample)
            except Exception as e:  # Redis away, a reschedule that failed: look again next time
                log.warning("workload check failed: %s", e)

    async def check_slo(self, sample: Any = None) -> str | None:
        """Say when the share of requests the gateways served within the plan's TTFT and TPOT (over the last
        ``workload_window_s``) falls under the attainment target (``slo.missed``, with the served rate against
        the plan's expected goodput: overload or a slow replica), and when it is back (``slo.met``). Once per
        change; None when nothing changed or too few requests were judged."""
        if sample is None:
            sample = await self.state.workload_window(self.cfg.workload_window_s)
        plan, attained = self.plan, sample.attainment
        if plan is None or attained is None or sample.judged < self.cfg.workload_min_requests:
            return None
        slo = self._judged_slo(plan)
        missed = attained < slo.attainment
        if missed == self._slo_missed:
            return None
        self._slo_missed = missed
        goodput = float(plan.expected.get("goodput_rps") or 0)
        p90 = {what: sample.latency_quantile(what, 0.9) for what in ("ttft", "tpot")}
        seen = {"attainment": round(attained, 4), "target": slo.attainment, "judged": sample.judged,
                "window_s": sample.seconds, "rate": round(sample.rate, 3), "expected_goodput_rps": goodput,
                "ttft_p90_at_most_s": p90["ttft"], "tpot_p90_at_most_s": p90["tpot"]}
        said = (f"{attained:.1%} of {sample.judged:.0f} requests over {sample.seconds:.0f} s within TTFT "
                f"{slo.ttft_s:g}s and TPOT {slo.tpot_s:g}s (target {slo.attainment:.0%})")
        if not missed:
            await self.state.emit("slo.met", said, **seen)
            return "slo.met"
        load = (f"; serving {sample.rate:.2f} req/s, " + ("over" if sample.rate > goodput else "within")
                + f" the plan's expected goodput of {goodput:.2f}") if goodput else ""
        await self.state.emit("slo.missed", said + load, **seen)
        return "slo.missed"

    def _judged_slo(self, plan: Plan) -> Any:
        """The SLO the gateways judge answers by: the plan's (``plan.slo``), else the deployment's."""
        from planner.workload import SLO

        return SLO.from_dict(plan.slo) if plan.slo else self._workload()[1]

    async def check_scale_up(self, sample: Any = None) -> str | None:
        """While the live SLO is missed: rent the one instance that adds the most goodput per dollar to the plan
        as it runs (``planner.scale_up``), within the budget and ``max_nodes`` GPUs; it is folded in once ready
        (make before break, as a replacement). One at a time, not while a replacement is under way, and not
        again before ``scale_up_cooldown_s``. Returns ``scale_up``, ``scale_up.refused`` (said once per
        reason) or None."""
        from planner.observed_workload import to_workload
        from planner.scale_up import choose_addition
        from planner.scheduler import resolve_offers

        cfg = self.cfg
        if sample is None:
            sample = await self.state.workload_window(cfg.workload_window_s)
        plan = self.plan
        if not self._slo_missed or plan is None or self._scaling or self._replacing:
            return None
        if time.time() - self._scaled_at < cfg.scale_up_cooldown_s:
            return None
        planned, slo = self._workload()
        workload = to_workload(sample, planned.rate) if sample.requests >= cfg.workload_min_requests else planned
        node_id = await self._free_node_id()
        offers = await asyncio.to_thread(resolve_offers, offers_of(cfg))
        add = await asyncio.to_thread(choose_addition, plan, offers, workload, slo, budget=cfg.budget,
                                      max_gpus=cfg.max_nodes, spot=cfg.spot, node_id=node_id)
        if add is None:
            used = sum(i.gpu_count for i in plan.instances)
            reason = (f"SLO missed, and no offer within the ${max(0.0, cfg.budget - plan.cost_per_hour):.2f}/h left "
                      f"of the budget and {max(0, cfg.max_nodes - used)} GPU(s) left of --max-nodes adds goodput")
            if reason == self._scale_refused:
                return None
            self._scale_refused = reason
            await self.state.emit("scale_up.refused", reason)
            return "scale_up.refused"
        self._scale_refused, self._scaled_at = "", time.time()
        await self.state.set_meta(**{SCALED_AT_META_KEY: self._scaled_at})
        inst = add.instance
        self._scaling[inst.id] = inst
        await self._save_scale_ups()
        await self.state.emit("scale_up", f"SLO missed: renting {inst.instance_type} ({inst.gpu_count}x "
                              f"{inst.gpu_type}, ${inst.price_per_hour:.2f}/h) as {inst.id}: goodput "
                              f"{add.goodput_now:.2f} -> {add.goodput_after:.2f} req/s on the served mix",
                              **add.to_dict())
        self._spawn(self._scale_up(inst), f"scale-up-{inst.id}")
        return "scale_up"

    async def _scale_up(self, inst: Instance) -> None:
        """Rent ``inst`` (its id recorded in Redis first, so no pass releases it) and fold it in once ready;
        one that fails to come up is released."""
        from provisioner.base import NodeRequest

        t0 = time.time()
        try:
            if await self.state.get_node(inst.id) is None:
                await self.provisioner.acquire(NodeRequest.from_instance(inst))
            ready = await self.provisioner.wait_ready(inst.id, timeout_s=self.cfg.replace_ready_timeout_s)
        except Exception as e:  # refused by the budget, no capacity, never ready
            await self.state.emit("scale_up.failed", f"{inst.id}: {type(e).__name__}: {e}", node=inst.id)
            live = await self.state.get_node(inst.id)
            if live is not None and live.status in LIVE:
                await self._release(inst.id, "scale-up did not come up")
        else:
            await self.fold_in([ready], reason=f"scale-up for the SLO: {inst.id}", started_at=t0)
            if self.plan is not None and inst.id in {i.id for i in self.plan.instances}:
                scaled = await self._scaled_nodes()
                await self.state.set_meta(**{SCALED_NODES_META_KEY: [*scaled, inst.id]})
        finally:
            self._scaling.pop(inst.id, None)
            await self._save_scale_ups()

    async def _scaled_nodes(self) -> list[str]:
        """The nodes scale-ups added that the plan still has, oldest first."""
        saved = (await self.state.meta()).get(SCALED_NODES_META_KEY)
        planned = {i.id for i in self.plan.instances} if self.plan is not None else set()
        return [n for n in saved if n in planned] if isinstance(saved, list) else []

    async def check_scale_down(self, sample: Any = None) -> str | None:
        """Give back the newest node a scale-up rented once the SLO has been met with room for
        ``scale_down_after_s`` (since the last scale change too): every share of the window within the target,
        p90 TTFT and TPOT at most half theirs, and the plan without the node still estimated to serve twice the
        served rate. The new plan goes out first (gateways stop sending to it), its replicas finish what they
        hold (``drain_timeout_s`` at most), then the node is released. Returns ``scale_down`` or None."""
        from planner.observed_workload import to_workload

        cfg = self.cfg
        if sample is None:
            sample = await self.state.workload_window(cfg.workload_window_s)
        plan, now = self.plan, time.time()
        attained = sample.attainment
        if plan is None or attained is None or sample.judged < cfg.workload_min_requests or self._slo_missed:
            self._roomy_since = None
            return None
        slo = self._judged_slo(plan)
        ttft, tpot = sample.latency_quantile("ttft", 0.9), sample.latency_quantile("tpot", 0.9)
        roomy = attained >= slo.attainment and ttft is not None and ttft <= slo.ttft_s / 2 and \
            (tpot is None or tpot <= slo.tpot_s / 2)
        if not roomy:
            self._roomy_since = None
            return None
        self._roomy_since = self._roomy_since or now
        if now - max(self._roomy_since, self._scaled_at) < cfg.scale_down_after_s:
            return None
        if self._scaling or self._replacing or self._draining:
            return None
        scaled = await self._scaled_nodes()
        if not scaled:
            return None
        node_id = scaled[-1]
        planned, _ = self._workload()
        async with self._plan_lock:
            plan = self.plan
            if plan is None or node_id not in {i.id for i in plan.instances}:
                return None
            new_plan, changes, solve_ms = await self._rescheduled(plan, workload=to_workload(sample, planned.rate),
                                                                  lost_nodes=[node_id])
            if changes.goodput_after < 2 * sample.rate:
                return None
            self._scaled_at, self._roomy_since = now, None
            await self.state.set_meta(**{SCALED_AT_META_KEY: now})
            self._draining.add(node_id)
            await self.state.set_meta(**{SCALED_NODES_META_KEY: [n for n in scaled if n != node_id]})
            await self._publish(new_plan, "scale_down", f"SLO met with room for {cfg.scale_down_after_s:g}s "
                                f"({attained:.1%}, p90 TTFT <= {ttft:g}s): giving back {node_id}, goodput "
                                f"{changes.goodput_kept:.2f} -> {changes.goodput_after:.2f} req/s est.",
                                removed=[node_id], solve_ms=solve_ms, changes=_changes_dict(changes),
                                expected=new_plan.expected)
        self._spawn(self._drain(node_id), f"scale-down-{node_id}")
        return "scale_down"

    async def _drain(self, node_id: str) -> None:
        """Hold back the reconcile pass's stop and release of ``node_id`` (no longer in the plan) until its
        replicas hold no request, or ``drain_timeout_s``; then let it do them."""
        import aiohttp

        urls = [r.url for r in (await self.state.replicas()).values() if node_id in r.node_ids and r.url]
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
                while time.monotonic() < deadline:  # polling the engines: they announce nothing
                    if not await _holding(http, urls):
                        break
                    await asyncio.sleep(0.2)
        finally:
            self._draining.discard(node_id)
            self._wake.set()

    async def _save_scale_ups(self) -> None:
        async with self._persist_lock:
            await self.state.set_meta(**{SCALE_UPS_META_KEY: {k: asdict(v) for k, v in self._scaling.items()}})

    async def _resume_scale_ups(self) -> None:
        """Finish the scale-ups a previous controller recorded (fold in, or release what never came up), and keep
        its cooldown (a restarted controller that sees the same miss must not rent again at once)."""
        meta = await self.state.meta()
        with contextlib.suppress(TypeError, ValueError):
            self._scaled_at = float(meta.get(SCALED_AT_META_KEY) or 0.0)
        saved = meta.get(SCALE_UPS_META_KEY)
        if not isinstance(saved, dict):
            return
        for node_id, inst in saved.items():
            if node_id not in self._scaling and isinstance(inst, dict):
                self._scaling[node_id] = Instance(**inst)
                self._spawn(self._scale_up(self._scaling[node_id]), f"scale-up-{node_id}")

    async def _free_node_id(self) -> str:
        """``n{k}`` for the lowest k no node of this deployment (planned, recorded, being rented) has used."""
        taken = set(await self.state.nodes()) | set(self._scaling) | set(self._replacing.values())
        taken |= {i.id for i in self.plan.instances} if self.plan else set()
        k = 0
        while f"n{k}" in taken:
            k += 1
        return f"n{k}"

    async def check_workload(self, sample: Any = None) -> str | None:
        """Reschedule for the observed workload when it shifted and re-deciding phases pays
        (``workload_min_gain``); else record that the plan was kept. Returns the event kind, or None when
        nothing shifted (or too little was seen)."""
        from planner.observed_workload import shift, to_workload

        cfg = self.cfg
        if sample is None:
            sample = await self.state.workload_window(cfg.workload_window_s)
        if sample.requests < cfg.workload_min_requests or self.plan is None:
            return None
        planned, _ = self._workload()
        observed = to_workload(sample, planned.rate)
        moved = shift(planned, observed, cfg.workload_shift_ratio)
        considered = self._shift_considered
        if moved is None or (considered is not None and shift(considered, observed, cfg.workload_shift_ratio) is None):
            return None
        async with self._plan_lock:
            plan = self.plan
            if plan is None:
                return None
            new_plan, changes, solve_ms = await self._rescheduled(plan, workload=observed)
            gain = changes.goodput_after / changes.goodput_kept - 1 if changes.goodput_kept > 0 else float("inf")
            seen = {"observed": observed.to_dict(), "requests": sample.requests, "window_s": sample.seconds,
                    "goodput_kept": round(changes.goodput_kept, 4), "goodput_after": round(changes.goodput_after, 4),
                    "gain": round(gain, 4) if gain != float("inf") else None, "solve_ms": solve_ms}
            if gain < cfg.workload_min_gain:
                # not worth a role switch: remember this mix, so the same one is not re-solved every check
                self._shift_considered = observed
                await self.state.emit("workload_shift.kept", f"{moved}; re-deciding phases gains {gain:.0%}, "
                                      f"under {cfg.workload_min_gain:.0%}: plan kept", **seen)
                return "workload_shift.kept"
            self._shift_considered = None
            await self._publish(new_plan, "workload_shift", f"{moved}; {len(changes.role_flips)} role flip(s), "
                                f"goodput {changes.goodput_kept:.2f} -> {changes.goodput_after:.2f} req/s",
                                changes=_changes_dict(changes), expected=new_plan.expected, **seen)
        self._wake.set()  # the reconcile pass switches the flipped replicas (after draining)
        return "workload_shift"

    # -- loss and replacement -----------------------------------------------------------------------------
    async def handle_lost(self, node_ids: list[str], seen_at: float | None = None, cause: str = "") -> None:
        """Reschedule without the lost nodes (no weight reload), publish, then ask for replacements.

        A loss that could not be published (Redis down) is not marked handled: the next reconcile pass
        finds the node dead in the plan and tries again."""
        ids = [n for n in dict.fromkeys(node_ids) if n not in self._losing]
        if not ids:
            return
        self._losing.update(ids)
        try:
            lost = await self._reschedule_without(ids, time.time() if seen_at is None else seen_at, cause)
        finally:
            self._losing.difference_update(ids)
        self._wake.set()
        if self.cfg.replace_lost:
            for node_id in lost:
                self._start_replacement(node_id)

    async def _reschedule_without(self, node_ids: list[str], seen_at: float, cause: str) -> list[str]:
        """Publish a plan without ``node_ids`` (those still in the plan); returns the ones removed."""
        async with self._plan_lock:
            plan = self.plan
            if plan is None:
                return []
            in_plan = {i.id for i in plan.instances}
            lost = [n for n in node_ids if n in in_plan]
            if not lost:
                return []
            t0 = time.perf_counter()
            try:
                new_plan, changes, _ = await self._rescheduled(plan, lost_nodes=lost)
            except Exception as e:
                await self.state.emit("reschedule.failed", f"lost {lost}: {e}", lost=lost)
                new_plan, changes = _without_nodes(plan, lost), None
            solve_s = time.perf_counter() - t0
            if self.cfg.replace_lost:  # recorded before the plan forgets the nodes, for a successor to resume
                for node_id in lost:
                    self._replacing.setdefault(node_id, "")
                await self._save_replacements()
            lost_replicas = [r.id for r in plan.replicas if set(r.node_ids) & set(lost)]
            for rid in lost_replicas:
                await self.state.delete_replica(rid)
            version = await self._publish(
                new_plan, "reschedule", f"lost {', '.join(lost)} ({cause})" if cause else f"lost {', '.join(lost)}",
                lost=lost, dropped_replicas=lost_replicas, solve_ms=round(solve_s * 1000, 2),
                reschedule_ms=round((time.time() - seen_at) * 1000, 2),
                changes=_changes_dict(changes), expected=new_plan.expected,
            )
            log.info("rescheduled after losing %s in %.1f ms (plan v%d)", lost, (time.time() - seen_at) * 1000,
                     version)
            self._stop_survivors(plan, lost_replicas, lost)
            return lost

    def _stop_survivors(self, plan: Plan, replica_ids: list[str], lost: list[str]) -> None:
        """A dropped replica over several nodes still runs on the nodes not lost, holding their GPUs (SGLang
        followers write no record, so no later pass would find them): stop it there, in the background.
        Busy under the replica's id, so a record a surviving rank 0 rewrites meanwhile is not stopped twice."""
        for rid in replica_ids:
            survivors = [n for n in plan.replica(rid).node_ids if n not in lost]
            if survivors:
                self._run_busy(rid, self._stop_on_ids(rid, survivors))

    async def _stop_on_ids(self, replica_id: str, node_ids: list[str]) -> None:
        await self._stop_on(replica_id, _ready(await self.state.nodes(), node_ids))
        await self.state.delete_replica(replica_id)  # rank 0 writes "stopped" as it stops; the plan has no such replica

    async def _save_replacements(self) -> None:
        """Write the replacements in progress to Redis meta (the lock keeps the last write the latest)."""
        async with self._persist_lock:
            await self.state.set_meta(**{REPLACEMENTS_META_KEY: dict(self._replacing)})

    async def _resume_replacements(self) -> None:
        """Pick up the replacements a previous controller recorded and did not finish."""
        saved = (await self.state.meta()).get(REPLACEMENTS_META_KEY)
        if not isinstance(saved, dict) or not saved:
            return
        for lost_id, node_id in saved.items():
            self._replacing[str(lost_id)] = str(node_id or "")
        await self.state.emit("replacement.resumed", f"{len(saved)} replacement(s) left by a previous controller",
                              replacements=dict(self._replacing))
        for lost_id in list(self._replacing):
            self._start_replacement(lost_id)

    def _start_replacement(self, lost_id: str) -> None:
        if lost_id in self._replace_running:
            return
        self._replace_running.add(lost_id)
        task = self._spawn(self.replace(lost_id), f"replace-{lost_id}")
        task.add_done_callback(lambda _: self._replace_running.discard(lost_id))

    async def replace(self, lost_id: str) -> None:
        """Rent a node like the lost one (spot first; on-demand fallback; within budget) and fold it in.

        The replacement's id is chosen and recorded in Redis before it is asked for, so neither this
        controller's reconcile pass nor a successor mistakes it for an unplanned node. A budget refusal
        is retried every ``replace_retry_s`` (capacity may free up); a replacement that fails to come up
        is itself replaced, up to ``replace_max_failures`` times. Cancellation (the controller stopping)
        leaves the record in Redis for the successor."""
        from provisioner.base import next_generation_id
        from provisioner.budget import BudgetExceeded

        t0 = time.time()
        source, failures, refused = lost_id, 0, False
        while True:
            node_id = self._replacing.get(lost_id) or next_generation_id(source)
            if self.plan is not None and node_id in {i.id for i in self.plan.instances}:
                break  # folded in already (by a predecessor that stopped before clearing the record)
            if self._replacing.get(lost_id) != node_id:
                self._replacing[lost_id] = node_id
                await self._save_replacements()
            try:
                rec = await self.state.get_node(node_id)
                if rec is None:
                    rec = await self.provisioner.replace(source, new_node_id=node_id)
                if rec.status not in LIVE:
                    raise RuntimeError(f"node {node_id} is {rec.status}")
                ready = await self.provisioner.wait_ready(node_id, timeout_s=self.cfg.replace_ready_timeout_s)
            except BudgetExceeded as e:
                if not refused:
                    refused = True
                    await self.state.emit("replacement.refused", f"{e}; asking again every "
                                          f"{self.cfg.replace_retry_s:g}s", lost=lost_id, node=node_id)
                await asyncio.sleep(self.cfg.replace_retry_s)
                continue
            except Exception as e:
                failures += 1
                await self.state.emit("replacement.failed", f"{node_id}: {type(e).__name__}: {e}", lost=lost_id,
                                      node=node_id, failures=failures)
                live = await self.state.get_node(node_id)
                if live is not None and live.status in LIVE:  # e.g. never became ready: stop paying for it
                    await self._release(node_id, "replacement did not come up")
                if failures >= self.cfg.replace_max_failures:
                    await self.state.emit("replacement.abandoned", f"{lost_id}: {failures} replacements failed",
                                          lost=lost_id)
                    break
                source, self._replacing[lost_id] = node_id, ""
                await asyncio.sleep(self.cfg.replace_retry_s)
                continue
            await self.fold_in([ready], reason=f"replacement for {lost_id}", started_at=t0)
            break
        self._replacing.pop(lost_id, None)
        await self._save_replacements()

    async def fold_in(self, nodes: list[NodeRecord], reason: str, started_at: float | None = None) -> None:
        """Re-plan with new nodes added (survivors keep their groups); their replicas start on reconcile.

        If the re-plan fails the nodes are released: nothing would ever use them."""
        unused: list[str] = []
        async with self._plan_lock:
            plan = self.plan
            if plan is None:
                return
            new = [Instance(n.id, n.instance_type, n.gpu_type, n.gpu_count, n.spot, n.price_per_hour, n.region,
                            n.cloud) for n in nodes if n.id not in {i.id for i in plan.instances}]
            if not new:
                return
            try:
                new_plan, changes, solve_ms = await self._rescheduled(plan, new_instances=new)
            except Exception as e:
                unused = [n.id for n in new]
                await self.state.emit("replan.failed", f"cannot fold in {', '.join(unused)}: {e}", nodes=unused)
            else:
                await self._publish(
                    new_plan, "replan", reason, added=[n.id for n in new], solve_ms=solve_ms,
                    replace_s=round(time.time() - started_at, 3) if started_at else None,
                    changes=_changes_dict(changes), expected=new_plan.expected,
                )
        for node_id in unused:
            await self._release(node_id, "the re-plan could not use it")
        self._wake.set()

    async def re_place(self, moved: list[Instance]) -> None:
        """Re-plan on where nodes really run: a launch that failed over to another region (or cloud),
        or fell back from spot to on-demand, has other links and another price than the plan says.
        Survivors keep their GPUs; routing (and phases, if that pays) follow the real network."""
        async with self._plan_lock:
            plan = self.plan
            if plan is None:
                return
            current = {i.id: i for i in plan.instances}  # a re-plan since the reconcile pass may have taken them
            moved = [m for m in moved if m.id in current and _placement_differs(current[m.id], m)]
            key = frozenset(moved)
            if not moved or key in self._unplaceable:
                return
            ids = [m.id for m in moved]
            try:
                new_plan, changes, solve_ms = await self._rescheduled(plan, placed=moved)
            except Exception as e:
                self._unplaceable.add(key)
                await self.state.emit("replan.failed", f"cannot re-plan for where {', '.join(ids)} run: {e}",
                                      nodes=ids)
                return
            reason = "; ".join(f"{n} runs {to}, planned {was}" for n, was, to in changes.moved_nodes)
            await self._publish(new_plan, "replan", reason, moved=ids, solve_ms=solve_ms,
                                changes=_changes_dict(changes), expected=new_plan.expected)
        self._wake.set()

    # -- reconcile -------------------------------------------------------------------------------------
    async def reconcile(self) -> None:
        plan = self.plan
        if plan is None:
            return
        nodes = await self.state.nodes()
        records = await self.state.replicas()
        plan_nodes = {i.id for i in plan.instances}
        # 1. nodes: rent what the plan has and nobody asked for yet; notice losses we missed
        dead = [n for n in plan_nodes if n in nodes and nodes[n].status in LOST and n not in self._losing]
        if dead:
            self._spawn(self.handle_lost(dead, cause="found lost on reconcile"), "lost-reconcile")
        for inst in plan.instances:
            if inst.id not in nodes:
                await self._acquire(inst)
        # 1b. nodes running somewhere other than planned (a failover region, on-demand for spot)
        moved = [a for i in plan.instances if (a := running_as(i, nodes.get(i.id))) is not None]
        if moved and "re-place" not in self._busy:
            self._run_busy("re-place", self.re_place(moved))
        # 2. replicas the plan wants
        for spec in plan.replicas:
            if spec.id in self._busy:
                continue
            hosts = [nodes.get(n) for n in spec.node_ids]
            if any(h is None or h.status != "ready" for h in hosts):
                continue
            rec = records.get(spec.id)
            if rec is None or rec.status == "stopped":
                self._run_busy(spec.id, self._start_replica(plan, spec.id, hosts))
            elif rec.role != spec.role and rec.status == "ready" and not strands_its_role(plan, rec, records):
                self._run_busy(spec.id, self._switch_role(rec, spec.role, hosts))
        # 3. replicas the plan no longer has
        wanted = {r.id for r in plan.replicas}
        for rid, rec in records.items():
            if rid not in wanted and rid not in self._busy and not set(rec.node_ids) & self._draining:
                self._run_busy(rid, self._stop_replica(rec, nodes))
        # 4. nodes the plan no longer has (not awaited replacements). The current plan, not this pass's
        # snapshot: a replacement folded in during the awaits above is in it (and no longer awaited).
        planned = {i.id for i in self.plan.instances} if self.plan is not None else plan_nodes
        awaited = set(self._replacing.values()) | set(self._scaling) | self._draining
        for nid, node in nodes.items():
            if nid not in planned and nid not in awaited and node.status in LIVE \
                    and f"release-{nid}" not in self._busy:
                self._run_busy(f"release-{nid}", self._release(nid, "not in the plan"))
        # 5. replacements whose task ended on an error (e.g. Redis): their records say they are not done
        for lost_id in list(self._replacing):
            self._start_replacement(lost_id)

    def _run_busy(self, key: str, coro: Any) -> None:
        self._busy[key] += 1

        async def wrapped() -> None:
            try:
                await coro
            finally:
                self._busy[key] -= 1
                if self._busy[key] <= 0:
                    del self._busy[key]
                self._wake.set()

        self._spawn(wrapped(), f"busy-{key}")

    async def _acquire(self, inst: Instance) -> None:
        from provisioner.base import NodeRequest
        from provisioner.budget import BudgetExceeded

        try:
            await self.provisioner.acquire(NodeRequest.from_instance(inst))
            self._refused.discard(inst.id)
        except BudgetExceeded as e:
            if inst.id not in self._refused:
                self._refused.add(inst.id)
                await self.state.emit("node.deferred", f"{inst.id}: {e}", node=inst.id)
        except Exception as e:  # e.g. ProvisionError: this node cannot be had; the rest of the pass goes on
            if inst.id not in self._refused:
                self._refused.add(inst.id)
                log.warning("cannot acquire %s: %s", inst.id, e)
                await self.state.emit("node.acquire_failed", f"{inst.id}: {type(e).__name__}: {e}", node=inst.id)

    def _agent(self, node: NodeRecord) -> Any:
        from replicas.agent_client import AgentClient

        agent = self._agents.get(node.agent_url)
        if agent is None:
            agent = self._agents[node.agent_url] = AgentClient(node.agent_url, timeout_s=60)
        return agent

    def _kv_compression(self, plan: Plan, replica_id: str) -> str:
        modes = Counter(r.kv_compression for r in plan.routing if replica_id in (r.prefill, r.decode))
        return modes.most_common(1)[0][0] if modes else "none"

    async def _start_replica(self, plan: Plan, replica_id: str, hosts: list[NodeRecord | None]) -> None:
        spec = plan.replica(replica_id)
        head = hosts[0]
        assert head is not None
        body: dict[str, Any] = {
            "id": spec.id, "engine": self.cfg.engine, "model": self.cfg.engine_model or self.cfg.model,
            "role": spec.role, "tp": spec.tp, "pp": spec.pp,
            "gpus": [i for n, i in spec.gpus if n == head.id],
            "kv_compression": self._kv_compression(plan, spec.id),
        }
        if self.cfg.max_batch:
            body["max_batch"] = self.cfg.max_batch
        if self.cfg.engine == "sglang" and len(spec.node_ids) > 1:  # SGLang: one process per node
            await self._start_ranks(spec, body, hosts)  # each rank's GPUs and launch hints set there
            return
        if len(spec.node_ids) > 1:  # one replica over several nodes (PP across nodes): the head's agent
            body["extra_args"] = {"nnodes": len(spec.node_ids), "layer_split": spec.layer_split}
        elif self.cfg.engine == "sglang" and spec.mixed_chunk:  # the colocated scheduling the plan assumed
            body["extra_args"] = ["--enable-mixed-chunk"] + (
                ["--chunked-prefill-size", str(spec.prefill_chunk)] if spec.prefill_chunk > 0 else [])
        t0 = time.perf_counter()
        try:
            res = await self._agent(head).start_replica(body)
        except Exception as e:
            await self.state.emit("replica.start_failed", f"{spec.id} on {head.id}: {e}", replica=spec.id)
            await asyncio.sleep(2.0)
            return
        await self.state.emit("replica.started", f"{spec.id} as {spec.role} on {head.id}", replica=spec.id,
                              node=head.id, role=spec.role, url=res.get("url"),
                              start_ms=round((time.perf_counter() - t0) * 1e3, 2))

    async def _start_ranks(self, spec: ReplicaSpec, body: dict[str, Any], hosts: list[NodeRecord | None]) -> None:
        """Start a multi-node SGLang replica on every node: followers together, then rank 0 (it serves HTTP).

        All or nothing: reconcile starts it only with every node ready, and a rank that fails to start stops
        the others, which would otherwise hold their GPUs and refuse (409) the next attempt."""
        nodes = [h for h in hosts if h is not None]
        assert len(nodes) == len(spec.node_ids)
        head = nodes[0]
        addr = dist_init_addr(head, spec.id)
        if addr is None:
            await self.state.emit("replica.start_failed", f"{spec.id}: head node {head.id} has no agent host "
                                  f"for --dist-init-addr ({head.agent_url!r})", replica=spec.id)
            return
        bodies = rank_bodies(spec, body, addr)
        t0 = time.perf_counter()
        try:
            await self._start_followers(list(zip(nodes[1:], bodies[1:], strict=True)))
            res = await self._agent(head).start_replica(bodies[0])
        except Exception as e:
            await self._stop_on(spec.id, nodes)
            await self.state.emit("replica.start_failed", f"{spec.id} on {', '.join(spec.node_ids)}: {e}",
                                  replica=spec.id, nodes=spec.node_ids)
            await asyncio.sleep(2.0)
            return
        await self.state.emit("replica.started", f"{spec.id} as {spec.role} on {', '.join(spec.node_ids)} "
                              f"(rank 0 on {head.id})", replica=spec.id, node=head.id, nodes=spec.node_ids,
                              role=spec.role, url=res.get("url"), dist_init_addr=addr,
                              start_ms=round((time.perf_counter() - t0) * 1e3, 2))

    async def _start_followers(self, ranks: list[tuple[NodeRecord, dict[str, Any]]]) -> None:
        """Start ranks > 0 concurrently; wait for all of them (none left in flight), then raise if any failed."""
        results = await asyncio.gather(*(self._agent(n).start_replica(b) for n, b in ranks), return_exceptions=True)
        failed = [f"rank {b['extra_args']['node_rank']} on {n.id}: {r}"
                  for (n, b), r in zip(ranks, results, strict=True) if isinstance(r, BaseException)]
        if failed:
            raise RuntimeError("; ".join(failed))

    async def _stop_on(self, replica_id: str, nodes: list[NodeRecord]) -> None:
        """Stop a replica on each of ``nodes`` at once; a node that does not run it (404) or is gone is fine."""
        await asyncio.gather(*(self._agent(n).stop_replica(replica_id) for n in nodes), return_exceptions=True)

    async def _switch_role(self, rec: ReplicaRecord, role: str, hosts: list[NodeRecord | None]) -> None:
        """Switch in place through rank 0 (the only rank with HTTP), or restart every rank for colocated."""
        head = hosts[0]
        assert head is not None
        t0 = time.perf_counter()
        if "both" in (rec.role, role):
            # SGLang switches prefill <-> decode in place; to or from colocated takes a restart (weights reload)
            await self._stop_on(rec.id, [h for h in hosts if h is not None and h.status == "ready"])
            await self.state.delete_replica(rec.id)
            await self.state.emit("replica.restart_for_role", f"{rec.id} {rec.role} -> {role}: restart, no in-place "
                                  "switch to or from colocated", replica=rec.id, old_role=rec.role, new_role=role)
            return  # the next reconcile pass starts it with the plan's role
        try:
            res = await self._agent(head).switch_role(rec.id, role, drain=True, timeout_s=self.cfg.drain_timeout_s)
        except Exception as e:
            await self.state.emit("role_switch.failed", f"{rec.id} {rec.role}->{role}: {e}", replica=rec.id)
            await asyncio.sleep(1.0)
            return
        await self.state.emit("role_switch", f"{rec.id} {rec.role} -> {role}", replica=rec.id, old_role=rec.role,
                              new_role=role, switch_ms=round((time.perf_counter() - t0) * 1000, 2), result=res)

    async def _stop_replica(self, rec: ReplicaRecord, nodes: dict[str, NodeRecord]) -> None:
        """Stop the replica on every node it spans (each rank of a multi-node one), then drop its record."""
        await self._stop_on(rec.id, _ready(nodes, rec.node_ids))
        await self.state.delete_replica(rec.id)
        await self.state.emit("replica.stopped", f"{rec.id}: not in the plan", replica=rec.id)

    async def _release(self, node_id: str, reason: str) -> None:
        try:
            await self.provisioner.release(node_id, reason)
        except Exception as e:
            await self.state.emit("node.release_failed", f"{node_id}: {e}", node=node_id)


PRICE_TOLERANCE = 0.01  # relative: a price that differs less is the same market (catalog rounding)


def strands_its_role(plan: Plan, rec: ReplicaRecord, records: dict[str, ReplicaRecord]) -> bool:
    """Would switching ``rec`` now leave nothing to serve with (no ready colocated replica, no ready
    prefill-decode pair) while a replica the plan gives ``rec``'s current role is still coming up? Then
    the switch waits for it: make before break. After a loss the reschedule flips a prefill replica to
    decode; the replacement node's decode replica then takes over, and flipping back before it is ready
    left no decode worker at all for the seconds it took to boot (a 5 s stall in `bench/chaos_soak.py`)."""
    planned = {s.id for s in plan.replicas}
    others = [r for rid, r in records.items() if rid in planned and rid != rec.id and r.status == "ready"]
    if _servable(others) or not _servable([*others, rec]):
        return False
    return any(s.role == rec.role and s.id != rec.id and (s.id not in records or records[s.id].status != "ready")
               for s in plan.replicas)


async def _holding(http: Any, urls: list[str]) -> bool:
    """Whether any of these engines still holds a request (SGLang's ``/get_load``); one that does not answer
    holds nothing we could wait for."""
    for url in urls:
        try:
            async with http.get(url + "/get_load") as r:
                loads = await r.json()
            if sum(int(d.get("num_reqs", 0)) for d in loads):
                return True
        except Exception:
            continue
    return False


def _servable(records: list[ReplicaRecord]) -> bool:
    roles = {r.role for r in records}
    return "both" in roles or {"prefill", "decode"} <= roles


def _placement_differs(planned: Instance, actual: Instance) -> bool:
    return ((planned.cloud, planned.region, planned.spot) != (actual.cloud, actual.region, actual.spot)
            or abs(planned.price_per_hour - actual.price_per_hour) > PRICE_TOLERANCE * max(planned.price_per_hour,
                                                                                             1e-9))


def running_as(planned: Instance, node: NodeRecord | None) -> Instance | None:
    """The plan instance as its ready node really runs, if that differs from the plan (else None).
    GPU type and count stay the plan's: the provisioner rented them as asked; a record that does not
    say where it runs (no cloud or region yet) says nothing."""
    if node is None or node.status != "ready" or not node.cloud or not node.region:
        return None
    actual = replace(planned, instance_type=node.instance_type or planned.instance_type, spot=node.spot,
                     price_per_hour=node.price_per_hour, region=node.region, cloud=node.cloud)
    return actual if _placement_differs(planned, actual) else None


def _ready(nodes: dict[str, NodeRecord], node_ids: list[str]) -> list[NodeRecord]:
    """The records of those of ``node_ids`` that are ready (an agent to talk to), in order."""
    return [nodes[n] for n in node_ids if n in nodes and nodes[n].status == "ready"]


def _warm_up() -> None:
    """Import the search code (numpy, scipy, HiGHS) before it is needed on the clock."""
    import planner.reschedule
    import planner.scheduler  # noqa: F401


def _without_nodes(plan: Plan, lost: list[str]) -> Plan:
    """The plan minus the lost nodes and their replicas, routing renormalised (the no-solver fallback)."""
    from planner.plan import Route

    keep = [r for r in plan.replicas if not set(r.node_ids) & set(lost)]
    ids = {r.id for r in keep}
    routes = [r for r in plan.routing if r.prefill in ids and r.decode in ids]
    total = sum(r.weight for r in routes) or 1.0
    return replace(plan, instances=[i for i in plan.instances if i.id not in lost], replicas=keep,
                   routing=[Route(r.prefill, r.decode, r.weight / total, r.kv_compression) for r in routes],
                   expected={}, network=dict(plan.network), created_at=time.time(),
                   next_replica_id=plan.first_free_replica_number())


def _changes_dict(changes: Any) -> Any:
    if changes is None:
        return None
    if hasattr(changes, "to_dict"):
        return changes.to_dict()
    with contextlib.suppress(TypeError):
        return asdict(changes)
    return str(changes)


def _log_task_error(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("controller task %s failed", task.get_name(), exc_info=task.exception())


# -- process entry point ------------------------------------------------------------------------------------
def build_provisioner(state: StateStore, redis_url: str, cfg: ControllerConfig) -> Any:
    from provisioner.budget import BudgetLedger

    ledger = BudgetLedger(state)
    if cfg.provider == "local":
        from provisioner.local import LocalProvisioner

        catalog = cfg.catalogs[0] if cfg.catalogs else None
        return ledger, LocalProvisioner(state, ledger, redis_url=redis_url, catalog=catalog,
                                        workdir=cfg.workdir or None)
    if cfg.provider == "skypilot":
        from provisioner.skypilot import SkyPilotProvisioner

        return ledger, SkyPilotProvisioner(state, ledger, redis_url=redis_url)
    raise ValueError(f"unknown provider {cfg.provider!r} (local or skypilot)")


# A controller whose Redis is gone for good (its deployment torn down under it) tried again every second and
# logged 1.4 MB an hour; now the pause doubles up to this, and a Redis that comes back is found within it.
REDIS_RETRY_MAX_S = 30.0


async def serve(redis_url: str, deployment: str, config: ControllerConfig | None) -> None:
    """Run the controller until SIGTERM (release every node) or SIGINT (leave them for a successor).

    A controller that stepped down (lease not renewable, or taken) closes its provisioner, leaving the
    nodes up, and waits to take the lease again with a fresh one that adopts them from Redis."""
    from redis.exceptions import RedisError

    state = StateStore.from_url(redis_url, deployment)
    if config is None:
        meta = await state.meta()
        if CONFIG_META_KEY not in meta:
            raise SystemExit(f"error: deployment {deployment!r} has no controller config in Redis; pass --config")
        config = ControllerConfig.from_dict(meta[CONFIG_META_KEY])
    stop = asyncio.Event()
    release_on_exit = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGTERM = `tsctl down`: stop and release every node. SIGINT (`tsctl restart`): stop, leave the nodes.
    loop.add_signal_handler(signal.SIGTERM, lambda: (release_on_exit.set(), stop.set()))
    loop.add_signal_handler(signal.SIGINT, stop.set)
    owner = ""
    unreachable = 0  # Redis failures in a row: the pause before trying again doubles, up to REDIS_RETRY_MAX_S
    try:
        while not stop.is_set():
            ledger, provisioner = build_provisioner(state, redis_url, config)
            controller = Controller(state, provisioner, config)
            owner = controller.owner
            try:
                await ledger.set_limit(config.budget)
                await controller.run(stop)
                unreachable = 0
            except (RedisError, OSError) as e:
                unreachable += 1
                log.error("controller stopped: Redis unreachable (%s); %d time(s) in a row", e, unreachable)
            finally:
                await provisioner.close(release_nodes=release_on_exit.is_set())
            if not stop.is_set():
                pause = min(REDIS_RETRY_MAX_S, 2.0 ** max(0, unreachable - 1))
                log.warning("stepped down; trying to take the controller lease again in %.0f s", pause)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
    finally:
        if release_on_exit.is_set():
            with contextlib.suppress(Exception):
                await state.emit("controller.stopped", "shut down; nodes released", owner=owner)
        await state.close()


def main(argv: list[str] | None = None) -> None:
    import orjson

    p = argparse.ArgumentParser(prog="python -m planner.controller", description=__doc__.split("\n")[0])
    p.add_argument("--redis-url", required=True)
    p.add_argument("--deployment", default="default")
    p.add_argument("--config", help="ControllerConfig as JSON (default: the one stored in Redis)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ControllerConfig.from_dict(orjson.loads(args.config)) if args.config else None
    try:
        import uvloop

        uvloop.run(serve(args.redis_url, args.deployment, config))
    except ImportError:
        asyncio.run(serve(args.redis_url, args.deployment, config))


if __name__ == "__main__":
    main()
