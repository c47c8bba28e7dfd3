"""UltraFlux model package: the Resonance-YaRN DiT, the F16 VAE, generation, training and releases.

The model classes are imported lazily so that light modules (config, checkpoint resolution, the CLI's help) do
not pay for importing diffusers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["UltraFluxAutoencoderKL", "UltraFluxTransformer2DModel"]


def __getattr__(name: str) -> Any:
    if name == "UltraFluxTransformer2DModel":
        from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel

        return UltraFluxTransformer2DModel
    if name == "UltraFluxAutoencoderKL":
        from ultraflux_model.vae.autoencoder import UltraFluxAutoencoderKL

        return UltraFluxAutoencoderKL
    raise AttributeError(f"module 'ultraflux_model' has no attribute {name!r}")
