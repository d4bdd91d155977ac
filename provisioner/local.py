"""Virtual nodes on this machine: each one a node agent in its own process group.

``LocalProvisioner`` gives ``tsctl up --local`` (and the tests) the same node life cycle a cloud gives:
a node has a declared instance type from ``deploy/local-catalog.csv`` (GPU type and count, on-demand
and spot $/h), takes time to come up (ready when its agent answers ``GET /health``), and can vanish
without warning: ``preempt`` SIGKILLs its whole process group, as a spot reclaim does. Loss is seen
two ways, like in the cloud: the agent process exits (we are its parent), or its heartbeat in Redis
expires (``StateStore.alive``: a hung or cut-off node). ``release`` stops the group cleanly (SIGTERM,
then SIGKILL) and leaves no process behind.

Nodes run in their own sessions, so they outlive a crashed controller; a new ``LocalProvisioner``
adopts them from Redis on ``start()``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import psutil

from planner.state import NodeRecord, StateStore
from provisioner.base import LIVE_STATUSES, NodeRequest, ProvisionError
from provisioner.budget import BudgetLedger
from provisioner.catalog import LOCAL_PLACE, Catalog, CatalogEntry, CatalogError, default_local_catalog_path
from provisioner.events import event_data
from provisioner.fallback import SpotFallbackPolicy
from provisioner.health import agent_healthy
from provisioner.managed import ManagedProvisioner, NodeState
from provisioner.process_group import NODE_TAG_ENV, kill_node, node_tag, parse_pgid, pid_alive, stop_node

REPO_ROOT = Path(__file__).resolve().parents[1]
# Runs before the agent when nodes must not outlive this process (tests): ask Linux to SIGKILL the agent
# when its parent dies (PR_SET_PDEATHSIG), then exec the agent itself, so the agent keeps its pid and group.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "if os.getppid() != int(os.environ['TS_PROVISIONER_PID']):\n"
    "    os._exit(1)\n"
    "os.execv(sys.executable, [sys.executable, '-m', *sys.argv[1:]])\n"
)
log = logging.getLogger(__name__)
LOG_TAIL_CHARS = 400


@dataclass
class _Choice:
    entry: CatalogEntry
    spot: bool
    price: float
    why: str


@dataclass
class _LocalNode(NodeState):
    """What this process knows of one virtual node beyond its Redis record."""

    id: str
    tag: str
    spot: bool
    gpu_type: str
    log_path: Path
    port: int = 0
    pid: int = 0  # the agent; leader of the node's process group, so also its pgid (0: not started yet)
    proc: asyncio.subprocess.Process | None = None  # None for a node adopted from a previous provisioner
    injected_at: float | None = None  # time.monotonic() of preempt()
    injected_reason: str = ""

    @property
    def agent_url(self) -> str:
        return f"http://127.0.0.1:{self.port}" if self.port else ""

    port_path: Path | None = None  # where the agent writes its port; default next to the log

    @property
    def port_file(self) -> Path:
        return self.port_path or self.log_path.with_suffix(".port")

    def read_port(self) -> int:
        """The port the agent bound (it writes it once listening); 0 until then."""
        try:
            text = self.port_file.read_text().strip()
        except OSError:
            return 0
        return int(text) if text.isdigit() else 0

    def log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " ".join(text[-LOG_TAIL_CHARS:].split())


class LocalProvisioner(ManagedProvisioner[_LocalNode]):
    """Virtual nodes as local process groups running ``python -m replicas.agent``."""

    ref_prefix = "local:"

    def __init__(
        self,
        state: StateStore,
        ledger: BudgetLedger,
        *,
        redis_url: str,
        catalog: Catalog | str | Path | None = None,
        workdir: str | Path | None = None,
        fallback: SpotFallbackPolicy | None = None,
        heartbeat_ttl_s: float = 3.0,
        ready_timeout_s: float = 60.0,
        monitor_interval_s: float = 0.25,
        stop_grace_s: float = 5.0,
        python: str = sys.executable,
        agent_module: str = "replicas.agent",
        agent_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        die_with_parent: bool = False,
    ) -> None:
        """``die_with_parent`` (Linux, for tests): agents are killed if this process dies without releasing
        them. Off by default: nodes outlive a crashed controller, and the next one adopts them."""
        super().__init__(state, ledger, fallback)
        if isinstance(catalog, Catalog):
            self.catalog = catalog
        else:
            self.catalog = Catalog.load(catalog or default_local_catalog_path(), cloud=LOCAL_PLACE)
        self.redis_url = redis_url
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"ts-local-{state.deployment}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.ready_timeout_s = ready_timeout_s
        self.monitor_interval_s = monitor_interval_s
        self.stop_grace_s = stop_grace_s
        self.python = python
        self.agent_module = agent_module
        self.agent_args = agent_args
        self.extra_env = dict(env or {})
        self.die_with_parent = die_with_parent and sys.platform == "linux"

    # -- acquire ---------------------------------------------------------------------------------------
    def _choices(self, request: NodeRequest) -> list[_Choice]:
        """Catalog entries and markets to try, in order of preference."""
        try:
            if request.instance_type:
                entries = [self.catalog.get(request.instance_type)]
            elif request.offers:
                # offers of types this catalog declares, whatever the planner named their cloud
                known = [o.instance_type for o in request.offers if self.catalog.has(o.instance_type)]
                entries = [self.catalog.get(t) for t in known]
            else:
                entries = self.catalog.find(request.gpu_type, request.gpu_count, spot=False)
        except CatalogError as e:
            raise ProvisionError(f"node {request.node_id}: {e}") from e
        if request.gpu_type and not request.instance_type:  # a named instance type decides the GPUs itself
            entries = [e for e in entries if e.gpu_type.lower() == request.gpu_type.lower()]
        if not entries:
            raise ProvisionError(
                f"node {request.node_id}: no local instance type has {request.gpu_count}x "
                f"{request.gpu_type or '?'} (catalog {self.catalog.source})"
            )
        spot, why = self._choose_market(request)
        cap = request.max_price_per_hour

        def cheapest(market_spot: bool, reason: str) -> _Choice | None:
            ok = [e for e in entries if not market_spot or e.spot_price is not None]
            ok = [e for e in ok if cap is None or e.price_for(market_spot) <= cap + 1e-9]
            if not ok:
                return None
            best = min(ok, key=lambda e: (e.price_for(market_spot), e.instance_type))
            return _Choice(best, market_spot, best.price_for(market_spot), reason)

        order: list[_Choice | None]
        if spot:
            order = [cheapest(True, why)]
            if order[0] is None:
                order = [cheapest(False, f"no spot offer for {entries[0].instance_type}: on-demand instead")]
        elif request.spot:  # spot asked for, the fallback policy says on-demand; spot if that is all we afford
            order = [cheapest(False, why), cheapest(True, f"{why}; on-demand over budget, staying on spot")]
        else:
            order = [cheapest(False, why)]
        found = [c for c in order if c is not None]
        if not found:
            raise ProvisionError(
                f"node {request.node_id}: no local instance type for {request.gpu_count}x {request.gpu_type} "
                f"at or under max_price_per_hour=${cap:.2f}/h"
            )
        return found

    async def acquire(self, request: NodeRequest) -> NodeRecord:
        await self._admit(request)
        options = (
            (choice, NodeRecord(
                id=request.node_id, instance_type=choice.entry.instance_type, gpu_type=choice.entry.gpu_type,
                gpu_count=choice.entry.gpu_count, spot=choice.spot, price_per_hour=choice.price,
                region=LOCAL_PLACE, cloud=LOCAL_PLACE, status="pending", provider_ref=self.ref_prefix,
            ), choice.price, choice.why)
            for choice in self._choices(request)
        )
        _, record = await self._reserve_first(options)
        self._requests[request.node_id] = request
        return await self._launch(record)

    def _agent_argv(self, node: _LocalNode, record: NodeRecord) -> list[str]:
        launcher = ["-c", _DIE_WITH_PARENT] if self.die_with_parent else ["-m"]
        return [
            self.python, *launcher, self.agent_module,
            "--node-id", node.id, "--host", "127.0.0.1", "--port", "0", "--port-file", str(node.port_file),
            "--log-dir", str(self.workdir / f"{node.id}-engines"),
            "--redis-url", self.redis_url, "--deployment", self.state.deployment,
            "--gpu-type", record.gpu_type, "--gpu-count", str(record.gpu_count),
            "--heartbeat-ttl", str(self.heartbeat_ttl_s),
            *self.agent_args,
        ]

    def _agent_env(self, node: _LocalNode) -> dict[str, str]:
        env = {**os.environ, **self.extra_env}
        env[NODE_TAG_ENV] = node.tag
        env["TS_NODE_ID"] = node.id
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env["TS_PROVISIONER_PID"] = str(os.getpid())
        return env

    async def _launch(self, record: NodeRecord) -> NodeRecord:
        node = _LocalNode(
            id=record.id, tag=node_tag(self.state.deployment, record.id), spot=record.spot,
            gpu_type=record.gpu_type, log_path=self.workdir / f"{record.id}.log",
        )
        node.port_file.unlink(missing_ok=True)  # a node id reused after a release: not the old port
        self._nodes[node.id] = node
        try:
            with _open_log(node.log_path) as log_file:
                node.proc = await asyncio.create_subprocess_exec(
                    *self._agent_argv(node, record), stdin=asyncio.subprocess.DEVNULL, stdout=log_file,
                    stderr=asyncio.subprocess.STDOUT, start_new_session=True, env=self._agent_env(node),
                    cwd=str(self.workdir),
                )
        except OSError as e:
            node.finished = True
            await self._transition(node.id, "failed", f"cannot start the node agent: {e}", release_budget=True)
            node.done.set()
            raise ProvisionError(f"node {node.id}: cannot start the node agent: {e}") from e
        node.pid = node.proc.pid
        if node.stopping:  # released while the agent was being started: the release found nothing to stop
            await asyncio.to_thread(kill_node, node.pid, node.tag)
            await node.proc.wait()
            raise ProvisionError(f"node {node.id} was released while its agent was being started")
        record = await self.state.update_node(node.id, provider_ref=f"{self.ref_prefix}pgid={node.pid}")
        node.tasks.append(asyncio.create_task(self._watch_exit(node), name=f"exit-{node.id}"))
        node.tasks.append(asyncio.create_task(self._bring_up(node), name=f"bring-up-{node.id}"))
        return record

    async def _bring_up(self, node: _LocalNode) -> None:
        """Bring the node up; an unexpected error on the way (e.g. Redis) fails it rather than leaving it
        pending forever (its processes are killed and its budget freed)."""
        try:
            await self._wait_healthy(node)
        except Exception as e:
            log.exception("bringing up %s failed", node.id)
            await self._finish_lost(node, "failed", f"bring-up failed: {type(e).__name__}: {e}")

    async def _wait_healthy(self, node: _LocalNode) -> None:
        """Wait for the agent's port, then poll ``/health`` until it answers (ready) or time is up (failed)."""
        assert self._session is not None, "call start() first"
        deadline = time.monotonic() + self.ready_timeout_s
        delay = 0.05
        while not node.finished:
            if not node.port and (port := await asyncio.to_thread(node.read_port)):
                node.port = port
                await self.state.update_node(node.id, agent_url=node.agent_url)
            if node.port and await agent_healthy(self._session, node.agent_url, timeout_s=1.0):
                if node.finished:
                    return
                node.ready_at = time.monotonic()
                await self._transition(
                    node.id, "ready", f"agent answers /health at {node.agent_url}", release_budget=False,
                    agent_url=node.agent_url,
                )
                return
            if time.monotonic() >= deadline:
                await self._finish_lost(
                    node, "failed", f"agent did not answer /health within {self.ready_timeout_s:.0f}s; "
                    f"log: {node.log_tail()}"
                )
                return
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.2)

    # -- loss -----------------------------------------------------------------------------------------
    async def _watch_exit(self, node: _LocalNode) -> None:
        assert node.proc is not None
        rc = await node.proc.wait()
        if node.finished or node.stopping:
            return
        if node.injected_at is not None:
            kind, reason = "preempted", f"preempted: {node.injected_reason}; agent killed (exit {rc})"
        elif rc < 0:
            kind, reason = "preempted", f"agent killed by signal {-rc} without warning"
        elif rc > 0:
            kind, reason = "failed", f"agent exited with code {rc}; log: {node.log_tail()}"
        else:
            kind, reason = "terminated", "agent exited on its own (code 0)"
        await self._finish_lost(node, kind, reason, detected_by="process exit")

    async def _finish_lost(self, node: _LocalNode, kind: str, reason: str, detected_by: str = "") -> None:
        """Make sure nothing of the node runs, then record the loss and free its budget."""
        if node.finished or node.stopping:
            return
        node.finished = True
        try:
            detected, detected_at = time.monotonic(), time.time()
            survivors = await asyncio.to_thread(kill_node, node.pid, node.tag)
            if node.proc is not None and node.proc.returncode is None:
                await node.proc.wait()
            timing: dict[str, float] = {}
            if node.injected_at is not None:
                timing["detect_s"] = detected - node.injected_at
            if node.ready_at is not None:
                timing["uptime_s"] = detected - node.ready_at
            if survivors:
                reason += f"; {len(survivors)} process(es) would not die, budget still held"
            if detected_by:
                reason += f" (seen by {detected_by})"
            if kind == "preempted" and node.spot:
                self.fallback.record_spot_failure(node.gpu_type)
            await self._transition(node.id, kind, reason, release_budget=not survivors,  # type: ignore[arg-type]
                                   timing=timing, detected_at=detected_at)
        finally:
            node.done.set()
        current = asyncio.current_task()
        for t in node.tasks:
            if t is not current and not t.done():
                t.cancel()

    async def _watch_loop(self) -> None:
        """Watch the nodes every ``monitor_interval_s`` until cancelled."""
        while await self._pause(self.monitor_interval_s):
            try:
                await self._check_nodes()
            except Exception:  # a Redis hiccup must not end the watch; the next round retries
                log.exception("local provisioner: node check failed")

    async def _check_nodes(self) -> None:
        """One round: exits of adopted nodes (not our children), heartbeat expiry of ready ones."""
        watched = [n for n in self._nodes.values() if not n.finished and not n.stopping]
        if not watched:
            return
        for node in watched:
            if node.proc is None and not pid_alive(node.pid):
                await self._finish_lost(node, "preempted", "agent process gone", detected_by="process poll")
        ready = [n for n in watched if n.ready_at is not None and not n.finished]
        alive = await self.state.alive([n.id for n in ready])
        now = time.monotonic()
        for node in ready:
            if alive.get(node.id):
                node.heartbeat_seen = True
                continue
            grace_over = now - (node.ready_at or now) > self.heartbeat_ttl_s * 2
            if node.heartbeat_seen or grace_over:
                await self._finish_lost(
                    node, "preempted",
                    f"heartbeat expired (none for over {self.heartbeat_ttl_s:g}s): node hung or cut off; "
                    "its process group was killed",
                    detected_by="heartbeat expiry",
                )

    # -- preemption injection -------------------------------------------------------------------------
    def preemptible(self, spot_only: bool = False) -> list[str]:
        """Ids of ready nodes that a preemption could hit now (sorted, for seeded reproducibility)."""
        return sorted(
            n.id for n in self._nodes.values()
            if n.ready_at is not None and not n.finished and not n.stopping and (n.spot or not spot_only)
        )

    async def preempt(self, node_id: str, reason: str = "injected preemption (chaos)") -> float:
        """SIGKILL the node's whole process group without warning; returns the injection time (monotonic).

        The loss is then seen the way a real one is (process exit), and reported as a ``preempted``
        event whose ``detect_s`` is the time from this kill to its detection.
        """
        node = self._nodes.get(node_id)
        if node is None or node.finished or node.stopping:
            raise ProvisionError(f"node {node_id} is not a live local node")
        node.injected_at = time.monotonic()
        node.injected_reason = reason
        rec = await self.state.get_node(node_id)
        if rec is not None:
            await self.state.emit("node.preempt_injected", reason, **event_data(rec, {}))
        await asyncio.to_thread(kill_node, node.pid, node.tag)
        return node.injected_at

    # -- release --------------------------------------------------------------------------------------
    async def release(self, node_id: str, reason: str = "released") -> NodeRecord:
        started = time.monotonic()
        node = await self._claim_release(node_id, "local")
        if isinstance(node, NodeRecord):
            return node
        survivors = await asyncio.to_thread(stop_node, node.pid, node.tag, self.stop_grace_s)
        if node.proc is not None and node.proc.returncode is None and not survivors:
            await node.proc.wait()
        node.finished = True
        timing = {"stop_s": time.monotonic() - started}
        if survivors:
            event = await self._transition(
                node_id, "failed", f"{reason}: {len(survivors)} process(es) survived SIGKILL; budget still held",
                release_budget=False, timing=timing,
            )
        else:
            event = await self._transition(node_id, "terminated", reason, release_budget=True, timing=timing)
        node.done.set()
        return event.record

    # -- restart: adopt what a previous provisioner left running -----------------------------------------
    async def _adopt(self) -> None:
        for rec in await self.nodes():
            if rec.status not in LIVE_STATUSES or rec.id in self._nodes:
                continue
            pid = parse_pgid(rec.provider_ref)
            tag = node_tag(self.state.deployment, rec.id)
            port = int(rec.agent_url.rsplit(":", 1)[1]) if rec.agent_url.count(":") == 2 else 0
            node = _LocalNode(
                id=rec.id, tag=tag, spot=rec.spot, gpu_type=rec.gpu_type, port=port, pid=pid or 0,
                log_path=self.workdir / f"{rec.id}.log", port_path=_port_file_of(pid),
            )
            self._nodes[rec.id] = node
            if pid and pid_alive(pid) and _has_tag(pid, tag):
                if rec.status == "ready":
                    node.ready_at = time.monotonic()
                else:
                    node.tasks.append(asyncio.create_task(self._bring_up(node), name=f"bring-up-{rec.id}"))
                await self.state.emit("node.adopted", "found running after a provisioner restart",
                                      **event_data(rec, {}))
            else:
                node.finished = True
                await self._transition(rec.id, "preempted", "node gone while no provisioner was watching it",
                                       release_budget=True)
                node.done.set()
        await self._release_orphan_holds()

    async def _release_orphan_holds(self) -> None:
        """Holds whose node record is missing or ended: the instance no longer bills."""
        records = await self.state.nodes()
        for node_id in await self.ledger.holds():
            rec = records.get(node_id)
            if rec is None or rec.status not in LIVE_STATUSES:
                freed = await self.ledger.release(node_id)
                await self.state.emit("budget.orphan_released", f"hold of {node_id} had no live node",
                                      node_id=node_id, freed=freed)


def _open_log(path: Path) -> BinaryIO:
    """The node's log file (appended: a node id reused after a release keeps its history)."""
    return open(path, "ab")


def _port_file_of(pid: int | None) -> Path | None:
    """The ``--port-file`` on an adopted agent's command line (its workdir may not be ours)."""
    try:
        argv = psutil.Process(pid).cmdline() if pid else []
        return Path(argv[argv.index("--port-file") + 1])
    except (psutil.Error, ValueError, IndexError):
        return None


def _has_tag(pid: int, tag: str) -> bool:
    try:
        return psutil.Process(pid).environ().get(NODE_TAG_ENV) == tag
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
