"""VAE post-training from any F16 VAE, measured on a fixed held-out manifest: the start VAE is resolved from a
folder or a checkpoint and a non-F16 one is refused; the manifest is disjoint from the training images (overlap
refused), its files are checked by sha256, and the before/after metrics are those of its images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.files import file_sha256
from ultraflux_core.tracking.config import TrackingConfig
from ultraflux_data.vae_post import (
    _fid_extractor,
    _lpips,
    load_heldout,
    post_train_vae,
    read_heldout_manifest,
    reconstruction_metrics,
)
from ultraflux_model.checkpoint.resolve import resolve_vae
from ultraflux_model.config import VaeTrainConfig
from ultraflux_model.vae.autoencoder import UltraFluxAutoencoderKL


def _textured(path: Path, seed: int, size: tuple[int, int] = (64, 64)) -> Path:
    """A smooth random image (the tiny VAE reconstructs it badly before training, as it should)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(coarse).resize((size[1], size[0]), Image.BILINEAR).save(path)
    return path


def _manifest(path: Path, images: list[Path]) -> Path:
    entries = [{"path": str(p), "sha256": file_sha256(p)} for p in images]
    path.write_text(json.dumps({"images": entries}))
    return path


@pytest.fixture()
def sets(tmp_path: Path) -> tuple[Path, list[Path]]:
    """(training folder with 3 images, 2 held-out images elsewhere of another size)."""
    for i in range(3):
        _textured(tmp_path / "train" / f"t{i}.png", i)
    held = [_textured(tmp_path / "held" / f"h{i}.png", 10 + i, size=(64, 96)) for i in range(2)]
    return tmp_path / "train", held


def _cfg(tmp_path: Path, model: Path, images: Path, manifest: Path | None, **kw: object) -> VaeTrainConfig:
    return VaeTrainConfig(model=str(model), images=images, out=tmp_path / "out", heldout_manifest=manifest,
                          steps=2, batch_size=1, least_flat=1.0, **kw)


def test_start_vae_from_a_folder_or_a_checkpoint_and_non_f16_refused(tiny_checkpoint: Path, sets, tmp_path: Path):
    assert resolve_vae(tiny_checkpoint) == tiny_checkpoint / "vae"  # a checkpoint: its vae/
    bare = shutil.copytree(tiny_checkpoint / "vae", tmp_path / "bare-vae")
    assert resolve_vae(bare) == bare  # a diffusers AutoencoderKL folder on its own
    stock = shutil.copytree(bare, tmp_path / "stock-vae")
    config = json.loads((stock / "config.json").read_text())
    config.pop("stride")  # a stock diffusers AutoencoderKL (8x): no stride key
    (stock / "config.json").write_text(json.dumps(config))
    images, held = sets
    cfg = _cfg(tmp_path, stock, images, _manifest(tmp_path / "m.json", held))
    with pytest.raises(UltraFluxError, match=r"not an F16 VAE \(stride 1, need 2\)"):
        post_train_vae(cfg, TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"))
    assert not (tmp_path / "out").exists()
    for weights in stock.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(UltraFluxError, match="holds no VAE"):
        resolve_vae(stock)


def test_a_heldout_image_among_the_training_images_is_refused(tiny_checkpoint: Path, sets, tmp_path: Path):
    images, held = sets
    shutil.copyfile(held[0], images / "copy-of-h0.png")  # the same bytes under another name
    cfg = _cfg(tmp_path, tiny_checkpoint, images, _manifest(tmp_path / "m.json", held))
    with pytest.raises(UltraFluxError, match="in the held-out manifest .*copy-of-h0.png"):
        post_train_vae(cfg, TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db"))
    assert not (tmp_path / "out").exists()


def test_a_changed_heldout_file_is_refused(sets, tmp_path: Path):
    _, held = sets
    manifest = _manifest(tmp_path / "m.json", held)
    _textured(held[1], 99, size=(64, 96))  # rewritten after the manifest was made
    with pytest.raises(UltraFluxError, match="h1.png has sha256 .* the manifest records"):
        load_heldout(read_heldout_manifest(manifest))


def test_metrics_are_those_of_the_manifest_images_before_and_after(tiny_checkpoint: Path, sets, tmp_path: Path):
    from mlflow import MlflowClient

    images, held = sets
    (tmp_path / "held" / "m.json").write_text(json.dumps({"images": [  # paths relative to the manifest
        {"path": p.name, "sha256": file_sha256(p)} for p in held]}))
    cfg = _cfg(tmp_path, tiny_checkpoint / "vae", images, tmp_path / "held" / "m.json", lr=1e-3)
    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="vae-heldout")
    report = post_train_vae(cfg, tracking)

    assert [Path(h["path"]).name for h in report.heldout] == ["h0.png", "h1.png"]
    assert {(h["width"], h["height"]) for h in report.heldout} == {(96, 64)}  # native size, not the 64px crop
    assert report.train_images == 3 and report.heldout_images == 2
    recorded = json.loads(report.heldout_manifest.read_text())["images"]
    assert [e["sha256"] for e in recorded] == [file_sha256(p) for p in held]

    # the starting VAE's numbers are the metrics of exactly these images (the training images would differ)
    lpips_model, (extractor, side) = _lpips(cfg), _fid_extractor(cfg)
    arrays = [np.array(Image.open(p).convert("RGB")) for p in held]
    vae = UltraFluxAutoencoderKL.from_pretrained(tiny_checkpoint / "vae", torch_dtype=torch.float32).eval()
    got = reconstruction_metrics(vae, arrays, lpips_model, extractor, side, torch.device("cpu"))
    assert got == pytest.approx(report.before, rel=1e-5)
    assert report.before != report.after
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| rFID |" in table and f"{report.before['psnr']:.4f}" in table and f"{report.after['ssim']:.4f}" in table

    client = MlflowClient(tracking_uri=tracking.uri)
    run = client.search_runs([client.get_experiment_by_name("vae-heldout").experiment_id])[0]
    assert run.data.params["heldout_manifest_sha256"] == file_sha256(report.heldout_manifest)
    assert {"heldout.json", "report.md", "report.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
