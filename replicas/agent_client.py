"""Async client of the node agent's HTTP API, for the controller (and tsctl).

    async with AgentClient("http://10.0.0.5:7001") as agent:
        rep = await agent.start_replica(id="r0", engine="reference", model="tiny", role="prefill")
        await agent.switch_role("r0", "decode", drain=True, timeout_s=30)
        await agent.stop_replica("r0")
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson


class AgentError(RuntimeError):
    """The agent refused or failed; ``status`` is its HTTP status (0 when unreachable)."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"agent error {status}: {message}")
        self.status = status
        self.message = message
        self.body = body


class AgentClient:
    def __init__(self, base_url: str, session: aiohttp.ClientSession | None = None, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._own_session = session is None
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        return self._session

    async def _call(self, method: str, path: str, body: Any = None, timeout_s: float | None = None,
                    ok: tuple[int, ...] = (200, 201)) -> Any:
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else self.timeout
        try:
            async with self.session.request(method, self.base_url + path, timeout=timeout,
                                            data=None if body is None else orjson.dumps(body),
                                            headers={"Content-Type": "application/json"}) as r:
                raw = await r.read()
                data = orjson.loads(raw) if raw else None
                if r.status not in ok:
                    message = data.get("error", {}).get("message") if isinstance(data, dict) else None
                    if message is None and isinstance(data, dict):
                        message = data.get("message")
                    raise AgentError(r.status, message or raw.decode(errors="replace")[:300], data)
                return data
        except (aiohttp.ClientError, TimeoutError) as e:
            raise AgentError(0, f"cannot reach the agent at {self.base_url}: {e!r}") from e
        except orjson.JSONDecodeError as e:
            raise AgentError(502, f"agent at {self.base_url} answered non-JSON: {e}") from e

    async def health(self) -> dict[str, Any]:
        return await self._call("GET", "/health")

    async def replicas(self) -> list[dict[str, Any]]:
        return await self._call("GET", "/replicas")

    async def replica(self, replica_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/replicas/{replica_id}")

    async def start_replica(self, spec: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        """POST /replicas with ``spec`` (and/or keyword fields): id, engine, model, role, tp, pp, gpus, ..."""
        body = {**(spec or {}), **fields}
        timeout = float(body.get("ready_timeout_s", 300)) + 30 if body.get("wait_ready") else None
        return await self._call("POST", "/replicas", body, timeout_s=timeout)

    async def stop_replica(self, replica_id: str) -> dict[str, Any]:
        return await self._call("DELETE", f"/replicas/{replica_id}", timeout_s=60)

    async def switch_role(self, replica_id: str, role: str, drain: bool = True, timeout_s: float = 30.0
                          ) -> dict[str, Any]:
        body = {"role": role, "drain": drain, "timeout_s": timeout_s}
        return await self._call("POST", f"/replicas/{replica_id}/role", body, timeout_s=timeout_s + 30)
