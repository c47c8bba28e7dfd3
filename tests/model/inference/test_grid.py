"""The benchmark grid: its seed policy (one seed for every prompt, or seed + k) and the transformer override."""

from __future__ import annotations

import json
from typing import get_args

import numpy as np
import pytest
from PIL import Image
from ultraflux_core.errors import UltraFluxError
from ultraflux_eval.config import BenchmarkConfig
from ultraflux_model.config import GenerateConfig, SeedPolicy
from ultraflux_model.inference.grid import generate_grid
from ultraflux_model.inference.pipeline import generate

SETTINGS = GenerateConfig(steps=1, dtype="fp32")


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.parametrize(("policy", "expected"), [("fixed", [5, 5]), ("per_prompt", [5, 6])])
def test_grid_seeds_follow_the_policy(tiny_checkpoint, tmp_path, policy, expected):
    # the same prompt twice: with one seed for all the two images are identical, with seed + k they are not
    grid = generate_grid(str(tiny_checkpoint), ["a cat", "a cat"], [("1:1", 64, 64)], [5], SETTINGS, tmp_path,
                         seed_policy=policy)
    assert [g.image.seed for g in grid] == expected
    assert [json.loads(g.image.path.with_suffix(".json").read_text())["seed"] for g in grid] == expected
    assert all(g.image.path.parent == tmp_path / "seed5" / "1x1" for g in grid)
    same = np.array_equal(_pixels(grid[0].image.path), _pixels(grid[1].image.path))
    assert same == (policy == "fixed")


def test_grid_loads_the_transformer_override(tiny_checkpoint, tmp_path):
    settings = SETTINGS.model_copy(update={"transformer": str(tiny_checkpoint / "transformer")})
    grid = generate_grid(str(tiny_checkpoint), ["a boat"], [("1:1", 64, 64)], [0], settings, tmp_path)
    assert grid[0].image.sidecar["transformer"] == str(tiny_checkpoint / "transformer")


def test_the_eval_setting_names_the_same_policies_and_bad_ones_fail(tiny_checkpoint, tmp_path):
    assert set(get_args(BenchmarkConfig.model_fields["seed_policy"].annotation)) == set(get_args(SeedPolicy))
    assert BenchmarkConfig().seed_policy == "fixed"
    with pytest.raises(UltraFluxError, match="seed policy must be one of"):
        generate(tiny_checkpoint, ["x"], [(64, 64)], out_dir=tmp_path, seed_policy="random", progress=False)
