"""The aiohttp application: routes, the error/metrics middleware, and the background tasks' lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import RedisError

from gateway import admin, header_deadline
from gateway.auth import Authenticator
from gateway.config import GatewayConfig
from gateway.context import GATEWAY, Gateway
from gateway.discovery import discovery_loop, load_tokenizer
from gateway.errors import ApiError, sse_error_event
from gateway.generate_stream import serve_generate_stream
from gateway.health import health_loop
from gateway.http import SSE_STARTED, read_body
from gateway.metrics import GatewayMetrics
from gateway.openai_routes import check_model, serve_openai
from gateway.passthrough import serve_passthrough
from gateway.plan_watch import PlanWatcher
from gateway.routing import RoutingTable, static_table
from gateway.sse import DONE
from gateway.upstream_http import UpstreamPool
from gateway.validation import get_bool, get_int, parse_chat, parse_completion, parse_generate, parse_object
from gateway.workers import WorkerPool
from planner.state import StateStore

log = logging.getLogger("gateway")

DISCOVERED: web.AppKey[asyncio.Event] = web.AppKey("discovered", asyncio.Event)
_UNMATCHED = "unmatched"


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else _UNMATCHED


@web.middleware
async def errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as an OpenAI-shaped error; every answer is counted by route and status."""
    request["t0"] = time.perf_counter()
    gw = request.app[GATEWAY]
    head = header_deadline.watch(request)
    if head is not None:
        head.head_received(request)
    # The request deadline: a timer that cancels this task (cheaper than asyncio.timeout on every request).
    task = asyncio.current_task()
    expired: list[bool] = []
    deadline = asyncio.get_running_loop().call_later(gw.cfg.request_timeout_s, _expire, task, expired)
    try:
        resp = await handler(request)
        status = request.get("final_status", resp.status)
    except asyncio.CancelledError:
        if not expired:
            gw.metrics.count(_route_label(request), 499)  # the client went away mid-request
            raise
        task.uncancel()  # type: ignore[union-attr]
        resp, status = await _timed_out(request, gw.cfg.request_timeout_s), 504
    except ApiError as e:
        resp, status = e.response(), e.status
        if e.status in (408, 413):
            resp.force_close()  # the client may still be sending a body we will not read
    except web.HTTPException as e:  # aiohttp's own: unknown route, wrong method, body too large
        err = ApiError(e.status, _http_message(request, e), code=_http_code(e.status))
        resp, status = err.response(), e.status
        if e.status == 405:
            resp.headers["Allow"] = e.headers.get("Allow", "")
    except RedisError as e:  # admin key routes (key lookups answer their own 503): the shared store is down
        log.warning("Redis unavailable on %s %s: %s", request.method, request.path, e)
        status = 503
        resp = await _fail(request, ApiError(503, f"the state store (Redis) is unavailable: {e}; retry shortly",
                                             code="state_store_unavailable", headers={"Retry-After": "2"}))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        status = 500
        resp = await _fail(request, ApiError(500, "internal gateway error", code="internal_error"))
    finally:
        deadline.cancel()
    gw.metrics.count(_route_label(request), status)
    return resp


def _expire(task: asyncio.Task[object] | None, expired: list[bool]) -> None:
    if task is not None and not task.done():
        expired.append(True)
        task.cancel()


async def _timed_out(request: web.Request, limit: float) -> web.StreamResponse:
    err = ApiError(504, f"request not completed within {limit:g} s (--request-timeout-s)", code="request_timeout")
    return await _fail(request, err)


async def _fail(request: web.Request, err: ApiError) -> web.StreamResponse:
    """``err`` as the answer: a JSON error, or, once an event stream has gone out (its status line with
    it), an error event and ``[DONE]`` at its end, since a second response cannot be sent."""
    stream = request.get(SSE_STARTED)
    if stream is None:
        return err.response()
    with contextlib.suppress(ConnectionError, RuntimeError):
        await stream.write(sse_error_event(err))
        await stream.write(DONE)
    return stream


def _http_message(request: web.Request, e: web.HTTPException) -> str:
    if e.status == 404:
        return f"unknown route {request.method} {request.path}"
    if e.status == 405:
        return f"method {request.method} not allowed on {request.path}"
    if e.status == 413:
        return "request body too large"
    return e.reason


def _http_code(status: int) -> str:
    return {404: "unknown_route", 405: "method_not_allowed", 413: "body_too_large"}.get(status, "http_error")


# -- public routes -----------------------------------------------------------------------------------
async def handle_generate(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    principal = await gw.auth.authenticate(request.headers.get("Authorization"))
    raw = await read_body(request, gw.cfg)
    body = parse_object(raw)
    req = parse_generate(body)
    await gw.auth.charge(principal, req.token_estimate)
    if req.stream and req.input_ids is not None:  # resumable: migrate on failure instead of breaking
        return await serve_generate_stream(request, gw, body, req, "/generate", request["t0"])
    return await serve_passthrough(request, gw, raw, "/generate", stream=req.stream, tokens=req.token_estimate,
                                   want_logprobs=req.return_logprob, route="/generate", t0=request["t0"])


async def _openai(request: web.Request, kind: str, path: str) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    principal = await gw.auth.authenticate(request.headers.get("Authorization"))
    raw = await read_body(request, gw.cfg)
    body = parse_object(raw)
    req = parse_chat(body) if kind == "chat" else parse_completion(body)
    if gw.tokenizer is not None:
        return await serve_openai(request, gw, req, kind, path, request["t0"], principal)
    # No tokenizer: check what we can and pass the body through untouched.
    check_model(gw, req.model)
    max_tokens = get_int(body, "max_completion_tokens", 1) or get_int(body, "max_tokens", 1)
    tokens = len(raw) // 4 + (max_tokens or gw.cfg.default_max_tokens)
    await gw.auth.charge(principal, tokens)
    return await serve_passthrough(request, gw, raw, path, stream=get_bool(body, "stream"), tokens=tokens,
                                   want_logprobs=False, route=path, t0=request["t0"])


async def handle_chat(request: web.Request) -> web.StreamResponse:
    return await _openai(request, "chat", "/v1/chat/completions")


async def handle_completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, "completion", "/v1/completions")


def _model_card(gw: Gateway, name: str) -> dict[str, object]:
    card: dict[str, object] = {"id": name, "object": "model", "created": 0, "owned_by": gw.model.owned_by}
    if gw.model.context_length:
        card["max_model_len"] = gw.model.context_length
    return card


async def handle_models(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    await gw.auth.authenticate(request.headers.get("Authorization"))
    return _json({"object": "list", "data": [_model_card(gw, m) for m in _served_ids(gw)]})


def _served_ids(gw: Gateway) -> list[str]:
    """The model ids workers gave, or the plan's model until a worker has answered: a gateway that has just
    restarted (its plan read before it serves) must not list no model while discovery is under way."""
    return gw.model.ids or ([gw.table.model] if gw.table.model else [])


async def handle_model(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    await gw.auth.authenticate(request.headers.get("Authorization"))
    name = request.match_info["model"]
    if name not in _served_ids(gw):
        raise ApiError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
    return _json(_model_card(gw, name))


async def handle_health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def handle_ready(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    state = gw.table.ready()
    discovered = request.app[DISCOVERED].is_set()
    ok = bool(state["ready"]) and discovered
    body = {**state, "ready": ok, "model_discovered": discovered, "plan_version": gw.table.version,
            "tokenizer": getattr(gw.tokenizer, "name", None)}
    return _json(body, status=200 if ok else 503)


async def handle_metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    resp = web.Response(body=gw.metrics.render())
    resp.headers["Content-Type"] = gw.metrics.content_type
    return resp


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


# -- assembly ------------------------------------------------------------------------------------------
def create_app(cfg: GatewayConfig) -> web.Application:
    """The gateway as an aiohttp app; background tasks start with the app and stop with it."""
    metrics = GatewayMetrics()
    pool = WorkerPool(cfg.cb_failures, cfg.cb_cooldown_s)
    metrics.watch_workers(pool.all)
    table = static_table(cfg.workers, pool, cfg.served_model_name) if cfg.workers else RoutingTable([], source="plan")
    auth = Authenticator(None, cfg.api_keys, cfg.admin_key, cfg.auth_enabled, cfg.key_cache_s, metrics)
    gw = Gateway(cfg=cfg, metrics=metrics, pool=pool, auth=auth, table=table, tokenizer=load_tokenizer(cfg.tokenizer),
                 upstream=UpstreamPool(connect_timeout=cfg.connect_timeout_s))
    metrics.plan_version.set(table.version)
    app = web.Application(client_max_size=cfg.max_body_bytes, middlewares=[errors_and_metrics])
    app[GATEWAY] = gw
    app[DISCOVERED] = asyncio.Event()
    r = app.router
    r.add_post("/generate", handle_generate)
    r.add_post("/v1/chat/completions", handle_chat)
    r.add_post("/v1/completions", handle_completions)
    r.add_get("/v1/models", handle_models)
    r.add_get("/v1/models/{model}", handle_model)
    r.add_get("/health", handle_health)
    r.add_get("/ready", handle_ready)
    r.add_get("/metrics", handle_metrics)
    admin.add_routes(app)
    app.cleanup_ctx.append(_lifecycle)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    cfg = gw.cfg
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=60)
    gw.session = aiohttp.ClientSession(connector=connector, auto_decompress=False, read_bufsize=1 << 20,
                                       skip_auto_headers=("User-Agent",))
    tasks: list[asyncio.Task[None]] = []
    if cfg.redis_url:
        gw.state = StateStore.from_url(cfg.redis_url, cfg.deployment)
        gw.auth.state = gw.state
        if cfg.plan_mode:
            watcher = PlanWatcher(gw, gw.state)
            with contextlib.suppress(Exception):
                await watcher.refresh()  # serve the current plan from the first request if Redis is up
            tasks.append(asyncio.create_task(watcher.run(), name="plan-watch"))
            tasks.append(asyncio.create_task(gw.workload.run(gw.state), name="workload-meter"))
    tasks.append(asyncio.create_task(health_loop(gw), name="health"))
    tasks.append(asyncio.create_task(discovery_loop(gw, app[DISCOVERED]), name="discovery"))
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        await gw.session.close()
        gw.upstream.close()
        if gw.state is not None:
            await gw.state.close()
