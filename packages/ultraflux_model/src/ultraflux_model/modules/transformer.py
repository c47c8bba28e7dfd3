"""The UltraFlux DiT: diffusers' ``FluxTransformer2DModel`` with Resonance-YaRN RoPE and our attention processor.

Only the positional embedding differs from stock Flux (that alone reproduces the official model exactly);
the attention processor is ours so that the fused RoPE kernel has one place to plug in. The extra config
keys of the official checkpoints (``method``, ``ntk_factor``, ``enable_gqa``) are accepted; the RoPE
training window, theta and axis order that the official code hard-codes are config fields here.
"""

from __future__ import annotations

import logging

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

from ultraflux_model.checkpoint.loading import StrictPretrainedMixin
from ultraflux_model.config import KernelChoice
from ultraflux_model.modules.attention import UltraFluxAttnProcessor
from ultraflux_model.modules.rope import AxisOrder, ResonanceYarnPosEmbed, RopeMethod

logger = logging.getLogger(__name__)


class UltraFluxTransformer2DModel(StrictPretrainedMixin, FluxTransformer2DModel):
    """Flux DiT with Resonance 2D RoPE + YaRN (diffusers checkpoint layout, official config keys)."""

    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        method: RopeMethod = "yarn",
        ntk_factor: float = 1.0,
        enable_gqa: bool | None = None,
        rope_theta: float = 10000.0,
        rope_train_tokens_hw: tuple[int, int] = (64, 64),
        rope_axis_order: AxisOrder = "t-h-w",
    ) -> None:
        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
        )
        if ntk_factor != 1.0:
            # The official position embedder never passes ntk_factor on, so released checkpoints ignore it.
            logger.warning("ntk_factor=%s is ignored, as in the official UltraFlux model", ntk_factor)
        self.pos_embed = ResonanceYarnPosEmbed(
            theta=rope_theta,
            axes_dim=tuple(axes_dims_rope),
            train_tokens_hw=tuple(rope_train_tokens_hw),
            axis_order=rope_axis_order,
            method=method,
        )
        self.set_rope_kernel("auto")

    def set_rope_kernel(self, choice: KernelChoice) -> None:
        """Select the RoPE implementation for every attention layer (``auto`` | ``eager`` | ``triton``)."""
        self.set_attn_processor(UltraFluxAttnProcessor(rope_kernel=choice))

    def _resolve_parallel_config(self, config: ParallelConfig | ContextParallelConfig) -> ParallelConfig:
        """diffusers' own, plus context parallelism over CPU ranks (gloo).

        diffusers 0.42 places rank ``r`` on accelerator ``r % device_count()``, a division by zero on a machine
        without one; there the mesh and the device are the CPU's. Tensor parallelism is left to diffusers.
        """
        if torch.accelerator.device_count() or not isinstance(config, ContextParallelConfig):
            return super()._resolve_parallel_config(config)
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            raise RuntimeError("torch.distributed must be initialized before applying a parallel config")
        parallel = ParallelConfig(context_parallel_config=config)
        mesh = config.mesh or torch.distributed.device_mesh.init_device_mesh(
            "cpu", mesh_shape=config.mesh_shape, mesh_dim_names=config.mesh_dim_names
        )
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        parallel.setup(rank, world, torch.device("cpu"), mesh=mesh)
        self._parallel_config = parallel
        return parallel
