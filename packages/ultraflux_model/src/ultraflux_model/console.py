"""Running a typer app as a console entry point: ``UltraFluxError`` becomes one red line and exit code 2.

Its own module so that every entry point (``ultraflux``, ``python -m ultraflux_model.training.commands`` under
torchrun/deepspeed) shares it without importing ``cli`` (which imports the command modules).
"""

from __future__ import annotations

import typer

from ultraflux_model.errors import UltraFluxError


def run(app: typer.Typer) -> None:
    """Run ``app`` on ``sys.argv``; bad input exits 2 with the error's message instead of a traceback."""
    try:
        app()
    except UltraFluxError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
