"""The streamed, partitioned loader on one rank with the tiny model: both checkpoint layouts (one file, sharded
index), FLUX.1-dev's config keys, dtype conversion, and the strict errors of ``from_pretrained``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

deepspeed = pytest.importorskip("deepspeed")

from ultraflux_core.errors import UltraFluxError  # noqa: E402
from ultraflux_model.checkpoint.tiny import transformer_config, write_transformer_streamed  # noqa: E402
from ultraflux_model.config import DeepSpeedConfig, StageConfig  # noqa: E402
from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel  # noqa: E402
from ultraflux_model.training.distributed import init_distributed  # noqa: E402
from ultraflux_model.training.partitioned import build_partitioned, read_safetensors_header  # noqa: E402
from ultraflux_model.training.trainer import deepspeed_config  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"
# black-forest-labs/FLUX.1-dev transformer/config.json carries only stock diffusers keys (no Resonance-YaRN ones).
FLUX_DEV_KEYS = {"_class_name", "_diffusers_version", "attention_head_dim", "axes_dims_rope", "guidance_embeds",
                 "in_channels", "joint_attention_dim", "num_attention_heads", "num_layers", "num_single_layers",
                 "patch_size", "pooled_projection_dim", "out_channels"}


@pytest.fixture(scope="module")
def zero3_config() -> dict:
    ds = DeepSpeedConfig(backend="gloo", precision="fp32")
    init_distributed(ds)
    return deepspeed_config(ds, StageConfig(micro_batch=1, global_batch=1), world_size=1)


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            out[name] = param.data.clone()
    return out


def test_single_file_loads_partitioned_equal_to_the_file(tiny_checkpoint: Path, zero3_config: dict) -> None:
    model = build_partitioned(UltraFluxTransformer2DModel, tiny_checkpoint / "transformer", zero3_config)
    assert all(hasattr(p, "ds_tensor") and p.numel() == 0 for p in model.parameters())
    expected = load_file(str(tiny_checkpoint / "transformer" / WEIGHTS))
    weights = gathered(model)
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name


def test_sharded_flux_dev_layout_in_bf16_loads_into_fp32_partitions(tmp_path: Path, zero3_config: dict) -> None:
    source = write_transformer_streamed(tmp_path / "transformer", transformer_config("tiny"), dtype=torch.bfloat16,
                                        seed=3, shard_bytes=4096)
    index = json.loads((source / f"{WEIGHTS}.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps(
        {**{k: v for k, v in config.items() if k in FLUX_DEV_KEYS}, "_class_name": "FluxTransformer2DModel"}))
    model = build_partitioned(UltraFluxTransformer2DModel, source, zero3_config)
    weights = gathered(model)
    for shard in sorted(set(index["weight_map"].values())):
        for name, tensor in load_file(str(source / shard)).items():
            assert tensor.dtype == torch.bfloat16
            assert weights[name].dtype == torch.float32 and torch.equal(weights[name], tensor.float()), name


def _copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint / "transformer", tmp_path / "transformer"))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.pop("proj_out.bias"), r"missing_keys: proj_out\.bias"),
    (lambda t: t.update(extra=torch.zeros(2)), "unexpected_keys: extra"),
    (lambda t: t.update({"proj_out.bias": torch.zeros(3)}), r"mismatched_keys: proj_out\.bias \(file \[3\]"),
])
def test_checkpoints_that_do_not_cover_the_model_exactly_are_refused(tiny_checkpoint: Path, tmp_path: Path,
                                                                     zero3_config: dict, edit, message: str) -> None:
    directory = _copy(tiny_checkpoint, tmp_path)
    tensors = load_file(str(directory / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(directory / WEIGHTS))
    with pytest.raises(UltraFluxError, match=message):
        build_partitioned(UltraFluxTransformer2DModel, directory, zero3_config)


def test_bad_files_are_refused_with_the_file_named(tiny_checkpoint: Path, tmp_path: Path, zero3_config: dict) -> None:
    directory = _copy(tiny_checkpoint, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "num_layer": 2}))
    with pytest.raises(UltraFluxError, match="keys that UltraFluxTransformer2DModel does not know: num_layer"):
        build_partitioned(UltraFluxTransformer2DModel, directory, zero3_config)
    (directory / "config.json").write_text(json.dumps(config))
    data = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(data[: len(data) - 100])
    with pytest.raises(UltraFluxError, match="truncated"):
        build_partitioned(UltraFluxTransformer2DModel, directory, zero3_config)
    (directory / WEIGHTS).write_bytes(b"\xff" * 16)
    with pytest.raises(UltraFluxError, match="header"):
        read_safetensors_header(directory / WEIGHTS)
    (directory / WEIGHTS).unlink()
    (directory / f"{WEIGHTS}.index.json").write_text(json.dumps({"weight_map": {"proj_out.bias": "gone.safetensors"}}))
    with pytest.raises(UltraFluxError, match="lists shard gone.safetensors, which is missing"):
        build_partitioned(UltraFluxTransformer2DModel, directory, zero3_config)
