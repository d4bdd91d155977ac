"""Helpers for the replicas tests: JSON/SSE over real HTTP, and a PD request sent the way a router sends it."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import orjson

from replicas.process import EngineProcess

TIMEOUT = aiohttp.ClientTimeout(total=120)


async def post(url: str, body: Any, raw: bytes | None = None) -> tuple[int, Any]:
    """POST JSON (or raw bytes); returns (status, parsed body or text)."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        data = raw if raw is not None else orjson.dumps(body)
        async with s.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
            text = await r.text()
            try:
                return r.status, orjson.loads(text)
            except orjson.JSONDecodeError:
                return r.status, text


async def get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s, s.get(url) as r:
        text = await r.text()
        try:
            return r.status, orjson.loads(text)
        except orjson.JSONDecodeError:
            return r.status, text


def sse_events(text: str) -> list[Any]:
    """``data:`` payloads of an SSE body in order; ``[DONE]`` stays a string."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        block = block.strip()
        if block.startswith("data: "):
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return out


async def stream(url: str, body: Any) -> tuple[int, list[Any]]:
    status, text = await post(url, {**body, "stream": True})
    return status, sse_events(text) if isinstance(text, str) else text


def pd_fields(prefill: EngineProcess, room: int | None = None) -> dict[str, Any]:
    return {"bootstrap_host": prefill.host, "bootstrap_port": prefill.bootstrap_port,
            "bootstrap_room": random.getrandbits(63) if room is None else room}


async def pd_post(prefill: EngineProcess, decode: EngineProcess, path: str, body: dict[str, Any],
                  streaming: bool = False) -> tuple[tuple[int, Any], tuple[int, Any]]:
    """Send the same body + bootstrap fields to both legs at once, as SGLang's router does."""
    full = {**body, **pd_fields(prefill)}
    if streaming:
        p, d = await asyncio.gather(stream(prefill.url + path, full), stream(decode.url + path, full))
    else:
        p, d = await asyncio.gather(post(prefill.url + path, full), post(decode.url + path, full))
    return p, d


async def metric(url: str, name: str) -> float:
    """The value of one sglang:* metric (summed over label sets)."""
    _, text = await get(url + "/metrics")
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


class SGLangRouter:
    """The official ``sglang-router`` (Rust, PD mode) in front of reference workers, on a free port."""

    def __init__(self, prefills: list[EngineProcess], decodes: list[EngineProcess]) -> None:
        self.prefills, self.decodes = prefills, decodes
        self.proc: Any = None
        self.url = ""

    async def __aenter__(self) -> SGLangRouter:
        import subprocess
        import sys
        import tempfile
        import time

        from replicas.process import free_port

        port = free_port()
        argv = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation"]
        for p in self.prefills:
            argv += ["--prefill", p.url, str(p.bootstrap_port)]
        for d in self.decodes:
            argv += ["--decode", d.url]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(free_port()),
                 "--worker-startup-check-interval", "1", "--health-check-interval-secs", "1",
                 "--policy", "round_robin", "--log-level", "warn"]
        self.log = tempfile.NamedTemporaryFile(prefix="sglang-router-", suffix=".log", delete=False)
        self.proc = await asyncio.to_thread(subprocess.Popen, argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sglang-router exited with {self.proc.returncode}; log {self.log.name}")
            try:
                status, _ = await get(self.url + "/readiness")
                if status == 200:
                    return self
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"sglang-router not ready in 60 s; log {self.log.name}")

    async def __aexit__(self, *_: Any) -> None:
        import os

        self.proc.terminate()
        await asyncio.to_thread(self.proc.wait)
        self.log.close()
        os.unlink(self.log.name)
