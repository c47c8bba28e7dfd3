"""``ultraflux serve``: the generation server on Ray Serve (replicas, backpressure, asynchronous jobs; loopback by
default). The library side is ``ultraflux_model.serving.ray_app``; docs/deploy.md has the recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.options import Options, config_options
from ultraflux_model.config import RayServeConfig

from ultraflux.config import resolve_config


@config_options(Options("ray_serve", RayServeConfig))
def serve(*, config: list[Path], overrides: list[str]) -> None:
    """Serve --model on Ray Serve: POST /invocations (the pyfunc model's schema), /jobs for long 4K jobs.

    --model takes a checkpoint directory, a hub id or a registry URI (models:/NAME@ALIAS); request defaults come from
    the generate section, request ceilings from the serve section.
    """
    cfg = resolve_config(config, overrides)
    try:
        from ultraflux_model.serving.ray_app import run
    except ModuleNotFoundError as err:
        raise UltraFluxError(f"ultraflux serve needs Ray Serve ({err}): pip install 'ultraflux-model[serve]'") from err
    run(cfg.ray_serve, cfg.generate, cfg.serve, announce=lambda line: typer.echo(line, err=True))


def app_builder(args: dict[str, Any]):  # noqa: ANN201 - a ray.serve Application
    """The same application for a Serve config file or KubeRay's ``serveConfigV2`` (``import_path:
    ultraflux.serve_cli:app_builder``): ``args`` = ``{config: [YAML files], overrides: [section.key=value]}``, resolved
    like ``ultraflux serve -c … --set …``."""
    from ultraflux_model.serving.ray_app import build_app

    unknown = sorted(set(args) - {"config", "overrides"})
    if unknown:
        raise UltraFluxError(f"unknown application args {unknown}; known: config, overrides")
    cfg = resolve_config(list(args.get("config", [])), list(args.get("overrides", [])))
    return build_app(cfg.ray_serve, cfg.generate, cfg.serve)
