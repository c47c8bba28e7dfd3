"""The root config tree: ``params.yaml`` is its serialisation, ``configs/*.yaml`` are presets layered over it, CLI
flags and Prefect parameters are the same fields.

Assembled here, above the packages, from the sections each one owns (model: generation, kernels, training, VAE
post-training, serving, the web app; data: data, compute; eval: eval; core: tracking), so no package's config
imports another's. Loading is the ground floor's one loader (``ultraflux_core.config``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ultraflux_core.config import Section, load, validate
from ultraflux_core.tracking.config import TrackingConfig
from ultraflux_data.config import ComputeConfig, DataConfig
from ultraflux_eval.config import EvalConfig
from ultraflux_model.config import (
    GenerateConfig,
    KernelConfig,
    RayServeConfig,
    ServeConfig,
    TrainConfig,
    UiConfig,
    VaeTrainConfig,
)


class UltraFluxConfig(Section):
    """The whole tree, as serialised in ``params.yaml``."""

    generate: GenerateConfig = GenerateConfig()
    kernels: KernelConfig = KernelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    vae_train: VaeTrainConfig = VaeTrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    compute: ComputeConfig = ComputeConfig()
    serve: ServeConfig = ServeConfig()
    ui: UiConfig = UiConfig()
    ray_serve: RayServeConfig = RayServeConfig()


# Keys that older configs (and params.yaml files) have but this version removed, with where the setting lives now;
# list indices are written `*`.
REMOVED_KEYS = {
    "data.scoring.workers": "set compute.workers (the compute engine parallelises every data stage)",
}


def config_from_dict(data: dict[str, Any], source: str = "config") -> UltraFluxConfig:
    """Validate a plain mapping; errors list every offending field path."""
    return validate(UltraFluxConfig, data, source, removed=REMOVED_KEYS)


def load_config(*paths: Path | str, overrides: Sequence[str] = ()) -> UltraFluxConfig:
    """Layer YAML files (later wins, e.g. ``params.yaml`` then ``configs/tiny.yaml``) and ``key=value`` overrides."""
    return load(UltraFluxConfig, paths, overrides, removed=REMOVED_KEYS)


def resolve_config(
    config: Sequence[str | Path] | None = None, overrides: Sequence[str] | None = None
) -> UltraFluxConfig:
    """What every entry point (CLI, flows) resolves: files layered in order plus overrides; nothing → defaults.

    Also applies ``tracking.http`` (MLflow client retries, proxied artifacts) for the clients this process opens;
    variables the user exported win."""
    from ultraflux_core.tracking.client import apply_client_settings

    cfg = load_config(*(config or ()), overrides=list(overrides or ()))
    apply_client_settings(cfg.tracking.http)
    return cfg
