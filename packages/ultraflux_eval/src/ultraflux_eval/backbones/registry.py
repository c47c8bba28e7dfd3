"""The one table of backbones: per network of a learned metric, where its weights come from (pins for
``ultraflux-eval weights fetch``), how it loads from the local weights folder, and its tiny stand-in for CI.

The metric table (:mod:`ultraflux_eval.metrics.table`) names each metric's backbones by the ``name`` of a row
here; that name is also the backbone's key under ``backbones:`` in the weights ``manifest.yaml`` and its field of
:class:`~ultraflux_eval.backbones.loading.Backbones`. Adding a learned metric: a module with its loader and tiny
stand-in, a row here, a row in the metric table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ultraflux_eval.backbones.artimuse import load_artimuse, tiny_artimuse
from ultraflux_eval.backbones.clip import (
    CLIP_TOKENIZER_FILES,
    load_aesthetic_head,
    load_clip,
    tiny_aesthetic_head,
    tiny_clip,
)
from ultraflux_eval.backbones.hpsv3 import load_hpsv3, tiny_hpsv3
from ultraflux_eval.backbones.iqa import load_musiq, tiny_musiq
from ultraflux_eval.backbones.qalign import load_qalign, tiny_qalign
from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics.inception import TinyFeatureExtractor, load_standard_inception
from ultraflux_eval.metrics.table import METRIC_ROLES


@dataclass(frozen=True)
class Pin:
    """One source of a backbone's files: where they come from and which files make it up."""

    role: str  # the backbone (row of BACKBONES) these files belong to
    kind: str  # "hf" (Hugging Face repo) or "url" (release asset; `repo` is the URL folder)
    repo: str
    files: tuple[str, ...]
    revision: str | None  # HF commit / release tag; None = not pinned yet
    dest: str  # file or folder of the weights dir the role loads
    sha256: tuple[tuple[str, str], ...] = ()  # (file, full sha256) where known
    optional: tuple[str, ...] = ()  # files taken when the repo has them (tokenizer variants differ between repos)
    # a sharded checkpoint: the first of these index files the repo has; every shard its weight_map names is fetched
    index: tuple[str, ...] = ()

    def target(self, name: str) -> str:
        """Where ``name`` lands in the weights dir."""
        return self.dest if len(self.files) == 1 and not self.dest.endswith("/") else f"{self.dest.rstrip('/')}/{name}"


@dataclass(frozen=True)
class Backbone:
    """One network: ``load(path)`` reads it from its file or folder of the weights dir (never downloads);
    ``tiny(seed=...)`` builds the stand-in; ``seed_offset`` gives backbones of one architecture (the three CLIPs)
    different random weights."""

    name: str
    load: Callable[[Path], object]
    tiny: Callable[..., object]
    pins: tuple[Pin, ...] = ()  # empty: no pinned source yet, placed by hand (`ultraflux-eval weights manifest`)
    seed_offset: int = 0


BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("clip", load_clip, tiny_clip, (
        # commit as pinned in public code that loads this model (the hub's history keeps it)
        Pin("clip", "hf", "openai/clip-vit-base-patch16", ("config.json", "model.safetensors", *CLIP_TOKENIZER_FILES),
            "57c216476eefef5ab752ec549e440a49ae4ae5f3", "clip/"),
    )),
    Backbone("aesthetic_head", load_aesthetic_head, tiny_aesthetic_head),
    Backbone("pickscore", load_clip, tiny_clip, (
        Pin("pickscore", "hf", "yuvalkirstain/PickScore_v1", ("config.json", "model.safetensors"), None, "pickscore/"),
        # PickScore's processor and tokenizer are those of the CLIP-H it was fine-tuned from
        Pin("pickscore", "hf", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", CLIP_TOKENIZER_FILES, None, "pickscore/"),
    ), seed_offset=1),
    Backbone("hps", load_clip, tiny_clip, seed_offset=2),
    Backbone("inception", load_standard_inception, TinyFeatureExtractor, (
        Pin("inception", "url", "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0",
            ("weights-inception-2015-12-05-6726825d.pth",), "v0.2.0",
            "inception/weights-inception-2015-12-05-6726825d.pth"),
    )),
    Backbone("musiq", load_musiq, tiny_musiq, (
        Pin("musiq", "hf", "chaofengc/IQA-PyTorch-Weights", ("musiq_koniq_ckpt-e95806b9.pth",), None,
            "musiq/musiq_koniq_ckpt-e95806b9.pth"),
    )),
    Backbone("hpsv3", load_hpsv3, tiny_hpsv3, (
        Pin("hpsv3", "hf", "MizzenAI/HPSv3", ("HPSv3.safetensors",), None, "hpsv3/"),
        # HPSv3's base: its config and processor (the weights come with HPSv3.safetensors)
        Pin("hpsv3", "hf", "Qwen/Qwen2-VL-7B-Instruct", ("config.json", "preprocessor_config.json", "tokenizer.json",
                                                          "tokenizer_config.json", "chat_template.json"), None,
            "hpsv3/"),
    ), seed_offset=3),
    Backbone("qalign", load_qalign, tiny_qalign, (
        # Q-Align's OneAlign (mPLUG-Owl2): LLaMA sentencepiece tokenizer, CLIP preprocessor, sharded weights
        Pin("qalign", "hf", "q-future/one-align", ("config.json", "preprocessor_config.json", "tokenizer_config.json"),
            None, "qalign/", optional=("tokenizer.model", "tokenizer.json", "special_tokens_map.json"),
            index=("model.safetensors.index.json", "pytorch_model.bin.index.json")),
    ), seed_offset=4),
    Backbone("artimuse", load_artimuse, tiny_artimuse, (
        # ArtiMuse (InternVL3-8B layout): Qwen2 tokenizer with the <img>/<IMG_CONTEXT> tokens, safetensors shards
        Pin("artimuse", "hf", "Thunderbolt215215/ArtiMuse", ("config.json", "tokenizer_config.json"), None,
            "artimuse/", optional=("tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json",
                                   "special_tokens_map.json"),
            index=("model.safetensors.index.json",)),
    ), seed_offset=5),
)}
ROLES: tuple[str, ...] = tuple(BACKBONES)
PINS: tuple[Pin, ...] = tuple(pin for backbone in BACKBONES.values() for pin in backbone.pins)


def needed_roles(metrics: Iterable[str]) -> list[str]:
    """The backbones ``metrics`` need, sorted (names without backbones, e.g. injected scorers, need none)."""
    return sorted({role for metric in metrics for role in METRIC_ROLES.get(metric, ())})


def pins_for(metrics: Iterable[str] | None, pins: Iterable[Pin] = PINS) -> list[Pin]:
    """Pins (of ``pins``) of the backbones ``metrics`` need (every pin when None)."""
    pins = list(pins)
    if metrics is None:
        return pins
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRIC_ROLES]
    if unknown:
        raise EvalError(f"no downloadable backbone for {unknown}; metrics with weights: {sorted(METRIC_ROLES)}")
    roles = set(needed_roles(metrics))
    missing = sorted(roles - {p.role for p in pins})
    if missing:
        raise EvalError(f"no pinned source for backbones {missing}: place their files by hand and run "
                        "`ultraflux-eval weights manifest`")
    return [p for p in pins if p.role in roles]
