"""Release flow: assemble a complete checkpoint from trained parts, then evaluate, register and maybe promote it.

Thin: the assembly is :func:`ultraflux_model.release.assemble.assemble_release` (the base checkpoint with the
trained transformer and/or post-trained VAE swapped in, written atomically, named by content); evaluation, logging the release
as a pyfunc MLflow model (content-addressed blobs in the run's artifact store, ``ultraflux_model.release.manifest``),
registration and the champion rule are the eval flow's. Consumers then use ``models:/ultraflux@champion``.

    python -m flows.release_flow --transformer artifacts/train/stage2/export --vae artifacts/vae-post/vae
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from ultraflux.config import resolve_config
from ultraflux.deploy import SharedRoots, with_roots
from ultraflux_model.release.assemble import assemble_release

from flows.eval_flow import eval_flow


@task(name="assemble-release")
def assemble(base: str, out: str, transformer: str | None, vae: str | None) -> str:
    return str(assemble_release(base, Path(out), {"transformer": transformer, "vae": vae}))


@flow(name="ultraflux-release", log_prints=True)
def release_flow(
    transformer: str | None = None,
    vae: str | None = None,
    config: list[str] | None = None,
    overrides: list[str] | None = None,
    out: str = "artifacts/release",
    promote: bool = True,
    roots: SharedRoots | None = None,
) -> dict[str, Any]:
    """``train.model`` with the given components replaced → ``out/ultraflux-<hash>`` → eval flow (register, promote).

    ``roots`` moves ``artifacts/…`` paths (the config's, ``out``, ``transformer``, ``vae``) onto shared folders."""
    if roots is not None:
        out, transformer, vae = (roots.rebase(p) if p else p for p in (out, transformer, vae))
    overrides = with_roots(config, overrides, roots)
    cfg = resolve_config(config, overrides)
    final = Path(assemble(cfg.train.model, out, transformer, vae))
    parts = [f"{part} from {path}" for part, path in (("transformer", transformer), ("VAE", vae)) if path]
    changes = f"release {final.name}: {cfg.train.model}" + (f" with the {' and the '.join(parts)}" if parts else "")
    result = eval_flow(model=str(final), config=config, overrides=overrides, out=str(Path(out) / "eval"),
                       promote=promote, changes=changes)  # fmt: skip
    print(f"released {final}: {result.get('registry')}")
    return {"checkpoint": str(final), **result}
