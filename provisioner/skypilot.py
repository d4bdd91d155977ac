"""Cloud nodes through SkyPilot: one cluster per node, spot first, on-demand when spot keeps failing.

Each node is a SkyPilot cluster named from the deployment and the node id (``skypilot_task.cluster_name``)
running the task of ``skypilot_task.node_task_config``: the plan's GPUs, spot or not, the candidate
offers as ``any_of``, ``max_hourly_cost`` equal to the budget hold, the agent and worker ports, setup
that installs SGLang and ThunderServe, and the node agent as the run command.

SkyPilot's SDK is asynchronous by request id: ``sky.launch`` returns an id, ``sky.stream_and_get`` /
``sky.get`` wait for the result. Those calls block, so they run in threads and the event loop stays
free. SkyPilot does not recover unmanaged spot clusters, so this provisioner watches them:
``sky.status(refresh=AUTO)`` every ``poll_interval_s`` (a cluster that vanished was reclaimed; INIT with
``init_kind='unhealthy'`` is a partial preemption; STOPPED is a spot "stop"), and ``FORCE`` at once for a
node whose agent heartbeat expired. Budget holds are released only when the cluster no longer bills:
at once for a vanished cluster, after ``sky.down`` otherwise.

``sdk`` is the ``sky`` module itself unless a test passes a double with the same functions.
``sky`` is imported only inside this module's functions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from planner.state import NodeRecord, StateStore
from provisioner.base import LIVE_STATUSES, NodeRequest, Offer, ProvisionError
from provisioner.budget import BudgetExceeded, BudgetLedger
from provisioner.events import event_data
from provisioner.fallback import SpotFallbackPolicy
from provisioner.health import agent_healthy
from provisioner.managed import ManagedProvisioner, NodeState
from provisioner.sky_catalog import DEFAULT_CLOUDS, catalog_offers, hourly_price, infeasibility
from provisioner.skypilot_task import NodeTaskInput, NodeTaskSettings, build_task, cluster_name, node_task_config

log = logging.getLogger(__name__)
PRICE_EPS = 1e-6


@dataclass
class _Market:
    """Candidates for one market (spot or on-demand) and the price cap that covers all of them."""

    spot: bool
    candidates: list[Offer]
    cap: float
    why: str
    dropped: list[str] = field(default_factory=list)


@dataclass
class _SkyNode(NodeState):
    """What this process knows of one node's cluster beyond its Redis record."""

    id: str
    cluster: str
    request: NodeRequest
    spot: bool
    gpu_type: str
    log_path: Path
    request_id: str = ""  # the API server's id of the launch in flight


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]


class SkyPilotProvisioner(ManagedProvisioner[_SkyNode]):
    """Nodes as SkyPilot clusters (``sky.launch`` / ``sky.status`` / ``sky.down``)."""

    ref_prefix = "sky:"
    close_failure = "cluster(s) may still be up"
    settle_timeout_s = None  # a loss being recorded may be running sky.down, which takes minutes

    def __init__(
        self,
        state: StateStore,
        ledger: BudgetLedger,
        settings: NodeTaskSettings | None = None,
        *,
        redis_url: str | None = None,
        sdk: Any = None,
        fallback: SpotFallbackPolicy | None = None,
        clouds: tuple[str, ...] = DEFAULT_CLOUDS,
        regions: tuple[str, ...] = (),
        poll_interval_s: float = 30.0,
        heartbeat_check_s: float = 5.0,
        ready_timeout_s: float = 1800.0,
        on_demand_attempts: int = 2,
        retry_delay_s: float = 10.0,
        check_feasibility: bool = True,
        log_dir: str | Path | None = None,
    ) -> None:
        super().__init__(state, ledger, fallback)
        if settings is None:
            if not redis_url:
                raise ValueError("SkyPilotProvisioner needs settings or the redis_url the nodes will use")
            settings = NodeTaskSettings(redis_url=redis_url, deployment=state.deployment)
        if settings.deployment != state.deployment:
            raise ValueError(f"settings are for deployment {settings.deployment!r}, state for {state.deployment!r}")
        self.settings = settings
        self.sdk = sdk
        self.clouds = clouds
        self.regions = regions
        self.poll_interval_s = poll_interval_s
        self.heartbeat_check_s = heartbeat_check_s
        self.ready_timeout_s = ready_timeout_s
        self.on_demand_attempts = on_demand_attempts
        self.retry_delay_s = retry_delay_s
        self.check_feasibility = check_feasibility
        self.log_dir = Path(log_dir) if log_dir else Path.home() / ".thunderserve" / "logs" / state.deployment

    # -- life cycle -----------------------------------------------------------------------------------
    async def _prepare(self) -> None:
        if self.sdk is None:
            import sky

            self.sdk = sky
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # -- SDK calls (blocking: always in a thread) ------------------------------------------------------
    async def _sdk_call(self, fn_name: str, *args: Any, **kwargs: Any) -> Any:
        """``sky.get(sky.<fn>(...))`` in a thread: the request id, then its result."""

        def call() -> Any:
            return self.sdk.get(getattr(self.sdk, fn_name)(*args, **kwargs))

        return await asyncio.to_thread(call)

    async def _down(self, cluster: str) -> str | None:
        """Take a cluster down; None when it is gone (or never existed), else the error."""
        from sky import exceptions as sky_exceptions

        try:
            await self._sdk_call("down", cluster)
        except sky_exceptions.ClusterDoesNotExist:
            return None
        except Exception as e:
            log.warning("sky.down(%s) failed: %s", cluster, e)
            return _one_line(e)
        return None

    # -- candidates and prices ------------------------------------------------------------------------
    def _market(self, request: NodeRequest, spot: bool, why: str) -> _Market:
        """Offers SkyPilot can launch in this market, priced by SkyPilot's catalog (runs in a thread)."""
        dropped: list[str] = []
        if request.offers:
            offers = []
            for o in request.offers:
                priced = replace(o, spot=spot)
                price = hourly_price(priced)
                if price is None:
                    dropped.append(f"{o.cloud} {o.instance_type}: no {'spot' if spot else 'on-demand'} price")
                    continue
                offers.append(replace(priced, price_per_hour=price))
        else:
            offers = catalog_offers(request.gpu_type, request.gpu_count, spot, self.clouds, self.regions)
            pinned = [o for o in offers if o.instance_type == request.instance_type]
            offers = pinned or offers
        if self.check_feasibility:
            kept = []
            for o in offers:
                why_not = infeasibility(o)
                if why_not:
                    dropped.append(why_not)
                else:
                    kept.append(o)
            offers = kept
        cap = request.max_price_per_hour
        if cap is not None:
            over = [o for o in offers if o.price_per_hour > cap + PRICE_EPS]
            dropped += [f"{o.cloud} {o.instance_type}: ${o.price_per_hour:.2f}/h over the cap" for o in over]
            offers = [o for o in offers if o.price_per_hour <= cap + PRICE_EPS]
        offers.sort(key=lambda o: (o.price_per_hour, o.cloud, o.instance_type))
        if offers:
            return _Market(spot, offers, max(o.price_per_hour for o in offers), why, dropped)
        if cap is not None and not request.offers:  # let SkyPilot search every enabled cloud under the cap
            return _Market(spot, [], cap, why + "; no catalog offer, SkyPilot searches under the cap", dropped)
        return _Market(spot, [], 0.0, why, dropped)

    async def _markets(self, request: NodeRequest) -> list[_Market]:
        """Markets to try, in order of preference (spot first unless the fallback policy says otherwise)."""
        spot, why = self._choose_market(request)
        if spot:
            first = await asyncio.to_thread(self._market, request, True, why)
            if first.cap > 0:
                return [first]
            od = await asyncio.to_thread(self._market, request, False, "no launchable spot offer: on-demand")
            od.dropped = first.dropped + od.dropped
            return [od]
        markets = [await asyncio.to_thread(self._market, request, False, why)]
        if request.spot:  # fallback to on-demand; stay on spot if on-demand does not fit the budget
            markets.append(await asyncio.to_thread(
                self._market, request, True, f"{why}; on-demand over budget, staying on spot"
            ))
        return markets

    # -- acquire ---------------------------------------------------------------------------------------
    async def acquire(self, request: NodeRequest) -> NodeRecord:
        await self._admit(request)
        if self.sdk is None:
            raise ProvisionError("call start() first")
        considered = await self._markets(request)
        markets = [m for m in considered if m.cap > 0]
        if not markets:
            dropped = "; ".join(d for m in considered for d in m.dropped)
            dropped = dropped or f"none in the {'/'.join(self.clouds)} catalogs"
            raise ProvisionError(f"node {request.node_id}: no offer SkyPilot can launch for {request.gpu_count}x "
                                 f"{request.gpu_type or request.instance_type} ({dropped})")
        cluster = cluster_name(self.state.deployment, request.node_id)
        market, record = await self._reserve_first(
            (market, self._pending_record(request, market, cluster), market.cap, market.why) for market in markets
        )
        node = _SkyNode(
            id=request.node_id, cluster=cluster, request=request, spot=market.spot, gpu_type=record.gpu_type,
            log_path=self.log_dir / f"{cluster}.log",
        )
        self._nodes[node.id] = node
        self._requests[node.id] = request
        node.tasks.append(asyncio.create_task(self._provision(node, market), name=f"provision-{node.id}"))
        return record

    def _pending_record(self, request: NodeRequest, market: _Market, cluster: str) -> NodeRecord:
        """The record a node starts with in ``market``: the offer's own type and place when it has one."""
        only = market.candidates[0] if len(market.candidates) == 1 else None
        return NodeRecord(
            id=request.node_id, instance_type=only.instance_type if only else request.instance_type,
            gpu_type=request.gpu_type or (only.gpu_type if only else ""), gpu_count=request.gpu_count,
            spot=market.spot, price_per_hour=market.cap, region=only.region if only else request.region,
            cloud=only.cloud if only else request.cloud, status="pending", provider_ref=self.ref_prefix + cluster,
        )

    def _stream_and_get(self, request_id: str, log_path: Path) -> Any:
        with open(log_path, "a") as out:
            return self.sdk.stream_and_get(request_id, output_stream=out)

    async def _provision(self, node: _SkyNode, market: _Market) -> None:
        """Bring the node up; anything unexpected on the way (a Redis or SDK error after the launch) fails it,
        so the cluster is taken down and the hold freed instead of a node left pending and billing."""
        try:
            await self._launch_until_ready(node, market)
        except Exception as e:
            log.exception("provisioning %s failed", node.cluster)
            await self._fail(node, f"provisioning {node.cluster} failed: {_one_line(e)}")

    async def _launch_until_ready(self, node: _SkyNode, market: _Market) -> None:
        """Launch (spot, retried, then on-demand), price the result, find the agent, wait for /health."""
        from sky import exceptions as sky_exceptions

        od_failures = 0
        started = time.monotonic()
        while True:
            node.spot = market.spot
            task_input = NodeTaskInput(
                node.id, node.gpu_type or node.request.gpu_type, node.request.gpu_count, market.spot, market.cap,
                tuple(market.candidates),
            )
            try:
                task = await asyncio.to_thread(build_task, node_task_config(task_input, self.settings))
                node.request_id = await asyncio.to_thread(self.sdk.launch, task, cluster_name=node.cluster)
                result = await asyncio.to_thread(self._stream_and_get, node.request_id, node.log_path)
                break
            except sky_exceptions.ResourcesUnavailableError as e:
                reason = _one_line(e)
            except Exception as e:
                await self._fail(node, f"launch of {node.cluster} failed: {_one_line(e)}")
                return
            await self.state.emit(
                "node.launch_failed", reason, node_id=node.id, cluster=node.cluster, spot=market.spot,
                attempt_s=round(time.monotonic() - started, 3),
            )
            if market.spot:
                self.fallback.record_spot_failure(node.gpu_type)
                if self.fallback.use_on_demand(node.gpu_type):
                    switched = await self._switch_to_on_demand(node)
                    if switched is None:
                        return
                    market = switched
            else:
                od_failures += 1
                if od_failures >= self.on_demand_attempts:
                    await self._fail(node, f"no on-demand capacity after {od_failures} attempts: {reason}")
                    return
            await asyncio.sleep(self.retry_delay_s)

        _job_id, handle = result
        launched = handle.launched_resources
        price = await asyncio.to_thread(launched.get_cost, 3600)
        if price > market.cap + PRICE_EPS:
            await self._fail(node, f"SkyPilot launched {launched} at ${price:.2f}/h, above the ${market.cap:.2f}/h cap")
            return
        await self.ledger.reserve(node.id, price, resize=True)  # lower the hold to what is charged
        await self.state.update_node(
            node.id, instance_type=launched.instance_type or "", cloud=str(launched.cloud).lower(),
            region=launched.region or "", spot=bool(launched.use_spot), price_per_hour=price,
        )
        launch_s = time.monotonic() - started
        try:
            endpoints = await self._sdk_call("endpoints", node.cluster, self.settings.agent_port)
        except Exception as e:
            await self._fail(node, f"no endpoint for the agent port {self.settings.agent_port}: {_one_line(e)}")
            return
        address = endpoints.get(self.settings.agent_port) or endpoints.get(str(self.settings.agent_port), "")
        if not address:
            await self._fail(node, f"SkyPilot lists no endpoint for the agent port {self.settings.agent_port}")
            return
        agent_url = address if address.startswith("http") else f"http://{address}"
        await self.state.update_node(node.id, agent_url=agent_url)
        assert self._session is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while not await agent_healthy(self._session, agent_url):
            if time.monotonic() >= deadline:
                await self._fail(
                    node, f"agent at {agent_url} did not answer /health within {self.ready_timeout_s:.0f}s"
                )
                return
            await asyncio.sleep(2.0)
        if node.finished or node.stopping:
            return
        node.ready_at = time.monotonic()
        await self._transition(
            node.id, "ready", f"{launched} up; agent answers /health at {agent_url}", release_budget=False,
            timing={"launch_s": launch_s, "ready_s": time.monotonic() - started},
        )

    async def _switch_to_on_demand(self, node: _SkyNode) -> _Market | None:
        """Re-plan the node on on-demand after repeated spot failures, re-sizing its hold; None if it failed."""
        reason = f"on-demand fallback: {self.fallback.reason(node.gpu_type)}"
        market = await asyncio.to_thread(self._market, node.request, False, reason)
        if market.cap <= 0:
            await self._fail(node, f"{reason}; but no launchable on-demand offer ({'; '.join(market.dropped)})")
            return None
        try:
            await self.ledger.reserve(node.id, market.cap, resize=True)
        except BudgetExceeded as e:
            await self._fail(node, f"{reason}; on-demand refused by the budget: {e}")
            return None
        only = market.candidates[0] if len(market.candidates) == 1 else None
        await self.state.update_node(
            node.id, spot=False, price_per_hour=market.cap, instance_type=only.instance_type if only else "",
        )
        await self.state.emit("node.fallback", reason, node_id=node.id, held=market.cap, cluster=node.cluster)
        return market

    async def _fail(self, node: _SkyNode, reason: str) -> None:
        """The node will not come up: take down whatever SkyPilot made, then free the budget if it is gone."""
        if node.finished or node.stopping:
            return
        node.finished = True
        try:
            down_error = await self._down(node.cluster)
            if down_error:
                reason += f"; sky.down failed ({down_error}), budget still held"
            await self._transition(node.id, "failed", reason, release_budget=down_error is None)
        finally:
            node.done.set()

    async def endpoint(self, node_id: str, port: int) -> str:
        """``http://host:port`` at which a port of the node is reached from outside (``sky.endpoints``).

        Some clouds forward ports (a container's 30001 is not the host's 30001); replica URLs that leave
        the node must go through this.
        """
        rec = await self.state.get_node(node_id)
        if rec is None or not rec.provider_ref.startswith(self.ref_prefix):
            raise ProvisionError(f"unknown SkyPilot node {node_id}")
        found = await self._sdk_call("endpoints", rec.provider_ref.removeprefix(self.ref_prefix), port)
        address = found.get(port) or found.get(str(port))
        if not address:
            raise ProvisionError(f"node {node_id}: SkyPilot lists no endpoint for port {port}")
        return address if address.startswith("http") else f"http://{address}"

    # -- watching ---------------------------------------------------------------------------------------
    async def _watch_loop(self) -> None:
        next_status = time.monotonic() + self.poll_interval_s
        while await self._pause(self.heartbeat_check_s):
            try:
                next_status = await self._poll_once(next_status)
            except Exception:  # an API-server hiccup must not end the watch
                log.exception("skypilot provisioner: status poll failed")

    def _ready_nodes(self) -> list[_SkyNode]:
        return [n for n in self._nodes.values() if n.ready_at is not None and not n.finished and not n.stopping]

    async def _poll_once(self, next_status: float) -> float:
        """Heartbeat check every round (FORCE status for suspects); AUTO status every ``poll_interval_s``."""
        import sky

        ready = self._ready_nodes()
        if not ready:
            return next_status
        alive = await self.state.alive([n.id for n in ready])
        now = time.monotonic()
        suspects = []
        for n in ready:
            if alive.get(n.id):
                n.heartbeat_seen = True
            elif n.heartbeat_seen or now - (n.ready_at or now) > 2 * self.settings.heartbeat_ttl_s:
                suspects.append(n)
        if suspects:
            await self.check_clusters(suspects, sky.StatusRefreshMode.FORCE, heartbeat_expired=True)
        if now >= next_status:
            await self.check_clusters([n for n in ready if n not in suspects], sky.StatusRefreshMode.AUTO)
            next_status = now + self.poll_interval_s
        return next_status

    async def check_clusters(self, nodes: list[_SkyNode] | None = None, refresh: Any = None,
                             heartbeat_expired: bool = False) -> None:
        """Ask ``sky.status`` about the nodes' clusters and act on what is gone, unhealthy or stopped."""
        import sky

        nodes = self._ready_nodes() if nodes is None else nodes
        refresh = sky.StatusRefreshMode.AUTO if refresh is None else refresh
        if not nodes:
            return
        records = await self._sdk_call("status", [n.cluster for n in nodes], refresh=refresh)
        by_name = {r.name: r for r in records}
        seen_by = f"sky.status(refresh={refresh.value})" + (" after heartbeat expiry" if heartbeat_expired else "")
        for node in nodes:
            if node.finished or node.stopping:
                continue
            rec = by_name.get(node.cluster)
            if rec is None:
                await self._lost(node, "preempted", f"cluster {node.cluster} is gone: reclaimed by the cloud or "
                                 "terminated outside ThunderServe", seen_by, billing_stopped=True)
            elif rec.status == sky.ClusterStatus.INIT and rec.init_kind != "launching":
                detail = rec.init_status_reason or rec.last_event or "no detail"
                await self._lost(node, "preempted", f"cluster {node.cluster} is INIT ({rec.init_kind or 'unhealthy'}): "
                                 f"partially preempted or its runtime died ({detail})", seen_by, billing_stopped=False)
            elif rec.status == sky.ClusterStatus.STOPPED:
                await self._lost(node, "preempted", f"cluster {node.cluster} was STOPPED by the cloud "
                                 "(spot interruption)", seen_by, billing_stopped=False)
            elif heartbeat_expired:
                await self._lost(node, "failed", f"agent heartbeat expired while cluster {node.cluster} is "
                                 f"{rec.status.value}", seen_by, billing_stopped=False)

    async def _lost(self, node: _SkyNode, kind: str, reason: str, seen_by: str, billing_stopped: bool) -> None:
        if node.finished or node.stopping:
            return
        node.finished = True
        detected_at = time.time()
        down_started = False
        try:
            if kind == "preempted" and node.spot:
                self.fallback.record_spot_failure(node.gpu_type)
            timing = {"uptime_s": time.monotonic() - node.ready_at} if node.ready_at else {}
            await self._transition(node.id, kind, f"{reason} (seen by {seen_by})",  # type: ignore[arg-type]
                                   release_budget=billing_stopped, timing=timing, detected_at=detected_at)
            if not billing_stopped:
                node.tasks.append(asyncio.create_task(self._down_after_loss(node), name=f"down-{node.id}"))
                down_started = True
        finally:
            if not down_started:
                node.done.set()

    async def _down_after_loss(self, node: _SkyNode, attempts: int = 3) -> None:
        """A lost cluster that may still bill (INIT, STOPPED, agent dead): down it, then free its hold."""
        try:
            error: str | None = "not tried"
            for attempt in range(attempts):
                error = await self._down(node.cluster)
                if error is None:
                    break
                await asyncio.sleep(self.retry_delay_s * (attempt + 1))
            if error is None:
                freed = await self.ledger.release(node.id)
                await self.state.emit("node.down", f"cluster {node.cluster} taken down after its loss",
                                      node_id=node.id, freed=freed)
            else:
                await self.state.emit("node.down_failed", f"sky.down {node.cluster} failed {attempts} times: "
                                      f"{error}; budget still held", node_id=node.id)
        finally:
            node.done.set()

    # -- release ----------------------------------------------------------------------------------------
    async def release(self, node_id: str, reason: str = "released") -> NodeRecord:
        started = time.monotonic()
        node = await self._claim_release(node_id, "SkyPilot")
        if isinstance(node, NodeRecord):
            return node
        if node.request_id and node.ready_at is None:
            try:  # a launch still running on the API server: stop it before taking the cluster down
                await asyncio.to_thread(self.sdk.api_cancel, node.request_id)
            except Exception as e:
                log.info("api_cancel(%s) failed: %s", node.request_id, e)
        error = await self._down(node.cluster)
        node.finished = True
        timing = {"down_s": time.monotonic() - started}
        if error:
            await self._transition(node_id, "failed", f"{reason}: sky.down {node.cluster} failed ({error}); budget "
                                   "still held", release_budget=False, timing=timing)
            node.done.set()
            raise ProvisionError(f"node {node_id}: sky.down {node.cluster} failed: {error}")
        event = await self._transition(node_id, "terminated", f"{reason}: sky.down {node.cluster}",
                                       release_budget=True, timing=timing)
        node.done.set()
        return event.record

    # -- restart ---------------------------------------------------------------------------------------
    async def _adopt(self) -> None:
        """Nodes a previous provisioner left: watch the ready ones, resume launches of the pending ones."""
        import sky

        ready: list[_SkyNode] = []
        for rec in await self.nodes():
            if rec.status not in LIVE_STATUSES or rec.id in self._nodes:
                continue
            request = NodeRequest(
                node_id=rec.id, gpu_type=rec.gpu_type, gpu_count=rec.gpu_count, spot=rec.spot,
                instance_type=rec.instance_type, max_price_per_hour=rec.price_per_hour,
            )
            node = _SkyNode(
                id=rec.id, cluster=rec.provider_ref.removeprefix(self.ref_prefix), request=request, spot=rec.spot,
                gpu_type=rec.gpu_type, log_path=self.log_dir / f"{rec.provider_ref.removeprefix(self.ref_prefix)}.log",
            )
            self._nodes[rec.id] = node
            self._requests[rec.id] = request
            await self.state.emit("node.adopted", f"{rec.status} after a provisioner restart", **event_data(rec, {}))
            if rec.status == "ready":
                node.ready_at = time.monotonic()
                ready.append(node)
            else:  # sky.launch on the same cluster name picks up where the interrupted launch was
                market = await asyncio.to_thread(self._market, request, rec.spot, "launch resumed after a restart")
                if market.cap <= 0:
                    market = _Market(rec.spot, [], rec.price_per_hour, "launch resumed after a restart")
                node.tasks.append(asyncio.create_task(self._provision(node, market), name=f"provision-{rec.id}"))
        if ready:
            await self.check_clusters(ready, sky.StatusRefreshMode.AUTO)
