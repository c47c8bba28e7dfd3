"""Generation with the tiny checkpoint: aspect ratios, determinism, sidecars, CLI, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner
from ultraflux.cli import app
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.inference.pipeline import generate, load_pipeline

SIZES = [(128, 128), (512, 288), (64, 128)]  # 1:1, 16:9, 1:2


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint, dtype="fp32", device="cpu")


def test_generates_each_aspect_ratio_with_sidecar(pipe, tiny_checkpoint, tmp_path):
    images = generate(tiny_checkpoint, ["a red fox"], SIZES, steps=3, seed=7, dtype="fp32", out_dir=tmp_path,
                      pipe=pipe, progress=False)
    assert [(g.width, g.height) for g in images] == SIZES
    for k, g in enumerate(images):
        assert Image.open(g.path).size == (g.width, g.height) and Image.open(g.path).mode == "RGB"
        side = json.loads(g.path.with_suffix(".json").read_text())
        assert side == g.sidecar
        assert (side["prompt"], side["seed"], side["steps"], side["guidance"], side["shift"]) == ("a red fox", 7 + k, 3, 4.0, 3.0)
        assert (side["width"], side["height"], side["vae_decode"]) == (g.width, g.height, "tiled")
        assert len(side["model_hash"]) == 64 and side["model"] == str(tiny_checkpoint)
        assert set(side["timings_s"]) == {"load", "text_encode", "denoise", "vae_decode"}
        assert side["memory"]["peak_host_rss_gb"] > 0
        assert np.asarray(Image.open(g.path)).std() > 0  # not a blank image


def test_same_seed_same_image_other_seed_other_image(pipe, tiny_checkpoint, tmp_path):
    kwargs = dict(steps=2, dtype="fp32", pipe=pipe, progress=False)
    a = generate(tiny_checkpoint, ["a cat"], [(64, 64)], seed=3, out_dir=tmp_path / "a", **kwargs)[0]
    b = generate(tiny_checkpoint, ["a cat"], [(64, 64)], seed=3, out_dir=tmp_path / "b", **kwargs)[0]
    c = generate(tiny_checkpoint, ["a cat"], [(64, 64)], seed=4, out_dir=tmp_path / "c", **kwargs)[0]
    assert np.array_equal(np.asarray(Image.open(a.path)), np.asarray(Image.open(b.path)))
    assert not np.array_equal(np.asarray(Image.open(a.path)), np.asarray(Image.open(c.path)))


def test_decode_modes_agree_up_to_the_official_shift(pipe, tiny_checkpoint, tmp_path):
    out = {}
    for mode in ("tiled", "full", "official"):
        g = generate(tiny_checkpoint, ["a boat"], [(96, 64)], steps=2, dtype="fp32", vae_decode=mode, out_dir=tmp_path / mode,
                     pipe=pipe, progress=False)[0]
        out[mode] = np.asarray(Image.open(g.path)).astype(int)
    assert np.abs(out["tiled"] - out["full"]).max() <= 1  # uint8 rounding of values equal to 1e-5
    assert np.abs(out["official"][1:, 1:] - out["full"][:-1, :-1]).max() <= 1


@pytest.mark.parametrize("size,nearest", [((100, 64), "96x64"), ((4000, 2250), "4000x2240"), ((10, 0), "32x32")])
def test_bad_sizes_name_the_nearest_valid_size(tiny_checkpoint, tmp_path, size, nearest):
    with pytest.raises(UltraFluxError, match=f"nearest valid size is {nearest}"):
        generate(tiny_checkpoint, ["x"], [size], out_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # nothing written, no model loaded


def test_incomplete_checkpoint_is_named(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(UltraFluxError, match="missing text_encoder_2"):
        load_pipeline(broken, dtype="fp32")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.copytree(tiny_checkpoint / "text_encoder_2", broken / "text_encoder_2")
    with pytest.raises(UltraFluxError, match="vae has no diffusion_pytorch_model.safetensors"):
        load_pipeline(broken, dtype="fp32")


def test_offload_without_gpu_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(UltraFluxError, match="no GPU"):
        load_pipeline(tiny_checkpoint, dtype="fp32", device="cpu", offload="model")


def test_unreachable_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UltraFluxError, match="could not get checkpoint 'Owen777/UltraFlux-v1'"):
        load_pipeline("Owen777/UltraFlux-v1")


def test_cli_generate_and_init_tiny(tmp_path):
    runner = CliRunner()
    ckpt = tmp_path / "tiny"
    result = runner.invoke(app, ["init-tiny", str(ckpt)])
    assert result.exit_code == 0, result.output
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse\n\na mountain lake\n")
    result = runner.invoke(app, [
        "generate", "--model", str(ckpt), "--prompts-file", str(prompts), "--width", "64", "--height", "128",
        "--steps", "2", "--dtype", "fp32", "--seed", "5", "--out", str(tmp_path / "out"),
    ])
    assert result.exit_code == 0, result.output
    sidecars = sorted((tmp_path / "out").glob("*/*.json"))  # each invocation writes into a run folder of its own
    assert [json.loads(p.read_text())["prompt"] for p in sidecars] == ["a lighthouse", "a mountain lake"]
    assert [json.loads(p.read_text())["seed"] for p in sidecars] == [5, 6]
    assert {json.loads(p.read_text())["dtype"] for p in sidecars} == {"fp32"}
    first = {p: p.with_suffix(".png").read_bytes() for p in sidecars}
    again = ["generate", "--model", str(ckpt), "-p", "a lighthouse", "--width", "64", "--height", "128", "--steps", "2",
             "--seed", "9", "--out", str(tmp_path / "out")]  # dtype left at auto: fp32 on this CPU
    result = runner.invoke(app, again)
    assert result.exit_code == 0, result.output
    runs = sorted(p for p in (tmp_path / "out").iterdir() if p.is_dir())
    assert len(runs) == 2 and any(f"1 image(s) in {run}" in result.output for run in runs)
    assert all(p.with_suffix(".png").read_bytes() == data for p, data in first.items())  # the first run is intact
    new = next(p for r in runs for p in r.glob("*.json") if p not in first)
    assert json.loads(new.read_text())["dtype"] == ("bf16" if torch.cuda.is_available() else "fp32")
    result = runner.invoke(app, [*again, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == ["0000_64x128_seed9.png"]  # --out itself
    bad = runner.invoke(app, ["generate", "--model", str(ckpt), "-p", "x", "--width", "64", "--height", "100"])
    assert bad.exit_code != 0 and "nearest valid size is 64x96" in str(bad.exception)
