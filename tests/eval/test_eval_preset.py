"""The Aesthetic-Eval@4096 preset validates over params.yaml and states the paper's protocol."""

from __future__ import annotations

from pathlib import Path

import pytest
from ultraflux_eval.config import load_eval_config
from ultraflux_eval.metrics.table import METRICS

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs" / "eval" / "aesthetic-eval-4096.yaml"


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
    assert spec.seeds == (0,) and spec.fid_resize == "legacy" and spec.patch_size == 299
    paper = {m.name for m in METRICS.values() if m.paper_4096 is not None}
    assert paper == {"fid", "clip_score", "pickscore", "hpsv3", "musiq", "qalign", "artimuse"}
    assert paper <= set(spec.metrics)  # every metric of the paper's table is in the list
    assert spec.prompts_file is not None and spec.reference_dir is not None
    assert cfg.eval.backbones.source == "local"
