"""The node agent: starts, stops and switches replicas on this node's GPUs as the controller asks.

``python -m replicas.agent --node-id n0 --host 127.0.0.1 --port 7001 --redis-url redis://... \\
    --deployment default --gpu-type L4 --gpu-count 2 [--heartbeat-ttl 6]``

Routes: ``GET /health``; ``GET /replicas``; ``POST /replicas`` (body: ``replica_spec.ReplicaRequest``)
-> 201 the replica as ``GET /replicas/{id}`` shows it; ``GET /replicas/{id}``; ``DELETE /replicas/{id}``;
``POST /replicas/{id}/role`` ``{role, drain: true, timeout_s: 30}``. Each replica's record goes to
Redis (``planner.state.StateStore``; from rank 0 only, for a replica over several nodes), the node's
heartbeat every ttl/3. SIGTERM stops every engine cleanly; killing the agent's process group kills the
node at once (engines share the group).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from planner.state import ReplicaRecord, StateStore
from replicas.replica_spec import SpecError, parse_replica_request
from replicas.supervisor import ManagedReplica, SupervisorConfig

log = logging.getLogger("replicas.agent")


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json")


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    return _json({"error": {"message": message, "type": "agent_error", "param": param, "code": status}}, status)


class NodeAgent:
    def __init__(self, state: StateStore, cfg: SupervisorConfig, gpu_type: str, gpu_count: int,
                 heartbeat_ttl_s: float) -> None:
        self.state = state
        self.cfg = cfg
        self.gpu_type = gpu_type
        self.gpu_count = gpu_count
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.replicas: dict[str, ManagedReplica] = {}
        self.started_at = time.time()
        self._heartbeat: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.heartbeats = 0

    @property
    def node_id(self) -> str:
        return self.cfg.node_id

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/replicas", self.list_replicas)
        app.router.add_post("/replicas", self.create)
        app.router.add_get("/replicas/{id}", self.get)
        app.router.add_delete("/replicas/{id}", self.delete)
        app.router.add_post("/replicas/{id}/role", self.switch_role)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    # -- lifecycle -----------------------------------------------------------------------------------
    async def _on_startup(self, _: web.Application) -> None:
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat(), name="heartbeat")

    async def _on_cleanup(self, _: web.Application) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop every engine cleanly (SIGTERM, then SIGKILL) and mark them stopped in Redis."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        replicas, self.replicas = list(self.replicas.values()), {}
        await asyncio.gather(*(r.stop() for r in replicas), return_exceptions=True)
        await self.state.close()

    async def _beat(self) -> None:
        period = max(0.05, self.heartbeat_ttl_s / 3)
        while True:
            try:
                await self.state.heartbeat(self.node_id, self.heartbeat_ttl_s)
                self.heartbeats += 1
            except Exception as e:  # Redis down for a while: keep serving, keep trying
                log.warning("heartbeat failed: %s", e)
            await asyncio.sleep(period)

    # -- Redis ----------------------------------------------------------------------------------------
    async def _publish(self, rep: ManagedReplica) -> None:
        """Write the replica's record (what the gateway routes by and the controller reconciles on).

        Only rank 0 writes it: a follower rank has no URL to route to, and its status must not overwrite
        (or, once stopped, mark stopped) the record of the replica that rank 0 serves."""
        if not rep.serves_http:
            return

        def change(rec: ReplicaRecord) -> None:
            rec.role, rec.url, rec.status = rep.role, rep.url, rep.status
            rec.bootstrap_port = rep.bootstrap_port if rep.serves_bootstrap else None

        try:
            try:
                await self.state.modify_replica(rep.id, change)
            except KeyError:
                await self.state.put_replica(ReplicaRecord(
                    id=rep.id, node_ids=rep.req.node_ids or [self.node_id], role=rep.role, url=rep.url,
                    bootstrap_port=rep.bootstrap_port if rep.serves_bootstrap else None,
                    gpus=[[self.node_id, g] for g in rep.req.gpus], engine=rep.req.engine, model=rep.req.model,
                    tp=rep.req.tp, pp=rep.req.pp, status=rep.status,
                ))
        except Exception as e:
            log.warning("cannot record replica %s in Redis: %s", rep.id, e)

    async def _event(self, kind: str, reason: str, data: dict[str, Any]) -> None:
        try:
            await self.state.emit(kind, reason, node=self.node_id, **data)
        except Exception as e:
            log.warning("cannot record event %s: %s", kind, e)

    # -- routes ---------------------------------------------------------------------------------------
    async def health(self, _: web.Request) -> web.Response:
        return _json({"status": "ok", "node_id": self.node_id, "gpu_type": self.gpu_type,
                      "gpu_count": self.gpu_count, "replicas": len(self.replicas),
                      "uptime_s": round(time.time() - self.started_at, 3), "heartbeats": self.heartbeats})

    async def list_replicas(self, _: web.Request) -> web.Response:
        return _json([r.to_json() for r in self.replicas.values()])

    async def get(self, request: web.Request) -> web.Response:
        rep = self.replicas.get(request.match_info["id"])
        if rep is None:
            return _error(404, f"no replica {request.match_info['id']!r} on node {self.node_id}", "id")
        return _json(rep.to_json())

    async def create(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as e:
            return _error(400, f"request body is not valid JSON: {e}")
        try:
            req = parse_replica_request(body)
        except SpecError as e:
            return _error(400, str(e), e.param)
        if req.node_ids and self.node_id not in req.node_ids:
            return _error(400, f"node_ids {req.node_ids} do not include this node ({self.node_id})", "node_ids")
        async with self._lock:
            if req.id in self.replicas:
                return _error(409, f"replica {req.id!r} already runs on node {self.node_id}", "id")
            bad = [g for g in req.gpus if g >= self.gpu_count]
            if bad:
                return _error(400, f"node {self.node_id} has {self.gpu_count} GPUs; no GPU {bad[0]}", "gpus")
            taken = {g: r.id for r in self.replicas.values() for g in r.req.gpus}
            clash = next((g for g in req.gpus if g in taken), None)
            if clash is not None:
                return _error(409, f"GPU {clash} is already used by replica {taken[clash]}", "gpus")
            try:
                rep = ManagedReplica(req, self.cfg, self._publish, self._event)
                rep.command()  # a spec SGLang cannot run fails here, before anything starts
            except (ValueError, OSError) as e:
                return _error(400, str(e))
            self.replicas[req.id] = rep
            await self._publish(rep)
            rep.start()
        await self._event("replica_started", f"{req.engine} {req.model} as {req.role}", {"replica": req.id})
        wait = body.get("wait_ready")
        if wait:
            timeout = float(body.get("ready_timeout_s", 300))
            if not await rep.wait_ready(timeout):
                return _error(504, f"replica {req.id} not ready within {timeout:g} s (status {rep.status}); "
                                   f"it keeps starting, see {rep.log_path}")
        return _json(rep.to_json(), 201)

    async def delete(self, request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        async with self._lock:
            rep = self.replicas.pop(rid, None)
        if rep is None:
            return _error(404, f"no replica {rid!r} on node {self.node_id}", "id")
        await rep.stop()
        await self._event("replica_stopped", "stopped by request", {"replica": rid})
        return _json({"id": rid, "status": rep.status, "exit": rep.proc.returncode if rep.proc else None})

    async def switch_role(self, request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        rep = self.replicas.get(rid)
        if rep is None:
            return _error(404, f"no replica {rid!r} on node {self.node_id}", "id")
        try:
            body = orjson.loads(await request.read() or b"{}")
        except orjson.JSONDecodeError as e:
            return _error(400, f"request body is not valid JSON: {e}")
        role = body.get("role") if isinstance(body, dict) else None
        if role not in ("prefill", "decode"):
            return _error(400, f"role must be prefill or decode, got {role!r}", "role")
        drain = body.get("drain", True)
        timeout = body.get("timeout_s", 30)
        if not isinstance(drain, bool):
            return _error(400, "drain must be true or false", "drain")
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout < 0:
            return _error(400, "timeout_s must be a non-negative number", "timeout_s")
        status, answer = await rep.switch_role(role, drain, float(timeout))
        return _json(answer, status)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m replicas.agent", description="ThunderServe node agent")
    p.add_argument("--node-id", required=True)
    p.add_argument("--host", default="127.0.0.1", help="where the agent (and its engines) listen")
    p.add_argument("--port", type=int, default=7001, help="0 = any free port (see --port-file)")
    p.add_argument("--advertise-host", default=None, help="host in replica URLs (default: --host)")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--deployment", default="default")
    p.add_argument("--gpu-type", default="cpu")
    p.add_argument("--gpu-count", type=int, default=0)
    p.add_argument("--heartbeat-ttl", type=float, default=6.0, help="seconds; the heartbeat is renewed every ttl/3")
    p.add_argument("--log-dir", default=None, help="engine logs (default: a temp dir per node)")
    p.add_argument("--port-file", default=None, help="write the bound port here once listening")
    p.add_argument("--health-interval-s", type=float, default=2.0)
    p.add_argument("--health-failures", type=int, default=3)
    p.add_argument("--restart-backoff-s", type=float, default=1.0)
    p.add_argument("--restart-backoff-max-s", type=float, default=30.0)
    p.add_argument("--python", default=sys.executable, help="interpreter for engines")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


async def serve(args: argparse.Namespace) -> int:
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.gettempdir()) / f"thunderserve-{args.node_id}"
    cfg = SupervisorConfig(
        node_id=args.node_id, bind_host=args.host, advertise_host=args.advertise_host or args.host, log_dir=log_dir,
        health_interval_s=args.health_interval_s, health_failures=args.health_failures,
        backoff_initial_s=args.restart_backoff_s, backoff_max_s=args.restart_backoff_max_s, python=args.python,
    )
    agent = NodeAgent(StateStore.from_url(args.redis_url, args.deployment), cfg, args.gpu_type, args.gpu_count,
                      args.heartbeat_ttl)
    runner = web.AppRunner(agent.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 98
    port = runner.addresses[0][1]
    if args.port_file:
        await asyncio.to_thread(Path(args.port_file).write_text, str(port))
    print(f"agent {args.node_id} listening on http://{args.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()  # on_cleanup stops the engines
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    sys.exit(run(serve(args)))


if __name__ == "__main__":
    main()
