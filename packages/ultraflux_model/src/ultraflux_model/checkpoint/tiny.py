"""A complete tiny UltraFlux checkpoint in the official layout, built offline from random weights.

Same directory layout and classes as ``Owen777/UltraFlux-v1`` (diffusers ``transformer/`` and ``vae/``,
transformers ``text_encoder`` (CLIP-L), ``text_encoder_2`` (T5), their tokenizers, ``scheduler/``,
``model_index.json``), only tiny, so tests, CI and the demo run the production loading and sampling
code without any download. Tokenizers are built from in-memory vocabularies (no hub files).

With a width preset (``flux-dev``) the transformer has the real widths and only a few blocks, so the
real-scale paths (partitioned ZeRO-3 loading, memory plans) run on CPU; it is written layer by layer into
safetensors shards, never held whole. The text encoders then get the matching output widths (4096, 768)
with tiny insides, so the checkpoint still generates end to end.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast
from ultraflux_core.errors import UltraFluxError

from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel
from ultraflux_model.vae.autoencoder import UltraFluxAutoencoderKL

TEXT_DIM = 32  # T5 width = transformer joint_attention_dim
POOLED_DIM = 32  # CLIP width = transformer pooled_projection_dim

MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


WidthPreset = Literal["tiny", "flux-dev"]
# FLUX.1-dev's transformer widths (black-forest-labs/FLUX.1-dev transformer/config.json): 3072 = 24 heads × 128.
FLUX_DEV_WIDTHS: dict[str, Any] = {
    "in_channels": 64, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
}
FLUX_DEV_DEPTH = (19, 38)  # double-stream, single-stream blocks of the full 12B model
SHARD_BYTES = 256 * 2**20  # transformer shards written by write_transformer_streamed
WEIGHTS_NAME = "diffusion_pytorch_model"


def transformer_config(preset: WidthPreset, layers: int | None = None, single_layers: int | None = None
                       ) -> dict[str, Any]:
    """Constructor keywords of ``UltraFluxTransformer2DModel`` for a width preset and depth (None: the preset's)."""
    if preset == "tiny":
        config = dict(tiny_transformer().config)
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    elif preset == "flux-dev":
        config = {**FLUX_DEV_WIDTHS, "num_layers": FLUX_DEV_DEPTH[0], "num_single_layers": FLUX_DEV_DEPTH[1]}
    else:
        raise UltraFluxError(f"unknown width preset {preset!r}; choose tiny or flux-dev")
    for key, value in (("num_layers", layers), ("num_single_layers", single_layers)):
        if value is not None:
            if value < 0:
                raise UltraFluxError(f"{key} must be 0 or more, got {value}")
            config[key] = value
    return config


def write_transformer_streamed(directory: Path | str, config: dict[str, Any], *, dtype: torch.dtype,
                               seed: int = 0, shard_bytes: int = SHARD_BYTES) -> Path:
    """Random ``UltraFluxTransformer2DModel(**config)`` weights as a diffusers folder, one layer at a time.

    The model is built on the meta device; each module's own tensors are materialised, initialised with the
    module's ``reset_parameters`` (seeded), cast to ``dtype`` and collected into the current shard, which is
    written once it reaches ``shard_bytes``. Memory peaks at about one shard plus one layer. Several shards
    get the diffusers names and a ``.safetensors.index.json``; one shard is a single file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = UltraFluxTransformer2DModel(**config)
    torch.manual_seed(seed)
    shards: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            save_file(current, str(directory / f".shard-{len(shards):05d}"), metadata={"format": "pt"})
            shards.append(list(current))
            current, size = {}, 0

    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if not own:
            continue
        if not hasattr(module, "reset_parameters"):
            raise UltraFluxError(f"{prefix} ({type(module).__name__}) has no reset_parameters to initialise it")
        module.to_empty(device="cpu", recurse=False)
        module.reset_parameters()
        for name, tensor in own:
            value = getattr(module, name).detach().to(dtype).contiguous()
            current[f"{prefix}.{name}" if prefix else name] = value
            size += value.numel() * value.element_size()
            total += value.numel() * value.element_size()
        module.to("meta")  # free this layer; its tensors live on in ``current`` until the shard is written
        if size >= shard_bytes:
            flush()
    flush()
    names = (
        [f"{WEIGHTS_NAME}.safetensors"] if len(shards) == 1
        else [f"{WEIGHTS_NAME}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for i, name in enumerate(names):
        (directory / f".shard-{i:05d}").rename(directory / name)
    if len(shards) > 1:
        weight_map = {key: name for name, keys in zip(names, shards, strict=True) for key in keys}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / f"{WEIGHTS_NAME}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    model.save_config(directory)
    return directory


def tiny_transformer() -> UltraFluxTransformer2DModel:
    return UltraFluxTransformer2DModel(
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
        rope_train_tokens_hw=(4, 4),  # a 128 px training window, so tiny 1:2 and 16:9 images exercise YaRN
    )


def tiny_vae() -> UltraFluxAutoencoderKL:
    return UltraFluxAutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=16,
        sample_size=64,
        stride=2,
    )


def tiny_clip(width: int = POOLED_DIM) -> tuple[CLIPTextModel, CLIPTokenizer]:
    # Byte-level BPE with no merges: every character of a word is a token (plus its end-of-word form).
    chars = list(string.ascii_lowercase + string.digits + ".,:;!?'-")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=width,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config), tokenizer


def tiny_t5(width: int = TEXT_DIM) -> tuple[T5EncoderModel, T5TokenizerFast]:
    pieces = (
        ["<pad>", "</s>", "<unk>", "▁"]
        + [f"▁{c}" for c in string.ascii_lowercase]
        + list(string.ascii_lowercase + string.digits)
    )
    tokenizer = T5TokenizerFast(vocab=[(p, -float(i)) for i, p in enumerate(pieces)], extra_ids=0)
    config = T5Config(
        vocab_size=len(pieces),
        d_model=width,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config), tokenizer


def write_tiny_checkpoint(directory: Path | str, seed: int = 0, *, width_preset: WidthPreset = "tiny",
                          layers: int | None = None, single_layers: int | None = None,
                          dtype: torch.dtype = torch.float32) -> Path:
    """Write the checkpoint to ``directory`` (created) and return it. Deterministic per ``seed``.

    ``width_preset="tiny"`` with default depth is the tiny model of the tests; any other choice streams the
    transformer (``write_transformer_streamed``) and sizes the text encoders' outputs to its widths.
    """
    directory = Path(directory)
    plain = width_preset == "tiny" and layers is None and single_layers is None and dtype == torch.float32
    config = None if plain else transformer_config(width_preset, layers, single_layers)  # validate before writing
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if config is None:
        tiny_transformer().save_pretrained(directory / "transformer", safe_serialization=True)
        text_dim, pooled_dim = TEXT_DIM, POOLED_DIM
    else:
        write_transformer_streamed(directory / "transformer", config, dtype=dtype, seed=seed)
        text_dim, pooled_dim = config["joint_attention_dim"], config["pooled_projection_dim"]
    tiny_vae().save_pretrained(directory / "vae", safe_serialization=True)
    clip, clip_tok = tiny_clip(pooled_dim)
    clip.save_pretrained(directory / "text_encoder", safe_serialization=True)
    clip_tok.save_pretrained(directory / "tokenizer")
    t5, t5_tok = tiny_t5(text_dim)
    t5.save_pretrained(directory / "text_encoder_2", safe_serialization=True)
    t5_tok.save_pretrained(directory / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False).save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    return directory


def ensure_checkpoint(model: str, init_tiny: bool) -> Path:
    """The local directory of a complete base checkpoint: ``model`` itself, a hub id fetched, or (with
    ``init_tiny``) the tiny checkpoint written where a missing local one was expected (the demo's first run)."""
    from ultraflux_model.checkpoint.layout import check_checkpoint_layout
    from ultraflux_model.checkpoint.resolve import resolve_checkpoint

    path = Path(model)
    if not path.exists() and init_tiny:
        write_tiny_checkpoint(path)
    elif not path.exists() and not str(model).startswith((".", "/")) and "/" in model:
        path = resolve_checkpoint(model)  # a hub id
    elif not path.exists():
        raise UltraFluxError(f"base checkpoint {model} does not exist (pass init_tiny=True for the tiny demo model)")
    check_checkpoint_layout(path)
    return path

