"""Running a typer app as a console entry point: ``UltraFluxError`` becomes one red line and exit code 2; and the
one-line progress report of a multi-step job (the demo's stages).

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


BAR_WIDTH = 20


def progress_line(done: int, total: int, label: str, summary: str, width: int = BAR_WIDTH) -> str:
    """One line for a finished step of a ``total``-step job: where the job is, as a bar, and what the step did::

        [2/4] ██████████·········· train     stage1: 40 steps, loss 0.812 → 0.455

    A finished line instead of a live bar, so it reads the same in a terminal, a log file and Prefect's log (a live
    bar redrawn under other output is what breaks into fragments)."""
    if not 0 <= done <= total or total < 1:
        raise ValueError(f"progress {done}/{total} is out of range")
    filled = round(width * done / total)
    return f"[{done}/{total}] {'█' * filled}{'·' * (width - filled)} {label:<9} {summary}"
