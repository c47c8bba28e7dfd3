"""Paper metrics: the registry and its CLI, MUSIQ in pyiqa's real architecture, pinned weight fetching from a
local stand-in hub (the same code as the network path), and the offline refusal."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner
from ultraflux_eval.backbones.clip import tiny_clip
from ultraflux_eval.backbones.iqa import MUSIQ_ARCH, build_musiq
from ultraflux_eval.backbones.loading import local_backbones, tiny_backbones
from ultraflux_eval.backbones.weights import PINS, LocalHub, Pin, fetch_weights, verify_weights, write_manifest
from ultraflux_eval.cli import app
from ultraflux_eval.config import BenchmarkConfig
from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics.aesthetic import TorchImageScorer
from ultraflux_eval.metrics.alignment import clip_score
from ultraflux_eval.metrics.table import METRICS, require_metric
from ultraflux_eval.protocol.evaluate import evaluate

PROMPTS = ["a red fox in snow", "a lighthouse at night", "ramen on a table"]


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (72, 120, 3), dtype=np.uint8), np.full((64, 64, 3), (200, 40, 40), np.uint8),
            np.clip(rng.normal(128, 50, (96, 64, 3)), 0, 255).astype(np.uint8)]


def test_metrics_cli_lists_every_paper_metric(tmp_path):
    result = CliRunner().invoke(app, ["metrics", "--weights-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name in ("fid", "patch_fid", "clip_score", "pickscore", "hpsv3", "artimuse", "qalign", "musiq", "glcm",
                 "compression_ratio"):
        assert name in result.output
    assert "openai/clip-vit-base-patch16" in result.output and "missing: no manifest" in result.output
    assert {m.name for m in METRICS.values() if m.paper_4096 is not None} == {
        "fid", "hpsv3", "pickscore", "artimuse", "clip_score", "qalign", "musiq"}


def test_missing_extras_are_clear_errors(monkeypatch):
    # None in sys.modules makes every import of pyiqa fail, whether or not an earlier test imported it
    monkeypatch.setitem(__import__("sys").modules, "pyiqa", None)
    for metric in ("musiq", "qalign"):
        with pytest.raises(EvalError, match=r"needs the `paper` extra .*ultraflux-eval\[paper\]"):
            require_metric(metric)


def test_musiq_real_architecture_loads_from_a_verified_checkpoint(tmp_path, pictures):
    """The full-size KonIQ MUSIQ (pyiqa's class) with random weights, saved as pyiqa ships it (a pickle read
    with weights_only=True) and loaded through the sha256 manifest, scores exactly like the network itself."""
    reference = build_musiq(seed=1)
    assert reference.net.transformer_encoder is not None and MUSIQ_ARCH["num_layers"] == 14
    (tmp_path / "musiq").mkdir()
    torch.save({"params": reference.net.state_dict()}, tmp_path / "musiq" / "ckpt.pth")
    write_manifest(tmp_path, {"musiq": "musiq/ckpt.pth"})
    nets = local_backbones(tmp_path, ["musiq"])
    image = pictures[0]
    ours = TorchImageScorer("musiq", nets.musiq, None, 1).score([image])
    direct = TorchImageScorer("musiq", reference, None, 1).score([image])
    np.testing.assert_allclose(ours, direct, rtol=1e-6)
    assert np.isfinite(ours).all()


def test_tiny_learned_paper_metrics_run_in_the_evaluation(pictures):
    learned = ("musiq", "hpsv3", "qalign", "artimuse")
    spec = BenchmarkConfig(metrics=("glcm", *learned), aspect_ratios=BenchmarkConfig().aspect_ratios)
    results = evaluate(pictures, PROMPTS, spec, backbones=tiny_backbones(learned))
    for metric in learned:
        values = [row[metric] for row in results.rows]
        assert len(set(values)) == 3 and all(np.isfinite(values))  # varies with the image
        assert results.table["overall"][metric] == pytest.approx(np.mean(values))
        assert f"{metric}/overall" in results.flat_metrics()


def _clip_hub(root, revision):
    """A stand-in hub folder holding a tiny CLIP under the pinned repo and commit."""
    folder = root / "hf" / "openai" / "clip-vit-base-patch16" / revision
    clip = tiny_clip(seed=5)
    clip.model.save_pretrained(folder, safe_serialization=True)
    clip.tokenizer.save_pretrained(folder)
    clip.processor.save_pretrained(folder)
    pin = next(p for p in PINS if p.role == "clip")
    for name in pin.files:  # tokenizers of some versions skip special_tokens_map.json: the pin lists it
        if not (folder / name).exists():
            (folder / name).write_text("{}")
    return clip


def test_fetch_from_a_local_hub_writes_a_loadable_manifest(tmp_path, pictures):
    pin = next(p for p in PINS if p.role == "clip")
    clip = _clip_hub(tmp_path / "hub", pin.revision)
    result = CliRunner().invoke(app, ["weights", "fetch", "--only", "clip_score", "--dir", str(tmp_path / "w"),
                                      "--source", str(tmp_path / "hub")])
    assert result.exit_code == 0, result.output
    manifest = yaml.safe_load((tmp_path / "w" / "manifest.yaml").read_text())
    assert manifest["backbones"] == {"clip": "clip"}
    assert manifest["sources"] == {"clip:openai/clip-vit-base-patch16": pin.revision}
    assert set(manifest["files"]) == {f"clip/{name}" for name in pin.files}
    nets = local_backbones(tmp_path / "w", ["clip_score"])
    np.testing.assert_allclose(clip_score(nets.clip, pictures, PROMPTS), clip_score(clip, pictures, PROMPTS),
                               atol=1e-5)
    # a second fetch keeps verified files and still verifies
    assert fetch_weights(tmp_path / "w", ["clip_score"], hub=LocalHub(tmp_path / "hub")).is_file()
    assert len(verify_weights(tmp_path / "w")) == len(pin.files)


def test_fetch_checks_the_sha256_a_file_name_carries(tmp_path):
    payload = b"pretend checkpoint"
    prefix = hashlib.sha256(payload).hexdigest()[:8]
    good = Pin("musiq", "url", "https://example.invalid/r", (f"m-{prefix}.pth",), "v1", f"musiq/m-{prefix}.pth")
    bad = Pin("musiq", "url", "https://example.invalid/r", ("m-00000000.pth",), "v1", "musiq/m-00000000.pth")
    (tmp_path / "hub" / "url").mkdir(parents=True)
    (tmp_path / "hub" / "url" / good.files[0]).write_bytes(payload)
    (tmp_path / "hub" / "url" / bad.files[0]).write_bytes(payload)
    hub = LocalHub(tmp_path / "hub")
    fetch_weights(tmp_path / "ok", ["musiq"], hub=hub, pins=[good])
    assert verify_weights(tmp_path / "ok", ["musiq"]) == [good.dest]
    with pytest.raises(EvalError, match="does not start with 00000000"):
        fetch_weights(tmp_path / "bad", ["musiq"], hub=hub, pins=[bad])
    assert not (tmp_path / "bad" / bad.dest).exists()  # nothing half-fetched is left as a weights file


def test_fetch_refuses_offline_at_once_with_the_hand_list(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["weights", "fetch", "--only", "fid", "--only", "clip_score",
                                      "--dir", str(tmp_path)])
    assert result.exit_code != 0
    message = str(result.exception)
    assert "HF_HUB_OFFLINE is set" in message
    assert "weights-inception-2015-12-05-6726825d.pth" in message
    assert "huggingface.co/openai/clip-vit-base-patch16/resolve/57c216476eefef5ab752ec549e440a49ae4ae5f3" in message
    with pytest.raises(EvalError, match="no pinned commit yet"):
        fetch_weights(tmp_path, ["pickscore"])


def test_hpsv3_in_its_real_architecture_round_trips_the_released_layout(tmp_path, pictures):
    """A tiny Qwen2-VL + ranknet head, saved the way HPSv3.safetensors is laid out (transformers 4.45 keys:
    `visual.*`, `model.*`, `lm_head.*`, `rm_head.*`) next to its config and processor, loads and scores the same."""
    from safetensors.torch import save_file
    from ultraflux_eval.backbones.hpsv3 import convert_checkpoint, load_hpsv3, tiny_hpsv3

    scorer = tiny_hpsv3(seed=0)
    scores = scorer.score(pictures, PROMPTS)
    assert scores.shape == (3,) and np.isfinite(scores).all() and np.ptp(scores) > 0
    assert not np.allclose(scores, scorer.score(pictures, PROMPTS[::-1]))  # the prompt matters

    released = {}
    for key, value in scorer.reward.state_dict().items():
        if key.startswith("model.visual."):
            released[key.removeprefix("model.")] = value
        elif key.startswith("model.language_model."):
            released["model." + key.removeprefix("model.language_model.")] = value
        else:
            released[key] = value
    released["lm_head.weight"] = torch.zeros(3, 3)
    assert convert_checkpoint(released).keys() == scorer.reward.state_dict().keys()
    folder = tmp_path / "hpsv3"
    scorer.reward.model.config.save_pretrained(folder)
    scorer.processor.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in released.items()}, folder / "HPSv3.safetensors")
    loaded = load_hpsv3(folder, pixels=scorer.pixels)
    np.testing.assert_allclose(loaded.score(pictures, PROMPTS), scores, rtol=1e-5, atol=1e-6)
    with pytest.raises(EvalError, match="unexpected key"):
        convert_checkpoint({"other.weight": torch.zeros(1)})
