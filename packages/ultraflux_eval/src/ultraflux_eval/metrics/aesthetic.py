"""Learned no-reference image scorers behind one interface: ``score(images) -> np.ndarray``.

- :class:`ClipAestheticScorer` — LAION-style aesthetic head on CLIP image embeddings (the dataset's
  ``aesthetics_score``; the ``aesthetic`` eval metric).
- :class:`TorchImageScorer` — any ``nn.Module`` mapping float ``[N, 3, H, W]`` in [0, 1] to ``[N]`` scores (MUSIQ;
  also the injection point for other IQA networks, e.g. a ``pyiqa`` metric object).
- Q-Align (:mod:`ultraflux_eval.backbones.qalign`) and ArtiMuse (:mod:`ultraflux_eval.backbones.artimuse`) are
  MLLM scorers with their own prompt and preprocessing that implement the same interface.

:func:`image_scorer` is the one place a no-reference metric's scorer is built from its backbones: the evaluation
and the dataset filters (``Q-Align > 4``, ArtiMuse top 30 %, stage 2 top 5 %) both call it.

Images are RGB ``uint8 [H, W, 3]`` arrays (or anything :func:`ultraflux_eval.metrics.scores.load_rgb` reads).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from ultraflux_eval.backbones.clip import AestheticHead, ClipBundle
from ultraflux_eval.backbones.loading import Backbones
from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics.table import IMAGE_METRICS
from ultraflux_eval.metrics.scores import ImageLike, load_rgb


@runtime_checkable
class ImageScorer(Protocol):
    """A no-reference scorer: one float per image, higher is better."""

    name: str

    def score(self, images: Sequence[ImageLike]) -> np.ndarray:
        """``N`` images → ``[N] float64``."""
        ...


def _checked(images: Sequence[ImageLike]) -> list[np.ndarray]:
    if len(images) == 0:
        raise EvalError("no images to score")
    return [load_rgb(image) for image in images]


class ClipAestheticScorer:
    """LAION aesthetic predictor: MLP head on L2-normalised CLIP image embeddings (≈1-10 with real weights)."""

    name = "aesthetic"

    def __init__(self, clip: ClipBundle, head: AestheticHead, batch_size: int = 8, device: str = "cpu") -> None:
        self.clip, self.head, self.batch_size, self.device = clip, head.to(device).eval(), batch_size, device
        self.clip.model.to(device)

    @torch.no_grad()
    def score(self, images: Sequence[ImageLike]) -> np.ndarray:
        rgbs = _checked(images)
        out = []
        for start in range(0, len(rgbs), self.batch_size):
            embeds = self.clip.image_embeds(rgbs[start : start + self.batch_size], self.device)
            out.append(self.head(embeds).double().cpu())
        return torch.cat(out).numpy()


class TorchImageScorer:
    """Wrap an IQA network: float ``[N, 3, H, W]`` in [0, 1] → ``[N]`` (or ``[N, 1]``) scores.

    ``size``: resize every image to ``size×size`` first (bilinear, antialias) so images of different shapes
    batch together; ``None`` scores each image alone at its native resolution (what MUSIQ is built for).
    """

    def __init__(self, name: str, model: nn.Module, size: int | None = None, batch_size: int = 8, device: str = "cpu"):
        self.name, self.model, self.size = name, model.to(device).eval(), size
        self.batch_size, self.device = batch_size, device

    def _tensor(self, rgb: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0).float() / 255.0
        if self.size is not None:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return x

    @torch.no_grad()
    def score(self, images: Sequence[ImageLike]) -> np.ndarray:
        tensors = [self._tensor(rgb) for rgb in _checked(images)]
        step = self.batch_size if self.size is not None else 1
        out = []
        for start in range(0, len(tensors), step):
            batch = torch.cat(tensors[start : start + step]).to(self.device)
            values = torch.as_tensor(self.model(batch)).reshape(batch.shape[0], -1)
            if values.shape[1] != 1:
                raise EvalError(
                    f"scorer {self.name!r} must return one score per image, got shape {tuple(values.shape)}"
                )
            out.append(values[:, 0].double().cpu())
        return torch.cat(out).numpy()




def image_scorer(metric: str, backbones: Backbones, batch_size: int = 8, device: str = "cpu") -> ImageScorer:
    """The scorer of a no-reference metric (:data:`IMAGE_METRICS`) over loaded ``backbones``."""
    if metric == "aesthetic":
        return ClipAestheticScorer(backbones.require("clip"), backbones.require("aesthetic_head"), batch_size, device)
    if metric == "musiq":  # native resolution, one image at a time (MUSIQ's multi-scale patches need no resize)
        return TorchImageScorer("musiq", backbones.require("musiq"), None, 1, device)
    if metric in ("qalign", "artimuse"):  # MLLM scorers: their own preprocessing and prompt
        scorer = backbones.require(metric)
        scorer.batch_size = batch_size
        return scorer.to(device)
    raise EvalError(f"{metric!r} is not a no-reference image metric; those are {list(IMAGE_METRICS)}")


def single_scorer(column: str, scorer_ids: Sequence[object]) -> str | None:
    """The one scorer id behind the non-missing values of a score ``column`` (None when every value is missing).

    Scores of different scorers (LAION 1-10 vs ArtiMuse 0-100, metadata vs a local model, tiny vs real) live on
    different scales: ranking or thresholding them together is meaningless, so a mix is an ``EvalError``.
    """
    ids = sorted({str(i) for i in scorer_ids if i is not None and i == i})  # i == i drops float NaN
    if len(ids) > 1:
        raise EvalError(
            f"{column} mixes scores of different scorers {ids}: they are on different scales and cannot be ranked "
            "together; score every row with one scorer (e.g. data.scoring.reuse_metadata_scores=false) or use "
            "only the metadata's scores"
        )
    return ids[0] if ids else None

