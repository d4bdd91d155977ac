"""Learn from the workers what model they serve: its ids, context length and tokenizer.

Runs in the background until one worker answers (workers may come up after the gateway). With
``--tokenizer auto`` the tokenizer is the one the worker names in ``/model_info`` (``tokenizer_path``)
when that folder exists on this host, as with ``--local``; on a separate gateway host pass
``--tokenizer DIR``. Without a tokenizer the OpenAI routes pass through (retries before the first
byte only; no mid-stream migration), which is logged once.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from gateway.context import Gateway
from gateway.tokenizer import ByteTokenizer, GatewayTokenizer, TextTokenizer, TokenizerUnavailable

log = logging.getLogger("gateway.discovery")


async def _get_json(gw: Gateway, url: str) -> Any:
    assert gw.session is not None
    async with gw.session.get(url, timeout=aiohttp.ClientTimeout(total=gw.cfg.health_timeout_s)) as resp:
        if resp.status != 200:
            raise aiohttp.ClientResponseError(resp.request_info, resp.history, status=resp.status)
        return orjson.loads(await resp.read())


def load_tokenizer(spec: str) -> GatewayTokenizer | None:
    """``--tokenizer`` when it names one (a folder, a tokenizer.json, or ``bytes``); None for auto/none."""
    if spec in ("auto", "none"):
        return None
    if spec == "bytes":
        return ByteTokenizer()
    return TextTokenizer.from_path(spec)


def _local_tokenizer(info: dict[str, Any]) -> GatewayTokenizer | None:
    if info.get("tokenizer_path") == "bytes":  # the reference engine's emulated model
        return ByteTokenizer()
    for key in ("tokenizer_path", "model_path"):
        path = info.get(key)
        if isinstance(path, str) and path and (Path(path) / "tokenizer.json").is_file():
            try:
                return TextTokenizer.from_path(path)
            except (TokenizerUnavailable, OSError, ValueError) as e:
                log.warning("cannot load the tokenizer at %s: %s", path, e)
    return None


async def discover_once(gw: Gateway) -> bool:
    """Ask one reachable worker; fill gw.model (and gw.tokenizer with --tokenizer auto). True on success."""
    workers = sorted(gw.table.workers(), key=lambda w: (w.healthy is not True, w.role != "decode"))
    for w in workers:
        try:
            models = await _get_json(gw, w.url + "/v1/models")
            info = await _get_json(gw, w.url + "/model_info")
        except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError):
            continue
        data = models.get("data", []) if isinstance(models, dict) else []
        ids = [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        lengths = [m.get("max_model_len") for m in data if isinstance(m, dict)]
        ctx = next((n for n in lengths if isinstance(n, int) and n > 0), None)
        if gw.cfg.served_model_name:
            ids = [gw.cfg.served_model_name]
        elif gw.table.model and gw.table.model not in ids:
            ids.append(gw.table.model)  # the plan's model name is an alias
        gw.model.ids = ids
        gw.model.context_length = ctx
        if gw.cfg.tokenizer == "auto" and gw.tokenizer is None and isinstance(info, dict):
            gw.tokenizer = _local_tokenizer(info)
            if gw.tokenizer is not None:
                log.info("tokenizing at the gateway with %s: OpenAI streams can migrate between workers",
                         gw.tokenizer.name)
        if gw.tokenizer is None:
            log.warning("no tokenizer (--tokenizer %s): OpenAI routes pass through to the workers; they retry "
                        "before the first byte but cannot migrate mid-stream", gw.cfg.tokenizer)
        log.info("serving model %s (context %s) from %s", ", ".join(ids) or "?", ctx, w.url)
        return True
    return False


async def discovery_loop(gw: Gateway, done: asyncio.Event) -> None:
    while not done.is_set():
        try:
            if await discover_once(gw):
                done.set()
                return
        except Exception:
            log.exception("model discovery failed")
        await asyncio.sleep(1.0)
