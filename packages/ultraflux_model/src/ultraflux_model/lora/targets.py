"""Which linear layers of the transformer get LoRA adapters: named presets resolved to module-name suffixes
(peft ``target_modules``: a module is adapted when its name equals an entry or ends with ``"." + entry``)."""

from __future__ import annotations

from ultraflux_core.errors import UltraFluxError

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


def target_modules(preset: str) -> list[str]:
    """The module-name suffixes of a preset: ``attention``, ``attention_mlp``, ``all_linear``."""
    if preset not in PRESETS:
        raise UltraFluxError(f"unknown LoRA target preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return list(PRESETS[preset])
