"""A transformer from another source over a base pipeline (as diffusers pipelines allow, and as the official
inference loads ``Owen777/UltraFlux-v1-1-Transformer`` over ``Owen777/UltraFlux-v1``)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner
from ultraflux.cli import app
from ultraflux.config import load_config
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.checkpoint.layout import assemble_checkpoint, fingerprint
from ultraflux_model.checkpoint.tiny import write_tiny_checkpoint
from ultraflux_model.inference.pipeline import generate, transformer_dir

KW = dict(steps=2, seed=3, dtype="fp32", device="cpu", progress=False)


def _pixels(images):
    return np.asarray(Image.open(images[0].path)).astype(int)


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("other") / "ckpt", seed=1)


def test_transformer_from_a_second_folder(tiny_checkpoint, other, tmp_path):
    base = generate(tiny_checkpoint, ["a fox"], [(96, 64)], out_dir=tmp_path / "base", **KW)
    mixed = generate(tiny_checkpoint, ["a fox"], [(96, 64)], out_dir=tmp_path / "mixed",
                     transformer=other / "transformer", **KW)  # fmt: skip
    assembled = assemble_checkpoint(tiny_checkpoint, tmp_path / "assembled", {"transformer": other / "transformer"})
    reference = generate(assembled, ["a fox"], [(96, 64)], out_dir=tmp_path / "ref", **KW)
    assert not np.array_equal(_pixels(mixed), _pixels(base))
    assert np.array_equal(_pixels(mixed), _pixels(reference))
    side = mixed[0].sidecar
    assert side["transformer"] == str(other / "transformer")
    assert side["transformer_hash"] == fingerprint(other / "transformer")
    assert side["model_hash"] == fingerprint(tiny_checkpoint) and "transformer" not in base[0].sidecar


def test_transformer_dir_takes_a_component_or_a_whole_checkpoint(other, tmp_path):
    assert transformer_dir(other) == other / "transformer"
    assert transformer_dir(other / "transformer") == other / "transformer"
    with pytest.raises(UltraFluxError, match="no config.json"):
        transformer_dir(other / "scheduler")


def test_cli_generate_takes_transformer(tiny_checkpoint, other, tmp_path):
    result = CliRunner().invoke(app, ["generate", "--model", str(tiny_checkpoint), "--transformer", str(other),
                                      "-p", "a fox", "--width", "64", "--height", "64", "--steps", "1",
                                      "--dtype", "fp32", "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    (sidecar,) = tmp_path.rglob("*.json")  # each run writes into a new folder under --out
    assert '"transformer_hash"' in sidecar.read_text()


def test_4k_preset_uses_the_recommended_pairing():
    gen = load_config("params.yaml", "configs/4k.yaml").generate
    assert (gen.model, gen.transformer) == ("Owen777/UltraFlux-v1", "Owen777/UltraFlux-v1-1-Transformer")
