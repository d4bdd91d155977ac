"""Start the gateway as a child process on a free port and wait until it listens (tests, benches, tsctl).

The gateway binds port 0 itself and prints ``gateway listening on URL`` on stdout (nothing else goes to
stdout), so there is no race for a port picked in advance.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson

from gateway.server import READY_LINE


class GatewayStartError(RuntimeError):
    """The gateway exited or did not listen in time; the message carries the end of its log."""


class GatewayProcess:
    """A `python -m gateway` child. Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(self, args: list[str], host: str = "127.0.0.1", log_path: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.args = args
        self.host = host
        self.env = env
        self.log_path = log_path or tempfile.mkstemp(prefix="ts-gateway-", suffix=".log")[1]
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout_s: float = 30.0) -> str:
        cmd = [sys.executable, "-m", "gateway", "--host", self.host, "--port", "0", *self.args]
        log = open(self.log_path, "ab")  # handed to the child; closed in stop()
        self._log = log
        env = {**os.environ, **(self.env or {})}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env,
                                     cwd=Path(__file__).resolve().parent.parent)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        buf = b""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise GatewayStartError(f"gateway exited with {self.proc.returncode}: {self.log_tail()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                buf += chunk
                for line in buf.decode(errors="replace").splitlines():
                    if line.startswith(READY_LINE):
                        self.url = line[len(READY_LINE):].strip()
                        return self.url
        self.stop()
        raise GatewayStartError(f"gateway did not listen within {timeout_s:g} s: {self.log_tail()}")

    def wait_ready(self, timeout_s: float = 60.0, healthy: int = 0) -> dict[str, object]:
        """Poll /ready until 200 (workers healthy and the model discovered) and, with ``healthy``, until
        that many workers pass their health checks: /ready answers 200 as soon as the gateway can route
        one request, while the other workers' first checks may still be on their way."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=2) as resp:
                    ready = orjson.loads(resp.read())
                up = _healthy_workers(ready)
                if up >= healthy:
                    return ready
                last = f"{up} of {healthy} workers healthy"
            except urllib.error.HTTPError as e:
                last = e.read().decode(errors="replace")
            except OSError as e:
                last = str(e)
            if self.proc is not None and self.proc.poll() is not None:
                raise GatewayStartError(f"gateway exited with {self.proc.returncode}: {self.log_tail()}")
            time.sleep(0.2)
        raise GatewayStartError(f"gateway not ready within {timeout_s:g} s ({last}): {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def __enter__(self) -> GatewayProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _healthy_workers(ready: dict[str, object]) -> int:
    """Workers of every role that pass their health checks, from a /ready answer."""
    return sum(v.get("healthy", 0) for v in ready.values() if isinstance(v, dict))
