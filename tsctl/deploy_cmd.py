"""`tsctl up`, `status`, `down` and `chaos`: bring a deployment up, watch it, break it, take it down.

`up` plans (so a bad budget fails here, at once, with one line), publishes the plan to Redis, creates an
API key, starts the controller and the gateway as detached services, shows each node and replica come
up, and prints the URL, the key and a `curl` line. The controller does the renting and the healing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import signal
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from planner.controller import CONFIG_META_KEY, ControllerConfig
from planner.embedded_redis import REDIS_URL_ENV, EmbeddedRedis, RedisUnavailable, check_redis, free_port
from planner.offers import MAX_GPUS
from planner.state import LATENCY_BOUNDS_S, StateStore
from replicas.engine.backends import unknown_model
from tsctl.runtime import (
    Deployment,
    DeploymentNotFound,
    alive,
    bad_deployment_name,
    python_module,
    spawn_detached,
    stop_process,
)

if TYPE_CHECKING:
    from planner.plan import Plan

console = Console()
err = Console(stderr=True)


def fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(1)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- up ------------------------------------------------------------------------------------------------------
def up(
    budget: float = typer.Option(..., "--budget", help="hourly budget in USD for everything rented"),
    local: bool = typer.Option(False, "--local", help="virtual nodes on this machine, CPU engine, no cloud"),
    model: str = typer.Option("", "--model", help="model catalog name (default: smollm2 with --local)"),
    rate: float = typer.Option(0.0, "--rate", help="requests/s to plan for (0: as much as the budget buys)"),
    input_len: int = typer.Option(256, "--input-len"),
    output_len: int = typer.Option(64, "--output-len"),
    ttft: float = typer.Option(0.0, "--ttft", help="TTFT target, s (default 2 in the cloud, 5 with --local)"),
    tpot: float = typer.Option(0.0, "--tpot", help="TPOT target, s (default 0.1 in the cloud, 0.5 with --local)"),
    spot: bool = typer.Option(True, "--spot/--no-spot", help="spot instances first"),
    disaggregate: bool | None = typer.Option(
        None, "--disaggregate/--any-phases",
        help="only prefill and decode replicas (default with --local, to run the PD path), or let the planner "
             "also choose colocated replicas (default in the cloud)"),
    catalog: list[str] = typer.Option([], "--catalog", help="SkyPilot vms.csv file(s) to rent from"),
    engine_model: str = typer.Option("", "--engine-model",
                                     help="with --local: the CPU engine's model (smollm2, tiny, emulated)"),
    max_nodes: int = typer.Option(0, "--max-nodes",
                                  help=f"most GPUs to rent (default 4 with --local, else {MAX_GPUS})"),
    deployment: str = typer.Option("default", "--deployment", "-d"),
    port: int = typer.Option(8000, "--port", help="gateway port (0, or taken: any free port)"),
    seed: int = typer.Option(0, "--seed"),
    timeout: float = typer.Option(600.0, "--timeout", help="seconds to wait until the gateway is ready"),
    follow_workload: bool = typer.Option(
        True, "--follow-workload/--fixed-workload",
        help="re-decide phases when the length mix the gateway serves shifts from --input-len/--output-len "
             "(lightweight reschedule, no weight reload), or keep the plan made for them (the live SLO is watched "
             "either way)"),
    scale_up: bool = typer.Option(
        False, "--scale-up",
        help="while the live SLO is missed, rent one more instance at a time (the one adding the most goodput per "
             "dollar) within --budget and --max-nodes; it is folded in once ready. Once the SLO has been met "
             "with room for 5 minutes the newest such node is given back (after its requests finish)"),
) -> None:
    """Plan, rent, start workers and the gateway; print the URL, an API key and a curl line."""
    problem = bad_deployment_name(deployment) or _bad_up_argument(
        budget, rate, input_len, output_len, ttft, tpot, max_nodes, port, timeout, engine_model if local else "")
    if problem:
        raise fail(problem)
    try:
        existing = Deployment.load(deployment)
        if any(alive(p) for p in existing.pids().values()):
            raise fail(f"deployment {deployment!r} is already up ({existing.gateway_url}); "
                       f"`tsctl down -d {deployment}` first")
    except DeploymentNotFound:
        pass
    if not local:
        import importlib.util

        if importlib.util.find_spec("sky") is None:
            raise fail("the cloud path needs SkyPilot: pip install 'thunderserve[cloud]' (or use --local)")
    cfg = ControllerConfig(
        model=model or ("smollm2" if local else "llama-3.1-8b"), budget=budget,
        provider="local" if local else "skypilot", engine="reference" if local else "sglang",
        engine_model=(engine_model or "smollm2") if local else "", rate=rate, input_len=input_len,
        output_len=output_len, ttft_s=ttft or (5.0 if local else 2.0), tpot_s=tpot or (0.5 if local else 0.1),
        spot=spot, disaggregate=local if disaggregate is None else disaggregate,
        catalogs=[os.path.abspath(c) for c in catalog], seed=seed,
        max_nodes=max_nodes or (4 if local else MAX_GPUS),
        follow_workload=follow_workload, scale_up=scale_up,
    )
    dep = Deployment(name=deployment, mode="local" if local else "cloud", redis_url="", budget=budget, model=cfg.model)
    cfg.workdir = str(dep.dir / "nodes")
    try:
        _bring_up(dep, cfg, port, timeout)
    except RedisUnavailable as e:
        raise fail(str(e)) from None


def _bad_up_argument(budget: float, rate: float, input_len: int, output_len: int, ttft: float, tpot: float,
                     max_nodes: int, port: int, timeout: float, engine_model: str) -> str | None:
    """What is wrong with ``tsctl up``'s arguments, said before anything starts (or None)."""
    if not 0 < budget < math.inf:
        return f"--budget must be a positive, finite $/h, not {budget}"
    if not 0 <= rate < math.inf:
        return f"--rate must be finite and >= 0 requests/s, not {rate}"
    if input_len < 1 or output_len < 1:
        return "--input-len and --output-len must be >= 1 token"
    if not (0 <= ttft < math.inf and 0 <= tpot < math.inf):
        return "--ttft and --tpot must be positive seconds (or 0 for the default)"
    if max_nodes < 0:
        return f"--max-nodes must be >= 1 (or 0 for the default), not {max_nodes}"
    if not 0 <= port <= 65535:
        return f"--port must be 0-65535, not {port}"
    if not timeout > 0:
        return f"--timeout must be positive seconds, not {timeout}"
    if engine_model and (problem := unknown_model(engine_model)):
        return f"--engine-model {engine_model!r}: {problem}"
    return None


def _bring_up(dep: Deployment, cfg: ControllerConfig, port: int, timeout: float) -> None:
    from planner.scheduler import PlanningError

    # 1. Redis: the user's, or our own embedded one that outlives this command
    url = os.environ.get(REDIS_URL_ENV)
    if url:
        check_redis(url)
        dep.redis_url = url
    else:
        dep.redis_url, dep.redis_pid = _start_embedded_redis(dep)
    dep.save()
    # 2. the plan, made here so that a budget too small fails now with one line
    from planner.controller import plan_for_config

    console.print(f"[bold]planning[/bold] {cfg.model} under ${cfg.budget:.2f}/h ...")
    try:
        plan = plan_for_config(cfg)
    except (PlanningError, ValueError) as e:
        if dep.redis_pid:  # nothing else was started yet: leave no embedded Redis and no record behind
            stop_process(dep.redis_pid, grace_s=10)
        dep.remove()
        raise fail(str(e)) from None
    from tsctl.plan_cmd import print_plan

    print_plan(plan, title=f"plan for {dep.name}")

    async def seed_state() -> tuple[str, str]:
        state = StateStore.from_url(dep.redis_url, dep.name)
        try:
            await state.wipe()
            await state.set_meta(**{CONFIG_META_KEY: _asdict(cfg)}, budget=cfg.budget, model=cfg.model,
                                 mode=dep.mode, started_at=time.time())
            await state.publish_plan(plan)
            await state.emit("deployment.up", f"tsctl up ({dep.mode})", budget=cfg.budget, model=cfg.model)
            key = await state.create_api_key("tsctl-up")
            return key, secrets.token_urlsafe(24)
        finally:
            await state.close()

    dep.api_key, dep.admin_key = _run(seed_state())
    # 3. the controller and the gateway, detached
    dep.controller_pid = _start_controller(dep)  # its config is in Redis (seed_state)
    dep.save()  # at once: if anything below fails (or `up` is interrupted), `tsctl down` still finds the controller
    gw_port = port if port and _port_free(port) else free_port()
    dep.gateway_url = f"http://127.0.0.1:{gw_port}"
    dep.gateway_pid = _start_gateway(dep)
    dep.save()
    # 4. watch it come up
    problem = _run(_watch_until_ready(dep, wait_s=timeout))
    if problem:
        err.print(f"[red]error:[/red] {problem}; logs in {dep.dir}; `tsctl down -d {dep.name}`")
        raise typer.Exit(1)
    model_id = _served_model(dep)
    console.print(f"\n[bold green]ready[/bold green]  {dep.gateway_url}   (deployment {dep.name}, logs {dep.dir})")
    console.print(f"API key: {dep.api_key}")
    body = orjson.dumps({"model": model_id, "messages": [{"role": "user", "content": "Hello!"}],
                         "max_tokens": 32}).decode()
    console.print(
        escape(f"curl {dep.gateway_url}/v1/chat/completions -H 'Authorization: Bearer {dep.api_key}' "
               f"-H 'Content-Type: application/json' -d '{body}'"),
        soft_wrap=True,
    )


def _start_embedded_redis(dep: Deployment, tries: int = 5) -> tuple[str, int | None]:
    """Our own redis-server, persisted to the deployment's directory and under a keepalive, so a crashed Redis
    comes back on the same port with every key (plan, nodes, replicas, API keys, events). Its URL and the
    keepalive's pid; a free port can be taken between the probe and the bind: then another port."""
    workdir = dep.dir / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    problem = RedisUnavailable("no try made")
    for _ in range(tries):
        port = free_port()
        server = EmbeddedRedis(port=port, workdir=str(workdir), persist=True)
        keepalive = _keepalive_command(dep, "redis", f"redis://127.0.0.1:{port}/0")
        try:
            return server.start(detach=True, wrapper=keepalive), server.pid
        except RedisUnavailable as e:
            problem = e
    raise problem


def _start_controller(dep: Deployment) -> int:
    """The controller, detached, under a keepalive; it reads its config (and everything else) from Redis, so a
    restart after a crash resumes from the same."""
    return _start_service(dep, "controller",
                          python_module("planner.controller", "--redis-url", dep.redis_url, "--deployment", dep.name))


def _start_gateway(dep: Deployment) -> int:
    """The gateway, detached, under a keepalive that holds its listening socket (on the port of
    ``dep.gateway_url``): while a crashed gateway restarts, connections wait instead of being refused."""
    port = dep.gateway_url.rsplit(":", 1)[1]
    return _start_service(dep, "gateway", python_module("gateway", *gateway_args(dep)), "--listen", f"127.0.0.1:{port}")


def _start_service(dep: Deployment, name: str, argv: list[str], *options: str) -> int:
    """``argv`` under ``tsctl.keepalive`` (restarted when it crashes, each restart an event); the keepalive's pid."""
    return spawn_detached([*_keepalive_command(dep, name, dep.redis_url, *options), *argv], dep.log_path(name))


def _keepalive_command(dep: Deployment, name: str, redis_url: str, *options: str) -> list[str]:
    """The ``tsctl.keepalive`` prefix for service ``name``, its restarts recorded in ``redis_url``."""
    return python_module("tsctl.keepalive", name, "--redis-url", redis_url, "--deployment", dep.name, *options, "--")


def service_pid(keepalive_pid: int | None) -> int | None:
    """The pid of the service a keepalive runs now (None when there is none)."""

    import psutil

    if not keepalive_pid or keepalive_pid <= 0:
        return None
    try:
        children = psutil.Process(keepalive_pid).children()
    except psutil.Error:
        return None
    live = []
    for c in children:
        with contextlib.suppress(psutil.Error):
            if c.status() != psutil.STATUS_ZOMBIE:
                live.append((c.create_time(), c.pid))
    return max(live)[1] if live else None  # the newest: a reload's old run may still be finishing


def gateway_args(dep: Deployment) -> list[str]:
    """The gateway's command line. The admin key goes as ``--admin-key=KEY``: a random URL-safe key
    starts with ``-`` one time in 64, and argparse takes a separate ``-...`` value for an option (the
    gateway then exits with "expected one argument" and ``tsctl up`` waits out its readiness timeout)."""
    port = dep.gateway_url.rsplit(":", 1)[1]
    return ["--host", "127.0.0.1", "--port", port, "--redis-url", dep.redis_url, "--deployment", dep.name,
            f"--admin-key={dep.admin_key}"]


def _asdict(cfg: ControllerConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _served_model(dep: Deployment) -> str:
    import urllib.request

    try:
        req = urllib.request.Request(dep.gateway_url + "/v1/models", headers={"Authorization": f"Bearer {dep.api_key}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return orjson.loads(r.read())["data"][0]["id"]
    except Exception:
        return dep.model


# `tsctl up` stops waiting once replicas failed this many times each (the controller restarts a failed replica;
# one that cannot start, a wrong engine model say, would otherwise keep `up` waiting for its whole --timeout)
FAILED_STARTS_PER_REPLICA = 2


async def _watch_until_ready(dep: Deployment, wait_s: float) -> str | None:
    """None once the gateway answers ready; else why it did not (the details printed above)."""
    state = StateStore.from_url(dep.redis_url, dep.name)
    deadline = time.monotonic() + wait_s
    failures: dict[str, str] = {}  # replica_failed event id -> reason
    try:
        async with aiohttp.ClientSession() as http:
            with Live(console=console, refresh_per_second=4, transient=False) as live:
                while time.monotonic() < deadline:
                    snap = await snapshot(state)
                    ready = await _gateway_ready(http, dep.gateway_url)
                    live.update(progress_table(snap, ready))
                    if ready:
                        return None
                    failures.update({e["id"]: e["reason"] for e in snap["events"] if e["kind"] == "replica_failed"})
                    if _failing_to_start(snap, len(failures)):
                        err.print(f"[red]replicas keep failing to start[/red] ({len(failures)} failed starts, last: "
                                  f"{escape(list(failures.values())[-1])}); last lines of {_engine_log(dep)}:")
                        err.print(escape(_tail(_engine_log(dep), 6)))
                        return "replicas keep failing to start"
                    for name, pid in (("controller", dep.controller_pid), ("gateway", dep.gateway_pid)):
                        if not alive(pid):
                            err.print(f"[red]{name} exited[/red]; last lines of {dep.log_path(name)}:")
                            err.print(escape(_tail(dep.log_path(name))))
                            return f"the {name} exited"
                    await asyncio.sleep(0.5)
        return f"not ready after {wait_s:.0f}s"
    finally:
        await state.close()


def _failing_to_start(snap: dict[str, Any], failed_starts: int) -> bool:
    """No replica has come up, and they have failed ``FAILED_STARTS_PER_REPLICA`` times each."""
    states = [r.get("status") for r in snap["replicas"]]
    planned = max(1, len(snap["plan_replicas"]))
    return "ready" not in states and failed_starts >= FAILED_STARTS_PER_REPLICA * planned


def _engine_log(dep: Deployment) -> Any:
    """The newest engine log of a local deployment (its node agents write one per replica), else the controller's."""
    logs = sorted((dep.dir / "nodes").glob("*-engines/replica-*.log"), key=lambda p: p.stat().st_mtime)
    return logs[-1] if logs else dep.log_path("controller")


async def _gateway_ready(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(url + "/ready", timeout=aiohttp.ClientTimeout(total=2)) as r:
            return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


def _tail(path: Any, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def progress_table(snap: dict[str, Any], gateway_ready: bool) -> Table:
    t = Table(title=f"plan v{snap['plan_version']}  gateway {'ready' if gateway_ready else 'waiting'}")
    for col in ("node", "type", "GPU", "spot", "$/h", "node state", "replica", "role", "replica state"):
        t.add_column(col)
    by_node: dict[str, list[dict[str, Any]]] = {}
    for r in snap["replicas"]:
        for n in r["node_ids"][:1]:
            by_node.setdefault(n, []).append(r)
    for n in snap["nodes"]:
        reps = by_node.get(n["id"]) or [{}]
        for r in reps:
            t.add_row(n["id"], n["instance_type"], f"{n['gpu_count']}x{n['gpu_type']}", "yes" if n["spot"] else "no",
                      f"{n['price_per_hour']:.2f}", _color(n["status"]), r.get("id", ""), r.get("role", ""),
                      _color(r.get("status", "")))
    return t


def _color(status: str) -> str:
    colors = {"ready": "green", "pending": "yellow", "starting": "yellow", "switching": "cyan",
              "draining": "cyan", "preempted": "red", "failed": "red", "terminated": "dim", "stopped": "dim"}
    c = colors.get(status)
    return f"[{c}]{status}[/{c}]" if c else status


# -- status ----------------------------------------------------------------------------------------------------
OBSERVED_WINDOW_S = 120.0  # the window `tsctl status` shows the served workload over (the controller's default)


async def snapshot(state: StateStore, events: int = 10) -> dict[str, Any]:
    """Everything `tsctl status` shows, as plain data (also the --json output)."""
    nodes = await state.nodes()
    replicas = await state.replicas()
    plan = await state.get_plan()
    meta = await state.meta()
    recent = await state.recent_events(events)
    live = [n for n in nodes.values() if n.status in ("pending", "ready")]
    spend = sum(n.price_per_hour for n in live)
    alive_map = await state.alive([n.id for n in live])
    seen = await state.workload_window(OBSERVED_WINDOW_S)
    return {
        "deployment": state.deployment,
        "plan_version": plan.version if plan else 0,
        "model": plan.model if plan else meta.get("model"),
        "budget_per_hour": meta.get("budget"),
        "spend_per_hour": round(spend, 4),
        "expected": plan.expected if plan else {},
        "nodes": [{**_public(n), "heartbeat": alive_map.get(n.id, False)} for n in
                  sorted(nodes.values(), key=lambda n: (n.created_at, n.id))],
        "replicas": [_public(r) for r in sorted(replicas.values(), key=lambda r: r.id)],
        "plan_replicas": [{"id": r.id, "role": r.role, "tp": r.tp, "pp": r.pp, "node_ids": r.node_ids}
                          for r in (plan.replicas if plan else [])],
        "routing": [{"prefill": r.prefill, "decode": r.decode, "weight": round(r.weight, 4)}
                    for r in (plan.routing if plan else [])],
        "events": [{"id": e.id, "ts": e.ts, "kind": e.kind, "reason": e.reason} for e in recent],
        "workload": {"planned": _mean_lengths(plan.workload) if plan else None,
                     "observed": {"window_s": seen.seconds, "requests": seen.requests, "rate": round(seen.rate, 3),
                                  "mean_prompt": round(seen.mean_input, 1),
                                  "mean_output": round(seen.mean_output, 1)}},
        "slo": _live_slo(plan, seen),
    }


def _live_slo(plan: Plan | None, seen: Any) -> dict[str, Any]:
    """The plan's SLO and how the gateways met it over the window: the share of requests within both targets,
    and TTFT / TPOT quantiles as the upper bound of their histogram bucket (None: nothing timed;
    inf, null in JSON: past the last bound, 30 s)."""
    attained = seen.attainment
    return {"target": plan.slo if plan else {}, "window_s": seen.seconds, "judged": seen.judged,
            "attainment": round(attained, 4) if attained is not None else None,
            **{f"{what}_p{q}_at_most_s": seen.latency_quantile(what, q / 100)
               for what in ("ttft", "tpot") for q in (50, 90, 99)}}


def _mean_lengths(workload: dict[str, Any]) -> dict[str, Any] | None:
    """A plan's workload as the means it was planned for (and whether the gateways measured it)."""
    from planner.observed_workload import is_observed

    try:
        return {"mean_prompt": workload["input"]["mean"], "mean_output": workload["output"]["mean"],
                "rate": workload["rate"], "observed": is_observed(workload)}
    except (KeyError, TypeError):
        return None


def services(dep: Deployment) -> dict[str, dict[str, Any]]:
    """Whether this machine's services run: the controller, the gateway and an embedded Redis, each under its
    keepalive (``pid`` is the service's, None while the keepalive waits to restart it)."""
    out: dict[str, dict[str, Any]] = {}
    for name, keeper in dep.pids().items():
        pid = service_pid(keeper)
        out[name] = {"running": pid is not None, "pid": pid, "keepalive_pid": keeper if alive(keeper) else None}
    return out


def _public(rec: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(rec)


async def _worker_loads(dep: Deployment | None) -> dict[str, Any]:
    """Per-worker load from the gateway's admin route, when we know where it is."""
    if dep is None or not dep.gateway_url or not dep.admin_key:
        return {}
    try:
        async with aiohttp.ClientSession() as http, http.get(
            dep.gateway_url + "/admin/workers", headers={"Authorization": f"Bearer {dep.admin_key}"},
            timeout=aiohttp.ClientTimeout(total=2),
        ) as r:
            if r.status != 200:
                return {}
            data = orjson.loads(await r.read())
    except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
        return {}
    workers = data.get("workers", data) if isinstance(data, dict) else data
    out: dict[str, Any] = {}
    for w in workers if isinstance(workers, list) else []:
        if isinstance(w, dict) and w.get("url"):
            out[w["url"]] = w
    return out


def status_tables(snap: dict[str, Any], loads: dict[str, Any]) -> list[Any]:
    budget = snap.get("budget_per_hour")
    head = (f"deployment [bold]{snap['deployment']}[/bold]  model {snap['model']}  plan v{snap['plan_version']}  "
            f"spend ${snap['spend_per_hour']:.2f}/h" + (f" of ${budget:.2f}/h budget" if budget else ""))
    nodes = Table(title="nodes")
    for col in ("node", "type", "GPUs", "spot", "$/h", "state", "heartbeat", "region"):
        nodes.add_column(col)
    for n in snap["nodes"]:
        nodes.add_row(n["id"], n["instance_type"], f"{n['gpu_count']}x{n['gpu_type']}", "yes" if n["spot"] else "no",
                      f"{n['price_per_hour']:.2f}", _color(n["status"]), "ok" if n["heartbeat"] else "-",
                      n.get("region", ""))
    plan_roles = {r["id"]: r for r in snap["plan_replicas"]}
    reps = Table(title="replicas")
    for col in ("replica", "node", "role", "plan role", "TP/PP", "state", "url", "in flight"):
        reps.add_column(col)
    for r in snap["replicas"]:
        planned = plan_roles.get(r["id"], {})
        load = loads.get(r["url"], {})
        inflight = load.get("outstanding", load.get("in_flight", ""))
        reps.add_row(r["id"], ",".join(r["node_ids"]), r["role"], planned.get("role", "(not in plan)"),
                     f"{r['tp']}/{r['pp']}", _color(r["status"]), r["url"], str(inflight))
    events = Table(title="recent events")
    for col in ("time", "event", "reason"):
        events.add_column(col)
    for e in snap["events"]:
        events.add_row(time.strftime("%H:%M:%S", time.localtime(e["ts"])), e["kind"], escape(e["reason"][:100]))
    parts: list[Any] = [head]
    wl = snap.get("workload") or {}
    planned, seen = wl.get("planned"), wl.get("observed") or {}
    if planned or seen.get("requests"):
        plan_part = (f"planned for {planned['mean_prompt']:.0f}/{planned['mean_output']:.0f} tokens"
                     + (" (measured)" if planned["observed"] else "")) if planned else "no plan workload"
        parts.append(f"workload: {plan_part}; last {seen.get('window_s', 0):.0f} s: {seen.get('requests', 0):.0f} "
                     f"requests, {seen.get('rate', 0):.2f} req/s, mean {seen.get('mean_prompt', 0):.0f}/"
                     f"{seen.get('mean_output', 0):.0f} tokens (prompt/output)")
    if slo_line := _slo_line(snap.get("slo") or {}):
        parts.append(slo_line)
    if "services" in snap:
        parts.append("  ".join(f"{name} " + ("[green]running[/green]" if svc["running"] else "[red]down[/red]")
                               for name, svc in snap["services"].items()))
    return [*parts, nodes, reps, events]


def _slo_line(slo: dict[str, Any]) -> str:
    """``SLO: 97.0% of 1,140 requests in the last 120 s within TTFT 5s / TPOT 0.5s (target 90%); TTFT p50 <= ...``"""
    target, attained = slo.get("target") or {}, slo.get("attainment")
    if attained is None or "ttft_s" not in target:
        return ""
    goal = target.get("attainment", 0.9)
    color = "green" if attained >= goal else "red"

    def at_most(v: float | None) -> str:
        return "-" if v is None else (f"> {LATENCY_BOUNDS_S[-1]:g} s" if v == math.inf else f"<= {v:g} s")

    quantiles = "; ".join(f"{what.upper()} " + ", ".join(f"p{q} {at_most(slo.get(f'{what}_p{q}_at_most_s'))}"
                                                      for q in (50, 90, 99)) for what in ("ttft", "tpot"))
    return (f"SLO: [{color}]{attained:.1%}[/{color}] of {slo['judged']:,.0f} requests in the last "
            f"{slo['window_s']:.0f} s within TTFT {target['ttft_s']:g}s and TPOT {target['tpot_s']:g}s (target "
            f"{goal:.0%}); {quantiles}")


def _state_for(deployment: str, redis_url: str | None) -> tuple[Deployment | None, StateStore]:
    dep = None
    url = redis_url or os.environ.get(REDIS_URL_ENV)
    try:
        dep = Deployment.load(deployment)
        url = url or dep.redis_url
    except DeploymentNotFound as e:
        if not url:
            raise fail(str(e)) from None
    assert url is not None
    try:
        check_redis(url)
    except RedisUnavailable as e:
        raise fail(str(e)) from None
    return dep, StateStore.from_url(url, deployment)


def status(
    deployment: str = typer.Option("default", "--deployment", "-d"),
    redis_url: str = typer.Option("", "--redis-url", help="default: the deployment's, or REDIS_URL"),
    watch: bool = typer.Option(False, "--watch", "-w", help="refresh every second until Ctrl-C"),
    as_json: bool = typer.Option(False, "--json", help="print the status as JSON"),
    events: int = typer.Option(10, "--events", help="how many recent events to show"),
) -> None:
    """Nodes, replicas, plan version, spend against the budget, recent events."""
    dep, state = _state_for(deployment, redis_url or None)

    async def once() -> tuple[dict[str, Any], dict[str, Any]]:
        snap = await snapshot(state, events)
        if dep is not None:
            snap["services"] = services(dep)
        return snap, await _worker_loads(dep)

    async def main() -> None:
        try:
            if as_json:
                snap, _ = await once()
                typer.echo(orjson.dumps(snap, option=orjson.OPT_INDENT_2).decode())
                return
            if not watch:
                for part in status_tables(*(await once())):
                    console.print(part)
                return
            from rich.console import Group

            with Live(console=console, refresh_per_second=2) as live:
                while True:
                    live.update(Group(*status_tables(*(await once()))))
                    await asyncio.sleep(1.0)
        finally:
            await state.close()

    try:
        _run(main())
    except KeyboardInterrupt:
        pass


# -- down ------------------------------------------------------------------------------------------------------
def _stop_services(dep: Deployment) -> list[str]:
    """Stop the gateway, then the controller (which releases the nodes); return what would not stop."""
    left = []
    if not stop_process(dep.gateway_pid, grace_s=10):
        left.append(f"gateway pid {dep.gateway_pid}")
    if not stop_process(dep.controller_pid, grace_s=60):
        left.append(f"controller pid {dep.controller_pid}")
    return left


def down(
    deployment: str = typer.Option("default", "--deployment", "-d"),
    keep_state: bool = typer.Option(False, "--keep-state", help="leave the deployment's keys in Redis"),
) -> None:
    """Stop everything and release every node; nothing is left running."""
    try:
        dep = Deployment.load(deployment)
    except DeploymentNotFound as e:
        raise fail(str(e)) from None
    console.print(f"stopping deployment [bold]{dep.name}[/bold] ...")
    left = _stop_services(dep)
    leftovers = _run(_release_leftovers(dep, wipe=not keep_state)) if _redis_up(dep) else []
    left += leftovers
    if dep.mode == "local":
        left += _kill_tagged_nodes(dep)
    if dep.redis_pid and not stop_process(dep.redis_pid, grace_s=10):
        left.append(f"redis pid {dep.redis_pid}")
    if left:
        raise fail("still running: " + ", ".join(left))
    dep.remove()
    console.print("[green]down[/green]: nodes released, controller, gateway and Redis stopped")


def _kill_tagged_nodes(dep: Deployment) -> list[str]:
    """Local nodes still running that Redis did not list (Redis gone, or its records wiped): found by the
    tag every process of a local node carries, and killed. Returns what would not die."""
    from provisioner.process_group import kill_node, node_tag, tagged_node_ids

    left = []
    for node_id in sorted(tagged_node_ids(dep.name)):
        survivors = kill_node(None, node_tag(dep.name, node_id))
        if survivors:
            left.append(f"node {node_id} ({len(survivors)} processes)")
    return left


def _redis_up(dep: Deployment) -> bool:
    try:
        check_redis(dep.redis_url, timeout_s=1.0)
        return True
    except RedisUnavailable:
        return False


async def _release_leftovers(dep: Deployment, wipe: bool) -> list[str]:
    """Kill local nodes a dead controller could not release; cloud nodes are reported, not guessed at."""
    from provisioner.process_group import kill_node, node_tag, parse_pgid

    state = StateStore.from_url(dep.redis_url, dep.name)
    left: list[str] = []
    try:
        for n in (await state.nodes()).values():
            if n.provider_ref.startswith("local:"):
                pgid = parse_pgid(n.provider_ref)
                survivors = await asyncio.to_thread(kill_node, pgid, node_tag(dep.name, n.id))
                if survivors:
                    left.append(f"node {n.id} ({len(survivors)} processes)")
            elif n.status in ("pending", "ready"):
                left.append(f"cloud node {n.id} ({n.provider_ref}): run `sky down {n.provider_ref}`")
        if wipe and not left:
            await state.wipe()
    finally:
        await state.close()
    return left


# -- chaos -----------------------------------------------------------------------------------------------------
chaos_app = typer.Typer(help="Break things on purpose, to watch the deployment heal.", no_args_is_help=True)


@chaos_app.command("preempt")
def chaos_preempt(
    nodes: list[str] = typer.Argument(..., help="node id(s) to take away"),
    deployment: str = typer.Option("default", "--deployment", "-d"),
) -> None:
    """Take nodes away without warning, as a spot reclaim does (local: SIGKILL the node's process group)."""
    _, state = _state_for(deployment, None)

    async def main() -> list[str]:
        from provisioner.process_group import kill_node, node_tag, parse_pgid

        done = []
        try:
            records = await state.nodes()
            for node_id in nodes:
                rec = records.get(node_id)
                live = sorted(k for k, v in records.items() if v.status in ("pending", "ready"))
                if rec is None or rec.status not in ("pending", "ready"):
                    raise fail(f"no live node {node_id!r} (live: {', '.join(live) or 'none'})")
                if not rec.provider_ref.startswith("local:"):
                    raise fail(f"node {node_id} is a cloud node: take it away with `sky down {rec.provider_ref}`")
                await state.emit("node.preempt_injected", "tsctl chaos preempt", node_id=node_id)
                t0 = time.perf_counter()
                await asyncio.to_thread(kill_node, parse_pgid(rec.provider_ref), node_tag(deployment, node_id))
                done.append(f"{node_id} ({(time.perf_counter() - t0) * 1000:.0f} ms)")
        finally:
            await state.close()
        return done

    killed = _run(main())
    console.print(f"preempted: {', '.join(killed)}; watch it heal with `tsctl status -w -d {deployment}`")


@chaos_app.command("crash")
def chaos_crash(
    service: str = typer.Argument(..., help="controller, gateway, or redis (the embedded one)"),
    deployment: str = typer.Option("default", "--deployment", "-d"),
) -> None:
    """SIGKILL the controller, the gateway or the embedded Redis, as an OOM kill would; its keepalive starts it
    again (Redis from its append-only file, on the same port)."""
    dep, state = _state_for(deployment, None)
    if dep is None:
        raise fail(f"no deployment {deployment!r} on this machine")
    keepalives = dep.pids()  # each service's keepalive (Redis only when it is our embedded one)
    if service not in keepalives:
        raise fail(f"service must be one of {', '.join(keepalives)}, not {service!r}"
                   + ("" if dep.redis_pid else " (this deployment's Redis is not ours: REDIS_URL)"))
    pid = service_pid(keepalives[service])
    if pid is None:
        raise fail(f"the {service} of {deployment!r} is not running; `tsctl restart {service} -d {deployment}`")

    async def record() -> None:
        try:
            await state.emit("service.crash_injected", f"tsctl chaos crash {service}", service=service, pid=pid)
        finally:
            await state.close()

    _run(record())
    os.kill(pid, signal.SIGKILL)
    console.print(f"{service} (pid {pid}) killed; its keepalive restarts it: `tsctl status -w -d {deployment}`")


# -- restart -----------------------------------------------------------------------------------------------------
def restart(
    service: str = typer.Argument(..., help="controller or gateway"),
    deployment: str = typer.Option("default", "--deployment", "-d"),
) -> None:
    """Restart the controller or the gateway: its keepalive runs a new one (the gateway's starts before the old one
    stops accepting, and the old one finishes its streams); it resumes from what Redis holds (plan, nodes, keys)."""
    try:
        dep = Deployment.load(deployment)
    except DeploymentNotFound as e:
        raise fail(str(e)) from None
    if service not in ("controller", "gateway"):
        raise fail(f"service must be controller or gateway, not {service!r}")
    if not _redis_up(dep):
        raise fail(f"Redis at {dep.redis_url} is not answering; the deployment is gone: `tsctl down -d {deployment}`")
    keeper = dep.controller_pid if service == "controller" else dep.gateway_pid
    before = service_pid(keeper)
    if keeper and before is not None:  # its keepalive runs it: SIGHUP, a new run replaces it
        os.kill(keeper, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while (now := service_pid(keeper)) in (None, before):
            if time.monotonic() > deadline or not alive(keeper):
                raise fail(f"the {service} did not come back; see {dep.log_path(service)}")
            time.sleep(0.1)
        how = "the old one finishes its streams" if service == "gateway" else "the old one handed over"
        console.print(f"{service} restarted (pid {now} replaces {before}; {how})")
        return
    # no keepalive (it was killed): a new one. SIGINT: a controller still running hands over and leaves the
    # nodes running (SIGTERM is `tsctl down`: release all)
    stop_process(keeper, grace_s=10, sig=signal.SIGINT if service == "controller" else signal.SIGTERM)
    if service == "controller":
        dep.controller_pid = _start_controller(dep)  # reads its config, the plan and the nodes from Redis
    else:
        dep.gateway_pid = _start_gateway(dep)
    dep.save()
    console.print(f"{service} restarted (pid {dep.controller_pid if service == 'controller' else dep.gateway_pid})")
