"""F16 VAE decoder post-training on the synthetic set: reconstruction improves, the encoder stays frozen,
the export loads, bad files are skipped with a reason, and MLflow gets the before/after metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.tracking.config import TrackingConfig
from ultraflux_data.synthetic import write_synthetic_dataset
from ultraflux_data.vae_post import load_images, post_train_vae
from ultraflux_model.config import VaeTrainConfig
from ultraflux_model.training.vae_decoder import random_crops, reconstruct
from ultraflux_model.vae.autoencoder import UltraFluxAutoencoderKL


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("syn"), n=10, seed=0, base_side=128)


def test_post_training_lowers_reconstruction_error(tiny_checkpoint: Path, images: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    cfg = VaeTrainConfig(model=str(tiny_checkpoint), images=images, out=tmp_path / "out", steps=12, lr=1e-3, heldout=3)
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="vae")
    report = post_train_vae(cfg, tracking)

    # Held-out images (never trained on) reconstruct better, and so does a fixed batch of training crops.
    assert report.after["psnr"] > report.before["psnr"]
    before_vae = UltraFluxAutoencoderKL.from_pretrained(tiny_checkpoint / "vae").eval()
    after_vae = UltraFluxAutoencoderKL.from_pretrained(report.export).eval()
    arrays = [img.array for img in load_images(images, cfg.crop)[0]]
    x = random_crops(arrays, 4, cfg.crop, np.random.default_rng(123))
    with torch.no_grad():
        err_before = torch.mean((reconstruct(before_vae, x) - x) ** 2)
        err_after = torch.mean((reconstruct(after_vae, x) - x) ** 2)
    assert err_after < err_before

    # Only the decoder moved.
    old, new = before_vae.state_dict(), after_vae.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old if k.startswith("encoder."))
    assert any(not torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))

    # The synthetic set's broken files are reported, not fatal; the report and MLflow hold the numbers.
    assert any("unreadable" in reason for reason in report.skipped.values())
    assert (tmp_path / "out" / "report.json").is_file() and report.heldout_images == 3
    client = MlflowClient(tracking_uri=tracking.uri)
    run = client.search_runs([client.get_experiment_by_name("vae").experiment_id])[0]
    for key in ("before/psnr", "after/psnr", "before/rfid", "after/ssim", "after/lpips", "loss", "wavelet"):
        assert key in run.data.metrics, key


def test_too_few_images_is_a_clear_error(tiny_checkpoint: Path, images: Path, tmp_path: Path) -> None:
    cfg = VaeTrainConfig(model=str(tiny_checkpoint), images=images, out=tmp_path / "out", heldout=50)
    with pytest.raises(UltraFluxError, match="usable images"):
        post_train_vae(cfg, TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"))
    assert not (tmp_path / "out" / "vae").exists()
