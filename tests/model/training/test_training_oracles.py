"""Independent oracles for the trainer's math (docs/design.md §3 flow matching and SACL bands).

Nothing here is computed by the code under test: a stub DiT with a known output pins the noising
z_t = (1−t)·z + t·ε, the velocity target v = ε − z and x̂₀ = z_t − t·v; thousands of drawn timesteps are
compared with a sampler of the configured law written here (rejection sampling, not the trainer's inverse CDF):
band limits exactly, the distribution by a two-sample Kolmogorov–Smirnov test at a fixed seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp, norm
from ultraflux_model.config import StageConfig, TimestepConfig
from ultraflux_model.training.trainer import draw_noise_and_t, predict_x0

N_DRAWS = 2000
KS_ALPHA = 1e-3  # fixed seeds: the p-values below are deterministic; a wrong law gives p ≈ 0


def stage(t_min: float = 0.0, t_max: float = 1.0) -> StageConfig:
    """The one place tests here build a stage (batch fields are irrelevant to the math)."""
    return StageConfig(name="oracle", t_min=t_min, t_max=t_max)


def law(sampling: str = "logit_normal", mean: float = 0.0, std: float = 1.0, shift: float = 1.0) -> TimestepConfig:
    return TimestepConfig(sampling=sampling, logit_mean=mean, logit_std=std, shift=shift)


def reference_timesteps(n: int, cfg: TimestepConfig, t_min: float, t_max: float, seed: int) -> np.ndarray:
    """``n`` draws of the configured law by rejection: base draw, static shift s·t/(1+(s−1)·t), keep if in band."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    while sum(len(x) for x in out) < n:
        if cfg.sampling == "uniform":
            base = rng.uniform(0.0, 1.0, 4 * n)
        else:
            base = 1.0 / (1.0 + np.exp(-(cfg.logit_mean + cfg.logit_std * rng.standard_normal(4 * n))))
        t = cfg.shift * base / (1.0 + (cfg.shift - 1.0) * base)
        out.append(t[(t >= t_min) & (t <= t_max)])
    return np.concatenate(out)[:n]


def trainer_timesteps(cfg: TimestepConfig, st: StageConfig, n: int = N_DRAWS, step: int = 0) -> tuple[torch.Tensor,
                                                                                                       torch.Tensor]:
    noise, t = draw_noise_and_t((n, 1, 2, 2), 0, seed=1234, stage_index=1, step=step, stage=st,
                                timesteps=cfg)
    return noise, t


class StubDiT:
    """Returns a packed velocity chosen by the test and records what the trainer fed it."""

    def __init__(self, velocity: torch.Tensor) -> None:
        self.velocity = velocity  # [B, C, h, w]
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        b, c, h, w = self.velocity.shape
        # Flux packing written out: 2×2 patches, channel-major inside a patch, row-major tokens.
        packed = self.velocity.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 4 * c)
        return (packed,)


def _unpack(x: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    b = x.shape[0]
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


@pytest.fixture()
def clean_and_noise():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 16, 4, 6, generator=g)
    eps = torch.randn(3, 16, 4, 6, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    batch = {"latents": z, "prompt_embeds": torch.randn(3, 5, 8, generator=g), "pooled": torch.randn(3, 8, generator=g)}
    return z, eps, t, batch


def test_true_velocity_gives_back_the_clean_latents(clean_and_noise):
    z, eps, t, batch = clean_and_noise
    stub = StubDiT(eps - z)  # the flow-matching target v = ε − z
    x0, target = predict_x0(stub, batch, eps, t, guidance=None, dtype=torch.float32)
    torch.testing.assert_close(x0, z, rtol=0, atol=1e-6)
    assert torch.equal(target, z)
    # The DiT saw z_t = (1−t)·z + t·ε (float64 here) and the time t itself.
    (call,) = stub.calls
    tt = t.double().view(-1, 1, 1, 1)
    expected_zt = (1 - tt) * z.double() + tt * eps.double()
    torch.testing.assert_close(_unpack(call["hidden_states"], 16, 4, 6).double(), expected_zt, rtol=0, atol=1e-6)
    assert torch.equal(call["timestep"], t)
    assert call["guidance"] is None


def test_velocity_error_moves_x0_by_minus_t_times_the_error(clean_and_noise):
    z, eps, t, batch = clean_and_noise
    delta = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    x0, _ = predict_x0(StubDiT(eps - z + delta), batch, eps, t, guidance=4.0, dtype=torch.float32)
    # x̂₀ = z_t − t·(v + δ) = z − t·δ
    torch.testing.assert_close(x0, z - t.view(-1, 1, 1, 1) * delta, rtol=0, atol=1e-5)
    # A wrong time convention fails this oracle: (1−t)·δ instead of t·δ at t = 0.1 and 0.9.
    wrong = z - (1 - t).view(-1, 1, 1, 1) * delta
    assert not torch.allclose(x0[[0, 2]], wrong[[0, 2]], atol=1e-2)


@pytest.mark.parametrize(
    "cfg,t_min,t_max",
    [
        (law(), 0.0, 1.0),  # stage 1: the whole range
        (law(shift=3.0, mean=0.3, std=1.2), 0.0, 1.0),
        (law(), 0.541, 1.0),  # stage 2: the paper's high-noise band σ ≥ 0.541
        (law(shift=3.0), 0.541, 1.0),
        (law("uniform"), 0.541, 1.0),
        (law("uniform", shift=2.0), 0.2, 0.7),
    ],
    ids=["stage1", "stage1-shifted", "stage2", "stage2-shifted", "stage2-uniform", "band-uniform-shifted"],
)
def test_timestep_sampler_follows_the_configured_law_inside_the_band(cfg, t_min, t_max):
    noise, t = trainer_timesteps(cfg, stage(t_min, t_max))
    values = t.double().numpy()
    assert t.shape == (N_DRAWS,) and t.dtype == torch.float32
    # Band limits exactly, and the draws reach close to both ends (no clamp piling mass on an edge).
    assert values.min() >= np.float32(t_min) and values.max() <= np.float32(t_max)
    reference = reference_timesteps(N_DRAWS, cfg, t_min, t_max, seed=7)
    assert values.min() <= np.quantile(reference, 0.01) and values.max() >= np.quantile(reference, 0.99)
    assert np.mean(values == np.float32(t_min)) < 0.002 and np.mean(values == np.float32(t_max)) < 0.002
    assert ks_2samp(values, reference).pvalue > KS_ALPHA
    # ε is standard normal, per element.
    flat = noise.flatten().double().numpy()
    assert ks_2samp(flat, norm.rvs(size=flat.size, random_state=3)).pvalue > KS_ALPHA


def test_ks_oracle_rejects_a_law_without_the_band_or_the_shift():
    """The oracle has teeth: the whole-range law fails against the stage-2 band, the unshifted against the shifted."""
    _, whole = trainer_timesteps(law(), stage())
    assert ks_2samp(whole.double().numpy(), reference_timesteps(N_DRAWS, law(), 0.541, 1.0, seed=7)).pvalue < KS_ALPHA
    _, shifted = trainer_timesteps(law(shift=3.0), stage())
    assert ks_2samp(shifted.double().numpy(), reference_timesteps(N_DRAWS, law(), 0.0, 1.0, seed=7)).pvalue < KS_ALPHA


def test_draws_depend_on_the_step_and_not_on_the_band_stream():
    """Each step draws fresh times; the same (seed, step) gives the same ε whatever the band."""
    n1, a = trainer_timesteps(law(), stage(), n=64, step=0)
    n2, b = trainer_timesteps(law(), stage(), n=64, step=1)
    n3, c = trainer_timesteps(law(), stage(0.541, 1.0), n=64, step=0)
    assert not torch.equal(a, b) and not torch.equal(n1, n2)
    assert torch.equal(n1, n3) and (c >= 0.541).all()
