"""CLIP-family backbones: the dual encoder behind CLIP score, PickScore and HPS, and the LAION aesthetic head
that reads its image embeddings.

Each comes as a loader from a local folder (HF ``CLIPModel`` layout, strictly offline) and a tiny stand-in built
offline from a seed with the same interface, initialised so that different images and prompts get different
features (metrics are not degenerate), which is all CI needs.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from ultraflux_eval.backbones.checkpoints import load_state_dict_file
from ultraflux_eval.errors import EvalError

# How a prompt longer than the text context is cut (see ClipBundle.text_embeds).
Truncation = Literal["tokenizer", "torchmetrics"]
TRUNCATIONS: tuple[str, ...] = ("tokenizer", "torchmetrics")
# what transformers 5 loads a CLIP tokenizer + image processor from (the fast tokenizer's tokenizer.json)
CLIP_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "preprocessor_config.json")


@dataclass
class ClipBundle:
    """A CLIP-like dual encoder with its tokenizer and image processor (HF ``CLIPModel`` layout)."""

    model: nn.Module
    tokenizer: object
    processor: object
    max_length: int

    @torch.no_grad()
    def image_embeds(self, images: list[np.ndarray], device: str = "cpu") -> torch.Tensor:
        """RGB uint8 ``[H, W, 3]`` list → L2-normalised projected embeddings ``[N, D]`` float32."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_embeds(
        self, prompts: list[str], device: str = "cpu", truncation: Truncation = "tokenizer"
    ) -> torch.Tensor:
        """Prompts → L2-normalised projected embeddings ``[N, D]`` float32, cut to the text context by
        ``truncation``:

        - ``tokenizer``: the tokenizer truncates to ``max_length`` and ends the sequence with its end-of-text token
          (the CLIP convention, PickScore's and HPS's reference code);
        - ``torchmetrics``: torchmetrics' ``clip_score`` (``_get_features``): tokenize in full with padding to the
          longest prompt, then keep the first ``max_length`` ids and mask entries. A prompt longer than the context
          loses its end-of-text token, and the text tower pools where its config says (the highest id for
          ``eos_token_id == 2`` configs such as OpenAI's, else the first end-of-text id, position 0 when none is
          left), so long prompts get another embedding than with ``tokenizer``.
        """
        if truncation == "tokenizer":
            tokens = self.tokenizer(
                prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            ids, mask = tokens["input_ids"], tokens["attention_mask"]
        elif truncation == "torchmetrics":
            tokens = self.tokenizer(prompts, padding=True, return_tensors="pt")
            ids, mask = tokens["input_ids"][..., : self.max_length], tokens["attention_mask"][..., : self.max_length]
        else:
            raise EvalError(f"CLIP text truncation must be one of {list(TRUNCATIONS)}, got {truncation!r}")
        pooled = self.model.text_model(input_ids=ids.to(device), attention_mask=mask.to(device)).pooler_output
        return nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())


class AestheticHead(nn.Module):
    """LAION improved-aesthetic-predictor MLP on L2-normalised CLIP image embeddings: ``[N, D]`` → ``[N]``."""

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


def tiny_clip(seed: int = 0) -> ClipBundle:
    """A 2-layer CLIP (32-px images, character-level tokenizer) built offline from ``seed``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(set(string.ascii_lowercase + string.digits + string.punctuation)):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    # Random towers give near-orthogonal image/text embeddings, so clamped CLIP scores would all be 0. A shared
    # projection and a shared offset after both final norms give the pairs a common direction: cosines land
    # mostly in (0, 1) and still vary with the image and the prompt.
    with torch.no_grad():
        shared = torch.randn(32) * 0.5
        model.vision_model.post_layernorm.bias.copy_(shared)
        model.text_model.final_layer_norm.bias.copy_(shared)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return ClipBundle(model, CLIPTokenizer(vocab=vocab, merges=[]), processor, max_length=77)


def tiny_aesthetic_head(dim: int = 16, seed: int = 0) -> AestheticHead:
    torch.manual_seed(seed)
    return AestheticHead(dim).eval()


def load_clip(folder: Path) -> ClipBundle:
    """An HF CLIPModel folder (config, safetensors weights, tokenizer, preprocessor), strictly offline."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
        tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise EvalError(f"cannot load the CLIP backbone from {folder}: {err}") from err
    return ClipBundle(model, tokenizer, processor, max_length=model.config.text_config.max_position_embeddings)


def load_aesthetic_head(path: Path) -> AestheticHead:
    state = load_state_dict_file(path)
    # LAION's checkpoint keys are `layers.N.weight`; the first Linear fixes the embedding width.
    first = state.get("layers.0.weight")
    if first is None:
        raise EvalError(f"{path} is not a LAION aesthetic head (no `layers.0.weight`)")
    head = AestheticHead(first.shape[1])
    head.load_state_dict(state)
    return head.eval()
