"""Which linear layers of the transformer get LoRA adapters: named presets resolved to module-name suffixes.

Names are suffixes as peft matches them (a module is adapted when its name equals an entry or ends with
``"." + entry``), read off ``UltraFluxTransformer2DModel`` (diffusers' ``FluxTransformer2DModel`` blocks):

* dual-stream blocks ``transformer_blocks.N``: ``attn.to_q/to_k/to_v/to_out.0`` (image stream),
  ``attn.add_q_proj/add_k_proj/add_v_proj/to_add_out`` (text stream), MLPs ``ff.net.0.proj``, ``ff.net.2``,
  ``ff_context.net.0.proj``, ``ff_context.net.2``, AdaLN ``norm1.linear``, ``norm1_context.linear``;
* single-stream blocks ``single_transformer_blocks.N``: ``attn.to_q/to_k/to_v``, ``proj_mlp`` and ``proj_out``
  (the fused attention + MLP output; the suffix also matches the model's final ``proj_out``), AdaLN ``norm.linear``;
* around the blocks: ``x_embedder``, ``context_embedder``, the time/guidance/text embedders' ``linear_1`` and
  ``linear_2``, the output AdaLN ``norm_out.linear``.
"""

from __future__ import annotations

from typing import get_args

from ultraflux_core.errors import UltraFluxError

from ultraflux_model.config import LoraTargetPreset

ATTENTION = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)
MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
OTHER_LINEAR = (
    "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear",
    "x_embedder", "context_embedder", "linear_1", "linear_2",
)
PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ATTENTION,
    "attention_mlp": ATTENTION + MLP,
    "all_linear": ATTENTION + MLP + OTHER_LINEAR,
}
assert set(PRESETS) == set(get_args(LoraTargetPreset))


def target_modules(preset: str) -> list[str]:
    """Module-name suffixes (peft ``target_modules``) of a preset: attention, attention_mlp or all_linear."""
    if preset not in PRESETS:
        raise UltraFluxError(f"unknown LoRA target preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return list(PRESETS[preset])
