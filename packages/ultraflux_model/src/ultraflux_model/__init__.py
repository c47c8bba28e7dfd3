"""UltraFlux model package: Resonance-YaRN DiT, F16 VAE, generation, data and training.

The model classes are imported lazily so that light modules (config, data, CLI help) do not pay for
importing diffusers.
"""

from __future__ import annotations

from typing import Any

from ultraflux_core.errors import UltraFluxError

__all__ = ["UltraFluxAutoencoderKL", "UltraFluxError", "UltraFluxTransformer2DModel"]


def __getattr__(name: str) -> Any:
    if name == "UltraFluxTransformer2DModel":
        from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel

        return UltraFluxTransformer2DModel
    if name == "UltraFluxAutoencoderKL":
        from ultraflux_model.vae.autoencoder import UltraFluxAutoencoderKL

        return UltraFluxAutoencoderKL
    raise AttributeError(f"module 'ultraflux_model' has no attribute {name!r}")
