"""``--set`` overrides on list items: by position or by ``name``, on the defaults or on a preset's list."""

from __future__ import annotations

from pathlib import Path

import pytest
from ultraflux.config import UltraFluxConfig, load_config
from ultraflux_core.errors import UltraFluxError

REPO = Path(__file__).resolve().parents[2]


def test_stage_fields_by_position_and_by_name_keep_the_other_fields() -> None:
    cfg = load_config(overrides=["train.stages.0.steps=6", "train.stages.stage2.lr=0.25", "train.stages.-1.steps=3"])
    default = UltraFluxConfig().train.stages
    assert [s.steps for s in cfg.train.stages] == [6, 3]
    assert cfg.train.stages[1].lr == 0.25 and cfg.train.stages[0].lr == default[0].lr
    assert cfg.train.stages[1].model_dump(exclude={"lr", "steps"}) == default[1].model_dump(exclude={"lr", "steps"})


def test_overrides_apply_to_a_presets_list_and_layer_with_files() -> None:
    cfg = load_config(REPO / "params.yaml", REPO / "configs" / "4k.yaml",
                      overrides=["train.stages.stage2.global_batch=32", "train.stages.stage1.steps=10"])
    assert [(s.name, s.steps, s.global_batch) for s in cfg.train.stages] == [("stage1", 10, 64), ("stage2", 2000, 32)]


@pytest.mark.parametrize(("override", "message"), [
    ("train.stages.2.steps=1", r"train.stages has 2 item\(s\) \['stage1', 'stage2'\]; there is no item 2"),
    ("train.stages.stage9.steps=1", r"no item named 'stage9'; items: \['stage1', 'stage2'\]"),
    ("train.stages.0.step=1", r"train.stages.0.step: unknown setting 'step' \(did you mean 'steps'\?\)$"),
    ("train.stages.0.global_batch=3", r"global_batch \(3\) must be a multiple of micro_batch \(2\)"),
    ("train..seed=1", "empty key"),
    ("train.stages.0.grad_accum=2", "batch_size and grad_accum were replaced: set micro_batch"),
    ("data.scoring.workers=4", r"data.scoring.workers: unknown setting 'workers' \(removed in this version: set "
                               r"compute.workers"),
    ("trian.seed=1", r"trian: unknown setting 'trian' \(did you mean 'train'"),
    ("generate.dtype=fp64", r"generate.dtype: should be 'auto', 'bf16', 'fp16' or 'fp32', got 'fp64'$"),
    ("generate.steps=0", r"generate.steps: should be greater than or equal to 1, got 0$"),
])
def test_bad_list_overrides_say_what_exists(override: str, message: str) -> None:
    with pytest.raises(UltraFluxError, match=message):
        load_config(overrides=[override])


def test_validator_messages_carry_no_pydantic_wording() -> None:
    with pytest.raises(UltraFluxError) as err:
        load_config(overrides=["generate.sizes=[[100, 64]]", "train.stages.0.lr=-1", "generate.bogus=1"])
    text = str(err.value)
    assert "generate.sizes: image size 100x64 is not supported" in text
    for leaked in ("Value error", "Extra inputs", "Input should", "https://errors.pydantic.dev"):
        assert leaked not in text
