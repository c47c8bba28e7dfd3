"""F16 VAE decoder post-training, the job: which images, the held-out before/after report, tracking.

The decoder trainer itself is the model's (``ultraflux_model.training.vae_decoder``); this job sits above the
model and metrics packages because it needs both. The starting VAE is any diffusers AutoencoderKL with stride 2
(``checkpoint.resolve.resolve_vae``: a folder, a checkpoint's ``vae/``, a hub id). Training images come from the
filter's ``vae`` subset (``<root>/subsets/vae.parquet``, the paper's least-flat selection) or a folder ranked by
the eval package's flatness score, each file counted once. The held-out images are a fixed manifest (paths +
sha256; given, or drawn once by seed and written) that never overlaps the training images; before and after
training they are reconstructed at native resolution and scored with the eval package's one implementation of
each metric (rFID on native-resolution crops with the standard Inception when ``backbones`` is a weights dir,
PSNR, SSIM, LPIPS). The result is a ``vae/`` folder that ``UltraFluxAutoencoderKL.from_pretrained`` loads, the
manifest, and a JSON report with its Markdown table.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.files import file_sha256
from ultraflux_core.tracking.config import TrackingConfig
from ultraflux_model.checkpoint.resolve import resolve_vae
from ultraflux_model.config import TOKEN_PX, VaeTrainConfig
from ultraflux_model.training.vae_decoder import (
    center_crop_to_tokens,
    decoder_trainable_vae,
    export_vae,
    reconstruct,
    to_model_range,
    to_uint8,
    train_decoder,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
HELDOUT_FILE = "heldout.json"  # the held-out manifest as the run used it, in vae_train.out
METRIC_LABELS = {"rfid": "rFID", "psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS"}


class SourceImage(NamedTuple):
    """One image file: where it is, its bytes' sha256, and its pixels ``[H, W, 3] uint8``."""

    path: Path
    sha256: str
    array: np.ndarray


@dataclass
class VaeReport:
    """Held-out reconstruction metrics of the starting VAE (``before``) and after training, the training losses,
    the held-out manifest they were measured on, and where the VAE went."""

    before: dict[str, float]
    after: dict[str, float]
    losses: list[float] = field(default_factory=list)
    export: Path = Path()
    start_vae: str = ""
    train_images: int = 0
    heldout_images: int = 0
    heldout_manifest: Path = Path()
    heldout: list[dict[str, object]] = field(default_factory=list)  # path, sha256, width, height per image
    skipped: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        """The before/after metrics as a Markdown table (also written as ``report.md``)."""
        rows = [f"| {METRIC_LABELS.get(k, k)} | {self.before[k]:.4f} | {self.after[k]:.4f} |" for k in self.before]
        return "\n".join([
            f"Held-out: {self.heldout_images} images at native resolution ({self.heldout_manifest}); "
            f"trained on {self.train_images} images.", "",
            "| metric | starting VAE | after training |", "|---|---|---|", *rows,
        ]) + "\n"



def _subset_paths(subset: Path) -> list[Path]:
    """Image files of a filter subset (``<root>/subsets/vae.parquet``): its ``path`` column, relative to the
    ingest folder next to ``subsets/`` (the data stages' layout), in the subset's order."""
    import pandas as pd

    frame = pd.read_parquet(subset)
    if "path" not in frame:
        raise UltraFluxError(f"{subset} has no `path` column: point vae_train.images at the filter's vae.parquet")
    ingest = subset.parent.parent / "ingest"
    return [Path(p) if Path(p).is_absolute() else ingest / p for p in frame["path"]]


def load_images(source: Path, min_side: int) -> tuple[list[SourceImage], dict[str, str]]:
    """Readable RGB images with both sides ≥ ``min_side``, each counted once; the rest with a reason.

    ``source``: the filter's ``vae`` subset parquet (the paper's least-flat selection), or a folder walked
    recursively. Files with the same bytes (an ingest root holds ``downloads/`` and ``images/`` copies of one
    picture) are counted once: the first in name order is kept, the others are skipped as duplicates.
    """
    from ultraflux_eval.errors import EvalError
    from ultraflux_eval.metrics.scores import load_rgb

    source = Path(source)
    if source.suffix == ".parquet" and source.is_file():
        paths = _subset_paths(source)
    elif source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise UltraFluxError(f"vae_train.images {source} is neither a folder of images nor a subset .parquet")
    images, skipped, seen = [], {}, {}
    for path in paths:
        try:
            digest = file_sha256(path)
        except OSError as err:
            skipped[str(path)] = f"unreadable: {err}"
            continue
        if digest in seen:
            skipped[str(path)] = f"duplicate of {seen[digest]}"
            continue
        seen[digest] = path
        try:
            array = load_rgb(path)
        except (EvalError, OSError, ValueError) as err:
            skipped[str(path)] = f"unreadable: {err}"
            continue
        if min(array.shape[:2]) < min_side:
            skipped[str(path)] = f"smaller than the {min_side}px crop"
            continue
        images.append(SourceImage(path, digest, array))
    return images, skipped


def read_heldout_manifest(path: Path) -> list[tuple[Path, str]]:
    """(path, sha256) of each held-out image listed in ``path``: JSON ``{"images": [{"path", "sha256"}, ...]}``,
    relative paths taken from the manifest's folder."""
    try:
        entries = json.loads(Path(path).read_text())["images"]
        listed = [(Path(e["path"]), str(e["sha256"])) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UltraFluxError(
            f"vae_train.heldout_manifest {path}: not a held-out manifest ({type(err).__name__}: {err}); expected "
            'JSON {"images": [{"path": ..., "sha256": ...}, ...]}'
        ) from err
    if not listed:
        raise UltraFluxError(f"vae_train.heldout_manifest {path} lists no images")
    return [(p if p.is_absolute() else Path(path).parent / p, digest) for p, digest in listed]


def write_heldout_manifest(path: Path, images: list[SourceImage]) -> Path:
    """Write the manifest of ``images`` to ``path`` (absolute paths, so a copy of it elsewhere still points at
    them), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [{"path": str(Path(img.path).resolve()), "sha256": img.sha256,
                "width": int(img.array.shape[1]), "height": int(img.array.shape[0])} for img in images]
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps({"images": entries}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load_heldout(listed: list[tuple[Path, str]]) -> list[SourceImage]:
    """The listed images, each checked against its recorded sha256 (a changed file would change the benchmark)."""
    from ultraflux_eval.errors import EvalError
    from ultraflux_eval.metrics.scores import load_rgb

    images = []
    for path, digest in listed:
        try:
            actual = file_sha256(path)
            array = load_rgb(path)
        except (EvalError, OSError, ValueError) as err:
            raise UltraFluxError(f"held-out image {path} cannot be read: {err}") from err
        if actual != digest:
            raise UltraFluxError(f"held-out image {path} has sha256 {actual}, the manifest records {digest}: the "
                                 "held-out set must not change; restore the file or write a new manifest")
        if min(array.shape[:2]) < TOKEN_PX:
            raise UltraFluxError(f"held-out image {path} is smaller than {TOKEN_PX}px on a side")
        images.append(SourceImage(path, digest, array))
    return images


def check_disjoint(train: list[SourceImage], heldout: list[SourceImage]) -> None:
    """Refuse training images that are held-out images (same bytes, or the same file)."""
    held = {img.sha256: img.path for img in heldout}
    held_paths = {Path(img.path).resolve() for img in heldout}
    overlap = [img.path for img in train if img.sha256 in held or Path(img.path).resolve() in held_paths]
    if overlap:
        raise UltraFluxError(
            f"{len(overlap)} training image(s) are in the held-out manifest (e.g. {overlap[0]}): held-out images "
            "must never be trained on; remove them from vae_train.images or use another heldout_manifest"
        )


def least_flat(arrays: list[np.ndarray], share: float, patch: int) -> list[int]:
    """Indices of the ``share`` of images with the lowest flat percentage (ties by index)."""
    from ultraflux_eval.metrics.scores import flat_percentage

    flatness = [flat_percentage(a, patch=patch) for a in arrays]
    keep = max(1, math.ceil(share * len(arrays) - 1e-9))
    return sorted(sorted(range(len(arrays)), key=lambda i: (flatness[i], i))[:keep])



RFID_CROPS_PER_IMAGE = 16  # native-resolution crops per held-out image for rFID (spread over the full-tile grid)


def rfid_native(originals: list[np.ndarray], recons: list[np.ndarray], extractor: torch.nn.Module,
                side: int) -> float:
    """rFID on native-resolution ``side×side`` crops (299 with the standard Inception: the crops reach it
    unresized, so 4K detail is compared instead of a 14× downscale); the same crop positions in both sets."""
    from ultraflux_eval.metrics.fidelity import frechet_distance, patch_inputs

    usable = [i for i, a in enumerate(originals) if min(a.shape[:2]) >= side]
    if not usable:
        raise UltraFluxError(f"rFID needs held-out images of at least {side}x{side} px; use larger images")
    real = patch_inputs([originals[i] for i in usable], side, RFID_CROPS_PER_IMAGE)
    fake = patch_inputs([recons[i] for i in usable], side, RFID_CROPS_PER_IMAGE)
    return frechet_distance(real, fake, extractor)


@torch.no_grad()
def reconstruction_metrics(vae: torch.nn.Module, arrays: list[np.ndarray], lpips_model: torch.nn.Module,
                           extractor: torch.nn.Module, fid_side: int, device: torch.device) -> dict[str, float]:
    """rFID (native-resolution crops), PSNR, SSIM and LPIPS of native-resolution reconstructions of ``arrays``."""
    from ultraflux_eval.metrics.fidelity import lpips_distance, psnr, ssim

    originals = [center_crop_to_tokens(a) for a in arrays]
    recons = [to_uint8(reconstruct(vae, to_model_range(a)[None].to(device))[0]) for a in originals]
    lpips_cpu = lpips_model.to("cpu")
    metrics = {
        "psnr": float(np.mean([psnr(a, b) for a, b in zip(originals, recons, strict=True)])),
        "ssim": float(np.mean([ssim(a, b) for a, b in zip(originals, recons, strict=True)])),
        "lpips": float(np.mean([lpips_distance(a, b, lpips_cpu) for a, b in zip(originals, recons, strict=True)])),
        "rfid": rfid_native(originals, recons, extractor, fid_side),
    }
    lpips_model.to(device)
    return metrics


def _lpips(cfg: VaeTrainConfig) -> torch.nn.Module:
    from safetensors.torch import load_file
    from ultraflux_eval.metrics.fidelity import build_lpips

    if cfg.lpips_alexnet is not None and not Path(cfg.lpips_alexnet).is_file():
        raise UltraFluxError(
            f"vae_train.lpips_alexnet {cfg.lpips_alexnet} does not exist (torchvision AlexNet state dict, safetensors)"
        )
    torch.manual_seed(cfg.seed)  # the random trunk (CI) is seeded
    model = build_lpips(load_file(str(cfg.lpips_alexnet)) if cfg.lpips_alexnet else None)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _fid_extractor(cfg: VaeTrainConfig) -> tuple[torch.nn.Module, int]:
    from ultraflux_eval.backbones.loading import local_backbones, tiny_backbones

    if cfg.backbones == "tiny":
        backbones = tiny_backbones(["fid"], seed=cfg.seed)
    else:
        backbones = local_backbones(Path(cfg.backbones), ["fid"])
    return backbones.require("inception"), backbones.fid_size



def split_heldout(images: list[SourceImage], cfg: VaeTrainConfig,
                  rng: np.random.Generator) -> tuple[list[SourceImage], list[SourceImage]]:
    """(training images, held-out images): the manifest's images and all of ``images`` (refused if they
    overlap), or without a manifest ``cfg.heldout`` images drawn by ``rng`` and the rest."""
    if cfg.heldout_manifest is not None:
        heldout = load_heldout(read_heldout_manifest(cfg.heldout_manifest))
        check_disjoint(images, heldout)
        if not images:
            raise UltraFluxError(f"{cfg.images} has no usable images (>= {cfg.crop}px) to train on")
        return images, heldout
    if len(images) < cfg.heldout + 1:
        raise UltraFluxError(
            f"{cfg.images} has {len(images)} usable images (≥ {cfg.crop}px), need more than vae_train.heldout="
            f"{cfg.heldout}; add images or lower heldout/crop"
        )
    order = rng.permutation(len(images)).tolist()
    return [images[i] for i in order[cfg.heldout :]], [images[i] for i in order[: cfg.heldout]]


def post_train_vae(cfg: VaeTrainConfig, tracking: TrackingConfig) -> VaeReport:
    """Post-train the decoder of the VAE ``cfg.model``; write ``cfg.out/vae``, the held-out manifest it was
    measured on (``heldout.json``) and ``report.json`` / ``report.md`` (before/after on that manifest)."""
    from ultraflux_core.tracking.runs import Tracker, flatten
    from ultraflux_core.tracking.uri import check_tracking_reachable

    out = Path(cfg.out)
    uri = tracking.resolve_uri(out)
    check_tracking_reachable(uri, tracking.check_timeout_s)
    start = resolve_vae(cfg.model, uri)  # first, so a VAE whose stride is not 2 is refused before any work
    images, skipped = load_images(cfg.images, cfg.crop)
    rng = np.random.default_rng(cfg.seed)
    pool, heldout = split_heldout(images, cfg, rng)
    # the filter's vae subset is already the least-flat selection: rank again only for a plain folder
    share = 1.0 if Path(cfg.images).suffix == ".parquet" else cfg.least_flat
    train_arrays = [pool[i].array for i in least_flat([img.array for img in pool], share, cfg.flat_patch)]

    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    vae = decoder_trainable_vae(start, device)
    lpips_model = _lpips(cfg).to(device)
    extractor, fid_side = _fid_extractor(cfg)

    out.mkdir(parents=True, exist_ok=True)
    manifest = write_heldout_manifest(out / HELDOUT_FILE, heldout)
    arrays = [img.array for img in heldout]
    tracker = Tracker(uri, tracking.experiment, active=True, artifact_dir=out / "mlartifacts")
    tracker.start(f"vae-post/{out.name}", tags={"component": "vae", "images": str(cfg.images),
                                                "start_vae": str(start)})
    tracker.log_params({**flatten({"vae_train": cfg.model_dump(mode="json")}),
                        "heldout_manifest_sha256": file_sha256(manifest), "heldout_images": len(heldout)})
    try:
        tracker.log_artifact(manifest)
        vae.eval()
        before = reconstruction_metrics(vae, arrays, lpips_model, extractor, fid_side, device)
        tracker.log_metrics({f"before/{k}": v for k, v in before.items()}, step=0)
        losses = train_decoder(vae, train_arrays, lpips_model, cfg, rng,
                               on_step=lambda step, parts: tracker.log_metrics(parts, step=step))
        after = reconstruction_metrics(vae, arrays, lpips_model, extractor, fid_side, device)
        tracker.log_metrics({f"after/{k}": v for k, v in after.items()}, step=cfg.steps)
        export = export_vae(vae, out / "vae")
        report = VaeReport(
            before=before, after=after, losses=losses, export=export, start_vae=str(start),
            train_images=len(train_arrays), heldout_images=len(heldout), heldout_manifest=manifest,
            heldout=[{"path": str(img.path), "sha256": img.sha256, "width": int(img.array.shape[1]),
                      "height": int(img.array.shape[0])} for img in heldout],
            skipped=skipped,
        )
        report_path = out / "report.json"
        report_path.write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
        (out / "report.md").write_text(report.table())
        tracker.log_artifact(report_path)
        tracker.log_artifact(out / "report.md")
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("FAILED")
        raise
    return report
