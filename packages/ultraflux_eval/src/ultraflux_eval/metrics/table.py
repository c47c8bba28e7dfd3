"""The one metric table: every metric of the paper's table (and the weight-free detail metrics), once.

Each entry says which backbones (rows of :mod:`ultraflux_eval.backbones.registry`) it runs, the upstream model,
on what scale its numbers are, which pip extra it needs, the paper's UltraFlux value at 4096² (Aesthetic-Eval@4096)
and whether our number is comparable with it, and under which benchmark settings (``protocol``: the
``eval.benchmark`` keys and values the claim needs; :func:`protocol_mismatches` checks a benchmark against them).
Everything else that names metrics derives from it: the names ``eval.benchmark.metrics`` accepts
(:data:`MetricName`, in table order, which is the config schema's order), :data:`WEIGHT_FREE_METRICS`,
:data:`REFERENCE_METRICS`, :data:`SET_METRICS`, :data:`IMAGE_METRICS`, :data:`METRIC_ROLES` and the
``ultraflux-eval metrics`` listing (with the local weights' presence).
``docs/evaluation.md`` explains each definition.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from ultraflux_eval.errors import EvalError

Kind = Literal["weight-free", "distribution", "learned"]
# What one value scores: each image alone, each image against its prompt, or the whole set at once.
Scope = Literal["image", "prompt", "set"]
PAPER_EXTRA_HINT = "pip install 'ultraflux-eval[paper]' && pip install --no-deps pyiqa==0.1.16"


@dataclass(frozen=True)
class MetricInfo:
    """One metric: how it is computed and where its network comes from."""

    name: str
    kind: Kind
    roles: tuple[str, ...]  # backbones it runs: rows of the backbone registry (empty for weight-free metrics)
    backbone: str  # upstream model id ("-" for weight-free)
    scale: str
    extra: str | None  # pip extra of ultraflux-eval that provides the code
    modules: tuple[str, ...]  # modules the extra must make importable
    higher_is_better: bool
    paper_4096: float | None  # UltraFlux at 4096x4096 in the paper's table
    comparable: str  # with the paper's number: "yes", "no: why", or "same definition, ..."
    scope: Scope = "image"
    # eval.benchmark settings under which `comparable` holds, e.g. (("fid_resize", "d4k"),); empty: any
    protocol: tuple[tuple[str, str], ...] = ()


METRICS: dict[str, MetricInfo] = {m.name: m for m in (
    MetricInfo("glcm", "weight-free", (), "-", "bits (GLCM entropy, 64 levels)", None, (), True, None,
               "yes: Diffusion-4K's eval.py definition, exact"),
    MetricInfo("compression_ratio", "weight-free", (), "-", "raw bytes / JPEG-95 bytes", None, (), False, None,
               "yes: Diffusion-4K's eval.py definition, exact", scope="set"),
    MetricInfo("shannon_entropy", "weight-free", (), "-", "bits, 0-8", None, (), True, None, "not in the table"),
    MetricInfo("flat_percentage", "weight-free", (), "-", "share 0-1", None, (), False, None, "not in the table"),
    MetricInfo("clip_score", "learned", ("clip",), "openai/clip-vit-base-patch16", "0-100", "learned",
               ("transformers",), True, 34.62,
               "yes with openai/clip-vit-base-patch16 and torchmetrics' truncation of long prompts (Diffusion-4K's "
               "script calls torchmetrics' clip_score; UltraFlux publishes no eval code)",
               scope="prompt", protocol=(("clip_truncation", "torchmetrics"),)),
    MetricInfo("aesthetic", "learned", ("clip", "aesthetic_head"), "LAION improved-aesthetic-predictor (ViT-L/14)",
               "1-10", "learned", ("transformers",), True, None, "not in UltraFlux's table (Diffusion-4K's)"),
    MetricInfo("pickscore", "learned", ("pickscore",), "yuvalkirstain/PickScore_v1", "logit_scale x cos (~22)",
               "learned", ("transformers",), True, 22.69, "yes with real weights", scope="prompt"),
    MetricInfo("hps", "learned", ("hps",), "HPSv2-style CLIP (HF layout)", "cos (~0.27)", "learned",
               ("transformers",), True, None, "no: HPSv2 convention, the paper reports HPSv3", scope="prompt"),
    MetricInfo("fid", "distribution", ("inception",), "torch-fidelity pt_inception-2015-12-05", "0-inf", None,
               ("torch_fidelity",), False, 143.11,
               "yes with real weights, the d4k protocol (short side to the generation size, centre crop, then "
               "torchmetrics' Inception path) and the paper's reference set; legacy/clean squash non-square images",
               scope="set", protocol=(("fid_resize", "d4k"),)),
    MetricInfo("patch_fid", "distribution", ("inception",), "torch-fidelity pt_inception-2015-12-05", "0-inf",
               None, ("torch_fidelity",), False, None, "not in UltraFlux's table (Diffusion-4K-style detail FID)",
               scope="set"),
    MetricInfo("musiq", "learned", ("musiq",), "pyiqa musiq_koniq_ckpt-e95806b9.pth", "0-100 (KonIQ MOS)", "paper",
               ("pyiqa",), True, 46.13, "yes with pyiqa's default KonIQ checkpoint (the paper names no variant)"),
    MetricInfo("hpsv3", "learned", ("hpsv3",), "MizzenAI/HPSv3 over Qwen/Qwen2-VL-7B-Instruct", "mu, ~0-15", "paper",
               ("transformers", "accelerate"), True, 11.47,
               "yes with real weights if the key mapping holds (checked on tiny models only; see docs)",
               scope="prompt"),
    MetricInfo("qalign", "learned", ("qalign",), "q-future/one-align (mPLUG-Owl2, pyiqa's code)", "1-5", "paper",
               ("pyiqa", "icecream", "accelerate"), True, 4.85,
               "yes with real weights, quality task (checked on tiny models only; see docs)"),
    MetricInfo("artimuse", "learned", ("artimuse",), "Thunderbolt215215/ArtiMuse (InternVL3-8B layout)", "0-100",
               "paper", ("transformers", "accelerate"), True, 68.36,
               "yes with real weights if the key mapping holds (checked on tiny models only; see docs)"),
)}

SET_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS.values() if m.scope == "set")
# The no-reference image scorers (one score per image, no prompt): what the data filters can rank with.
IMAGE_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS.values() if m.kind == "learned" and m.scope == "image")

# Built from the table so that a name exists in one place; pydantic validates against it and lists the names in
# its error. `Literal[tuple]` is `Literal[a, b, ...]` at runtime (type checkers see a plain str here).
MetricName = Literal[tuple(METRICS)]  # type: ignore[valid-type]
WEIGHT_FREE_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS.values() if m.kind == "weight-free")
# need a reference image directory
REFERENCE_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS.values() if m.kind == "distribution")
METRIC_ROLES: dict[str, tuple[str, ...]] = {m.name: m.roles for m in METRICS.values() if m.roles}


def metric_info(name: str) -> MetricInfo:
    if name not in METRICS:
        raise EvalError(f"unknown metric {name!r}; known: {sorted(METRICS)}")
    return METRICS[name]


def protocol_mismatches(metrics: Iterable[str], settings: Mapping[str, object]) -> list[str]:
    """``metric: key=value (paper: value)`` for each metric of the paper's table whose comparability needs a
    benchmark setting (``protocol``) that ``settings`` (e.g. ``BenchmarkConfig.model_dump()``) does not have."""
    return [
        f"{name}: {key}={settings.get(key)} (comparable with the paper under {key}={value})"
        for name in metrics
        for key, value in metric_info(name).protocol
        if str(settings.get(key)) != value
    ]


def require_metric(name: str) -> MetricInfo:
    """The metric's entry, after checking that its extra's modules import."""
    info = metric_info(name)
    for module in info.modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            hint = PAPER_EXTRA_HINT if info.extra == "paper" else f"pip install 'ultraflux-eval[{info.extra}]'"
            raise EvalError(f"metric {name!r} needs the `{info.extra}` extra ({module} is missing): {hint}") from err
    return info

