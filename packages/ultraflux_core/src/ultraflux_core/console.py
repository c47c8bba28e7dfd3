"""Running a typer app as a console entry point: ``UltraFluxError`` becomes one red line and exit code 2.

Shared by every entry point (``ultraflux``, ``ultraflux-eval``, ``python -m ultraflux.cli`` under torchrun).
"""

from __future__ import annotations

import typer

from ultraflux_core.errors import UltraFluxError


def run(app: typer.Typer) -> None:
    """Run ``app`` on ``sys.argv``; bad input exits 2 with the error's message instead of a traceback."""
    try:
        app()
    except UltraFluxError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
