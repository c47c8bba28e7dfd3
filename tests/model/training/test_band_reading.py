"""The two readings of the paper's stage-2 band "timesteps 0–459" (upstream W2GenAI-Lab/UltraFlux#6).

Oracle: diffusers' FlowMatchEulerDiscreteScheduler as FLUX.1-dev configures it for training (dynamic shifting,
so the training sigmas are unshifted), indexed the way the diffusers Flux training scripts index it.
"""

from __future__ import annotations

import pytest
import torch
from ultraflux_model.config import StageConfig, TimestepConfig, TrainConfig
from ultraflux_model.training.curriculum import paper_band_sigmas, stage_band, stage_plans
from ultraflux_model.training.timesteps import (
    SHARE_TABLE_LAWS,
    band_share,
    reading_share_table,
    sample_timesteps,
    unshift_timesteps,
)
from ultraflux_model.training.trainer import draw_noise_and_t


def flux_dev_training_schedule() -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) [1000] of FLUX.1-dev's training scheduler, index 0 first."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    return scheduler.timesteps.double(), scheduler.sigmas[:1000].double()


def test_both_readings_match_the_scheduler_index_convention():
    timesteps, sigmas = flux_dev_training_schedule()
    # sigma_high: 0–459 are indices into the descending schedule (timesteps = scheduler.timesteps[indices])
    lo, hi = paper_band_sigmas((0, 459), "sigma_high")
    assert (lo, hi) == (0.541, 1.0)
    assert float(sigmas[0:460].min()) == pytest.approx(lo) and float(sigmas[0:460].max()) == pytest.approx(hi)
    # index_low: 0–459 are timestep values (σ·1000, the number the DiT is conditioned on): the low-noise end
    lo, hi = paper_band_sigmas((0, 459), "index_low")
    assert (lo, hi) == (0.0, 0.459)
    low = sigmas[timesteps <= 459]
    assert len(low) == 459 and float(low.max()) == pytest.approx(hi) and float(low.min()) >= lo


def test_default_reading_keeps_todays_stage2_band():
    train = TrainConfig()
    stage2 = train.stages[1]
    assert stage2.paper_band == (0, 459) and train.timesteps.band_reading == "sigma_high"
    assert stage_band(stage2, train.timesteps) == (0.541, 1.0)  # exactly the band the config held before
    assert stage_band(train.stages[0], train.timesteps) == (0.0, 1.0)
    low = TimestepConfig(band_reading="index_low")
    assert stage_band(stage2, low) == (0.0, 0.459)
    # the curriculum's plans carry the resolved band
    assert [p.band for p in stage_plans(train)] == [(0.0, 1.0), (0.541, 1.0)]
    assert stage_plans(train.model_copy(update={"timesteps": low}))[1].band == (0.0, 0.459)


def test_trainer_draws_in_the_band_of_the_configured_reading():
    stage = StageConfig(name="s2", paper_band=(0, 459))
    for reading, inside in (("sigma_high", lambda t: t >= 0.541), ("index_low", lambda t: t <= 0.459)):
        _, t = draw_noise_and_t((256, 1, 1, 1), 0, seed=0, stage_index=1, step=0, stage=stage,
                                timesteps=TimestepConfig(band_reading=reading))
        assert inside(t).all(), reading


def test_paper_band_is_refused_with_a_band_or_out_of_range():
    with pytest.raises(ValueError, match="either paper_band or t_min"):
        StageConfig(name="s2", t_min=0.541, paper_band=(0, 459))
    with pytest.raises(ValueError, match="paper_band"):
        StageConfig(name="s2", paper_band=(459, 0))
    with pytest.raises(ValueError, match="paper_band"):
        StageConfig(name="s2", paper_band=(0, 1001))


def test_share_table_equals_sampled_draws():
    rows = reading_share_table()
    assert len(rows) == 2 * len(SHARE_TABLE_LAWS)
    for row in rows:
        law = SHARE_TABLE_LAWS[row["law"]]
        t = sample_timesteps(50_000, law, generator=torch.Generator().manual_seed(0)).double()
        if law.band_schedule == "unshifted":  # that band bounds the draw before the shift
            t = unshift_timesteps(t, law.shift)
        sampled = ((t >= row["t_min"]) & (t <= row["t_max"])).double().mean().item()
        assert row["stage1_share"] == pytest.approx(sampled, abs=6e-3), row
    share = {(r["law"], r["reading"]): r["stage1_share"] for r in rows}
    # with no shift the two readings are mirror bands of a symmetric law: the same share; the shift breaks that
    assert share["uniform, shift 1", "sigma_high"] == pytest.approx(share["uniform, shift 1", "index_low"])
    shifted = "logit-normal(0, 1), shift 3, band on the shifted t"
    assert share[shifted, "sigma_high"] > 0.8 > 0.11 > share[shifted, "index_low"]
    assert share[shifted, "sigma_high"] == band_share(SHARE_TABLE_LAWS[shifted], (0.0, 1.0), (0.541, 1.0))
