"""Joint text-image attention of the UltraFlux DiT: the one place that picks eager vs fused kernels.

Same math as diffusers' ``FluxAttnProcessor`` (QK RMS-norm, text tokens first, RoPE on the whole joint
sequence, SDPA through diffusers' backend dispatcher); RoPE goes through :func:`rotate`, which uses the
Triton kernel when the kernel choice selects it.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from ultraflux_model.config import KernelChoice
from ultraflux_model.kernels.dispatch import use_triton


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernel: KernelChoice = "auto") -> torch.Tensor:
    """Apply interleaved-pair RoPE.

    Args:
        x: ``[B, S, H, D]`` queries or keys (sequence on dim 1, as the Flux processor holds them).
        cos, sin: ``[S, D]`` tables from :class:`~ultraflux_model.modules.rope.ResonanceYarnPosEmbed`.
    Returns:
        ``[B, S, H, D]`` in ``x.dtype``.
    """
    if use_triton(kernel, x):
        from ultraflux_model.kernels.rope import apply_rope  # imported lazily: Triton is optional

        return apply_rope(x.transpose(1, 2), cos, sin).transpose(1, 2)
    return apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)


class UltraFluxAttnProcessor:
    """Processor for both Flux block kinds: dual-stream (with ``encoder_hidden_states``) and single-stream."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, rope_kernel: KernelChoice = "auto") -> None:
        self.rope_kernel: KernelChoice = rope_kernel

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        heads = (-1, attn.head_dim)
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, heads))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, heads))
        value = attn.to_v(hidden_states).unflatten(-1, heads)

        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            query = torch.cat(
                [attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, heads)), query], 1
            )
            key = torch.cat([attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, heads)), key], 1)
            value = torch.cat([attn.add_v_proj(encoder_hidden_states).unflatten(-1, heads), value], 1)

        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            query = rotate(query, cos, sin, self.rope_kernel)
            key = rotate(key, cos, sin, self.rope_kernel)

        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = out.flatten(2, 3).to(query.dtype)
        if not joint:
            return out
        text_len = encoder_hidden_states.shape[1]
        text, image = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())
