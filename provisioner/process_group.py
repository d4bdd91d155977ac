"""A virtual node's processes: its own process group, tagged, killed all at once.

A local node is a node agent started in a new session (``start_new_session=True``), so it and the
engines it starts share a process group we can signal as one, the way a cloud VM disappears as one.
Each process also carries ``TS_LOCAL_NODE=<deployment>/<node>`` in its environment (inherited by every
child), so a process that left the group (``setsid``) is still found and nothing outlives its node.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TypeGuard

import psutil

NODE_TAG_ENV = "TS_LOCAL_NODE"


def node_tag(deployment: str, node_id: str) -> str:
    return f"{deployment}/{node_id}"


def parse_pgid(provider_ref: str) -> int | None:
    """The process group of a local node from its ``NodeRecord.provider_ref`` (``local:pgid=N``)."""
    _, _, rest = provider_ref.partition("pgid=")
    return int(rest) if rest.isdigit() else None


def pid_alive(pid: int | None) -> bool:
    """A live process (not a zombie waiting to be reaped) has this pid."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def signallable_group(pgid: int | None) -> TypeGuard[int]:
    """Whether ``pgid`` names another process group that we may signal as a whole.

    ``os.killpg(0, sig)`` signals the caller's own group, and so does its own id. A node released while
    its agent was being launched had no pid yet (0), and stopping it signalled our own group: here it
    SIGTERMed the test run; a CI run that died with exit code 137 in these tests, make and the CI
    script with it, most likely met the same end."""
    return pgid is not None and pgid > 0 and pgid != os.getpgrp()


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def node_processes(pgid: int | None, tag: str) -> list[psutil.Process]:
    """Live (non-zombie) processes of a node: members of its group, or carrying its tag (never this
    process's own group: see ``signallable_group``)."""
    me = os.getpid()
    pgid = pgid if signallable_group(pgid) else None
    found: list[psutil.Process] = []
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.pid == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if (pgid is not None and _pgid(proc.pid) == pgid) or proc.environ().get(NODE_TAG_ENV) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def tagged_processes(deployment: str) -> dict[str, list[psutil.Process]]:
    """This deployment's live (non-zombie) local-node processes by node id, found by their tag alone (what
    `tsctl down` falls back to when Redis, which records the nodes, is gone)."""
    prefix = f"{deployment}/"
    found: dict[str, list[psutil.Process]] = {}
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            tag = proc.environ().get(NODE_TAG_ENV, "")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if tag.startswith(prefix):
            found.setdefault(tag[len(prefix):], []).append(proc)
    return found


def tagged_node_ids(deployment: str) -> set[str]:
    """Ids of this deployment's local nodes that still have a live process."""
    return set(tagged_processes(deployment))


def signal_node(pgid: int | None, tag: str, sig: signal.Signals) -> int:
    """Send ``sig`` to the node's group and to every tagged process; returns how many were signalled."""
    if signallable_group(pgid):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    procs = node_processes(pgid, tag)
    for proc in procs:
        try:
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return len(procs)


def wait_gone(pgid: int | None, tag: str, timeout_s: float, poll_s: float = 0.05) -> list[psutil.Process]:
    """Wait until the node has no live process; returns the survivors (empty on success)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = node_processes(pgid, tag)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(poll_s)


def kill_node(pgid: int | None, tag: str, timeout_s: float = 10.0) -> list[psutil.Process]:
    """SIGKILL everything of the node at once, without warning (a preemption); returns survivors."""
    left: list[psutil.Process] = []
    for _ in range(3):  # again for children forked while the previous sweep ran
        signal_node(pgid, tag, signal.SIGKILL)
        left = wait_gone(pgid, tag, timeout_s / 3)
        if not left:
            break
    return left


def stop_node(pgid: int | None, tag: str, grace_s: float = 5.0, kill_timeout_s: float = 10.0) -> list[psutil.Process]:
    """SIGTERM the node, SIGKILL what is left after ``grace_s``; returns survivors (should be none)."""
    signal_node(pgid, tag, signal.SIGTERM)
    if not wait_gone(pgid, tag, grace_s):
        return []
    return kill_node(pgid, tag, kill_timeout_s)
