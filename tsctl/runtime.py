"""Where a deployment's control-host processes are recorded, and how they are started and stopped.

`tsctl up` starts Redis (embedded unless ``REDIS_URL``), the controller and the gateway as detached
processes (their own sessions, so they outlive the command), and writes what it started to
``$TS_HOME/deployments/<name>/deployment.json`` (mode 0600: it holds the first API key). `tsctl status`,
`chaos` and `down` read it back. Everything else a deployment knows lives in Redis.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from provisioner.process_group import pid_alive as alive
from provisioner.process_group import signallable_group


def ts_home() -> Path:
    return Path(os.environ.get("TS_HOME", "~/.thunderserve")).expanduser()


class DeploymentNotFound(RuntimeError):
    """No deployment of that name is recorded on this machine."""


# A deployment's name is a folder under $TS_HOME/deployments, a Redis key prefix and part of process tags:
# letters, digits, '.', '_', '-' (not '..': `-d ../x` wrote outside the deployments folder)
DEPLOYMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def bad_deployment_name(name: str) -> str | None:
    """Why ``name`` cannot name a deployment, or None."""
    if DEPLOYMENT_NAME.fullmatch(name) and ".." not in name:
        return None
    return (f"deployment name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(no '..')")


@dataclass
class Deployment:
    """What `tsctl up` started on this machine for one deployment."""

    name: str
    mode: str  # "local" or "cloud"
    redis_url: str
    redis_pid: int | None = None  # set when we started an embedded redis-server
    controller_pid: int | None = None
    gateway_pid: int | None = None
    gateway_url: str = ""
    api_key: str = ""
    admin_key: str = ""
    budget: float = 0.0
    model: str = ""
    started_at: float = field(default_factory=time.time)

    @property
    def dir(self) -> Path:
        return ts_home() / "deployments" / self.name

    def log_path(self, service: str) -> Path:
        return self.dir / f"{service}.log"

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "deployment.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(path)

    @classmethod
    def load(cls, name: str) -> Deployment:
        if problem := bad_deployment_name(name):
            raise DeploymentNotFound(problem)
        path = ts_home() / "deployments" / name / "deployment.json"
        if not path.is_file():
            raise DeploymentNotFound(f"no deployment {name!r} on this machine (looked in {path}); run `tsctl up` first")
        return cls(**json.loads(path.read_text()))

    def remove(self) -> None:
        path = self.dir / "deployment.json"
        path.unlink(missing_ok=True)

    def pids(self) -> dict[str, int]:
        named = {"controller": self.controller_pid, "gateway": self.gateway_pid, "redis": self.redis_pid}
        return {k: v for k, v in named.items() if v}


def spawn_detached(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    """Start ``argv`` in its own session with output to ``log_path``; return its pid."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, **(env or {})}, close_fds=True,
        )
    return proc.pid


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the group ``pid`` leads (its session's processes), or the process alone when that group is
    ours (a stale pid file naming our own group leader) or cannot be signalled."""
    if signallable_group(pid):
        try:
            os.killpg(pid, sig)
            return
        except (ProcessLookupError, PermissionError):
            pass
    os.kill(pid, sig)


def stop_process(pid: int | None, grace_s: float = 10.0, sig: signal.Signals = signal.SIGTERM) -> bool:
    """Send ``sig`` to the process (and its session's group), SIGKILL after ``grace_s``; True if it is gone."""
    if not alive(pid):
        return True
    assert pid is not None
    try:
        _signal_group(pid, sig)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    try:
        _signal_group(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    time.sleep(0.2)
    return not alive(pid)
