"""The Aesthetic-Eval@4096 preset validates over params.yaml and states the paper's protocol."""

from __future__ import annotations

from pathlib import Path

import pytest
from ultraflux_eval.config import load_eval_config
from ultraflux_eval.metrics.table import METRICS, protocol_mismatches
from ultraflux_eval.protocol.session import comparability

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs" / "eval" / "aesthetic-eval-4096.yaml"
V11 = ROOT / "configs" / "eval" / "aesthetic-eval-4096-v1.1.yaml"


def test_preset_validates_and_follows_the_protocol():
    from ultraflux.config import load_config

    cfg = load_config(ROOT / "params.yaml", PRESET)
    spec = cfg.eval.benchmark
    assert load_eval_config(PRESET).benchmark == spec  # `ultraflux-eval evaluate -c PRESET` reads the same
    sizes = {a.name: (a.width, a.height) for a in spec.aspect_ratios}
    assert set(sizes) == {"1:1", "2:1", "1:2", "16:9", "2.39:1"} and sizes["1:1"] == (4096, 4096)
    for name, (width, height) in sizes.items():
        a, b = (float(x) for x in name.split(":"))
        assert width / height == pytest.approx(a / b, rel=0.03), name  # the named aspect ratio
        assert width * height == pytest.approx(4096 * 4096, rel=0.12), name  # native 4K pixel budget
        assert width % 32 == 0 and height % 32 == 0  # token grid of the F16 VAE + 2x2 packing
    assert (cfg.generate.steps, cfg.generate.guidance, cfg.generate.shift) == (50, 4.0, 3.0)
    # the official inference's settings: one seed (0) for every prompt, the partitioned decode, UltraFlux-v1
    assert spec.seeds == (0,) and spec.seed_policy == "fixed" and spec.patch_size == 299
    assert cfg.generate.vae_decode == "official"
    assert cfg.generate.model == "Owen777/UltraFlux-v1" and cfg.generate.transformer is None
    # the protocols under which FID and CLIP score are comparable with the paper
    assert (spec.fid_resize, spec.fid_crop_size, spec.clip_truncation) == ("d4k", 4096, "torchmetrics")
    assert comparability(cfg.eval) == "yes"
    paper = {m.name for m in METRICS.values() if m.paper_4096 is not None}
    assert paper == {"fid", "clip_score", "pickscore", "hpsv3", "musiq", "qalign", "artimuse"}
    assert paper <= set(spec.metrics)  # every metric of the paper's table is in the list
    assert spec.prompts_file is not None and spec.reference_dir is not None
    assert cfg.eval.backbones.source == "local"


def test_v11_preset_changes_only_the_transformer_and_the_name():
    from ultraflux.config import load_config

    v1 = load_config(ROOT / "params.yaml", PRESET)
    v11 = load_config(ROOT / "params.yaml", PRESET, V11)
    assert v11.generate.transformer == "Owen777/UltraFlux-v1-1-Transformer"
    assert v11.generate.model_copy(update={"transformer": None}) == v1.generate
    assert v11.eval.benchmark.name == "aesthetic-eval-4096-v1.1"
    assert v11.eval.benchmark.model_copy(update={"name": v1.eval.benchmark.name}) == v1.eval.benchmark


def test_reproduce_preset_evaluates_fid_under_the_paper_protocol():
    from ultraflux.config import load_config

    cfg = load_config(ROOT / "params.yaml", ROOT / "configs" / "4k-reproduce.yaml")
    assert cfg.generate.transformer is not None  # v1.1: its header must not claim v1
    header = (ROOT / "configs" / "4k-reproduce.yaml").read_text().split("\ngenerate:")[0]
    assert "v1.1 transformer" in header and "use the released UltraFlux-v1." not in header
    assert protocol_mismatches(cfg.eval.benchmark.metrics, cfg.eval.benchmark.model_dump(mode="json")) == []


def test_a_squashed_fid_or_tokenizer_truncation_is_reported_as_not_comparable():
    spec = load_eval_config(PRESET).benchmark.model_dump(mode="json")
    assert protocol_mismatches(["fid", "clip_score", "glcm"], spec) == []
    changed = {**spec, "fid_resize": "legacy", "clip_truncation": "tokenizer"}
    assert protocol_mismatches(["fid", "clip_score", "glcm"], changed) == [
        "fid: fid_resize=legacy (comparable with the paper under fid_resize=d4k)",
        "clip_score: clip_truncation=tokenizer (comparable with the paper under clip_truncation=torchmetrics)",
    ]
    cfg = load_eval_config(PRESET, ["benchmark.fid_resize=legacy"])
    assert comparability(cfg).startswith("no: fid: fid_resize=legacy")
