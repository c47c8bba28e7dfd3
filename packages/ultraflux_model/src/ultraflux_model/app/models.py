"""Which models ``make ui`` opens after ``make demo``: the registry's champion when ``models:/`` resolves,
else the newest release directory; the newest other release is offered for comparison.

    python -m ultraflux_model.app.models artifacts/release    # prints: --model REF [--compare DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from ultraflux_core.errors import UltraFluxError

from ultraflux_model.checkpoint.resolve import resolve_checkpoint

CHAMPION = "models:/ultraflux@champion"


def pick_models(release_root: Path, champion: str = CHAMPION) -> tuple[str, str | None]:
    """``(model, compare)`` for the app; raises ``UltraFluxError`` when there is no release at all."""
    releases = sorted(Path(release_root).glob("ultraflux-*"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    releases = [p for p in releases if p.is_dir()]
    try:
        resolved: Path | None = resolve_checkpoint(champion).resolve()
        model = champion
    except UltraFluxError:  # no registry, no alias yet, or models:/ not supported by this install
        resolved, model = None, ""
    if not model:
        if not releases:
            raise UltraFluxError(f"no release under {release_root}: run `make demo` first (or pass --model)")
        resolved, model = releases[0].resolve(), str(releases[0])
    others = [p for p in releases if p.resolve() != resolved]
    return model, (str(others[0]) if others else None)


def main() -> None:
    try:
        model, compare = pick_models(Path(sys.argv[1] if len(sys.argv) > 1 else "artifacts/release"))
    except UltraFluxError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"--model {model}" + (f" --compare {compare}" if compare else ""))


if __name__ == "__main__":
    main()
