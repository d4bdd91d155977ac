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
- SIGTERM, SIGINT or SIGHUP to the keepalive go on to the service (in a process group of its own, so that
  ``tsctl down`` and ``tsctl restart``, which signal the keepalive's group, reach it once) and end the
  keepalive once the service has exited;
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
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
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
    """Runs ``argv`` and restarts it on failure (the module docstring has the rules). ``on_restart`` is told
    of each restart (for the event log); its errors are logged, never fatal."""

    def __init__(self, name: str, argv: list[str],
                 on_restart: Callable[[dict[str, Any]], None] | None = None,
                 listener: socket.socket | None = None) -> None:
        self.name = name
        self.listener = listener
        self.argv = [*argv, "--listen-fd", str(listener.fileno())] if listener else argv
        self.on_restart = on_restart
        self.child: subprocess.Popen[bytes] | None = None
        self.stop_signal: int | None = None
        self.restarts = 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_signal = signum
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(signum)

    def _pause(self, seconds: float) -> None:
        """Sleep, but end at once when a stop signal comes."""
        deadline = time.monotonic() + seconds
        while self.stop_signal is None and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def run(self) -> int:
        """Until the service stops on purpose or cannot start; returns the exit status to leave with."""
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        quick_failures = 0
        restarted: dict[str, Any] | None = None  # the restart to record once the new run is up
        while True:
            started = time.monotonic()
            # its own process group: a signal to the keepalive's group reaches it once, from here (twice, the
            # second could land while it exits, with the default action: killed by SIGTERM, not exit 0)
            self.child = subprocess.Popen(self.argv, preexec_fn=_die_with_parent, process_group=0,
                                          pass_fds=(self.listener.fileno(),) if self.listener else ())
            if self.stop_signal is not None:  # it came while the child was being made
                self._on_signal(self.stop_signal, None)
            if restarted is not None:  # now, not at the crash: the service may be the Redis the event goes to
                self._report(restarted)
                restarted = None
            code = self.child.wait()
            uptime = time.monotonic() - started
            if self.stop_signal is not None or code == 0:
                return exit_status(code)
            if self.restarts == 0 and uptime < MIN_UPTIME_S:
                log.error("%s could not start (%s after %.1f s); not restarting it", self.name, describe(code), uptime)
                return exit_status(code)
            quick_failures = quick_failures + 1 if uptime < STABLE_S else 1
            pause = min(MAX_PAUSE_S, FIRST_PAUSE_S * 2 ** (quick_failures - 1))
            self.restarts += 1
            log.warning("%s %s after %.1f s; restart %d in %.1f s", self.name, describe(code), uptime,
                        self.restarts, pause)
            restarted = {"service": self.name, "exit": describe(code), "uptime_s": round(uptime, 1),
                         "restarts": self.restarts, "pause_s": pause}
            self._pause(pause)
            if self.stop_signal is not None:
                return 128 + self.stop_signal

    def _report(self, fields: dict[str, Any]) -> None:
        if self.on_restart is None:
            return
        try:
            self.on_restart(fields)
        except Exception as e:  # the event log is a courtesy: Redis may be what is down
            log.warning("could not record the restart: %s", e)


def redis_reporter(redis_url: str, deployment: str) -> Callable[[dict[str, Any]], None]:
    """Each restart as a ``service.restarted`` event in the deployment's log (``tsctl status`` shows it)."""

    def report(fields: dict[str, Any]) -> None:
        import asyncio

        from planner.state import StateStore

        async def emit() -> None:
            from redis.exceptions import ConnectionError as RedisConnectionError

            state = StateStore.from_url(redis_url, deployment)
            reason = f"{fields['service']} {fields['exit']} after {fields['uptime_s']:.0f} s"
            deadline = time.monotonic() + REPORT_FOR_S
            try:
                while True:  # a Redis that has just been restarted takes a moment to accept connections
                    try:
                        await asyncio.wait_for(state.emit("service.restarted", reason, **fields), REPORT_FOR_S)
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
