"""Admin routes, behind the admin key: the plan in use, the workers and their load, API-key management."""

from __future__ import annotations

from dataclasses import asdict

import orjson
from aiohttp import web

from gateway.context import GATEWAY, Gateway
from gateway.errors import ApiError, invalid
from gateway.http import read_body
from gateway.validation import get_bool, get_int, get_str, parse_object
from planner.state import StateStore, hash_api_key


async def _admin(request: web.Request) -> Gateway:
    gw = request.app[GATEWAY]
    await gw.auth.authenticate_admin(request.headers.get("Authorization"))
    return gw


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def get_plan(request: web.Request) -> web.Response:
    gw = await _admin(request)
    plan = gw.plan.to_dict() if gw.plan is not None else None
    return _json({"table": gw.table.describe(), "plan": plan})


async def get_workers(request: web.Request) -> web.Response:
    gw = await _admin(request)
    in_table = gw.table.workers()
    workers = [{**w.snapshot(), "in_table": w in in_table,
                "share": round(gw.table.share.get(w, 0.0), 6)} for w in gw.pool.all()]
    return _json({"plan_version": gw.table.version, "ready": gw.table.ready(), "workers": workers})


def _keys_store(gw: Gateway) -> StateStore:
    if gw.state is None:
        raise ApiError(501, "API-key management needs Redis: start the gateway with --redis-url",
                       code="no_key_store")
    return gw.state


async def list_keys(request: web.Request) -> web.Response:
    gw = await _admin(request)
    keys = await _keys_store(gw).api_keys()
    return _json({"keys": [asdict(k) for k in sorted(keys, key=lambda k: k.created_at)]})


MAX_KEY_NAME = 200  # a label shown in `GET /admin/keys`, stored in Redis with the key's hash


async def create_key(request: web.Request) -> web.Response:
    gw = await _admin(request)
    store = _keys_store(gw)
    body = parse_object(await read_body(request, gw.cfg))
    name = get_str(body, "name", required=True) or ""
    if len(name) > MAX_KEY_NAME:
        raise invalid(f"'name' may be at most {MAX_KEY_NAME} characters, got {len(name)}", "name")
    rpm = get_int(body, "rpm", 1)
    tpm = get_int(body, "tpm", 1)
    admin = get_bool(body, "admin")
    key = await store.create_api_key(name, rpm=rpm, tpm=tpm, admin=admin)
    return _json({"key": key, "key_hash": hash_api_key(key), "name": name, "rpm": rpm, "tpm": tpm,
                  "admin": admin}, status=201)


async def revoke_key(request: web.Request) -> web.Response:
    gw = await _admin(request)
    key_hash = request.match_info["key_hash"]
    if not await _keys_store(gw).revoke_api_key(key_hash):
        raise ApiError(404, f"no API key with hash {key_hash}", param="key_hash", code="key_not_found")
    gw.auth.forget(key_hash)
    return _json({"revoked": key_hash})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/plan", get_plan)
    app.router.add_get("/admin/workers", get_workers)
    app.router.add_get("/admin/keys", list_keys)
    app.router.add_post("/admin/keys", create_key)
    app.router.add_delete("/admin/keys/{key_hash}", revoke_key)
