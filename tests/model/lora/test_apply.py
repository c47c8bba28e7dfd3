"""Generating with LoRA adapters: the adapter changes the image by its scale, goes off again when a request has none,
fuses to the same image, and unfuses to the base weights bit for bit; bad adapters are refused with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner
from ultraflux.cli import app
from ultraflux_core.errors import UltraFluxError
from ultraflux_model.config import GenerateConfig
from ultraflux_model.inference.pipeline import generate, load_pipeline
from ultraflux_model.lora.apply import read_adapter, read_specs, use_adapters

from tests.model.lora.conftest import make_adapter


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint, dtype="fp32", device="cpu")


def _image(pipe, tmp_path: Path, **kwargs) -> tuple[np.ndarray, dict]:
    made = generate(pipe.checkpoint_root, ["a red fox"], [(64, 64)], steps=2, dtype="fp32", out_dir=tmp_path,
                    pipe=pipe, progress=False, **kwargs)[0]  # fmt: skip
    return np.asarray(Image.open(made.path)).astype(np.int16), made.sidecar


def _base_weights(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of the model by its name without peft's wrapping (``x.base_layer.weight`` → ``x.weight``)."""
    weights = transformer.state_dict()
    return {name.replace(".base_layer.", "."): t.detach().clone() for name, t in weights.items() if "lora_" not in name}


def test_scale_reaches_the_layers_and_unfuse_restores_the_base_bit_for_bit(pipe, tiny_adapter, tmp_path):
    pristine = _base_weights(pipe.transformer)
    base, _ = _image(pipe, tmp_path / "base")
    one, sidecar = _image(pipe, tmp_path / "one", lora=[str(tiny_adapter)])
    zero, _ = _image(pipe, tmp_path / "zero", lora=[f"{tiny_adapter}:0"])
    two, _ = _image(pipe, tmp_path / "two", lora=[f"{tiny_adapter}:2"])
    assert np.abs(one - base).max() > 10 and np.abs(two - one).max() > 10
    assert np.array_equal(zero, base)  # scale 0 adds exact zeros
    assert sidecar["lora"] == [read_adapter(tiny_adapter).record(1.0)] and sidecar["lora_fused"] is False
    off, _ = _image(pipe, tmp_path / "off")
    assert np.array_equal(off, base)  # a request without adapters runs the base layers alone

    fused, sidecar = _image(pipe, tmp_path / "fused", lora=[str(tiny_adapter)], fuse_lora=True)
    assert np.abs(fused - one).max() <= 1 and sidecar["lora_fused"] is True  # the same adapter, merged
    merged = _base_weights(pipe.transformer)
    changed = [k for k in pristine if not torch.equal(merged[k], pristine[k])]
    assert changed and all("attn.to_" in k or "attn.add_" in k for k in changed)  # the attention preset's layers

    after, _ = _image(pipe, tmp_path / "after")  # the next request without adapters unfuses
    restored = _base_weights(pipe.transformer)
    assert all(torch.equal(restored[k], pristine[k]) for k in pristine)
    assert np.array_equal(after, base)


def test_two_adapters_add_up(pipe, tiny_adapter, tiny_adapter_b, tmp_path):
    a, _ = _image(pipe, tmp_path / "a", lora=[str(tiny_adapter)])
    both, sidecar = _image(pipe, tmp_path / "ab", lora=[str(tiny_adapter), f"{tiny_adapter_b}:0.5"])
    assert np.abs(both - a).max() > 10
    assert [(r["name"], r["scale"]) for r in sidecar["lora"]] == [("style-a", 1.0), ("style-b", 0.5)]
    with pytest.raises(UltraFluxError, match="given twice"):
        _image(pipe, tmp_path / "twice", lora=[str(tiny_adapter), f"{tiny_adapter}:0.5"])


def test_an_adapter_of_another_base_is_refused(tiny_checkpoint, tmp_path):
    other = make_adapter(tiny_checkpoint, tmp_path / "other", base_fingerprint="0" * 64)
    stand_in = SimpleNamespace(checkpoint_root=tiny_checkpoint, transformer_root=None)  # refused before any model use
    with pytest.raises(UltraFluxError, match=r"other was trained on .* \(fingerprint 000000000000\), not on this"):
        use_adapters(stand_in, read_specs([str(other)]))


def test_the_checkpoint_fingerprint_is_accepted_too(pipe, tiny_checkpoint, tmp_path):
    from ultraflux_model.checkpoint.layout import fingerprint

    adapter = make_adapter(tiny_checkpoint, tmp_path / "by-checkpoint", base_fingerprint=fingerprint(tiny_checkpoint))
    _, sidecar = _image(pipe, tmp_path / "out", lora=[str(adapter)])
    assert sidecar["lora"][0]["name"] == "by-checkpoint"


@pytest.mark.parametrize("spec,message", [
    ("{adapter}:abc", "bad LoRA scale 'abc'"),
    ("{adapter}:9", "must lie between -4 and 4, got 9"),
    ("{adapter}:nan", "must be a finite number"),
])  # fmt: skip
def test_bad_scales_are_refused_by_the_config(tiny_adapter, spec, message):
    with pytest.raises(ValueError, match=message):
        GenerateConfig(lora=(spec.format(adapter=tiny_adapter),))


def test_broken_adapter_folders_are_refused(tiny_adapter, tmp_path):
    with pytest.raises(UltraFluxError, match="does not exist"):
        read_specs([str(tmp_path / "nowhere")])
    broken = Path(shutil.copytree(tiny_adapter, tmp_path / "broken"))
    meta = json.loads((broken / "ultraflux_lora.json").read_text())
    (broken / "ultraflux_lora.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "base_fingerprint"}))
    with pytest.raises(UltraFluxError, match="lacks base_fingerprint"):
        read_adapter(broken)
    (broken / "pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(UltraFluxError, match="has no pytorch_lora_weights.safetensors"):
        read_adapter(broken)


def test_cli_generate_with_lora(tiny_checkpoint, tiny_adapter, tmp_path):
    runner = CliRunner()
    common = ["generate", "--model", str(tiny_checkpoint), "-p", "a fox", "--width", "64", "--height", "64",
              "--steps", "1", "--dtype", "fp32"]  # fmt: skip
    result = runner.invoke(app, common + ["--lora", f"{tiny_adapter}:0.5", "--fuse-lora", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    (sidecar,) = [json.loads(p.read_text()) for p in (tmp_path / "o").rglob("*.json")]
    assert [(r["name"], r["scale"]) for r in sidecar["lora"]] == [("style-a", 0.5)] and sidecar["lora_fused"]
    missing = runner.invoke(app, common + ["--lora", str(tmp_path / "none"), "--out", str(tmp_path / "x")])
    assert isinstance(missing.exception, UltraFluxError) and "does not exist" in str(missing.exception)
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").iterdir())  # refused before anything was made
