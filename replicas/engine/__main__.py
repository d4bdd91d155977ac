"""``python -m replicas.engine``: serve the reference engine until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import sys

from aiohttp import web

from replicas.engine.config import EngineConfig, parse_args
from replicas.engine.engine import Engine
from replicas.engine.server import EngineServer

EXIT_PORT_IN_USE = 98  # the process library retries with other ports on this exit code
PARENT_PID_ENV = "THUNDERSERVE_PARENT_PID"

log = logging.getLogger("replicas.engine")


async def serve(cfg: EngineConfig) -> int:
    engine = Engine(cfg)
    runner = web.AppRunner(EngineServer(engine).app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, cfg.host, cfg.port, shutdown_timeout=1.0).start()
    except OSError as e:
        await runner.cleanup()
        print(f"error: cannot listen on {cfg.host}:{cfg.port}: {e}", file=sys.stderr)
        return EXIT_PORT_IN_USE if e.errno == errno.EADDRINUSE else 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    orphan_watch = asyncio.ensure_future(_exit_with_parent(stop))
    code = 0
    try:
        load = asyncio.ensure_future(engine.load())
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait([load, waiter], return_when=asyncio.FIRST_COMPLETED)
        if load.done() and load.exception() is not None:
            err = load.exception()
            if isinstance(err, OSError) and err.errno == errno.EADDRINUSE:
                print(f"error: cannot serve the bootstrap port {cfg.bootstrap_port}: {err}", file=sys.stderr)
                code = EXIT_PORT_IN_USE
            else:
                print(f"error: cannot load model {cfg.model!r}: {err}", file=sys.stderr)
                code = 1
        else:
            print(f"ready: {cfg.model} role={cfg.role} http://{cfg.host}:{cfg.port}", file=sys.stderr, flush=True)
            await waiter
        load.cancel()
        waiter.cancel()
    finally:
        orphan_watch.cancel()
        await engine.close()
        await runner.cleanup()
    return code


async def _exit_with_parent(stop: asyncio.Event) -> None:
    """Started by an agent or a test (PARENT_PID_ENV set): stop when that parent is gone, leave no orphan."""
    with contextlib.suppress(ValueError):
        parent = int(os.environ.get(PARENT_PID_ENV, "0"))
        if parent <= 0:
            return
        while True:
            await asyncio.sleep(1.0)
            if os.getppid() != parent:
                break
        print(f"parent process {parent} is gone: shutting down", file=sys.stderr)
        stop.set()


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a core dependency on Linux
        run = asyncio.run
    code = run(serve(cfg))
    # Everything is closed; skip the interpreter's slow teardown of torch and its threads (seconds).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
