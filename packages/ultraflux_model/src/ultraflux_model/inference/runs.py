"""Run folders: every generation run (a CLI invocation, a Studio request) writes into a folder of its own, so a
second run never replaces the images of the first."""

from __future__ import annotations

import time
import uuid
from pathlib import Path


def new_run_dir(out: Path | str) -> Path:
    """The path of a new run folder ``<out>/<YYYYmmdd-HHMMSS>-<8 hex>``: sorted by time, unique across concurrent
    runs. Not created here: :func:`~ultraflux_model.inference.pipeline.generate` creates it with its first image, so
    a run refused or failing before that leaves no empty folder behind."""
    return Path(out) / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
