"""Start reference engines as child processes on free ports and wait until they serve.

Used by the gateway's tests and benches, the node agent and the local provisioner::

    with EngineProcess(model="emulated") as eng:          # sync
        requests.post(eng.url + "/generate", ...)
    async with EngineProcess(model="tiny", role="prefill") as p: ...   # async (does not block the loop)
    with engine_pair(model="tiny") as (prefill, decode): ...           # a PD pair

Ports are chosen free on loopback; if another process grabs one before the engine binds it, the
engine exits with code 98 and the start is retried on fresh ports. The child runs in our process
group (no new session), so killing the group kills it too, as a preemption would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

EXIT_PORT_IN_USE = 98
PARENT_PID_ENV = "THUNDERSERVE_PARENT_PID"  # an engine given this exits when that process is gone
PORT_RETRIES = 4
DEFAULT_START_TIMEOUT_S = 180.0


class EngineStartError(RuntimeError):
    """The engine exited or never became healthy; the message carries the tail of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def engine_argv(model: str, role: str, host: str, port: int, bootstrap_port: int, kv_compression: str = "none",
                max_batch: int | None = None, served_model_name: str | None = None,
                context_length: int | None = None, enable_pd_role_switch: bool = True,
                extra_args: Sequence[str] = (), python: str = sys.executable) -> list[str]:
    """The command line of ``python -m replicas.engine`` (what the node agent runs for engine=reference)."""
    argv = [python, "-m", "replicas.engine", "--model", model, "--role", role, "--host", host,
            "--port", str(port), "--bootstrap-port", str(bootstrap_port), "--kv-compression", kv_compression]
    if max_batch is not None:
        argv += ["--max-batch", str(max_batch)]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if context_length is not None:
        argv += ["--context-length", str(context_length)]
    if enable_pd_role_switch:
        argv.append("--enable-pd-role-switch")
    return argv + list(extra_args)


class EngineProcess:
    """One engine child process. ``start()``/``astart()`` return once ``/health`` answers 200."""

    def __init__(self, model: str = "emulated", role: str = "both", host: str = "127.0.0.1",
                 port: int | None = None, bootstrap_port: int | None = None, kv_compression: str = "none",
                 max_batch: int | None = None, served_model_name: str | None = None,
                 context_length: int | None = None, enable_pd_role_switch: bool = True,
                 extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                 log_path: str | os.PathLike[str] | None = None,
                 start_timeout_s: float = DEFAULT_START_TIMEOUT_S) -> None:
        self.model, self.role, self.host = model, role, host
        self._fixed_port, self._fixed_bootstrap = port, bootstrap_port
        self.port = port or 0
        self.bootstrap_port = bootstrap_port or 0
        self.kv_compression = kv_compression
        self.max_batch = max_batch
        self.served_model_name = served_model_name
        self.context_length = context_length
        self.enable_pd_role_switch = enable_pd_role_switch
        self.extra_args = list(extra_args)
        self.env = env
        self.start_timeout_s = start_timeout_s
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen[bytes] | None = None

    # -- what callers read ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self) -> list[str]:
        return engine_argv(self.model, self.role, self.host, self.port, self.bootstrap_port, self.kv_compression,
                           self.max_batch, self.served_model_name, self.context_length,
                           self.enable_pd_role_switch, self.extra_args)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- starting ------------------------------------------------------------------------------------
    def _spawn(self) -> None:
        self.port = self._fixed_port or free_port(self.host)
        self.bootstrap_port = self._fixed_bootstrap or free_port(self.host)
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"engine-{self.model.replace('/', '_')}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid()), **(self.env or {})}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env)

    def _probe(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def _failure(self, why: str) -> EngineStartError:
        where = f"engine {self.model} ({self.role}) on {self.url}"
        return EngineStartError(f"{where} {why}\n--- log ---\n{self.log_tail()}")

    def start(self) -> EngineProcess:
        for _attempt in range(PORT_RETRIES):
            self._spawn()
            deadline = time.monotonic() + self.start_timeout_s
            while time.monotonic() < deadline:
                code = self._exited()
                if code is not None:
                    break
                if self._probe():
                    return self
                time.sleep(0.05)
            else:
                self.stop()
                raise self._failure(f"did not answer /health within {self.start_timeout_s:g} s")
            if code != EXIT_PORT_IN_USE or (self._fixed_port and self._fixed_bootstrap):
                raise self._failure(f"exited with code {code}")
        raise self._failure("could not find free ports")

    async def astart(self) -> EngineProcess:
        """``start()`` for asyncio callers: polls without blocking the event loop."""
        import aiohttp

        async with aiohttp.ClientSession() as session:
            for _attempt in range(PORT_RETRIES):
                self._spawn()
                deadline = time.monotonic() + self.start_timeout_s
                code = None
                while time.monotonic() < deadline:
                    code = self._exited()
                    if code is not None:
                        break
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                        async with session.get(self.url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                            if r.status == 200:
                                return self
                    await asyncio.sleep(0.05)
                else:
                    await asyncio.to_thread(self.stop)
                    raise self._failure(f"did not answer /health within {self.start_timeout_s:g} s")
                if code != EXIT_PORT_IN_USE or (self._fixed_port and self._fixed_bootstrap):
                    raise self._failure(f"exited with code {code}")
        raise self._failure("could not find free ports")

    # -- stopping ------------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL. Returns the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        if self._own_log and self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
        return code

    def kill(self) -> None:
        """SIGKILL at once: a crash or a preemption, not a clean stop."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> EngineProcess:
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()

    async def __aenter__(self) -> EngineProcess:
        return await self.astart()

    async def __aexit__(self, *_: Any) -> None:
        await asyncio.to_thread(self.stop)

    def __repr__(self) -> str:
        return f"EngineProcess({self.model}, {self.role}, {self.url}, bootstrap={self.bootstrap_port}, pid={self.pid})"


class EnginePair:
    """A prefill worker and a decode worker on the same model, started together (in parallel)."""

    def __init__(self, model: str = "emulated", kv_compression: str = "none", **kwargs: Any) -> None:
        self.prefill = EngineProcess(model=model, role="prefill", kv_compression=kv_compression, **kwargs)
        self.decode = EngineProcess(model=model, role="decode", kv_compression="none", **kwargs)

    def start(self) -> EnginePair:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(e.start) for e in (self.prefill, self.decode)]
            errors = [f.exception() for f in futures]
        if any(errors):
            self.stop()
            raise next(e for e in errors if e is not None)
        return self

    async def astart(self) -> EnginePair:
        results = await asyncio.gather(self.prefill.astart(), self.decode.astart(), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await asyncio.to_thread(self.stop)
            raise errors[0]
        return self

    def stop(self) -> None:
        self.prefill.stop()
        self.decode.stop()

    def bootstrap_fields(self, room: int) -> dict[str, Any]:
        """What a router adds to a request body for this pair (SGLang's PD protocol)."""
        return {"bootstrap_host": self.prefill.host, "bootstrap_port": self.prefill.bootstrap_port,
                "bootstrap_room": room}

    def __enter__(self) -> tuple[EngineProcess, EngineProcess]:
        self.start()
        return self.prefill, self.decode

    def __exit__(self, *_: Any) -> None:
        self.stop()


@contextlib.contextmanager
def engine_pair(model: str = "emulated", **kwargs: Any) -> Iterator[tuple[EngineProcess, EngineProcess]]:
    """``with engine_pair("tiny") as (prefill, decode):`` -- the pytest-friendly form."""
    pair = EnginePair(model, **kwargs).start()
    try:
        yield pair.prefill, pair.decode
    finally:
        pair.stop()


@contextlib.asynccontextmanager
async def async_engine_pair(model: str = "emulated", **kwargs: Any) -> AsyncIterator[tuple[EngineProcess,
                                                                                         EngineProcess]]:
    pair = await EnginePair(model, **kwargs).astart()
    try:
        yield pair.prefill, pair.decode
    finally:
        await asyncio.to_thread(pair.stop)
