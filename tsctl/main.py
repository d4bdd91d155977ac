"""Entry point of `tsctl`. Each command group lives in its own module and is registered here."""

from __future__ import annotations

import typer

from tsctl import __version__
from tsctl.deploy_cmd import chaos_app, down, restart, status, up
from tsctl.doctor import doctor
from tsctl.plan_cmd import plan, reschedule, simulate

app = typer.Typer(
    name="tsctl",
    help="ThunderServe: serve LLMs on rented mixed GPUs under an hourly budget.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """ThunderServe: serve LLMs on rented mixed GPUs under an hourly budget."""


@app.command()
def version() -> None:
    """Print the ThunderServe version."""
    typer.echo(f"thunderserve {__version__}")


app.command()(up)
app.command()(status)
app.command()(down)
app.command()(restart)
app.add_typer(chaos_app, name="chaos")
app.command()(doctor)
app.command()(plan)
app.command()(simulate)
app.command()(reschedule)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
