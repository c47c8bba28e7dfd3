"""A complete tiny UltraFlux checkpoint in the official layout, built offline from random weights.

Same directory layout and classes as ``Owen777/UltraFlux-v1`` (diffusers ``transformer/`` and ``vae/``,
transformers ``text_encoder`` (CLIP-L), ``text_encoder_2`` (T5), their tokenizers, ``scheduler/``,
``model_index.json``), only tiny, so tests, CI and the demo run the production loading and sampling
code without any download. Tokenizers are built from in-memory vocabularies (no hub files).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

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


def tiny_clip() -> tuple[CLIPTextModel, CLIPTokenizer]:
    # Byte-level BPE with no merges: every character of a word is a token (plus its end-of-word form).
    chars = list(string.ascii_lowercase + string.digits + ".,:;!?'-")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=POOLED_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=POOLED_DIM,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config), tokenizer


def tiny_t5() -> tuple[T5EncoderModel, T5TokenizerFast]:
    pieces = (
        ["<pad>", "</s>", "<unk>", "▁"]
        + [f"▁{c}" for c in string.ascii_lowercase]
        + list(string.ascii_lowercase + string.digits)
    )
    tokenizer = T5TokenizerFast(vocab=[(p, -float(i)) for i, p in enumerate(pieces)], extra_ids=0)
    config = T5Config(
        vocab_size=len(pieces),
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config), tokenizer


def write_tiny_checkpoint(directory: Path | str, seed: int = 0) -> Path:
    """Write the tiny checkpoint to ``directory`` (created) and return it. Deterministic per ``seed``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tiny_transformer().save_pretrained(directory / "transformer", safe_serialization=True)
    tiny_vae().save_pretrained(directory / "vae", safe_serialization=True)
    clip, clip_tok = tiny_clip()
    clip.save_pretrained(directory / "text_encoder", safe_serialization=True)
    clip_tok.save_pretrained(directory / "tokenizer")
    t5, t5_tok = tiny_t5()
    t5.save_pretrained(directory / "text_encoder_2", safe_serialization=True)
    t5_tok.save_pretrained(directory / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False).save_pretrained(directory / "scheduler")
    (directory / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    return directory
