"""One engine process under a node agent: launch, health, restart on crash with backoff, role switch.

The engine runs in the agent's process group (no new session): killing the agent's group takes the
whole node down at once, as a cloud preemption does. Status goes to Redis as the replica's
``ReplicaRecord``: starting -> ready; failed while it is down (then restarted with exponential
backoff); switching during a role switch; stopped when the controller removes it.

A multi-node SGLang replica runs one process per node; only rank 0 serves HTTP. A follower (node rank
> 0) is healthy while its process lives: it is never probed over HTTP, so it is not restarted for the
probes it cannot answer, and it takes no role switch (those go to rank 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from planner.plan import ReplicaSpec
from replicas.process import PARENT_PID_ENV, engine_argv, free_port
from replicas.replica_spec import ReplicaRequest
from replicas.sglang_launch import sglang_launch_command

log = logging.getLogger("replicas.agent")


@dataclass
class SupervisorConfig:
    node_id: str
    bind_host: str = "127.0.0.1"  # where engines listen
    advertise_host: str = "127.0.0.1"  # how others reach them
    log_dir: Path = Path("/tmp")
    health_interval_s: float = 2.0
    health_timeout_s: float = 5.0
    health_failures: int = 3  # consecutive failed probes of a serving engine before it is restarted
    start_timeout_s: float = 900.0  # SGLang loads big models slowly
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    stable_after_s: float = 60.0  # a run this long resets the backoff
    python: str = sys.executable


StatusHook = Callable[["ManagedReplica"], Awaitable[None]]


class ManagedReplica:
    def __init__(self, req: ReplicaRequest, cfg: SupervisorConfig, on_change: StatusHook,
                 on_event: Callable[[str, str, dict[str, Any]], Awaitable[None]]) -> None:
        self.req = req
        self.cfg = cfg
        self.role = req.role
        self.port = req.port or free_port(cfg.bind_host)
        self.bootstrap_port = req.bootstrap_port or free_port(cfg.bind_host)
        self.status = "starting"
        self.restarts = 0
        self.last_exit: int | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = cfg.log_dir / f"replica-{req.id}.log"
        self._on_change = on_change
        self._on_event = on_event
        self._stopping = False
        self._switching = False
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None

    # -- views ---------------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.req.id

    @property
    def url(self) -> str:
        host = self.cfg.advertise_host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def node_ids(self) -> list[str]:
        """The replica's nodes in rank order; without names, stand-ins around this node at its rank."""
        r = self.req
        if r.node_ids:
            return r.node_ids
        return [self.cfg.node_id if i == r.node_rank else f"{r.id}-rank{i}" for i in range(r.nnodes)]

    @property
    def serves_http(self) -> bool:
        """Only rank 0 of a multi-node replica has an HTTP server (and is the replica to route to)."""
        return self.req.node_rank == 0

    @property
    def serves_bootstrap(self) -> bool:
        return self.role in ("prefill", "decode")

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "engine": self.req.engine, "model": self.req.model, "role": self.role,
            "url": self.url if self.serves_http else None, "port": self.port,
            "node_rank": self.req.node_rank, "nnodes": self.req.nnodes,
            "bootstrap_port": self.bootstrap_port if self.serves_bootstrap else None,
            "status": self.status, "pid": self.proc.pid if self.proc else None, "restarts": self.restarts,
            "last_exit": self.last_exit, "tp": self.req.tp, "pp": self.req.pp, "gpus": self.req.gpus,
            "kv_compression": self.req.kv_compression, "log": str(self.log_path),
        }

    # -- command -------------------------------------------------------------------------------------
    def command(self) -> tuple[list[str], dict[str, str]]:
        """argv + extra env for the current role (a restart after a role switch keeps the new role)."""
        r = self.req
        if r.engine == "reference":
            argv = engine_argv(r.model, self.role, self.cfg.bind_host, self.port, self.bootstrap_port,
                               r.kv_compression, r.max_batch, r.served_model_name, None, True, r.extra_args,
                               python=self.cfg.python)
            return argv, dict(r.env)
        cmd = sglang_launch_command(
            self.plan_replica(), model_path=r.model, port=self.port, node_id=self.cfg.node_id, host=self.cfg.bind_host,
            bootstrap_port=self.bootstrap_port, gpu_ids=r.gpus or None, dist_init_addr=r.dist_init_addr,
            transfer_backend=r.transfer_backend, served_model_name=r.served_model_name, python=self.cfg.python,
            extra_args=r.extra_args,
        )
        return cmd.argv, {**cmd.env, **r.env}

    def plan_replica(self) -> ReplicaSpec:
        """This replica as a plan describes it; GPUs on the other nodes are known here only by count."""
        r = self.req
        nodes = self.node_ids
        per_other = (r.tp * r.pp - len(r.gpus)) // max(1, len(nodes) - 1)
        gpus: list[tuple[str, int]] = []
        for n in nodes:
            gpus += [(n, g) for g in r.gpus] if n == self.cfg.node_id else [(n, i) for i in range(per_other)]
        return ReplicaSpec(id=r.id, node_ids=nodes, gpus=gpus, tp=r.tp, pp=r.pp, role=self.role,  # type: ignore[arg-type]
                           layer_split=r.layer_split)

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name=f"replica-{self.id}")

    async def wait_ready(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the engine (SIGKILL after ``timeout_s``) and end supervision."""
        self._stopping = True
        if self._task is not None:  # first stop supervising (no restart races the stop), then the engine
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._terminate(timeout_s)
        if self._session is not None:
            await self._session.close()
        await self._set_status("stopped")

    async def _terminate(self, timeout_s: float) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _launch(self) -> None:
        argv, extra_env = self.command()
        # PARENT_PID_ENV: the engine exits if this agent dies without stopping it (no orphans after a crash).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid()), **extra_env}
        logf = _open_log(self.log_path, argv)
        try:
            self.proc = await asyncio.create_subprocess_exec(*argv, stdout=logf, stderr=asyncio.subprocess.STDOUT,
                                                             stdin=asyncio.subprocess.DEVNULL, env=env)
        finally:
            logf.close()
        log.info("replica %s: started pid %d (%s)", self.id, self.proc.pid, self.role)

    async def _supervise(self) -> None:
        backoff = self.cfg.backoff_initial_s
        while not self._stopping:
            try:
                await self._launch()
            except (OSError, ValueError) as e:
                log.error("replica %s: cannot launch: %s", self.id, e)
                await self._set_status("failed")
                await self._on_event("replica_failed", f"cannot launch: {e}", {"replica": self.id})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.cfg.backoff_max_s)
                continue
            launched = time.monotonic()
            await self._set_status("starting")
            reason = await self._watch(launched)
            if self._stopping:
                return
            self.restarts += 1
            self._ready.clear()
            await self._set_status("failed")
            await self._on_event("replica_failed", reason, {"replica": self.id, "restarts": self.restarts,
                                                            "exit": self.last_exit})
            if time.monotonic() - launched > self.cfg.stable_after_s:
                backoff = self.cfg.backoff_initial_s
            log.warning("replica %s: %s; restarting in %.1f s", self.id, reason, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.cfg.backoff_max_s)

    async def _watch(self, launched: float) -> str:
        """Probe health until the process dies or stops answering; return why it is being restarted."""
        assert self.proc is not None
        proc = self.proc
        exited = asyncio.ensure_future(proc.wait())
        failures = 0
        try:
            while True:
                fast = min(0.25, self.cfg.health_interval_s)  # poll quickly until ready, then at the set pace
                interval = self.cfg.health_interval_s if self.status == "ready" else fast
                done, _ = await asyncio.wait([exited], timeout=interval)
                if done:
                    self.last_exit = proc.returncode
                    return f"engine exited with code {proc.returncode}"
                if await self._probe():
                    failures = 0
                    if self.status in ("starting", "failed") and not self._switching:
                        await self._set_status("ready")  # recorded in Redis before anyone is told it is ready
                        self._ready.set()
                    continue
                if self.status == "starting":
                    if time.monotonic() - launched > self.cfg.start_timeout_s:
                        await self._terminate(5.0)
                        return f"engine not healthy within {self.cfg.start_timeout_s:g} s of launch"
                    continue
                failures += 1
                if failures >= self.cfg.health_failures and not self._switching:
                    await self._terminate(5.0)
                    self.last_exit = proc.returncode
                    return f"engine failed {failures} health checks"
        finally:
            exited.cancel()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _probe(self) -> bool:
        """HTTP /health; a follower rank has no server, and ``_watch`` only probes while its process lives."""
        if not self.serves_http:
            return True
        try:
            async with self.session.get(self.url + "/health",
                                        timeout=aiohttp.ClientTimeout(total=self.cfg.health_timeout_s)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _set_status(self, status: str) -> None:
        if status == self.status and status != "starting":
            return
        self.status = status
        await self._on_change(self)

    # -- role switch ---------------------------------------------------------------------------------
    async def switch_role(self, role: str, drain: bool, timeout_s: float) -> tuple[int, dict[str, Any]]:
        """Call the worker's /pd_role_switch (SGLang's API), retrying while it is busy if ``drain``."""
        old = self.role
        if not self.serves_http:
            return 409, {"id": self.id, "success": False, "old_role": old, "new_role": role,
                         "message": f"node rank {self.req.node_rank} serves no HTTP; switch rank 0's role"}
        if role == old:
            return 200, {"id": self.id, "success": True, "old_role": old, "new_role": role,
                         "message": "already in target role"}
        if self.status != "ready":
            return 409, {"id": self.id, "success": False, "old_role": old, "new_role": role,
                         "message": f"replica is {self.status}, not ready"}
        self._switching = True
        await self._set_status("switching")
        started = time.monotonic()
        deadline = started + timeout_s
        answer: dict[str, Any] = {}
        try:
            while True:
                try:
                    async with self.session.post(self.url + "/pd_role_switch", json={"new_role": role},
                                                 timeout=aiohttp.ClientTimeout(total=30)) as r:
                        answer = await r.json(content_type=None)
                except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                    answer = {"success": False, "message": f"cannot reach the worker: {e}", "safe_to_restore": True}
                if answer.get("success"):
                    self.role = role
                    break
                busy = "not idle" in str(answer.get("message", ""))
                if not (drain and busy and time.monotonic() < deadline):
                    break
                await asyncio.sleep(0.1)
        finally:
            self._switching = False
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        ok = bool(answer.get("success"))
        safe = bool(answer.get("safe_to_restore", True))
        if self.status == "switching":  # else the engine died meanwhile and the supervisor has taken over
            await self._set_status("ready" if ok or safe else "failed")
        if ok:
            await self._on_event("role_switched", f"{old} -> {role}", {"replica": self.id, "elapsed_ms": elapsed_ms})
        body = {"id": self.id, "success": ok, "old_role": old, "new_role": role, "role": self.role,
                "message": answer.get("message", ""), "elapsed_ms": elapsed_ms,
                "bootstrap_port": self.bootstrap_port if self.serves_bootstrap else None}
        return (200 if ok else 409), body


def _open_log(path: Path, argv: list[str]) -> Any:
    """The replica's log, appended across restarts, with a header line per launch."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logf = open(path, "ab")  # handed to the child process; the caller closes our copy
    logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} launch: {' '.join(argv)}\n".encode())
    logf.flush()
    return logf
