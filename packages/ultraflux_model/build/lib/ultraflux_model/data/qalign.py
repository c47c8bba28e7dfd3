"""Q-Align's score readout and a tiny seeded stand-in network for CI and the demo.

Q-Align (Wu et al., 2023) rates an image by the probabilities of five level words ("excellent", "good",
"fair", "poor", "bad"); the score is their expectation with weights 5…1, so it lies in [1, 5] and the
UltraFlux filter keeps ``> 4``. :func:`qalign_readout` is that rule; :class:`TinyQAlign` feeds it five logits
from a random two-layer conv net so the scores vary with the image. The real 7B model is not bundled: use the
released metadata's ``qalign_score`` (``data.scoring.qalign=metadata``) or inject a scorer through
``score_manifest(..., scorer_factory=...)``.
"""

from __future__ import annotations

import torch
from torch import nn

LEVEL_WEIGHTS = (5.0, 4.0, 3.0, 2.0, 1.0)  # excellent, good, fair, poor, bad


def qalign_readout(level_logits: torch.Tensor) -> torch.Tensor:
    """``[N, 5]`` logits of (excellent, good, fair, poor, bad) → ``[N]`` expected level in [1, 5]."""
    weights = torch.tensor(LEVEL_WEIGHTS, dtype=level_logits.dtype, device=level_logits.device)
    return level_logits.softmax(dim=-1) @ weights


class TinyQAlign(nn.Module):
    """Random conv trunk → five level logits → :func:`qalign_readout`: float ``[N, 3, H, W]`` in [0, 1] → ``[N]``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.levels = nn.Linear(16, 5)
        for layer in (self.conv1, self.conv2, self.levels):
            fan_in = layer.weight[0].numel()
            layer.weight.data = torch.randn(layer.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5
            layer.bias.data = torch.zeros_like(layer.bias)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(images * 2.0 - 1.0))))
        features = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)
        return qalign_readout(self.levels(features) * 4.0)
