"""Resonance 2D RoPE + YaRN: the pure-torch reference.

This is the positional embedding of the official UltraFlux transformer. Every detail below (float64
tables, float32 ramps, the resonance rounding, the YaRN blend bands and the magnitude factor) is pinned
by ``tests/fixtures/ultraflux_reference/{rope_1d,pos_embed}``.

Per axis of ``dim`` channels (``dim/2`` interleaved pairs) and training window ``L`` tokens:

* Plain RoPE (span <= L, the text axis, or ``method != "yarn"``): ``ω_k = θ^(-2k/dim)``.
* Resonance + YaRN (span > L, ``s = span / L``):

  1. resonance: a pair that completes ``r_k = L·ω_k / 2π >= 1`` cycles in the window is snapped to a
     whole number of cycles, ``ω̂_k = 2π·round(r_k) / L``; slower pairs keep ``ω̂_k = ω_k``.
  2. YaRN: linear ``ω̂/s`` and NTK ``ω̂^(ln θ' / ln θ)`` with ``θ' = θ·s^(dim/(dim-2))`` are blended
     with a ramp over pair index between the correction bounds for rotation counts (β₀, β₁) = (1.25, 0.75),
     then blended back to ``ω̂`` over (γ₀, γ₁) = (16, 2). Ramps are float32, as in the official code.
  3. cos and sin are scaled by ``mscale = 1 + 0.1·ln s``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

YARN_BETA = (1.25, 0.75)
YARN_GAMMA = (16.0, 2.0)
AxisOrder = Literal["t-h-w", "t-w-h"]
RopeMethod = Literal["yarn", "base"]


def _correction_bounds(
    rotations_lo: float, rotations_hi: float, dim: int, theta: float, train_len: int
) -> tuple[float, float]:
    """Pair-index range whose wavelengths make between ``rotations_hi`` and ``rotations_lo`` turns in ``train_len``.

    The index is ``dim·ln(L / (2π·rot)) / (2 ln θ)``, floored/ceiled, clamped to ``[0, dim/2]``.
    """

    def index(rot: float) -> float:
        return dim * math.log(train_len / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(index(rotations_lo)), 0)
    high = min(math.ceil(index(rotations_hi)), dim - 1, dim // 2)
    return float(low), float(high)


def _ramp(low: float, high: float, n: int) -> torch.Tensor:
    """float32 ``[n]`` ramp: 0 at or below ``low``, 1 at or above ``high`` (``high == low`` nudged by 1e-3)."""
    if low == high:
        high += 0.001
    return ((torch.arange(n, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)


def rope_frequencies(dim: int, train_len: int, span: int, theta: float = 10000.0) -> tuple[torch.Tensor, float]:
    """Per-pair angular frequencies (float64 ``[dim/2]``) and the magnitude factor for one axis.

    YaRN applies only when ``span > train_len``; otherwise the plain RoPE spectrum and factor 1.
    """
    if dim % 2:
        raise ValueError(f"RoPE axis dim must be even, got {dim}")
    alpha = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    log_theta = math.log(theta)
    if span <= train_len:
        return 1.0 / torch.exp(alpha * log_theta), 1.0

    scale = span / train_len
    omega = 1.0 / torch.exp(alpha * log_theta)
    cycles = train_len * omega / (2 * math.pi)
    base = torch.where(cycles >= 1.0, 2 * math.pi * cycles.round() / train_len, omega)
    linear = base / scale
    # NTK: the same exponent against the enlarged base θ' = θ·s^(d/(d-2)), i.e. ω̂^(ln θ' / ln θ)
    ntk = torch.exp(torch.log(base) * (math.log(theta * scale ** (dim / (dim - 2))) / log_theta))
    mask_beta = (1 - _ramp(*_correction_bounds(*YARN_BETA, dim, theta, train_len), dim // 2)).double()
    freqs = linear * (1 - mask_beta) + ntk * mask_beta
    mask_gamma = (1 - _ramp(*_correction_bounds(*YARN_GAMMA, dim, theta, train_len), dim // 2)).double()
    freqs = freqs * (1 - mask_gamma) + base * mask_gamma
    return freqs, 0.1 * math.log(scale) + 1.0


def resonance_yarn_1d(
    dim: int,
    pos: torch.Tensor,
    train_len: int,
    span: int | None = None,
    theta: float = 10000.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of one axis.

    Args:
        dim: channels of this axis (even).
        pos: ``[S]`` positions (any float/int dtype; evaluated in float64).
        train_len: training window in tokens for this axis.
        span: the axis' current length; defaults to ``max(pos) - min(pos) + 1``.
    Returns:
        ``(cos, sin)``, float32 ``[S, dim]``, pairs interleaved (0,0,1,1,...), scaled by mscale.
    """
    pos = pos.to(torch.float64)
    if span is None:
        span = int(pos.max().item() - pos.min().item() + 1) if pos.numel() else 0
    freqs, mscale = rope_frequencies(dim, train_len, span, theta)
    angles = torch.outer(pos, freqs.to(pos.device))
    cos = angles.cos().repeat_interleave(2, dim=1).float()
    sin = angles.sin().repeat_interleave(2, dim=1).float()
    if mscale != 1.0:
        # The official code multiplies the float32 tables by a float64 0-dim tensor: float32 result.
        factor = torch.tensor(mscale, dtype=torch.float64, device=pos.device)
        cos, sin = cos * factor, sin * factor
    return cos, sin


class ResonanceYarnPosEmbed(nn.Module):
    """Flux-style 3-axis positional embedding with per-axis Resonance-YaRN.

    Axis 0 (text/time) is always plain RoPE. Axes 1 and 2 are image rows and columns (``axis_order="t-h-w"``)
    or columns and rows (``"t-w-h"``); each uses YaRN when its span over the whole id set exceeds its
    training window ``train_tokens_hw`` (``(H, W)`` in tokens).
    """

    def __init__(
        self,
        theta: float = 10000.0,
        axes_dim: tuple[int, ...] = (16, 56, 56),
        train_tokens_hw: tuple[int, int] = (64, 64),
        axis_order: AxisOrder = "t-h-w",
        method: RopeMethod = "yarn",
    ) -> None:
        super().__init__()
        if axis_order not in ("t-h-w", "t-w-h"):
            raise ValueError(f"axis_order must be 't-h-w' or 't-w-h', got {axis_order!r}")
        if method not in ("yarn", "base"):
            raise ValueError(f"method must be 'yarn' or 'base', got {method!r}")
        if len(axes_dim) != 3:
            raise ValueError(f"axes_dim needs 3 entries (text, row, column), got {tuple(axes_dim)}")
        self.theta = float(theta)
        self.axes_dim = tuple(int(d) for d in axes_dim)
        self.train_tokens_hw = (int(train_tokens_hw[0]), int(train_tokens_hw[1]))
        self.axis_order = axis_order
        self.method = method
        # Context parallelism hands each rank a slice of the ids; the YaRN switch and scale depend on the span of the
        # whole image, so the ranks of this group agree on it (``inference.accel``). None: the ids are the whole set.
        self.span_group: Any = None

    def train_len(self, axis: int) -> int | None:
        """Training window of ``axis`` in tokens, or ``None`` for the text axis."""
        if axis == 0:
            return None
        h, w = self.train_tokens_hw
        first, second = (h, w) if self.axis_order == "t-h-w" else (w, h)
        return first if axis == 1 else second

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids ``[S, 3]`` → ``(cos, sin)`` float32 ``[S, sum(axes_dim)]`` on ``ids.device``."""
        if ids.ndim != 2 or ids.shape[-1] != len(self.axes_dim):
            raise ValueError(f"ids must be [S, {len(self.axes_dim)}], got {tuple(ids.shape)}")
        cos_parts, sin_parts = [], []
        spans = self._spans(ids)
        for axis, dim in enumerate(self.axes_dim):
            pos = ids[:, axis].to(torch.float64)
            span = spans[axis]
            train_len = self.train_len(axis)
            if self.method != "yarn" or train_len is None:
                train_len = max(span, 1)  # span <= train_len: plain RoPE
            cos, sin = resonance_yarn_1d(dim, pos, train_len, span=span, theta=self.theta)
            cos_parts.append(cos)
            sin_parts.append(sin)
        return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)

    def _spans(self, ids: torch.Tensor) -> list[int]:
        """``max - min + 1`` per axis of ``ids [S, 3]``, over every rank of ``span_group`` when it is set."""
        bounds = torch.cat([ids.amax(0), -ids.amin(0)]).to(torch.float64)  # [2 * axes]
        if self.span_group is not None:
            import torch.distributed as dist

            dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=self.span_group)
        n = len(self.axes_dim)
        return [int(bounds[axis].item() + bounds[n + axis].item() + 1) for axis in range(n)]
