"""An adapter written for other tools: diffusers' LoRA file and the kohya (sd-scripts) / ComfyUI layout.

One rule for both: ``alpha / rank`` is folded into every ``lora_B`` (B' = B·α/r) and each layer's alpha, where the
layout has one, equals its rank, so B'·A is the weight delta whatever a reader does with alpha. Readers differ
there: a diffusers file carries no alpha (alpha = rank unless optional metadata says otherwise), and diffusers'
kohya reader applies ``.alpha`` to the layers inside the blocks but not to ``final_layer`` (its "TODO: alphas").

**diffusers** (``FluxPipeline.load_lora_weights``): the keys of our adapter file, written by diffusers' own
``FluxPipeline.save_lora_weights``.

**kohya** (what kohya's sd-scripts write for Flux and ComfyUI, Forge and InvokeAI load): one
``lora_unet_<BFL module>`` per layer of the original Flux code, each ``.lora_down.weight`` (rank × in),
``.lora_up.weight`` (out × rank) and ``.alpha``. BFL fuses some of diffusers' layers: ``img_attn_qkv`` = to_q, to_k,
to_v; ``txt_attn_qkv`` = add_q/k/v_proj; a single block's ``linear1`` = to_q, to_k, to_v, proj_mlp. A fused layer's
LoRA is the members' LoRAs side by side: ``down`` = [A_1; …; A_n] (n·r × in) and ``up`` = blockdiag(B_1, …, B_n)
(Σ out × n·r), alpha n·r; ``up·down`` holds each member's ``B_i·A_i`` in its rows. A member the adapter does not
train (``proj_mlp`` under the attention preset) gets zero blocks. ``norm_out.linear`` is BFL's
``final_layer.adaLN_modulation.1`` with its two output halves swapped (diffusers' ``swap_scale_shift``, its own
inverse).

diffusers ships the way in (``_convert_kohya_flux_lora_to_diffusers``, which ``FluxPipeline.lora_state_dict`` runs
on any file with ``lora_down`` keys) but not the way out for Flux (its ``convert_state_dict_to_kohya`` renames UNet
keys and knows no fused layers), so the way out is written here and the tests prove it by the way in: diffusers'
converter turns our kohya file back into the adapter's B·A·α/r for every module. That converter hard-codes Flux-dev's
widths (3072 hidden, 12288 MLP) for ``linear1``; files of the full-width model read back, a tiny test model's single
blocks do not (ComfyUI's Flux keeps BFL's fused layers, so a fused LoRA applies to them as is, at any width).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from ultraflux_core.errors import UltraFluxError

from ultraflux_model.lora.apply import Adapter, adapter_state_dict, modules_of

ExportFormat = Literal["diffusers", "kohya"]
FORMATS: tuple[str, ...] = ("diffusers", "kohya")
MLP_RATIO = 4  # Flux's MLP width / hidden width: the size of a missing proj_mlp's zero block in linear1

# diffusers module (inside transformer_blocks.N) → (BFL layer of double_blocks_N, position in a fused layer)
DOUBLE: dict[str, tuple[str, int | None]] = {
    "attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", None),
    "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2), "attn.to_add_out": ("txt_attn_proj", None),
    "ff.net.0.proj": ("img_mlp_0", None), "ff.net.2": ("img_mlp_2", None),
    "ff_context.net.0.proj": ("txt_mlp_0", None), "ff_context.net.2": ("txt_mlp_2", None),
    "norm1.linear": ("img_mod_lin", None), "norm1_context.linear": ("txt_mod_lin", None),
}  # fmt: skip
# diffusers module (inside single_transformer_blocks.N) → (BFL layer of single_blocks_N, position)
SINGLE: dict[str, tuple[str, int | None]] = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None), "norm.linear": ("modulation_lin", None),
}  # fmt: skip
# modules outside the blocks
TOP: dict[str, str] = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
    "norm_out.linear": "final_layer_adaLN_modulation_1", "proj_out": "final_layer_linear",
}  # fmt: skip
FUSED_SIZE = {"img_attn_qkv": 3, "txt_attn_qkv": 3, "linear1": 4}
_BLOCK = re.compile(r"^(?P<kind>transformer_blocks|single_transformer_blocks)\.(?P<index>\d+)\.(?P<rest>.+)$")


def _bfl_place(module: str) -> tuple[str, str, int | None]:
    """``(kohya name, BFL layer, position in its fused layer or None)`` of a diffusers module name."""
    match = _BLOCK.match(module)
    if match:
        double = match["kind"] == "transformer_blocks"
        table, prefix = (DOUBLE, "double_blocks") if double else (SINGLE, "single_blocks")
        if match["rest"] in table:
            layer, position = table[match["rest"]]
            return f"lora_unet_{prefix}_{match['index']}_{layer}", layer, position
    elif module in TOP:
        return f"lora_unet_{TOP[module]}", TOP[module], None
    raise UltraFluxError(f"LoRA module {module!r} has no place in the kohya/ComfyUI Flux layout")


def baked_state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's tensors with ``alpha / rank`` folded into each ``lora_B``: B·A is then the weight delta."""
    scale = adapter.alpha / adapter.rank
    return {key: tensor * scale if ".lora_B." in key else tensor for key, tensor in adapter_state_dict(adapter).items()}


def to_kohya(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers-format Flux LoRA (``transformer.<module>.lora_A/B.weight``, alpha folded in: B·A is the delta) in
    the kohya layout described in the module doc, each layer's alpha its rank."""
    from diffusers.loaders.lora_conversion_utils import swap_scale_shift

    fused: dict[str, tuple[str, dict[int, tuple[torch.Tensor, torch.Tensor]]]] = {}
    out: dict[str, torch.Tensor] = {}
    for module in modules_of(state_dict):
        down, up = state_dict[f"transformer.{module}.lora_A.weight"], state_dict[f"transformer.{module}.lora_B.weight"]
        name, layer, position = _bfl_place(module)
        if module == "norm_out.linear":
            up = swap_scale_shift(up)
        if position is None:
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down.contiguous(), up.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
        else:
            fused.setdefault(name, (layer, {}))[1][position] = (down, up)
    for name, (layer, members) in fused.items():
        size = FUSED_SIZE[layer]
        qkv = [up for position, (_, up) in members.items() if position < 3]
        hidden = qkv[0].shape[0] if qkv else members[3][1].shape[0] // MLP_RATIO
        down0 = next(iter(members.values()))[0]
        rank = down0.shape[0]
        downs, ups = [], []
        for position in range(size):
            width = hidden * MLP_RATIO if position == 3 else hidden
            down, up = members.get(position, (torch.zeros_like(down0), down0.new_zeros(width, rank)))
            downs.append(down)
            ups.append(up)
        out[f"{name}.lora_down.weight"] = torch.cat(downs).contiguous()
        out[f"{name}.lora_up.weight"] = torch.block_diag(*ups).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(rank * size))
    return dict(sorted(out.items()))


def export_adapter(adapter: Adapter, fmt: str, out: Path | str) -> dict[str, int]:
    """Write ``adapter`` as one safetensors file ``out`` in ``fmt`` (``diffusers`` or ``kohya``), atomically;
    returns ``{"tensors": n, "modules": m}`` of the written file."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise UltraFluxError(f"unknown LoRA export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UltraFluxError(f"the exported LoRA is a safetensors file: name it *.safetensors, not {out.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    baked = baked_state_dict(adapter)
    if fmt == "diffusers":
        from diffusers import FluxPipeline

        layers = {key.removeprefix("transformer."): tensor for key, tensor in baked.items()}
        FluxPipeline.save_lora_weights(out.parent, transformer_lora_layers=layers, weight_name=tmp.name)
        tensors, modules = len(baked), len(modules_of(baked))
    else:
        kohya = to_kohya(baked)
        save_file(kohya, str(tmp), metadata={"format": "pt", "ss_network_dim": str(adapter.rank),
                                             "ss_network_alpha": str(adapter.rank)})  # fmt: skip
        tensors, modules = len(kohya), sum(key.endswith(".alpha") for key in kohya)
    tmp.replace(out)
    return {"tensors": tensors, "modules": modules}
