"""The networks a set of metrics needs, in one container: tiny stand-ins built offline (CI, demos) or real weights
from the local weights folder, sha256-verified first (never downloaded). Which backbone a metric needs and how each
one loads is the registry's (:mod:`ultraflux_eval.backbones.registry`); this module only walks it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ultraflux_eval.backbones.artimuse import ArtiMuseScorer
from ultraflux_eval.backbones.clip import AestheticHead, ClipBundle
from ultraflux_eval.backbones.hpsv3 import HPSv3Scorer
from ultraflux_eval.backbones.qalign import QAlignScorer
from ultraflux_eval.backbones.registry import BACKBONES, needed_roles
from ultraflux_eval.backbones.weights import read_manifest, verify_weights
from ultraflux_eval.errors import EvalError
from ultraflux_eval.metrics.inception import INPUT_SIDE, RESIZE_MODES


@dataclass
class Backbones:
    """The networks a set of metrics needs, one field per row of the backbone registry (those not needed stay
    None), plus how whole images reach the FID extractor."""

    clip: ClipBundle | None = None
    aesthetic_head: AestheticHead | None = None
    pickscore: ClipBundle | None = None
    hps: ClipBundle | None = None
    inception: nn.Module | None = None
    fid_size: int = 64  # the extractor's input side
    tiny: bool = True
    fid_resize: str = "antialias"  # how whole images reach fid_size: antialias (tiny), legacy/clean/d4k (Inception)
    musiq: nn.Module | None = None
    hpsv3: HPSv3Scorer | None = None
    qalign: QAlignScorer | None = None
    artimuse: ArtiMuseScorer | None = None

    def require(self, role: str) -> object:
        value = getattr(self, role)
        if value is None:
            raise EvalError(f"backbone {role!r} was not loaded; load_backbones(...) with the metric that needs it")
        return value


def tiny_backbones(metrics: Iterable[str], seed: int = 0, fid_size: int = 64) -> Backbones:
    """Random tiny networks for the backbones ``metrics`` need; backbones of one architecture get their own seeds
    (``seed_offset``)."""
    roles = set(needed_roles(metrics))
    out = Backbones(fid_size=fid_size, tiny=True)
    for backbone in BACKBONES.values():  # registry order: the stand-ins are built as they always were
        if backbone.name in roles:
            setattr(out, backbone.name, backbone.tiny(seed=seed + backbone.seed_offset))
    return out


def local_backbones(
    weights_dir: Path, metrics: Iterable[str], fid_size: int = 299, fid_resize: str = "legacy"
) -> Backbones:
    """Verify (sha256) then load the backbones ``metrics`` need from ``weights_dir``; never downloads.

    FID always runs the standard Inception at 299 (``fid_size`` is ignored with real weights);
    ``fid_resize`` is ``legacy`` (torch-fidelity), ``clean`` (clean-fid) or ``d4k`` (Diffusion-4K).
    """
    if fid_resize not in RESIZE_MODES:
        raise EvalError(f"fid resize must be one of {list(RESIZE_MODES)}, got {fid_resize!r}")
    del fid_size  # the standard network's input side is fixed
    weights_dir = Path(weights_dir)
    roles = needed_roles(metrics)
    verify_weights(weights_dir, roles)
    targets = read_manifest(weights_dir)["backbones"]
    out = Backbones(fid_size=INPUT_SIDE, tiny=False, fid_resize=fid_resize)
    for role in roles:
        setattr(out, role, BACKBONES[role].load(weights_dir / targets[role]))
    return out


def backbones_from_config(
    source: str, weights_dir: Path, metrics: Iterable[str], fid_size: int, fid_resize: str = "legacy"
) -> Backbones:
    """``tiny`` → :func:`tiny_backbones`; ``local`` → :func:`local_backbones` (sha256-verified, offline)."""
    if source == "tiny":
        return tiny_backbones(metrics, fid_size=fid_size)
    if source == "local":
        return local_backbones(weights_dir, metrics, fid_size=fid_size, fid_resize=fid_resize)
    raise EvalError(f"eval.backbones.source must be 'tiny' or 'local', got {source!r}")
