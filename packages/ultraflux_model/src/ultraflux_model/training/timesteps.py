"""Training timestep laws: uniform or logit-normal, a static shift, restricted to a band.

Every sample costs exactly one uniform draw ``u`` that is mapped through the inverse CDF of the
band-restricted law. That keeps the random stream independent of the band (no rejection loop), so a
resumed run and a run with another stage band consume randomness identically, and the band restriction
is exact rather than a clamp that would pile mass on the edges.
"""

from __future__ import annotations

import torch

from ultraflux_model.config import TimestepConfig
from ultraflux_model.training.curriculum import paper_band_sigmas


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The static FlowMatch shift ``s·t / (1 + (s−1)·t)``; monotone on [0, 1], identity for s = 1."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def unshift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of :func:`shift_timesteps`: ``t / (s − (s−1)·t)``."""
    return t / (shift - (shift - 1.0) * t)


def _base_cdf(t: torch.Tensor, cfg: TimestepConfig) -> torch.Tensor:
    """CDF of the unshifted law at ``t`` (float64)."""
    if cfg.sampling == "uniform":
        return t
    return torch.special.ndtr((torch.logit(t) - cfg.logit_mean) / cfg.logit_std)


def _base_icdf(p: torch.Tensor, cfg: TimestepConfig) -> torch.Tensor:
    """Inverse CDF of the unshifted law (float64)."""
    if cfg.sampling == "uniform":
        return p
    return torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.special.ndtri(p))


def timesteps_from_uniform(
    u: torch.Tensor, cfg: TimestepConfig, t_min: float = 0.0, t_max: float = 1.0
) -> torch.Tensor:
    """Map uniform draws ``u`` [B] in [0, 1) to timesteps [B] of the configured law restricted to [t_min, t_max].

    ``cfg.band_schedule`` says where the band is read: on the final (shifted) t, or on the draw before the
    shift (the band then maps to [shift(t_min), shift(t_max)] of the final t).
    """
    lo, hi = _base_cdf(_base_band(cfg, t_min, t_max), cfg)
    p = lo + (hi - lo) * u.to(torch.float64)
    t = shift_timesteps(_base_icdf(p, cfg), cfg.shift)
    final = shift_timesteps(_base_band(cfg, t_min, t_max), cfg.shift)
    return t.clamp(float(final[0]), float(final[1])).to(torch.float32)


def _base_band(cfg: TimestepConfig, t_min: float, t_max: float) -> torch.Tensor:
    """The band [2] on the unshifted draw (float64)."""
    band = torch.tensor([t_min, t_max], dtype=torch.float64)
    return band if cfg.band_schedule == "unshifted" else unshift_timesteps(band, cfg.shift)


def sample_timesteps(
    n: int, cfg: TimestepConfig, t_min: float = 0.0, t_max: float = 1.0, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` timesteps [n] of the configured law restricted to [t_min, t_max]."""
    return timesteps_from_uniform(torch.rand(n, generator=generator, dtype=torch.float64), cfg, t_min, t_max)


def band_probability(cfg: TimestepConfig, t_min: float, t_max: float) -> float:
    """Probability that the configured law draws t in the band [t_min, t_max] (read as ``cfg.band_schedule`` says)."""
    lo, hi = _base_cdf(_base_band(cfg, t_min, t_max), cfg)
    return float(hi - lo)


def band_share(cfg: TimestepConfig, draw: tuple[float, float], band: tuple[float, float]) -> float:
    """Share of draws restricted to ``draw`` = (t_min, t_max) that fall in ``band``, e.g. stage 1 in stage 2's band.

    Near 1 means the two stages see almost the same noise levels, so the curriculum's band changes little.
    """
    lo, hi = max(draw[0], band[0]), min(draw[1], band[1])
    if lo >= hi:
        return 0.0
    return band_probability(cfg, lo, hi) / band_probability(cfg, *draw)


# The laws the docs' share table compares (docs/training.md, "Paper facts and our readings").
SHARE_TABLE_LAWS: dict[str, TimestepConfig] = {
    "uniform, shift 1": TimestepConfig(sampling="uniform"),
    "logit-normal(0, 1), shift 1": TimestepConfig(),
    "uniform, shift 3, band on the shifted t": TimestepConfig(sampling="uniform", shift=3.0),
    "logit-normal(0, 1), shift 3, band on the shifted t": TimestepConfig(shift=3.0),
    "logit-normal(0, 1), shift 3, band on the unshifted draw": TimestepConfig(shift=3.0, band_schedule="unshifted"),
}


def reading_share_table(
    band: tuple[int, int] = (0, 459), laws: dict[str, TimestepConfig] | None = None
) -> list[dict[str, object]]:
    """Per law and band reading: stage 2's σ band from ``band`` and the share of stage 1's draws (t ∈ [0, 1])
    that fall in it, i.e. how much of what stage 1 already trains on stage 2 repeats (stage 2 itself draws only
    inside its band)."""
    rows: list[dict[str, object]] = []
    for name, law in (SHARE_TABLE_LAWS if laws is None else laws).items():
        for reading in ("sigma_high", "index_low"):
            sigmas = paper_band_sigmas(band, reading)
            rows.append({"law": name, "reading": reading, "t_min": sigmas[0], "t_max": sigmas[1],
                         "stage1_share": band_share(law, (0.0, 1.0), sigmas)})
    return rows
