"""Text-image alignment and preference scores with CLIP-like dual encoders.

- :func:`clip_score` — ``100 · max(cos(image, text), 0)`` per pair: torchmetrics' ``clip_score`` called on each
  (image, prompt) pair, as Diffusion-4K's script does, including its truncation of long prompts
  (``truncation="torchmetrics"``, the default; see :meth:`~ultraflux_eval.backbones.clip.ClipBundle.text_embeds`).
- :class:`PreferenceScorer` — PickScore (``logit_scale · cos``, the PickScore_v1 convention) or HPS-style
  (``cos``, the HPSv2 convention) with a preference-tuned CLIP in HF layout.

Images are RGB ``uint8 [H, W, 3]`` arrays (or anything :func:`ultraflux_eval.metrics.scores.load_rgb` reads); prompts
align with images one to one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from ultraflux_eval.backbones.clip import ClipBundle, Truncation
from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics.scores import ImageLike, load_rgb


def pair_cosines(
    bundle: ClipBundle,
    images: Sequence[ImageLike],
    prompts: Sequence[str],
    batch_size: int = 8,
    device: str = "cpu",
    truncation: Truncation = "tokenizer",
) -> np.ndarray:
    """Cosine similarity of each image with its own prompt: ``[N] float64`` (long prompts cut by ``truncation``)."""
    if len(images) != len(prompts):
        raise EvalError(f"{len(images)} images but {len(prompts)} prompts: they must pair one to one")
    if len(images) == 0:
        raise EvalError("no images to score")
    bundle.model.to(device)
    out = []
    for start in range(0, len(images), batch_size):
        rgbs = [load_rgb(x) for x in images[start : start + batch_size]]
        image_embeds = bundle.image_embeds(rgbs, device)
        text_embeds = bundle.text_embeds(list(prompts[start : start + batch_size]), device, truncation)
        out.append((image_embeds * text_embeds).sum(-1).double().cpu())
    return torch.cat(out).numpy()


def clip_score(
    bundle: ClipBundle,
    images: Sequence[ImageLike],
    prompts: Sequence[str],
    batch_size: int = 8,
    device: str = "cpu",
    truncation: Truncation = "torchmetrics",
) -> np.ndarray:
    """CLIP score per pair: ``100 · max(cos, 0)`` (0-100; ~35 for well-aligned 4K generations with ViT-L/14);
    with ``truncation="torchmetrics"`` each value is torchmetrics' ``clip_score(image, prompt)``."""
    return 100.0 * np.maximum(pair_cosines(bundle, images, prompts, batch_size, device, truncation), 0.0)


class PreferenceScorer:
    """Human-preference reward of an (image, prompt) pair from a preference-tuned CLIP."""

    def __init__(
        self,
        name: str,
        bundle: ClipBundle,
        convention: Literal["pickscore", "hps"],
        batch_size: int = 8,
        device: str = "cpu",
    ) -> None:
        self.name, self.bundle, self.convention = name, bundle, convention
        self.batch_size, self.device = batch_size, device

    def score(self, images: Sequence[ImageLike], prompts: Sequence[str]) -> np.ndarray:
        """``[N] float64``: ``logit_scale · cos`` (PickScore, ~22 for good images) or ``cos`` (HPSv2, ~0.27)."""
        cosines = pair_cosines(self.bundle, images, prompts, self.batch_size, self.device)
        return cosines * self.bundle.logit_scale if self.convention == "pickscore" else cosines
