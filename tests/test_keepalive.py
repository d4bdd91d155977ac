"""tsctl.keepalive on real processes: a crashed service comes back (each restart an event in a real Redis), a
service that cannot start is not looped, a stop signal ends both, and the service dies with its keepalive."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from planner.state import StateStore

# A service whose runs are scripted by how many came before it: each run appends its pid to RUNS.
SERVICE = textwrap.dedent("""
    import os, signal, sys, time
    runs = sys.argv[1]
    with open(runs, "a") as f:
        f.write(f"{os.getpid()}\\n")
    n = len(open(runs).read().split())
    script = sys.argv[2].split(",")
    step = script[min(n, len(script)) - 1]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # as the gateway and the controller do
    kind, _, arg = step.partition(":")
    if kind == "exit":  # run a while, then exit with the status
        time.sleep(float(arg.split("/")[1]))
        sys.exit(int(arg.split("/")[0]))
    if kind == "kill":  # run a while, then die of SIGKILL (an OOM kill)
        time.sleep(float(arg))
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # "serve": until a signal
        time.sleep(0.1)
""")


def _keepalive(tmp_path: Path, script: str, *, min_uptime: float = 0.3, pause: float = 0.1,
               redis: tuple[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    """The keepalive in its own session (as `tsctl up` starts it), with short thresholds for the test."""
    runs = tmp_path / "runs"
    service = tmp_path / "service.py"
    service.write_text(SERVICE)
    opts = ["--redis-url", redis[0], "--deployment", redis[1]] if redis else []
    boot = (f"import tsctl.keepalive as k; k.MIN_UPTIME_S = {min_uptime}; k.FIRST_PAUSE_S = {pause}; "
            f"k.main({['svc', *opts, '--', sys.executable, str(service), str(runs), script]!r})")
    proc = subprocess.Popen([sys.executable, "-c", boot], start_new_session=True, stderr=subprocess.PIPE)
    return proc, runs


def _runs(runs: Path) -> list[int]:
    return [int(p) for p in runs.read_text().split()] if runs.exists() else []


def _wait(what: Callable[[], object], timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def cleanup() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_a_crashed_service_is_restarted_each_time_with_an_event_and_a_stop_ends_both(
        tmp_path: Path, redis_url: str, cleanup: list[subprocess.Popen[bytes]]) -> None:
    """Run 1 exits 3 after 0.5 s, run 2 is SIGKILLed after 0.5 s, run 3 serves: two restarts, two events
    saying how each run ended; then SIGTERM to the group (`tsctl down`) ends the service and the keepalive
    with status 0, and no fourth run starts."""
    proc, runs = _keepalive(tmp_path, "exit:3/0.5,kill:0.5,serve", redis=(redis_url, "ka"))
    cleanup.append(proc)
    _wait(lambda: len(_runs(runs)) == 3, 20, "the service to be started three times")
    time.sleep(0.5)
    assert proc.poll() is None
    service = _runs(runs)[-1]
    assert not _gone(service)

    async def events() -> list:
        state = StateStore.from_url(redis_url, "ka")
        try:
            return await state.events(kind="service.restarted")
        finally:
            await state.close()

    restarted = asyncio.run(events())
    assert [(e.data["service"], e.data["exit"], e.data["restarts"]) for e in restarted] == [
        ("svc", "exit status 3", 1), ("svc", "killed by SIGKILL", 2)]
    assert restarted[0].data["pause_s"] == pytest.approx(0.1)
    assert restarted[1].data["pause_s"] == pytest.approx(0.2)  # a second quick failure: twice the pause
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert _gone(service)
    time.sleep(0.5)
    assert len(_runs(runs)) == 3


@pytest.mark.parametrize(("script", "status"), [("exit:2/0", 2), ("exit:0/0.5", 0)])
def test_a_service_that_cannot_start_or_stops_by_itself_is_not_started_again(
        tmp_path: Path, cleanup: list[subprocess.Popen[bytes]], script: str, status: int) -> None:
    """Exit 2 at once (a bad flag, a taken port): the keepalive leaves with 2, so `tsctl up` reports it instead of
    waiting on a loop. Exit 0 (stopped on purpose) after it had started: the keepalive leaves with 0."""
    proc, runs = _keepalive(tmp_path, script, min_uptime=0.3 if status else 0.1)
    cleanup.append(proc)
    assert proc.wait(timeout=20) == status
    assert len(_runs(runs)) == 1
    if status:
        assert b"could not start" in proc.stderr.read()


def test_a_stop_signal_during_the_pause_before_a_restart_ends_the_keepalive_without_a_restart(
        tmp_path: Path, cleanup: list[subprocess.Popen[bytes]]) -> None:
    """The service crashes; the keepalive would restart it in 30 s; SIGINT (`tsctl restart`) meanwhile ends it
    at once."""
    proc, runs = _keepalive(tmp_path, "exit:1/0.5,serve", pause=30)
    cleanup.append(proc)
    _wait(lambda: b"restart 1 in 30.0 s" in _read_stderr_so_far(proc), 20, "the first crash to be seen")
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=5) == 128 + signal.SIGINT
    assert time.monotonic() - t0 < 2
    assert len(_runs(runs)) == 1


def test_a_killed_keepalive_takes_its_service_with_it(tmp_path: Path, cleanup: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL to the keepalive alone (not its group): the service must not live on unsupervised."""
    proc, runs = _keepalive(tmp_path, "serve")
    cleanup.append(proc)
    _wait(lambda: _runs(runs), 20, "the service to start")
    service = _runs(runs)[0]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=5)
    _wait(lambda: _gone(service), 5, "the service to die with its keepalive")


_STDERR: dict[int, bytes] = {}


def _read_stderr_so_far(proc: subprocess.Popen[bytes]) -> bytes:
    """What the keepalive has logged so far (non-blocking)."""
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    chunk = proc.stderr.read() or b""
    _STDERR[proc.pid] = _STDERR.get(proc.pid, b"") + chunk
    return _STDERR[proc.pid]


# A service that answers each connection on the socket it was handed with its run number after ``work`` seconds
# (a stream in flight), and on SIGINT or SIGTERM finishes the connection in hand and exits 0 (as the gateway
# drains). Its first run (crash-first) or every later one (crash-later) crashes after 0.5 s when asked to.
LISTENER = textwrap.dedent("""
    import os, signal, socket, sys, time
    runs, mode, work = sys.argv[1], sys.argv[2], float(sys.argv[3])
    with open(runs, "a") as f:
        f.write(f"{os.getpid()}\\n")
    n = len(open(runs).read().split())
    assert sys.argv[4] == "--listen-fd"
    sock = socket.socket(fileno=int(sys.argv[5]))
    sock.settimeout(0.05)
    if (n == 1 and mode == "crash-first") or (n > 1 and mode == "crash-later"):
        time.sleep(0.5)
        os._exit(9)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    while not stop:
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        time.sleep(work)
        conn.sendall(f"run {n}".encode())
        conn.close()
""")


def _listening_keepalive(tmp_path: Path, mode: str, work: float, pause: float) -> tuple[
        subprocess.Popen[bytes], Path, int]:
    import socket

    service = tmp_path / "listener.py"
    service.write_text(LISTENER)
    runs = tmp_path / "runs"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, str(service), str(runs), mode, str(work)]
    boot = (f"import tsctl.keepalive as k; k.MIN_UPTIME_S = 0.3; k.FIRST_PAUSE_S = {pause}; "
            f"k.RELOAD_OVERLAP_S = 1.0; k.main({['svc', '--listen', f'127.0.0.1:{port}', '--', *command]!r})")
    return subprocess.Popen([sys.executable, "-c", boot], start_new_session=True, stderr=subprocess.PIPE), runs, port


def _ask(port: int) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        return conn.recv(64)


def test_a_connection_made_while_the_service_restarts_waits_for_the_next_run(
        tmp_path: Path, cleanup: list[subprocess.Popen[bytes]]) -> None:
    """``--listen``: the keepalive holds the socket across runs, so a client that connects in the 1.5 s between a
    crash and the next run is answered by that run instead of being refused."""
    proc, runs, port = _listening_keepalive(tmp_path, "crash-first", work=0.0, pause=1.5)
    cleanup.append(proc)
    _wait(lambda: b"restart 1 in 1.5 s" in _read_stderr_so_far(proc), 20, "the first run to crash")
    assert len(_runs(runs)) == 1  # between runs: nothing accepts
    assert _ask(port) == b"run 2"
    # the port is held: a second keepalive on it cannot start, and says so in one line
    taken = subprocess.run([sys.executable, "-m", "tsctl.keepalive", "svc", "--listen", f"127.0.0.1:{port}", "--",
                            sys.executable, "-c", "pass"], capture_output=True, text=True, timeout=30)
    assert taken.returncode == 1 and taken.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")


def test_a_reload_starts_the_new_run_first_and_the_old_one_finishes_what_it_has(
        tmp_path: Path, cleanup: list[subprocess.Popen[bytes]]) -> None:
    """SIGHUP (`tsctl restart`) with a held socket: run 2 starts; after the overlap (1 s here) run 1 gets SIGINT and
    finishes the answer it was working on (a stream is not cut); a client that connects after that is answered by
    run 2; run 1 then exits."""
    import concurrent.futures

    proc, runs, port = _listening_keepalive(tmp_path, "serve", work=2.5, pause=0.1)
    cleanup.append(proc)
    _wait(lambda: _runs(runs), 20, "the first run")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(_ask, port)
        time.sleep(0.5)  # run 1 has it in hand
        os.kill(proc.pid, signal.SIGHUP)
        _wait(lambda: b"svc reloaded" in _read_stderr_so_far(proc), 20, "the new run to take over")
        assert len(_runs(runs)) == 2 and in_flight.running()
        later = pool.submit(_ask, port)
        assert in_flight.result(timeout=20) == b"run 1"
        assert later.result(timeout=20) == b"run 2"
    first = _runs(runs)[0]
    _wait(lambda: _gone(first), 10, "the old run to exit once its work is done")
    assert proc.poll() is None


def test_a_reload_whose_new_run_fails_leaves_the_old_one_serving(
        tmp_path: Path, cleanup: list[subprocess.Popen[bytes]]) -> None:
    """A new version that dies within the overlap (bad code, a bad flag): the old run was never told to stop, goes
    on serving, and stays the keepalive's service."""
    proc, runs, port = _listening_keepalive(tmp_path, "crash-later", work=0.0, pause=0.1)
    cleanup.append(proc)
    _wait(lambda: _runs(runs), 20, "the first run")
    first = _runs(runs)[0]
    os.kill(proc.pid, signal.SIGHUP)
    _wait(lambda: b"before taking over" in _read_stderr_so_far(proc), 20, "the new run to fail")
    assert len(_runs(runs)) == 2 and not _gone(first)
    assert _ask(port) == b"run 1"
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert _gone(first)


def test_a_reload_without_a_socket_starts_the_new_run_once_the_old_one_has_exited(
        tmp_path: Path, cleanup: list[subprocess.Popen[bytes]]) -> None:
    """SIGHUP without a held socket (the controller, Redis): SIGINT to the run, then a new one; not a crash, so no
    restart is counted, and the keepalive stays."""
    proc, runs = _keepalive(tmp_path, "serve")
    cleanup.append(proc)
    _wait(lambda: _runs(runs), 20, "the first run")
    os.kill(proc.pid, signal.SIGHUP)
    _wait(lambda: len(_runs(runs)) == 2, 20, "the new run")
    assert _gone(_runs(runs)[0])
    assert proc.poll() is None
    log = _read_stderr_so_far(proc)
    assert b"svc reloaded" in log and b"restart 1" not in log


def test_a_run_that_replaced_a_working_one_is_restarted_when_it_fails_early(
        tmp_path: Path, cleanup: list[subprocess.Popen[bytes]]) -> None:
    """After a reload the new run is not a first start: failing within ``MIN_UPTIME_S`` (5 s here) gets it
    restarted, not the keepalive ended (which would take the service down for good)."""
    proc, runs = _keepalive(tmp_path, "serve,exit:3/0.2,serve", min_uptime=5.0)
    cleanup.append(proc)
    _wait(lambda: _runs(runs), 20, "the first run")
    os.kill(proc.pid, signal.SIGHUP)
    _wait(lambda: len(_runs(runs)) == 3, 20, "the failed new run to be restarted")
    assert proc.poll() is None and b"restart 1" in _read_stderr_so_far(proc)
