"""Gateway settings and the `python -m gateway` command line.

argparse rather than typer here: the worker flags copy sglang-router's (`--prefill URL [BOOTSTRAP_PORT]`,
repeatable, with an optional second value), which argparse expresses directly.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass(frozen=True)
class StaticWorker:
    """A worker named on the command line (static mode)."""

    url: str
    role: str  # prefill | decode | both
    bootstrap_port: int | None = None


@dataclass
class GatewayConfig:
    """Everything the gateway needs to run; defaults are what `python -m gateway` uses."""

    host: str = "127.0.0.1"
    port: int = 8000
    listen_fd: int | None = None  # an inherited listening socket (from tsctl.keepalive) instead of host:port
    # plan mode
    redis_url: str | None = None
    deployment: str = "default"
    plan_refresh_s: float = 5.0
    # static mode
    workers: list[StaticWorker] = field(default_factory=list)
    # auth
    no_auth: bool = False
    api_keys: list[str] = field(default_factory=list)
    admin_key: str | None = None
    key_cache_s: float = 2.0
    # model and tokenizer
    tokenizer: str = "auto"  # auto | none | a directory or tokenizer.json path
    served_model_name: str | None = None
    default_max_tokens: int = 1024
    # limits and timeouts
    max_body_bytes: int = 8 * 1024 * 1024
    body_timeout_s: float = 10.0
    header_timeout_s: float = 10.0
    request_timeout_s: float = 600.0
    connect_timeout_s: float = 3.0
    upstream_read_timeout_s: float = 120.0
    max_attempts: int = 3
    max_migrations: int = 3
    wait_for_pair_s: float = 30.0  # hold a request this long for a usable pair (a node lost, a role switching)
    retry_backoff_ms: float = 50.0
    # health and circuit breaker
    health_interval_s: float = 2.0
    health_timeout_s: float = 2.0
    health_failures: int = 2
    cb_failures: int = 3
    cb_cooldown_s: float = 5.0
    log_level: str = "info"

    @property
    def plan_mode(self) -> bool:
        return not self.workers

    @property
    def auth_enabled(self) -> bool:
        return not self.no_auth


class ConfigError(ValueError):
    """A command line that cannot run; the message says what to change."""


def _check_url(url: str, flag: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{flag} {url!r}: expected an http(s)://host:port URL")
    return url.rstrip("/")


def _prefill(values: list[str]) -> StaticWorker:
    if len(values) > 2:
        raise ConfigError(f"--prefill takes URL [BOOTSTRAP_PORT|none], got {' '.join(values)}")
    url = _check_url(values[0], "--prefill")
    port: int | None = None
    if len(values) == 2 and values[1].lower() != "none":
        try:
            port = int(values[1])
        except ValueError as e:
            raise ConfigError(f"--prefill {url}: bootstrap port {values[1]!r} is not a number or 'none'") from e
        if not 0 < port < 65536:
            raise ConfigError(f"--prefill {url}: bootstrap port {port} out of range")
    return StaticWorker(url, "prefill", port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gateway",
        description="ThunderServe gateway: one OpenAI-compatible URL over SGLang prefill/decode workers.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--listen-fd", type=int, metavar="FD",
                   help="serve on this inherited listening socket instead of binding --host/--port (a supervisor "
                        "holds it, so connections wait in its backlog while the gateway restarts)")
    g = p.add_argument_group("plan mode (routing from Redis)")
    g.add_argument("--redis-url", help="Redis holding the plan, replicas and API keys")
    g.add_argument("--deployment", default="default", help="deployment namespace in Redis")
    g.add_argument("--plan-refresh-s", type=float, default=5.0, help="periodic re-read of plan and replicas")
    s = p.add_argument_group("static mode (workers on the command line, uniform weights)")
    s.add_argument("--prefill", nargs="+", action="append", default=[], metavar="URL [BOOTSTRAP_PORT]",
                   help="a prefill worker and its bootstrap port (repeatable)")
    s.add_argument("--decode", action="append", default=[], metavar="URL", help="a decode worker (repeatable)")
    s.add_argument("--worker", action="append", default=[], metavar="URL",
                   help="a colocated (prefill+decode) worker (repeatable)")
    a = p.add_argument_group("auth")
    a.add_argument("--no-auth", action="store_true", help="serve without API keys (logs a warning)")
    a.add_argument("--api-key", action="append", default=[], help="accept this bearer key (repeatable)")
    a.add_argument("--admin-key", help="bearer key for the /admin routes")
    a.add_argument("--key-cache-s", type=float, default=2.0, help="how long a key lookup is cached")
    m = p.add_argument_group("model")
    m.add_argument("--tokenizer", default="auto",
                   help="auto (ask the workers), none (pass-through), or a tokenizer directory/tokenizer.json")
    m.add_argument("--served-model-name", help="model id clients must send (default: the workers')")
    m.add_argument("--default-max-tokens", type=int, default=1024)
    lim = p.add_argument_group("limits and timeouts")
    lim.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    lim.add_argument("--body-timeout-s", type=float, default=10.0, help="deadline to receive a request body")
    lim.add_argument("--header-timeout-s", type=float, default=10.0,
                     help="deadline to receive a request's line and headers, from its first byte")
    lim.add_argument("--request-timeout-s", type=float, default=600.0)
    lim.add_argument("--connect-timeout-s", type=float, default=3.0)
    lim.add_argument("--upstream-read-timeout-s", type=float, default=120.0,
                     help="longest silence from a worker before it counts as failed")
    lim.add_argument("--max-attempts", type=int, default=3, help="pairs tried before the first byte")
    lim.add_argument("--max-migrations", type=int, default=3, help="mid-stream moves to a new pair")
    lim.add_argument("--wait-for-pair-s", type=float, default=30.0,
                     help="how long a request waits for a usable (prefill, decode) pair before a 503, e.g. while "
                          "the controller reschedules after a lost node")
    lim.add_argument("--retry-backoff-ms", type=float, default=50.0)
    h = p.add_argument_group("health")
    h.add_argument("--health-interval-s", type=float, default=2.0)
    h.add_argument("--health-timeout-s", type=float, default=2.0)
    h.add_argument("--health-failures", type=int, default=2, help="failed checks before a worker is down")
    h.add_argument("--cb-failures", type=int, default=3, help="consecutive request failures that open the breaker")
    h.add_argument("--cb-cooldown-s", type=float, default=5.0, help="open breaker waits this long for a probe")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def parse_config(argv: list[str] | None = None) -> GatewayConfig:
    """Parse and check the command line; raises ConfigError with one line saying what to fix."""
    ns = build_parser().parse_args(argv)
    workers = [_prefill(v) for v in ns.prefill]
    workers += [StaticWorker(_check_url(u, "--decode"), "decode") for u in ns.decode]
    workers += [StaticWorker(_check_url(u, "--worker"), "both") for u in ns.worker]
    if workers:
        has_p = any(w.role == "prefill" for w in workers)
        has_d = any(w.role == "decode" for w in workers)
        if has_p != has_d:
            raise ConfigError("PD mode needs at least one --prefill and one --decode")
    elif not ns.redis_url:
        raise ConfigError("no workers: pass --redis-url (plan mode) or --prefill/--decode/--worker (static mode)")
    if not ns.no_auth and not ns.api_key and not ns.redis_url:
        raise ConfigError("no API keys: pass --api-key KEY, --redis-url (keys in Redis), or --no-auth")
    if ns.listen_fd is not None and ns.listen_fd < 0:
        raise ConfigError(f"--listen-fd {ns.listen_fd}: a file descriptor is not negative")
    for name in ("max_attempts", "max_body_bytes", "default_max_tokens"):
        if getattr(ns, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    return GatewayConfig(
        host=ns.host,
        port=ns.port,
        listen_fd=ns.listen_fd,
        redis_url=ns.redis_url,
        deployment=ns.deployment,
        plan_refresh_s=ns.plan_refresh_s,
        workers=workers,
        no_auth=ns.no_auth,
        api_keys=list(ns.api_key),
        admin_key=ns.admin_key,
        key_cache_s=ns.key_cache_s,
        tokenizer=ns.tokenizer,
        served_model_name=ns.served_model_name,
        default_max_tokens=ns.default_max_tokens,
        max_body_bytes=ns.max_body_bytes,
        body_timeout_s=ns.body_timeout_s,
        header_timeout_s=ns.header_timeout_s,
        request_timeout_s=ns.request_timeout_s,
        connect_timeout_s=ns.connect_timeout_s,
        upstream_read_timeout_s=ns.upstream_read_timeout_s,
        max_attempts=ns.max_attempts,
        max_migrations=ns.max_migrations,
        wait_for_pair_s=ns.wait_for_pair_s,
        retry_backoff_ms=ns.retry_backoff_ms,
        health_interval_s=ns.health_interval_s,
        health_timeout_s=ns.health_timeout_s,
        health_failures=ns.health_failures,
        cb_failures=ns.cb_failures,
        cb_cooldown_s=ns.cb_cooldown_s,
        log_level=ns.log_level,
    )
