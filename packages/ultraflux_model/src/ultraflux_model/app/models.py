"""Which models ``make ui`` opens after ``make demo``: the registry's champion when ``models:/`` resolves,
else the newest release directory; the newest release with *other weights* is offered for comparison.

Releases are compared by content (:func:`~ultraflux_model.checkpoint.layout.fingerprint`, the hash every sidecar
records), never by path: the champion resolves to a copy in the model cache, which is the same release as the
folder it was logged from. When no release differs from the main model, the app opens that one model alone.

    python -m ultraflux_model.app.models artifacts/release    # prints: --model REF [--compare DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from ultraflux_core.errors import UltraFluxError

from ultraflux_model.checkpoint.layout import fingerprint
from ultraflux_model.checkpoint.resolve import resolve_checkpoint

CHAMPION = "models:/ultraflux@champion"


def pick_models(release_root: Path, champion: str = CHAMPION) -> tuple[str, str | None]:
    """``(model, compare)`` for the app; ``compare`` is None when no release holds other weights than ``model``.
    Raises ``UltraFluxError`` when there is no release at all."""
    releases = sorted(Path(release_root).glob("ultraflux-*"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    releases = [p for p in releases if p.is_dir()]
    try:
        folder: Path = resolve_checkpoint(champion)
        model = champion
    except UltraFluxError:  # no registry, no alias yet, or models:/ not supported by this install
        if not releases:
            raise UltraFluxError(f"no release under {release_root}: run `make demo` first (or pass --model)") from None
        folder, model = releases[0], str(releases[0])
    shown = fingerprint(folder)
    other = next((p for p in releases if fingerprint(p) != shown), None)
    return model, (str(other) if other is not None else None)


def main() -> None:
    try:
        model, compare = pick_models(Path(sys.argv[1] if len(sys.argv) > 1 else "artifacts/release"))
    except UltraFluxError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"--model {model}" + (f" --compare {compare}" if compare else ""))


if __name__ == "__main__":
    main()
