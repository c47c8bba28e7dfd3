"""The one typed configuration tree.

``params.yaml`` is its serialisation, ``configs/*.yaml`` are presets layered over it, CLI flags and
Prefect parameters are the same fields. Every section is frozen and rejects unknown keys, so a typo in a
YAML file or a ``--set`` override fails loudly instead of being ignored.

Sections are owned by the package that uses them; the eval package's section is imported, never
re-declared (the eval package does not import this one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ultraflux_model.errors import UltraFluxError

Dtype = Literal["bf16", "fp16", "fp32"]
Offload = Literal["none", "model", "sequential"]
VaeDecodeMode = Literal["tiled", "full", "official"]
KernelChoice = Literal["auto", "eager", "triton"]

TOKEN_PX = 32  # 16x VAE downsampling then 2x2 packing: one transformer token covers 32x32 pixels


class Section(BaseModel):
    """Base of every config section: immutable, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class KernelConfig(Section):
    """Which implementation the hot ops use.

    ``auto``: Triton on CUDA tensors, the pure-torch reference elsewhere. ``triton`` forces the kernel
    (on CPU it then needs ``TRITON_INTERPRET=1``); ``eager`` forces the reference.
    """

    rope: KernelChoice = "auto"
    loss: KernelChoice = "auto"


class GenerateConfig(Section):
    """Text-to-image generation (defaults follow the official UltraFlux inference)."""

    model: str = Field("artifacts/tiny-ultraflux", description="checkpoint directory or hub id")
    prompts: tuple[str, ...] = ("a red fox in fresh snow, golden hour, 4k photograph",)
    sizes: tuple[tuple[int, int], ...] = Field(
        ((4096, 4096),), description="(width, height) pairs; each side a multiple of 32"
    )
    steps: int = Field(50, ge=1)
    guidance: float = Field(4.0, ge=0.0, description="distilled guidance fed to the guidance embedding")
    shift: float = Field(3.0, gt=0.0, description="static FlowMatch Euler timestep shift")
    max_sequence_length: int = Field(512, ge=1, le=512, description="T5 tokens")
    seed: int = 0
    dtype: Dtype = "bf16"
    offload: Offload = "none"
    vae_decode: VaeDecodeMode = "tiled"
    vae_tile_latent: int = Field(64, ge=8, description="latent tile side of the tiled decode")
    out: Path = Path("artifacts/generated")

    @field_validator("sizes")
    @classmethod
    def _sizes_are_token_multiples(cls, sizes: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
        for width, height in sizes:
            check_image_size(width, height)
        return sizes


def nearest_valid_size(width: int, height: int) -> tuple[int, int]:
    """The closest (width, height) whose sides are positive multiples of 32."""
    return (max(TOKEN_PX, round(width / TOKEN_PX) * TOKEN_PX), max(TOKEN_PX, round(height / TOKEN_PX) * TOKEN_PX))


def check_image_size(width: int, height: int) -> None:
    """Raise ``UltraFluxError`` naming the nearest valid size unless both sides are multiples of 32."""
    if width <= 0 or height <= 0 or width % TOKEN_PX or height % TOKEN_PX:
        w, h = nearest_valid_size(width, height)
        raise UltraFluxError(
            f"image size {width}x{height} is not supported: width and height must be positive multiples of "
            f"{TOKEN_PX} (16x VAE, 2x2 packing); the nearest valid size is {w}x{h}"
        )


class UltraFluxConfig(Section):
    """The whole tree, as serialised in ``params.yaml``."""

    generate: GenerateConfig = GenerateConfig()
    kernels: KernelConfig = KernelConfig()


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _parse_override(item: str) -> dict[str, Any]:
    """``"generate.steps=10"`` → nested dict; the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in item:
        raise UltraFluxError(f"override {item!r} must look like section.key=value")
    dotted, raw = item.split("=", 1)
    value: Any = yaml.safe_load(raw) if raw else ""
    for key in reversed(dotted.strip().split(".")):
        value = {key: value}
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UltraFluxError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UltraFluxError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise UltraFluxError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def config_from_dict(data: dict[str, Any], source: str = "config") -> UltraFluxConfig:
    """Validate a plain mapping; errors list every offending field path."""
    try:
        return UltraFluxConfig.model_validate(data)
    except ValidationError as err:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise UltraFluxError(f"invalid {source}:\n" + "\n".join(lines)) from err


def load_config(*paths: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> UltraFluxConfig:
    """Layer YAML files (later wins, e.g. ``params.yaml`` then ``configs/tiny.yaml``) and ``key=value`` overrides."""
    merged: dict[str, Any] = {}
    for path in paths:
        merged = _deep_merge(merged, _read_yaml(Path(path)))
    for item in overrides:
        merged = _deep_merge(merged, _parse_override(item))
    return config_from_dict(merged, source=" + ".join(str(p) for p in paths) or "config")


def dump_config(config: BaseModel) -> str:
    """YAML text of a config tree (the format of ``params.yaml``)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
