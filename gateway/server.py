"""Run the gateway: `python -m gateway --host H --port P ...` (see gateway.config for the flags)."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys

from aiohttp import web

from gateway import header_deadline
from gateway.app import create_app
from gateway.config import ConfigError, GatewayConfig, parse_config
from gateway.tokenizer import TokenizerUnavailable

log = logging.getLogger("gateway")

READY_LINE = "gateway listening on "  # followed by the URL; gateway.launcher waits for this line


async def serve(cfg: GatewayConfig, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set); then stop accepting, finish, and clean up."""
    app = create_app(cfg)
    # handler_cancellation: a client that disconnects cancels its handler, which closes both upstream legs.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, keepalive_timeout=75)
    await runner.setup()
    loop = asyncio.get_running_loop()
    # not web.TCPSite: each connection's protocol is wrapped in a request-head deadline (slow headers)
    factory = header_deadline.protocol_factory(runner, cfg.header_timeout_s)
    if cfg.listen_fd is not None:
        listener = await loop.create_server(factory, sock=inherited_listener(cfg.listen_fd), backlog=4096)
    else:
        listener = await loop.create_server(factory, cfg.host, cfg.port, backlog=4096, reuse_address=True)
    host, port = listener.sockets[0].getsockname()[:2]
    if cfg.no_auth:
        log.warning("--no-auth: anyone who can reach http://%s:%s can use it without an API key", host, port)
    print(f"{READY_LINE}http://{host}:{port}", flush=True)
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        listener.close()  # stop accepting; the runner then finishes and closes the open connections
        await runner.cleanup()


def inherited_listener(fd: int) -> socket.socket:
    """The listening TCP socket a supervisor passed as ``fd``; OSError when it is not one."""
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise OSError(f"file descriptor {fd} is not a listening TCP socket")
    sock.setblocking(False)
    return sock


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a core dependency off Windows
        runner = asyncio.run
    try:
        runner(serve(cfg))
    except TokenizerUnavailable as e:
        print(f"error: --tokenizer {cfg.tokenizer}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        where = f"--listen-fd {cfg.listen_fd}" if cfg.listen_fd is not None else f"{cfg.host}:{cfg.port}"
        print(f"error: cannot listen on {where}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
