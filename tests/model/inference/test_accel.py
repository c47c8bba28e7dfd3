"""The accelerators of ``generate.accel`` on the tiny checkpoint: diffusers' cache hooks skip block evaluations
(counted by forward hooks inside the blocks, ``count_evaluations``) and, set not to skip, give the uncached image
bit for bit; FP8 and context parallelism are refused with one line where they cannot run; regional compilation
equals eager."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.config import AccelConfig
from ultraflux_model.inference.accel import check_accel, count_evaluations, set_cache
from ultraflux_model.inference.pipeline import generate, load_pipeline

SIZE = (64, 64)
STEPS = 5


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint: Path):
    return load_pipeline(tiny_checkpoint, dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def counts(pipe) -> dict[str, int]:
    return count_evaluations(pipe.transformer)


def run(pipe, counts, accel: AccelConfig, out: Path) -> tuple[np.ndarray, dict[str, int]]:
    counts.update(blocks=0, attention=0)
    image = generate(pipe.checkpoint_root, ["a red fox in snow"], [SIZE], steps=STEPS, dtype="fp32", pipe=pipe,
                     out_dir=out, progress=False, accel=accel)[0]  # fmt: skip
    return np.asarray(Image.open(image.path)), dict(counts)


BLOCKS = 2  # the tiny model: one double-stream and one single-stream block


@pytest.fixture(scope="module")
def uncached(pipe, counts, tmp_path_factory) -> tuple[np.ndarray, dict[str, int]]:
    return run(pipe, counts, AccelConfig(), tmp_path_factory.mktemp("uncached"))


@pytest.mark.parametrize(
    ("skipping", "exact"),
    [
        # FirstBlockCache: a threshold no residual change reaches skips every step after the first ...
        (AccelConfig(cache="first_block", cache_threshold=1e9), AccelConfig(cache="first_block", cache_threshold=0.0)),
        # ... TaylorSeer's lite mode predicts the output on 2 of every 3 steps after 2 computed ones ...
        (AccelConfig(cache="taylorseer", taylorseer_interval=3, taylorseer_warmup=2, taylorseer_predict="output"),
         AccelConfig(cache="taylorseer", taylorseer_interval=1, taylorseer_predict="output")),
        # ... and its default mode predicts the attention of each block (the blocks' MLPs still run).
        (AccelConfig(cache="taylorseer", taylorseer_interval=3, taylorseer_warmup=2),
         AccelConfig(cache="taylorseer", taylorseer_interval=1)),
    ],
    ids=["first_block", "taylorseer-output", "taylorseer-attention"],
)
def test_cache_skips_block_work_and_equals_uncached_when_it_may_not_skip(pipe, counts, uncached, tmp_path, skipping,
                                                                         exact):  # fmt: skip
    reference, full = uncached
    assert full == {"blocks": STEPS * BLOCKS, "attention": STEPS * BLOCKS}

    cached, saved = run(pipe, counts, skipping, tmp_path / "cached")
    if skipping.cache == "first_block":
        # every step runs the first block; the rest only on the first step
        assert saved == {"blocks": STEPS + (BLOCKS - 1), "attention": STEPS + (BLOCKS - 1)}
    elif skipping.taylorseer_predict == "output":
        computed = [k for k in range(STEPS) if k < 2 or (k - 2 - 1) % 3 == 0]  # diffusers' TaylorSeer schedule
        assert saved == {"blocks": len(computed) * BLOCKS, "attention": len(computed) * BLOCKS}
    else:
        assert saved["blocks"] == STEPS * BLOCKS and saved["attention"] < STEPS * BLOCKS
    assert not np.array_equal(cached, reference)  # predicted steps change the image ...

    same, evaluations = run(pipe, counts, exact, tmp_path / "exact")
    assert evaluations == full
    np.testing.assert_array_equal(same, reference)  # ... a cache that may not skip changes nothing


def test_cache_follows_each_call_and_is_removed_by_none(pipe):
    set_cache(pipe.transformer, AccelConfig(cache="first_block", cache_threshold=0.3))
    assert pipe.transformer.is_cache_enabled and pipe.transformer._cache_config.threshold == 0.3
    set_cache(pipe.transformer, AccelConfig(cache="taylorseer"))
    assert type(pipe.transformer._cache_config).__name__ == "TaylorSeerCacheConfig"
    set_cache(pipe.transformer, AccelConfig())
    assert not pipe.transformer.is_cache_enabled


def test_cache_sidecar_records_the_accelerators(pipe, counts, tmp_path):
    accel = AccelConfig(cache="first_block", cache_threshold=0.2)
    image = generate(pipe.checkpoint_root, ["a fox"], [(64, 64)], steps=2, dtype="fp32", pipe=pipe, out_dir=tmp_path,
                     progress=False, accel=accel)[0]  # fmt: skip
    assert image.sidecar["accel"]["cache"] == "first_block" and image.sidecar["accel"]["cache_threshold"] == 0.2
    plain = generate(pipe.checkpoint_root, ["a fox"], [(64, 64)], steps=2, dtype="fp32", pipe=pipe,
                     out_dir=tmp_path / "plain", progress=False, accel=AccelConfig())[0]  # fmt: skip
    assert "accel" not in plain.sidecar  # today's sidecar when nothing is on


def test_fp8_is_refused_on_cpu_before_anything_loads(tmp_path):
    message = r"quantize: fp8 needs a CUDA GPU of compute capability 8\.9 or newer .* this run is on cpu"
    with pytest.raises(UltraFluxError, match=message):
        # a model that does not exist: the refusal comes before any loading
        generate(tmp_path / "no-model", ["x"], [(64, 64)], steps=1, device="cpu", accel=AccelConfig(quantize="fp8"))


def test_context_parallel_and_ring_are_refused_where_they_cannot_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UltraFluxError, match=r"torchrun --nproc-per-node N .* \(WORLD_SIZE is 1\)"):
        generate(tmp_path / "no-model", ["x"], [(64, 64)], steps=1, device="cpu", accel=AccelConfig(parallel="context"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UltraFluxError, match="parallel_attention: ring needs a GPU attention backend"):
        check_accel(AccelConfig(parallel="context", parallel_attention="ring"), torch.device("cpu"))
    with pytest.raises(UltraFluxError, match="use offload none, not model"):
        check_accel(AccelConfig(parallel="context"), torch.device("cpu"), offload="model")


def test_pipeline_refuses_other_load_time_settings(pipe, tmp_path):
    with pytest.raises(UltraFluxError, match="reload it for"):
        generate(pipe.checkpoint_root, ["x"], [(64, 64)], steps=1, pipe=pipe, out_dir=tmp_path,
                 accel=AccelConfig(compile="regional"))  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("cache", "fast", "cache"), ("cache_threshold", -0.1, "greater than or equal to 0"),
     ("taylorseer_interval", 0, "greater than or equal to 1"), ("quantize", "int4", "quantize"),
     ("parallel", "tensor", "parallel"), ("compile", "full", "compile"), ("bogus", 1, "Extra inputs")],
)
def test_settings_are_validated(field, value, message):
    with pytest.raises(ValidationError, match=message):
        AccelConfig(**{field: value})


# Inductor's first C++ build of the two block graphs takes 3 minutes on this project's 2-core CI machine (18 s with
# a warm cache): too slow for the default run. ULTRAFLUX_TEST_COMPILE=1 runs it; benchmarks/gpu_check.sh compiles
# on the GPU at every size.
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ULTRAFLUX_TEST_COMPILE") != "1", reason="inductor build: ULTRAFLUX_TEST_COMPILE=1")
def test_regional_compile_builds_and_equals_eager(tiny_checkpoint, tmp_path):
    eager = load_pipeline(tiny_checkpoint, dtype="fp32", device="cpu")
    compiled = load_pipeline(tiny_checkpoint, dtype="fp32", device="cpu", accel=AccelConfig(compile="regional"))
    blocks = [*compiled.transformer.transformer_blocks, *compiled.transformer.single_transformer_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    images = [
        np.asarray(Image.open(generate(tiny_checkpoint, ["a fox"], [(64, 64)], steps=2, dtype="fp32", pipe=p,
                                       out_dir=tmp_path / name, progress=False)[0].path))  # fmt: skip
        for name, p in (("eager", eager), ("compiled", compiled))
    ]
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() <= 1
