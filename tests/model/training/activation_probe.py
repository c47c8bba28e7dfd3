"""Measure what autograd holds for backward in a Flux DiT forward: unique saved storages, parameters excluded.

``torch.autograd.graph.saved_tensors_hooks`` sees every tensor an op saves for backward; summing the unique
storages (views share one) gives the memory held for backward exactly and deterministically, unlike RSS.
With gradient checkpointing, a block's internals are saved under torch's own checkpoint hooks (they are
recomputed, not held); what the checkpoint holds instead is the block's input tensors, which a recording
``gradient_checkpointing_func`` counts before handing the call to ``torch.utils.checkpoint``.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel


def flux_inputs(model: UltraFluxTransformer2DModel, image_tokens: int, text_tokens: int, dtype: torch.dtype) -> dict:
    """One sample's inputs for ``model`` with an image grid of ``image_tokens`` (a 16-wide grid) and ``text_tokens``."""
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    width = 16
    ids = torch.zeros(image_tokens, 3)
    ids[:, 1] = torch.arange(image_tokens) // width
    ids[:, 2] = torch.arange(image_tokens) % width
    return {
        "hidden_states": torch.randn(1, image_tokens, cfg.in_channels, generator=gen).to(dtype),
        "encoder_hidden_states": torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=gen).to(dtype),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=gen).to(dtype),
        "timestep": torch.tensor([0.5]),
        "img_ids": ids,
        "txt_ids": torch.zeros(text_tokens, 3),
        "guidance": torch.tensor([3.5]) if cfg.guidance_embeds else None,
        "return_dict": False,
    }


def held_for_backward(model: UltraFluxTransformer2DModel, inputs: dict, *, checkpointing: bool) -> dict[str, int]:
    """Bytes held for backward after one forward: ``saved`` (hooks), ``checkpoint_inputs``, and per block."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    def recording_checkpoint(module, *args):
        for arg in torch.utils._pytree.tree_leaves(args):  # the RoPE (cos, sin) pair comes as a tuple
            if isinstance(arg, torch.Tensor) and arg.untyped_storage().data_ptr() not in params:
                kept[arg.untyped_storage().data_ptr()] = arg.untyped_storage().nbytes()
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    if checkpointing:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=recording_checkpoint)
    else:
        model.disable_gradient_checkpointing()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)  # the graph (and what it holds) is freed when the output goes
    kept_only = {k: v for k, v in kept.items() if k not in saved}  # a block input also saved outside counts once
    return {"saved": sum(saved.values()), "checkpoint_inputs": sum(kept_only.values())}
