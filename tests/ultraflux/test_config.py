"""The one config tree: every preset validates, unknown keys are rejected, overrides and dumps round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ultraflux.config import UltraFluxConfig, load_config
from ultraflux_core.config import dump_config
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.config import GenerateConfig, check_image_size, nearest_valid_size

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def test_presets_exist():
    assert {p.stem for p in PRESETS} >= {"tiny", "1k", "2k", "4k"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_validates_over_params(preset):
    cfg = load_config(ROOT / "params.yaml", preset)
    assert isinstance(cfg, UltraFluxConfig)
    for width, height in cfg.generate.sizes:
        assert width % 32 == 0 and height % 32 == 0


def test_params_yaml_is_a_complete_serialisation():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cfg = load_config(ROOT / "params.yaml")
    assert set(params) == set(UltraFluxConfig.model_fields)
    assert yaml.safe_load(dump_config(cfg)) == yaml.safe_load(dump_config(load_config(ROOT / "params.yaml")))


def test_unknown_keys_are_rejected_with_their_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("generate:\n  step: 10\nkernel:\n  rope: eager\n")
    with pytest.raises(UltraFluxError) as err:
        load_config(bad)
    assert "generate.step" in str(err.value) and "kernel" in str(err.value)


def test_overrides_layer_and_are_typed(tmp_path):
    cfg = load_config(ROOT / "params.yaml", overrides=["generate.steps=7", "kernels.rope=eager", "generate.sizes=[[64, 32]]"])
    assert (cfg.generate.steps, cfg.kernels.rope, cfg.generate.sizes) == (7, "eager", ((64, 32),))
    with pytest.raises(UltraFluxError, match="section.key=value"):
        load_config(overrides=["generate.steps"])
    with pytest.raises(UltraFluxError, match="generate.steps"):
        load_config(overrides=["generate.steps=zero"])


def test_sections_are_frozen_and_sizes_checked():
    cfg = GenerateConfig()
    with pytest.raises(ValidationError):
        cfg.steps = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="nearest valid size is 1024x576"):
        GenerateConfig(sizes=((1024, 575),))
    assert nearest_valid_size(4000, 2250) == (4000, 2240)
    check_image_size(4096, 4096)


def test_broken_yaml_and_missing_file(tmp_path):
    (tmp_path / "broken.yaml").write_text("generate: [unclosed\n")
    with pytest.raises(UltraFluxError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UltraFluxError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(UltraFluxError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
