"""The ``eval`` section of the config tree (``params.yaml: eval``).

Owned here because the eval package must not import ``ultraflux_model``; the root ``UltraFluxConfig`` imports
:class:`EvalConfig` as its ``eval`` field. The promotion rule (``eval.promotion``) is the registry's, so its section
lives with the registry in ``ultraflux_core.tracking.config``; metric names come from the metric table
(``ultraflux_eval.metrics.table``). Defaults are the tiny CPU values; ``configs/4k.yaml`` sets the
Aesthetic-Eval@4096 sizes (see ``docs/evaluation.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from ultraflux_core.config import Section, apply_override, deep_merge, parse_override, read_yaml, validate
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.tracking.config import PromotionConfig
from ultraflux_core.tracking.uri import DEMO_STORE, default_tracking_uri

from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics.table import MetricName

EVAL_STORE = DEMO_STORE  # the demo's SQLite file (under the working directory) when no tracking URI is set


class AspectSize(Section):
    """One benchmark resolution: a name for tables and metric keys (``clip_score/16:9``) and the pixel size."""

    name: str = Field(pattern=r"^[0-9.]+:[0-9.]+$")
    width: int = Field(ge=1)
    height: int = Field(ge=1)


TINY_ASPECTS = (
    AspectSize(name="1:1", width=128, height=128),
    AspectSize(name="16:9", width=224, height=128),
    AspectSize(name="2:1", width=256, height=128),
    AspectSize(name="1:2", width=128, height=256),
    AspectSize(name="2.39:1", width=320, height=128),
)


class BenchmarkConfig(Section):
    """The protocol: prompts × aspect ratios × seeds, and which metrics to compute."""

    name: str = "aesthetic-eval-tiny"
    prompts: tuple[str, ...] = (
        "a red fox in fresh snow, golden hour, 4k photograph",
        "a lighthouse on a cliff above a stormy sea, wide panorama",
        "a bowl of ramen on a wooden table, studio lighting",
    )
    prompts_file: Path | None = Field(None, description="one prompt per line; replaces `prompts` when set")
    aspect_ratios: tuple[AspectSize, ...] = TINY_ASPECTS
    seeds: tuple[int, ...] = (0,)
    seed_policy: Literal["fixed", "per_prompt"] = Field(
        "fixed", description="fixed: every prompt of a seed's grid uses that seed (the official inference and "
        "Diffusion-4K: seed 0 for all); per_prompt: prompt k uses seed + k")
    metrics: tuple[MetricName, ...] = (
        "glcm",
        "compression_ratio",
        "shannon_entropy",
        "flat_percentage",
        "clip_score",
        "aesthetic",
        "pickscore",
    )  # fid / patch_fid also need reference_dir (configs/4k.yaml sets both)
    reference_dir: Path | None = Field(None, description="real images for FID / patch-FID (skipped when unset)")
    fid_size: int = Field(64, ge=16, description="side the whole image is resized to for FID (299 for Inception)")
    patch_size: int = Field(64, ge=16, description="native-resolution crop side for patch-FID (299 at 4K)")
    patches_per_image: int = Field(4, ge=1, description="non-overlapping crops per image for patch-FID")
    grid_columns: int = Field(4, ge=1, description="columns of the per-aspect image grid")
    fid_resize: Literal["legacy", "clean", "d4k"] = Field(
        "legacy", description="how whole images reach the standard Inception's 299x299: legacy (squash the whole "
        "image, TF-1 bilinear: torch-fidelity), clean (squash, clean-fid: PIL bicubic per channel in float) or d4k "
        "(Diffusion-4K's protocol: short side to fid_crop_size, centre crop, then legacy; comparable with the paper)")
    fid_crop_size: int = Field(
        4096, ge=16, description="d4k only: the generation size each image's short side is resized to and "
        "centre-cropped at (Diffusion-4K's --size; 4096 for Aesthetic-Eval@4096)")
    clip_truncation: Literal["torchmetrics", "tokenizer"] = Field(
        "torchmetrics", description="clip_score's text input: torchmetrics (tokenize in full, keep the first 77 "
        "ids, as torchmetrics' clip_score and so Diffusion-4K's script do: comparable with the paper) or "
        "tokenizer (the tokenizer truncates to 77 and keeps its end-of-text token)")

    @field_validator("aspect_ratios")
    @classmethod
    def _unique_aspects(cls, aspects: tuple[AspectSize, ...]) -> tuple[AspectSize, ...]:
        names = [a.name for a in aspects]
        if not aspects or len(set(names)) != len(names):
            raise ValueError(f"aspect_ratios needs at least one entry and unique names, got {names}")
        return aspects

    @field_validator("seeds")
    @classmethod
    def _some_seeds(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        if not seeds:
            raise ValueError("seeds needs at least one seed")
        return seeds


class BackbonesConfig(Section):
    """Where the learned metrics get their networks.

    ``tiny``: small random networks built offline with fixed seeds (CI, demos); numbers are not comparable with
    the paper. ``local``: real weights from ``weights_dir`` as listed (with sha256) in its ``manifest.yaml``;
    nothing is ever downloaded.
    """

    source: Literal["tiny", "local"] = "tiny"
    weights_dir: Path = Path("storage/eval-weights")
    device: str = "cpu"
    batch_size: int = Field(8, ge=1)


class TrackingConfig(Section):
    """MLflow endpoint. ``tracking_uri`` unset: ``$MLFLOW_TRACKING_URI``, else the demo's store
    ``sqlite:///<cwd>/artifacts/mlflow.db`` (read lazily)."""

    tracking_uri: str | None = None
    experiment: str = "ultraflux-eval"
    connect_timeout_s: float = Field(5.0, gt=0, description="reachability check of an http(s) tracking server")

    def resolve_uri(self) -> str:
        """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the demo's store (``default_tracking_uri``)."""
        return default_tracking_uri(self.tracking_uri)


class EvalConfig(Section):
    """``params.yaml: eval``."""

    benchmark: BenchmarkConfig = BenchmarkConfig()
    backbones: BackbonesConfig = BackbonesConfig()
    tracking: TrackingConfig = TrackingConfig()
    promotion: PromotionConfig = PromotionConfig()

    @model_validator(mode="after")
    def _promotion_metric_is_logged(self) -> EvalConfig:
        metric = self.promotion.metric.split("/", 1)[0]
        if metric not in self.benchmark.metrics:
            raise ValueError(
                f"promotion.metric {self.promotion.metric!r} is not computed: add {metric!r} to "
                f"benchmark.metrics {list(self.benchmark.metrics)}"
            )
        return self


def load_eval_config(paths: Path | Sequence[Path] | None = None, overrides: Sequence[str] = ()) -> EvalConfig:
    """The ``eval`` section of ``params.yaml``-style files (or files holding only that section), layered in order,
    then ``key=value`` overrides relative to the section (``benchmark.seeds=[0,1]``, an ``eval.`` prefix allowed;
    values parsed as YAML), through the core loader's reader, merge, override parser and validation."""
    try:
        data: dict = {}
        for path in [paths] if isinstance(paths, (str, Path)) else list(paths or []):
            loaded = read_yaml(path)
            in_tree = "eval" in loaded or not set(loaded) <= set(EvalConfig.model_fields)
            data = deep_merge(data, loaded.get("eval", {}) if in_tree else loaded)
        defaults = EvalConfig().model_dump(mode="json") if overrides else {}
        for item in overrides:
            keys, value = parse_override(item)
            data = apply_override(data, keys[1:] if keys[0] == "eval" and len(keys) > 1 else keys, value, defaults)
        return validate(EvalConfig, data, "eval config", prefix="eval.")
    except UltraFluxError as err:  # the eval package's callers (and its CLI) handle its own type
        raise EvalError(str(err)) from err
