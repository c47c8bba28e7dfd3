"""The F16 VAE: diffusers' ``AutoencoderKL`` with the official ``stride`` option and three decode modes.

``stride: 2`` (UltraFlux F16) makes the encoder's ``conv_in`` stride 2 and gives the decoder a final
nearest ×2 upsample between ``conv_norm_out`` and ``conv_out`` (norm → ×2 → SiLU → conv_out); with the
Flux block layout that is a 16× spatial factor with 16 latent channels. The parameters and their names are
exactly diffusers' (no new weights), so official checkpoints load unchanged.

Decode modes:
* ``"full"``: the plain decoder forward (the official ``partitioned=False``).
* ``"tiled"`` (default): :func:`~ultraflux_model.vae.streamed_decode.streamed_decode`, equal to ``"full"``
  up to float rounding with a peak of about one activation of the last up block.
* ``"official"``: the official partitioned decode (shifted one pixel against ``"full"``), streamed too.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.autoencoders.vae import DecoderOutput
from torch import nn
from ultraflux_core.errors import UltraFluxError

from ultraflux_model.checkpoint.loading import StrictPretrainedMixin
from ultraflux_model.vae.streamed_decode import OFFICIAL_PARTITIONED, SAME, streamed_decode

DecodeMode = Literal["tiled", "full", "official"]


class UltraFluxAutoencoderKL(StrictPretrainedMixin, AutoencoderKL):
    """Flux ``AutoencoderKL`` with ``stride`` (1: stock 8× VAE, 2: the F16 VAE)."""

    accepted_foreign_keys = frozenset({"enable_gqa"})  # present in some official configs, meaningless here

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4,
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        layers_per_block: int = 2,
        act_fn: str = "silu",
        latent_channels: int = 16,
        norm_num_groups: int = 32,
        sample_size: int = 1024,
        scaling_factor: float = 0.3611,
        shift_factor: float | None = 0.1159,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = False,
        use_post_quant_conv: bool = False,
        mid_block_add_attention: bool = True,
        stride: int = 2,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=down_block_types,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            latents_mean=latents_mean,
            latents_std=latents_std,
            force_upcast=force_upcast,
            use_quant_conv=use_quant_conv,
            use_post_quant_conv=use_post_quant_conv,
            mid_block_add_attention=mid_block_add_attention,
        )
        if stride not in (1, 2):
            raise UltraFluxError(f"VAE stride must be 1 or 2, got {stride}")
        if stride == 2:
            old = self.encoder.conv_in
            self.encoder.conv_in = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=2, padding=1)
            # nearest ×2 commutes with SiLU, so the official norm → ×2 → SiLU order needs no new module slot
            self.decoder.conv_act = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.SiLU())

    @property
    def spatial_factor(self) -> int:
        """Image pixels per latent pixel along each axis (16 for the F16 VAE)."""
        return 2 ** (len(self.config.block_out_channels) - 1) * self.config.stride

    def decode(  # type: ignore[override]
        self,
        z: torch.Tensor,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
        mode: DecodeMode = "tiled",
        tile_pixels: int = 1 << 19,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Decode latents ``z [B, C, h, w]`` (unscaled, as the decoder sees them) → images ``[B, 3, h·f, w·f]``."""
        if mode == "full":
            return super().decode(z, return_dict=return_dict, generator=generator)
        if mode not in ("tiled", "official"):
            raise UltraFluxError(f"VAE decode mode must be 'tiled', 'full' or 'official', got {mode!r}")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        padding = OFFICIAL_PARTITIONED if mode == "official" else SAME
        decoded = torch.cat(
            [
                streamed_decode(
                    self.decoder, zi, stride=self.config.stride, tile_pixels=tile_pixels, conv_out_padding=padding
                )
                for zi in z.split(1)
            ]
        )
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)
