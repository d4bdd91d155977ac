"""Keep a control-plane service running: restart it when it crashes, as systemd's ``Restart=on-failure`` would.

`tsctl up` runs the controller and the gateway under this (``python -m tsctl.keepalive NAME [--redis-url URL
--deployment D] -- ARGV...``), so the public URL comes back by itself after the gateway dies (an OOM kill, a
bug), and the controller after it crashes, without anyone running ``tsctl restart``. Both resume from Redis.

The rules:
- a service that exits 0 was stopped on purpose (its SIGTERM or SIGINT): the keepalive exits too;
- a first run that fails within ``MIN_UPTIME_S`` could not start (a taken port, a bad flag): no loop, the
  keepalive exits with its status, so ``tsctl up`` reports it at once;
- any other failure (non-zero exit, a signal) is restarted after a pause that doubles from ``FIRST_PAUSE_S``
  to ``MAX_PAUSE_S`` while runs keep failing within ``STABLE_S``, each restart an event ``service.restarted``
  (written once the new run has started: the service may be the embedded Redis itself);
- SIGTERM or SIGINT to the keepalive go on to the service (in a process group of its own, so that
  ``tsctl down``, which signals the keepalive's group, reaches it once) and end the keepalive once the service
  has exited;
- SIGHUP to the keepalive (``tsctl restart``) replaces the service with a new run (new code, config re-read):
  the old run gets SIGINT and finishes what it has in hand (the gateway its streams, the controller hands over
  its lease, nodes left up). With a held socket (below) the new run starts first and both accept for
  ``RELOAD_OVERLAP_S`` (a new run that fails meanwhile leaves the old one serving), so no connection waits on
  a stopped service and no stream is cut; without, it starts once the old one has exited;
- the service dies with the keepalive (``PR_SET_PDEATHSIG``): a SIGKILLed keepalive leaves no service behind;
- with ``--listen HOST:PORT`` the keepalive binds the socket once and hands it to each run (``--listen-fd N``
  appended to its command), as systemd's socket activation does: while a crashed gateway restarts, new
  connections wait in the socket's backlog instead of being refused.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("tsctl.keepalive")

MIN_UPTIME_S = 10.0
STABLE_S = 60.0
FIRST_PAUSE_S = 0.1  # systemd's RestartSec default
MAX_PAUSE_S = 30.0
REPORT_FOR_S = 5.0  # how long a restart's event may wait for Redis to answer
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_ON = signal.SIGHUP  # to the keepalive: replace the service with a new run
RELOAD_SIGNAL = signal.SIGINT  # to the run being replaced (the controller leaves its nodes up on SIGINT)
RELOAD_OVERLAP_S = 5.0  # with a held socket, the old run serves on this long beside the new one
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL when the keepalive dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def exit_status(returncode: int) -> int:
    """A shell's exit status for a Popen returncode (-N, killed by signal N, is 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class Keepalive:
    """Runs ``argv`` and restarts it on failure (the module docstring has the rules). ``on_event`` is told of
    each restart and reload (for the event log); its errors are logged, never fatal."""

    def __init__(self, name: str, argv: list[str],
                 on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 listener: socket.socket | None = None) -> None:
        self.name = name
        self.listener = listener
        self.argv = [*argv, "--listen-fd", str(listener.fileno())] if listener else argv
        self.on_event = on_event
        self.child: subprocess.Popen[bytes] | None = None
        self.started = 0.0  # when the current run started (monotonic)
        self.draining: list[subprocess.Popen[bytes]] = []  # runs replaced by a reload, finishing their work
        self.replacing: subprocess.Popen[bytes] | None = None  # the run a reload's new run overlaps
        self.replacing_started = 0.0
        self.stop_signal: int | None = None
        self.reload_asked = False
        self.restarts = 0
        self.reloads = 0  # a run that replaced a working one is not a first start: its failure is restarted

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_signal = signum
        for run in [self.child, self.replacing, *self.draining]:
            if run is not None and run.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    run.send_signal(signum)

    def _on_reload(self, _signum: int, _frame: FrameType | None) -> None:
        self.reload_asked = True

    def _spawn(self) -> None:
        # its own process group: a signal to the keepalive's group reaches it once, from here (twice, the
        # second could land while it exits, with the default action: killed by SIGTERM, not exit 0)
        self.started = time.monotonic()
        self.child = subprocess.Popen(self.argv, preexec_fn=_die_with_parent, process_group=0,
                                      pass_fds=(self.listener.fileno(),) if self.listener else ())
        if self.stop_signal is not None:  # it came while the child was being made
            self._on_signal(self.stop_signal, None)

    def _reload(self) -> None:
        """A new run replaces the current one, which gets ``RELOAD_SIGNAL`` and finishes what it has in hand. With
        a held socket the new run starts first and both serve for ``RELOAD_OVERLAP_S`` (the new one is up before
        the old one stops accepting; a new run that dies meanwhile leaves the old one serving); without, the new
        run starts once the old one has exited."""
        self.reload_asked = False
        old = self.child
        assert old is not None
        if self.listener is None:
            old.send_signal(RELOAD_SIGNAL)
            old.wait()
            self._spawn()
            self._reloaded(old)
        else:
            self.replacing, self.replacing_started = old, self.started
            self._spawn()

    def _reloaded(self, old: subprocess.Popen[bytes]) -> None:
        pid = self.child.pid if self.child else None
        self.reloads += 1
        log.info("%s reloaded: pid %s replaces pid %d", self.name, pid, old.pid)
        self._report("service.reloaded", {"service": self.name, "pid": pid, "replaced_pid": old.pid})

    def _wait_current(self) -> int:
        """The current run's exit status, acting on reloads and reaping drained runs meanwhile."""
        assert self.child is not None
        while True:
            try:
                code = self.child.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                code = None
            old = self.replacing
            if code is not None and old is not None and self.stop_signal is None and old.poll() is None:
                log.error("%s: the new run %s before taking over; pid %d goes on", self.name, describe(code), old.pid)
                self._report("service.reload_failed", {"service": self.name, "exit": describe(code),
                                                       "uptime_s": round(time.monotonic() - self.started, 1)})
                self.child, self.replacing, self.started = old, None, self.replacing_started
                continue
            if code is not None:
                return code
            if old is not None and time.monotonic() - self.started >= RELOAD_OVERLAP_S:
                with contextlib.suppress(ProcessLookupError):
                    old.send_signal(RELOAD_SIGNAL)
                self.draining.append(old)
                self.replacing = None
                self._reloaded(old)
            self.draining = [run for run in self.draining if run.poll() is None]
            if self.reload_asked and self.stop_signal is None and self.replacing is None:
                self._reload()

    def _pause(self, seconds: float) -> None:
        """Sleep, but end at once when a stop signal or a reload comes."""
        deadline = time.monotonic() + seconds
        while self.stop_signal is None and not self.reload_asked and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        self.reload_asked = False

    def _leave(self, status: int) -> int:
        for run in [self.replacing, *self.draining]:  # they had the stop signal too: let them finish
            if run is not None:
                run.wait()
        return status

    def run(self) -> int:
        """Until the service stops on purpose or cannot start; returns the exit status to leave with."""
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.signal(RELOAD_ON, self._on_reload)
        quick_failures = 0
        restarted: dict[str, Any] | None = None  # the restart to record once the new run is up
        while True:
            self._spawn()
            if restarted is not None:  # now, not at the crash: the service may be the Redis the event goes to
                self._report("service.restarted", restarted)
                restarted = None
            code = self._wait_current()
            uptime = time.monotonic() - self.started
            if self.stop_signal is not None or code == 0:
                return self._leave(exit_status(code))
            if self.restarts == 0 and self.reloads == 0 and uptime < MIN_UPTIME_S:
                log.error("%s could not start (%s after %.1f s); not restarting it", self.name, describe(code), uptime)
                return self._leave(exit_status(code))
            quick_failures = quick_failures + 1 if uptime < STABLE_S else 1
            pause = min(MAX_PAUSE_S, FIRST_PAUSE_S * 2 ** (quick_failures - 1))
            self.restarts += 1
            log.warning("%s %s after %.1f s; restart %d in %.1f s", self.name, describe(code), uptime,
                        self.restarts, pause)
            restarted = {"service": self.name, "exit": describe(code), "uptime_s": round(uptime, 1),
                         "restarts": self.restarts, "pause_s": pause}
            self._pause(pause)
            if self.stop_signal is not None:
                return self._leave(128 + self.stop_signal)

    def _report(self, kind: str, fields: dict[str, Any]) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(kind, fields)
        except Exception as e:  # the event log is a courtesy: Redis may be what is down
            log.warning("could not record %s: %s", kind, e)


def redis_reporter(redis_url: str, deployment: str) -> Callable[[str, dict[str, Any]], None]:
    """Each restart or reload as an event in the deployment's log (``tsctl status`` shows them)."""

    def report(kind: str, fields: dict[str, Any]) -> None:
        import asyncio

        from planner.state import StateStore

        async def emit() -> None:
            from redis.exceptions import ConnectionError as RedisConnectionError

            state = StateStore.from_url(redis_url, deployment)
            reason = (f"{fields['service']} {fields['exit']} after {fields['uptime_s']:.0f} s" if "exit" in fields
                      else f"{fields['service']} reloaded (pid {fields['pid']} replaces {fields['replaced_pid']})")
            deadline = time.monotonic() + REPORT_FOR_S
            try:
                while True:  # a Redis that has just been restarted takes a moment to accept connections
                    try:
                        await asyncio.wait_for(state.emit(kind, reason, **fields), REPORT_FOR_S)
                        return
                    except (RedisConnectionError, OSError):
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.1)
            finally:
                await state.close()

        asyncio.run(emit())

    return report


def listen(where: str) -> socket.socket:
    """A listening TCP socket on ``HOST:PORT`` (SystemExit with one line when it cannot be had)."""
    host, _, port = where.rpartition(":")
    try:
        sock = socket.create_server((host or "127.0.0.1", int(port)), backlog=4096)
    except (OSError, ValueError, OverflowError) as e:
        raise SystemExit(f"error: cannot listen on {where}: {e}") from None
    return sock


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: python -m tsctl.keepalive NAME [--redis-url URL --deployment D] [--listen HOST:PORT] "
                         "-- COMMAND...")
    split = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m tsctl.keepalive", description=__doc__.split("\n")[0])
    p.add_argument("name", help="the service's name, for logs and events")
    p.add_argument("--redis-url", default="", help="record each restart as an event in this Redis")
    p.add_argument("--deployment", default="default")
    p.add_argument("--listen", metavar="HOST:PORT", help="hold this listening socket, hand it to each run")
    args = p.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        raise SystemExit("error: no command after --")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s keepalive %(levelname)s %(message)s")
    reporter = redis_reporter(args.redis_url, args.deployment) if args.redis_url else None
    listener = listen(args.listen) if args.listen else None
    raise SystemExit(Keepalive(args.name, command, reporter, listener).run())


if __name__ == "__main__":
    main()
