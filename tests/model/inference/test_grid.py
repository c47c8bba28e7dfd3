"""The benchmark grid's cells: their seed policy (one seed for every prompt, or seed + k), deterministic names, the
transformer override, and the finished-cell check (a cell is trusted only when its sidecar vouches for the PNG)."""

from __future__ import annotations

import functools
import json
from typing import get_args

import numpy as np
import pytest
from PIL import Image
from ultraflux_core.errors import UltraFluxError
from ultraflux_eval.config import BenchmarkConfig
from ultraflux_model.config import GenerateConfig, SeedPolicy
from ultraflux_model.inference.grid import GridJob, GridWorker, finished_cell, grid_cells
from ultraflux_model.inference.pipeline import generate

SETTINGS = GenerateConfig(steps=1, dtype="fp32")


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def worker_for(tiny_checkpoint):
    """One loaded pipeline per settings for the module: ``worker_for(settings) -> GridWorker``."""
    return functools.lru_cache(lambda settings: GridWorker(GridJob.create(str(tiny_checkpoint), settings, "/")))


def _render(worker: GridWorker, job: GridJob, cells):
    worker.job = job  # the loaded pipeline serves any job of the same model and settings
    return [worker(cell) for cell in cells]


@pytest.mark.parametrize(("policy", "expected"), [("fixed", [5, 5]), ("per_prompt", [5, 6])])
def test_grid_seeds_follow_the_policy(tiny_checkpoint, tmp_path, worker_for, policy, expected):
    # the same prompt twice: with one seed for all the two images are identical, with seed + k they are not
    cells = grid_cells(["a cat", "a cat"], [("1:1", 64, 64)], [5], policy)
    job = GridJob.create(str(tiny_checkpoint), SETTINGS, tmp_path)
    grid = _render(worker_for(SETTINGS), job, cells)
    assert [g.image.seed for g in grid] == expected
    assert [json.loads(g.image.path.with_suffix(".json").read_text())["seed"] for g in grid] == expected
    assert [g.image.path.relative_to(tmp_path).as_posix() for g in grid] == [
        f"seed5/1x1/{k:04d}_64x64_seed{s}.png" for k, s in enumerate(expected)]
    same = np.array_equal(_pixels(grid[0].image.path), _pixels(grid[1].image.path))
    assert same == (policy == "fixed")


def test_generate_gives_every_prompt_the_seed_under_the_fixed_policy(tiny_checkpoint, tmp_path):
    images = generate(tiny_checkpoint, ["a cat", "a cat"], [(64, 64)], steps=1, dtype="fp32", seed=5,
                      out_dir=tmp_path, progress=False, seed_policy="fixed")
    assert [i.seed for i in images] == [5, 5]
    assert np.array_equal(_pixels(images[0].path), _pixels(images[1].path))


def test_grid_loads_the_transformer_override(tiny_checkpoint, tmp_path, worker_for):
    settings = SETTINGS.model_copy(update={"transformer": str(tiny_checkpoint / "transformer")})
    job = GridJob.create(str(tiny_checkpoint), settings, tmp_path)
    (image,) = _render(worker_for(settings), job, grid_cells(["a boat"], [("1:1", 64, 64)], [0]))
    assert image.image.sidecar["transformer"] == str(tiny_checkpoint / "transformer")
    assert image.image.sidecar["request"]["transformer_hash"] == image.image.sidecar["transformer_hash"]


def test_a_cell_is_finished_only_when_its_sidecar_vouches_for_the_png(tiny_checkpoint, tmp_path, worker_for):
    job = GridJob.create(str(tiny_checkpoint), SETTINGS, tmp_path)
    (cell,) = grid_cells(["a fox"], [("1:1", 64, 64)], [0])
    assert finished_cell(job, cell) is None  # nothing written yet
    (made,) = _render(worker_for(SETTINGS), job, [cell])
    png, sidecar = made.image.path, made.image.path.with_suffix(".json")
    assert finished_cell(job, cell).image.path == png
    assert not [p for p in png.parent.iterdir() if p.name.startswith(".")]  # the staging folder is gone
    good = png.read_bytes()

    png.write_bytes(good[: len(good) // 2])  # half-written
    assert finished_cell(job, cell) is None
    png.write_bytes(good)
    assert finished_cell(job, cell) is not None
    # other settings, other weights, another prompt at the same name: not this cell
    assert finished_cell(GridJob.create(str(tiny_checkpoint), SETTINGS.model_copy(update={"steps": 2}), tmp_path),
                         cell) is None
    other_weights = GridJob(job.model, job.settings, job.out_dir, None, {**job.weights, "model_hash": "0" * 64})
    assert finished_cell(other_weights, cell) is None
    (renamed,) = grid_cells(["a wolf"], [("1:1", 64, 64)], [0])
    assert renamed.relpath == cell.relpath and finished_cell(job, renamed) is None
    sidecar.write_text("{")  # a torn sidecar
    assert finished_cell(job, cell) is None
    sidecar.unlink()
    assert finished_cell(job, cell) is None


def test_the_eval_setting_names_the_same_policies_and_bad_ones_fail(tiny_checkpoint, tmp_path):
    assert set(get_args(BenchmarkConfig.model_fields["seed_policy"].annotation)) == set(get_args(SeedPolicy))
    assert BenchmarkConfig().seed_policy == "fixed"
    with pytest.raises(UltraFluxError, match="seed policy must be one of"):
        generate(tiny_checkpoint, ["x"], [(64, 64)], out_dir=tmp_path, seed_policy="random", progress=False)
    with pytest.raises(UltraFluxError, match="seed policy must be one of"):
        grid_cells(["x"], [("1:1", 64, 64)], [0], "random")
    with pytest.raises(UltraFluxError, match="names a cell twice"):
        grid_cells(["x"], [("1:1", 64, 64)], [0, 0])
