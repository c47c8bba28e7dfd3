"""A release folder: the base checkpoint with trained components swapped in, named by its content."""

from __future__ import annotations

import shutil
from pathlib import Path

from ultraflux_model.checkpoint.layout import assemble_checkpoint, fingerprint


def assemble_release(base: str | Path, out_root: Path, replace: dict[str, Path | str | None]) -> Path:
    """``base`` with ``replace``'s components (``transformer``, ``vae``; None keeps the base's) as
    ``<out_root>/ultraflux-<first 12 hex of its fingerprint>``, written atomically.

    Named by content: re-releasing identical weights lands in (and later registers) the same folder.
    """
    staged = assemble_checkpoint(base, Path(out_root) / "staging", replace)
    final = staged.with_name(f"ultraflux-{fingerprint(staged)[:12]}")
    if final.exists():
        shutil.rmtree(staged)
    else:
        staged.rename(final)
    return final
