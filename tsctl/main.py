"""Entry point of `tsctl`. Each command group lives in its own module and is registered here."""

from __future__ import annotations

import typer

from tsctl import __version__
from tsctl.doctor import doctor

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


app.command()(doctor)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
