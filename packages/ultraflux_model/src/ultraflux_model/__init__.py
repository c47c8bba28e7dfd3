"""UltraFlux model package: the Resonance-YaRN DiT, the F16 VAE, generation, training and releases.

The model classes are imported lazily so that light modules (config, checkpoint resolution, the CLI's help) do
not pay for importing diffusers.
"""

from __future__ import annotations

import logging
from typing import Any

# torchao (imported by diffusers' quantizers whenever diffusers loads a model) registers two Enums with torch's pytree,
# and torch 2.14 logs a deprecation line for each at import: a note between those two libraries that no user of ours
# can act on, printed before every command's own output. Only that message is dropped; the logger stays as it was.
logging.getLogger("torch.utils._pytree").addFilter(lambda record: "is an Enum subclass" not in record.getMessage())

__all__ = ["UltraFluxAutoencoderKL", "UltraFluxTransformer2DModel"]


def __getattr__(name: str) -> Any:
    if name == "UltraFluxTransformer2DModel":
        from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel

        return UltraFluxTransformer2DModel
    if name == "UltraFluxAutoencoderKL":
        from ultraflux_model.vae.autoencoder import UltraFluxAutoencoderKL

        return UltraFluxAutoencoderKL
    raise AttributeError(f"module 'ultraflux_model' has no attribute {name!r}")
