"""Drive a real `tsctl up --local` deployment from tests: the same commands a user types.

Every test that uses it gets its own ``TS_HOME`` and deployment name, its own embedded Redis, and a
check afterwards that `tsctl down` left no process behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

TSCTL = [sys.executable, "-m", "tsctl"]


@dataclass
class LocalCluster:
    home: Path
    name: str

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env["TS_HOME"] = str(self.home)
        return env

    def tsctl(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*TSCTL, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"tsctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def deployment(self) -> dict[str, Any]:
        return json.loads((self.home / "deployments" / self.name / "deployment.json").read_text())

    def status(self) -> dict[str, Any]:
        return json.loads(self.tsctl("status", "-d", self.name, "--json", "--events", "200").stdout)

    def log(self, service: str) -> str:
        try:
            return (self.home / "deployments" / self.name / f"{service}.log").read_text(errors="replace")
        except OSError:
            return ""

    def processes(self) -> list[psutil.Process]:
        """Every live process that belongs to this deployment (its nodes, services, or its TS_HOME)."""
        found = []
        tag = f"{self.name}/"
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            try:
                cmd = " ".join(proc.info["cmdline"] or [])
                env_tag = proc.environ().get("TS_LOCAL_NODE", "")
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if env_tag.startswith(tag) or str(self.home) in cmd:
                found.append(proc)
        return found

    def wait_for(self, predicate: Any, timeout: float, what: str, poll: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = self.status()
            result = predicate(last)
            if result:
                return result
            time.sleep(poll)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last status:\n"
                             f"{json.dumps(last, indent=1)[:4000]}\ncontroller log:\n{self.log('controller')[-3000:]}")
