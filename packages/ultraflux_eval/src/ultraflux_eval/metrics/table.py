"""Every metric of the paper's table (and the weight-free detail metrics) in one registry.

Each entry says which backbone (upstream id) it runs, on what scale its numbers are, which pip extra it needs,
the paper's UltraFlux value at 4096² (Aesthetic-Eval@4096) and whether our number is comparable with it.
``ultraflux-eval metrics`` prints this table with the local weights' presence; ``docs/evaluation.md`` explains
each definition.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ultraflux_eval.errors import EvalError

Kind = Literal["weight-free", "distribution", "learned"]
PAPER_EXTRA_HINT = "pip install 'ultraflux-eval[paper]' && pip install --no-deps pyiqa==0.1.16"


@dataclass(frozen=True)
class MetricInfo:
    """One metric: how it is computed and where its network comes from."""

    name: str
    kind: Kind
    roles: tuple[str, ...]  # backbone roles of the weights manifest (empty for weight-free metrics)
    backbone: str  # upstream model id ("-" for weight-free)
    scale: str
    extra: str | None  # pip extra of ultraflux-eval that provides the code
    modules: tuple[str, ...]  # modules the extra must make importable
    higher_is_better: bool
    paper_4096: float | None  # UltraFlux at 4096x4096 in the paper's table
    comparable: str  # with the paper's number: "yes", "no: why", or "same definition, ..."


METRICS: dict[str, MetricInfo] = {m.name: m for m in (
    MetricInfo("glcm", "weight-free", (), "-", "bits (GLCM entropy, 64 levels)", None, (), True, None,
               "yes: Diffusion-4K's eval.py definition, exact"),
    MetricInfo("compression_ratio", "weight-free", (), "-", "raw bytes / JPEG-95 bytes", None, (), False, None,
               "yes: Diffusion-4K's eval.py definition, exact"),
    MetricInfo("shannon_entropy", "weight-free", (), "-", "bits, 0-8", None, (), True, None, "not in the table"),
    MetricInfo("flat_percentage", "weight-free", (), "-", "share 0-1", None, (), False, None, "not in the table"),
    MetricInfo("fid", "distribution", ("inception",), "torch-fidelity pt_inception-2015-12-05", "0-inf", None,
               ("torch_fidelity",), False, 143.11,
               "yes with real weights, legacy resize and the paper's reference set"),
    MetricInfo("patch_fid", "distribution", ("inception",), "torch-fidelity pt_inception-2015-12-05", "0-inf",
               None, ("torch_fidelity",), False, None, "not in UltraFlux's table (Diffusion-4K-style detail FID)"),
    MetricInfo("clip_score", "learned", ("clip",), "openai/clip-vit-base-patch16", "0-100", "learned",
               ("transformers",), True, 34.62,
               "yes with openai/clip-vit-base-patch16 (Diffusion-4K's script; UltraFlux publishes no eval code)"),
    MetricInfo("aesthetic", "learned", ("clip", "aesthetic_head"), "LAION improved-aesthetic-predictor (ViT-L/14)",
               "1-10", "learned", ("transformers",), True, None, "not in UltraFlux's table (Diffusion-4K's)"),
    MetricInfo("pickscore", "learned", ("pickscore",), "yuvalkirstain/PickScore_v1", "logit_scale x cos (~22)",
               "learned", ("transformers",), True, 22.69, "yes with real weights"),
    MetricInfo("hps", "learned", ("hps",), "HPSv2-style CLIP (HF layout)", "cos (~0.27)", "learned",
               ("transformers",), True, None, "no: HPSv2 convention, the paper reports HPSv3"),
    MetricInfo("musiq", "learned", ("musiq",), "pyiqa musiq_koniq_ckpt-e95806b9.pth", "0-100 (KonIQ MOS)", "paper",
               ("pyiqa",), True, 46.13, "yes with pyiqa's default KonIQ checkpoint (the paper names no variant)"),
    MetricInfo("hpsv3", "learned", ("hpsv3",), "MizzenAI/HPSv3 over Qwen/Qwen2-VL-7B-Instruct", "mu, ~0-15", "paper",
               ("transformers", "accelerate"), True, 11.47,
               "yes with real weights if the key mapping holds (checked on tiny models only; see docs)"),
    MetricInfo("qalign", "learned", ("qalign",), "q-future/one-align (mPLUG-Owl2, pyiqa's code)", "1-5", "paper",
               ("pyiqa", "icecream", "accelerate"), True, 4.85,
               "yes with real weights, quality task (checked on tiny models only; see docs)"),
    MetricInfo("artimuse", "learned", ("artimuse",), "Thunderbolt215215/ArtiMuse (InternVL3-8B layout)", "0-100",
               "paper", ("transformers", "accelerate"), True, 68.36,
               "yes with real weights if the key mapping holds (checked on tiny models only; see docs)"),
)}


def metric_info(name: str) -> MetricInfo:
    if name not in METRICS:
        raise EvalError(f"unknown metric {name!r}; known: {sorted(METRICS)}")
    return METRICS[name]


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


def weights_status(info: MetricInfo, weights_dir: Path) -> str:
    """``n/a`` (weight-free), ``present`` (every manifest file of its roles exists; not re-hashed here),
    or ``missing: ...``."""
    if not info.roles:
        return "n/a"
    from ultraflux_eval.backbones import MANIFEST, read_manifest, role_files

    if not (Path(weights_dir) / MANIFEST).is_file():
        return "missing: no manifest"
    manifest = read_manifest(weights_dir)
    absent = [r for r in info.roles if r not in manifest.get("backbones", {}) or not role_files(manifest, r)]
    if absent:
        return f"missing: {', '.join(absent)}"
    files = [f for r in info.roles for f in role_files(manifest, r)]
    gone = [f for f in files if not (Path(weights_dir) / f).is_file()]
    return f"missing: {len(gone)} files" if gone else "present"
