"""Local weights (manifest + sha256, offline loading), tiny backbones, and the learned scorers on top of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner
from ultraflux_eval.backbones.clip import tiny_aesthetic_head, tiny_clip
from ultraflux_eval.backbones.loading import local_backbones, tiny_backbones
from ultraflux_eval.backbones.weights import verify_weights, write_manifest
from ultraflux_eval.cli import app
from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics.aesthetic import ClipAestheticScorer, ImageScorer, TorchImageScorer
from ultraflux_eval.metrics.alignment import PreferenceScorer, clip_score, pair_cosines

PROMPTS = ["a red fox in snow", "a lighthouse at night", "ramen on a table", "a city skyline, 4k"]


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8) for _ in range(2)]
    out += [np.full((64, 64, 3), (200, 40, 40), np.uint8), np.full((40, 96, 3), (20, 20, 90), np.uint8)]
    return out


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> tuple:
    """A local weights folder written from tiny networks: CLIP (HF layout) and an aesthetic head."""
    root = tmp_path_factory.mktemp("weights")
    clip = tiny_clip(seed=3)
    clip.model.save_pretrained(root / "clip", safe_serialization=True)
    clip.tokenizer.save_pretrained(root / "clip")
    clip.processor.save_pretrained(root / "clip")
    head = tiny_aesthetic_head(16, seed=4)
    (root / "aesthetic").mkdir()
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, root / "aesthetic" / "head.safetensors")
    write_manifest(root, {"clip": "clip", "aesthetic_head": "aesthetic/head.safetensors"})
    return root, clip, head


def test_tiny_scores_are_not_degenerate(pictures):
    nets = tiny_backbones(["clip_score", "aesthetic", "pickscore", "hps"])
    scores = clip_score(nets.clip, pictures, PROMPTS)
    assert np.all(scores > 0) and np.ptp(scores) > 1.0  # positive and spread, not clamped to 0
    swapped = clip_score(nets.clip, pictures, PROMPTS[::-1])
    assert not np.allclose(scores, swapped)  # depends on the prompt
    aesthetic = ClipAestheticScorer(nets.clip, nets.aesthetic_head).score(pictures)
    assert aesthetic.shape == (4,) and np.ptp(aesthetic) > 0
    pick = PreferenceScorer("pickscore", nets.pickscore, "pickscore").score(pictures, PROMPTS)
    hps = PreferenceScorer("hps", nets.hps, "hps").score(pictures, PROMPTS)
    assert np.ptp(pick) > 0 and np.ptp(hps) > 0
    # PickScore convention: logit_scale x cosine of the same pair
    assert np.allclose(pick, nets.pickscore.logit_scale * pair_cosines(nets.pickscore, pictures, PROMPTS))
    assert isinstance(ClipAestheticScorer(nets.clip, nets.aesthetic_head), ImageScorer)


def test_clip_score_matches_a_direct_forward(pictures):
    clip = tiny_clip(seed=0)
    pixels = clip.processor(images=pictures, return_tensors="pt")["pixel_values"]
    tokens = clip.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = clip.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    cos = (out.image_embeds * out.text_embeds).sum(-1).double().numpy()
    assert np.allclose(clip_score(clip, pictures, PROMPTS, batch_size=3), 100 * np.maximum(cos, 0), atol=1e-4)


def test_local_weights_verify_and_load_offline(weights_dir, pictures):
    root, clip, head = weights_dir
    assert len(verify_weights(root)) >= 4
    nets = local_backbones(root, ["clip_score", "aesthetic"])
    assert not nets.tiny and nets.pickscore is None
    assert np.allclose(clip_score(nets.clip, pictures, PROMPTS), clip_score(clip, pictures, PROMPTS), atol=1e-5)
    local = ClipAestheticScorer(nets.clip, nets.aesthetic_head).score(pictures)
    assert np.allclose(local, ClipAestheticScorer(clip, head).score(pictures), atol=1e-6)


def test_missing_or_altered_weights_are_named(weights_dir, tmp_path):
    root, _, _ = weights_dir
    copy = tmp_path / "w"
    import shutil

    shutil.copytree(root, copy)
    (copy / "aesthetic" / "head.safetensors").write_bytes(b"tampered")
    with pytest.raises(EvalError, match=r"sha256 mismatch for .*head\.safetensors"):
        local_backbones(copy, ["aesthetic"])
    (copy / "clip" / "model.safetensors").unlink()
    with pytest.raises(EvalError, match=r"missing file .*clip/model\.safetensors"):
        verify_weights(copy, ["clip"])
    with pytest.raises(EvalError, match="no entry for \\['pickscore'\\]"):
        local_backbones(copy, ["pickscore"])
    with pytest.raises(EvalError, match="no weights manifest"):
        verify_weights(tmp_path / "empty")


def test_weights_cli(weights_dir, tmp_path):
    root, _, _ = weights_dir
    runner = CliRunner()
    ok = runner.invoke(app, ["weights", "verify", str(root)])
    assert ok.exit_code == 0 and "verified" in ok.output
    bad = runner.invoke(app, ["weights", "verify", str(tmp_path)])
    assert bad.exit_code != 0 and isinstance(bad.exception, EvalError)
    folder = tmp_path / "new"
    folder.mkdir()
    (folder / "inception.safetensors").write_bytes(b"x")
    made = runner.invoke(app, ["weights", "manifest", str(folder), "--backbone", "inception=inception.safetensors"])
    assert made.exit_code == 0, made.output
    assert verify_weights(folder, ["inception"]) == ["inception.safetensors"]


def test_torch_image_scorer_wraps_any_iqa_module(pictures):
    class MeanBrightness(torch.nn.Module):  # stands in for a MUSIQ / Q-Align network: [N,3,H,W] in [0,1] -> [N]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(1, 2, 3))

    native = TorchImageScorer("brightness", MeanBrightness(), size=None).score(pictures)
    expected = [p.astype(np.float64).mean() / 255 for p in pictures]
    assert np.allclose(native, expected, atol=1e-6)
    resized = TorchImageScorer("brightness", MeanBrightness(), size=32, batch_size=3).score(pictures)
    assert resized.shape == (4,) and np.allclose(resized[2:], expected[2:], atol=1e-3)  # flat images survive resizing

    class TwoOutputs(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 2)

    with pytest.raises(EvalError, match="one score per image"):
        TorchImageScorer("bad", TwoOutputs()).score(pictures)


def test_local_inception_features_for_fid(tmp_path):
    """The production FID extractor: torch-fidelity's Inception weights file from the manifest → 2048 features."""
    from ultraflux_eval.metrics.inception import write_random_inception_weights

    write_random_inception_weights(tmp_path / "inception" / "weights-inception.pth", seed=0)
    write_manifest(tmp_path, {"inception": "inception/weights-inception.pth"})
    nets = local_backbones(tmp_path, ["fid", "patch_fid"])
    assert nets.fid_size == 299 and nets.clip is None and nets.fid_resize == "legacy"
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)
    with torch.no_grad():
        features = nets.inception(images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])
