"""Release flow: assemble a complete checkpoint from trained parts, then evaluate, register and maybe promote it.

Thin: the assembly is :func:`ultraflux_model.release.assemble.assemble_release` (the base checkpoint with the
trained transformer and/or post-trained VAE swapped in, written atomically, named by content); evaluation, logging the release
as a pyfunc MLflow model (content-addressed blobs in the run's artifact store, ``ultraflux_model.release.manifest``),
registration and the champion rule are the eval flow's. Consumers then use ``models:/ultraflux@champion``.

    python -m flows.release_flow --transformer artifacts/train/stage2/export --vae artifacts/vae-post/vae

A LoRA adapter trained on a release is released beside it (``lora_release_flow``): registered as a version of
``ultraflux-lora`` whose description and ``ultraflux.base_*`` tags name that release, after the adapter is checked
against it (:func:`ultraflux_model.serving.publish.register_adapter`; docs/lora.md).
"""


from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from ultraflux.config import resolve_config
from ultraflux.deploy import SharedRoots, with_roots
from ultraflux_model.release.assemble import assemble_release
from ultraflux_model.serving.publish import register_adapter

from flows.eval_flow import eval_flow, resolve_eval_config


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


@task(name="register-adapter")
def register_lora(adapter: str, uri: str, experiment: str, base: str, name: str) -> dict[str, str]:
    from ultraflux_core.tracking.uri import client_for

    client = client_for(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run_id = client.create_run(experiment_id, run_name=f"lora-{Path(adapter).name}").info.run_id
    try:
        version = register_adapter(Path(adapter), uri, run_id, base, name)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id)
    return {"run_id": run_id, "model": name, "version": version, "uri": f"models:/{name}/{version}"}


@flow(name="ultraflux-lora-release", log_prints=True)
def lora_release_flow(
    adapter: str,
    base: str = "models:/ultraflux@champion",
    name: str = "ultraflux-lora",
    config: list[str] | None = None,
    overrides: list[str] | None = None,
    out: str = "artifacts/release",
    roots: SharedRoots | None = None,
) -> dict[str, str]:
    """Register the adapter folder ``adapter`` as a version of ``name`` naming the release ``base`` it was trained on
    (the eval section's tracking server and experiment, as the release flow registers releases)."""
    if roots is not None:
        out, adapter = roots.rebase(out), roots.rebase(adapter)
    cfg = resolve_eval_config(config or [], with_roots(config, overrides, roots), Path(out))
    result = register_lora(adapter, cfg.eval.tracking.resolve_uri(), cfg.eval.tracking.experiment, base, name)
    print(f"registered {adapter} as {result['uri']} (base {base})")
    return result
