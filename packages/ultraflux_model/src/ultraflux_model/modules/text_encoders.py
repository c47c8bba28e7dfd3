"""The text encoders of a Flux checkpoint: CLIP-L (pooled) and T5 (sequence), loaded and applied as the official
pipeline does. Used by generation and by the data package's embedding cache (which loads only these)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from ultraflux_model.checkpoint.loading import check_local_component
from ultraflux_model.config import Dtype
from ultraflux_model.dtypes import TORCH_DTYPES

CLIP_MAX_TOKENS = 77


@dataclass(frozen=True)
class TextEncoders:
    """CLIP-L and T5 with their tokenizers: all that text conditioning needs (the caches load only these)."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    tokenizer_2: T5TokenizerFast
    text_encoder_2: T5EncoderModel


def load_text_encoders(root: Path, *, dtype: Dtype = "bf16", device: str | torch.device | None = None) -> TextEncoders:
    """Load the two text encoders and tokenizers of a checkpoint directory (safetensors only)."""
    check_local_component(root / "text_encoder", "model")
    check_local_component(root / "text_encoder_2", "model")
    common = {"torch_dtype": TORCH_DTYPES[dtype], "use_safetensors": True}
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", **common).eval()
    text_encoder_2 = T5EncoderModel.from_pretrained(root / "text_encoder_2", **common).eval()
    if device is not None:
        text_encoder, text_encoder_2 = text_encoder.to(device), text_encoder_2.to(device)
    return TextEncoders(
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder=text_encoder,
        tokenizer_2=T5TokenizerFast.from_pretrained(root / "tokenizer_2"),
        text_encoder_2=text_encoder_2,
    )


@torch.no_grad()
def encode_prompts(
    text: TextEncoders | Any,
    prompts: list[str],
    max_sequence_length: int = 512,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text conditioning as Flux: T5 sequence ``[B, L, D_t5]`` and CLIP pooled ``[B, D_clip]`` in ``dtype``.

    ``text`` is anything holding the two tokenizers and encoders (a pipeline or :class:`TextEncoders`);
    ``L`` is ``max_sequence_length`` (padded, truncated), as in the official pipeline.
    """
    clip_ids = text.tokenizer(
        prompts, padding="max_length", max_length=CLIP_MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    pooled = text.text_encoder(clip_ids.to(device), output_hidden_states=False).pooler_output
    t5_ids = text.tokenizer_2(
        prompts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    ).input_ids
    sequence = text.text_encoder_2(t5_ids.to(device), output_hidden_states=False)[0]
    return sequence.to(dtype), pooled.to(dtype)
