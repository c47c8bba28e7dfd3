"""F16 VAE decoder post-training (DESIGN §3): encoder frozen, decoder tuned for detail.

loss = w_l2·MSE(x̂, x) + w_wavelet·L1(high-frequency Haar sub-bands of x̂ and x) + w_lpips·LPIPS(x̂, x)

on random square crops of the least-flat share of the images (flat images teach the decoder nothing about
detail), AdamW. The latents are the frozen encoder's posterior means, so only the decoder moves. Before and
after training the held-out images are reconstructed at native resolution and scored with the eval
package's one implementation of each metric (rFID on native-resolution crops with the standard Inception when
``backbones`` is a weights dir, PSNR, SSIM, LPIPS). Training images come from the filter's ``vae`` subset
(``<root>/subsets/vae.parquet``) or a folder, each file counted once. The result is a ``vae/`` folder
that ``UltraFluxAutoencoderKL.from_pretrained`` loads, and a JSON report.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import trange

from ultraflux_core.tracking.config import TrackingConfig
from ultraflux_model.config import TOKEN_PX, VaeTrainConfig
from ultraflux_model.diffusion.losses import haar_dwt2
from ultraflux_model.errors import UltraFluxError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class VaeReport:
    """Held-out reconstruction metrics before/after, the training losses, and where the VAE went."""

    before: dict[str, float]
    after: dict[str, float]
    losses: list[float] = field(default_factory=list)
    export: Path = Path()
    train_images: int = 0
    heldout_images: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


def _subset_paths(subset: Path) -> list[Path]:
    """Image files of a filter subset (``<root>/subsets/vae.parquet``): its ``path`` column, relative to the
    ingest folder next to ``subsets/`` (the data stages' layout), in the subset's order."""
    import pandas as pd

    frame = pd.read_parquet(subset)
    if "path" not in frame:
        raise UltraFluxError(f"{subset} has no `path` column: point vae_train.images at the filter's vae.parquet")
    ingest = subset.parent.parent / "ingest"
    return [Path(p) if Path(p).is_absolute() else ingest / p for p in frame["path"]]


def load_images(source: Path, min_side: int) -> tuple[list[tuple[Path, np.ndarray]], dict[str, str]]:
    """Readable RGB images with both sides ≥ ``min_side``, each counted once; the rest with a reason.

    ``source``: the filter's ``vae`` subset parquet (the paper's least-flat selection), or a folder walked
    recursively. Files with the same bytes (an ingest root holds ``downloads/`` and ``images/`` copies of one
    picture) are counted once: the first in name order is kept, the others are skipped as duplicates.
    """
    import hashlib

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
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
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
        images.append((path, array))
    return images, skipped


def least_flat(arrays: list[np.ndarray], share: float, patch: int) -> list[int]:
    """Indices of the ``share`` of images with the lowest flat percentage (ties by index)."""
    from ultraflux_eval.metrics.scores import flat_percentage

    flatness = [flat_percentage(a, patch=patch) for a in arrays]
    keep = max(1, math.ceil(share * len(arrays) - 1e-9))
    return sorted(sorted(range(len(arrays)), key=lambda i: (flatness[i], i))[:keep])


def to_model_range(array: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` → float ``[3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 127.5 - 1.0


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """float ``[3, H, W]`` in [-1, 1] → uint8 ``[H, W, 3]``."""
    return ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def center_crop_to_tokens(array: np.ndarray) -> np.ndarray:
    """Centre crop to the largest size whose sides are multiples of 32 (what the VAE + packing accept)."""
    h, w = array.shape[:2]
    nh, nw = h - h % TOKEN_PX, w - w % TOKEN_PX
    top, left = (h - nh) // 2, (w - nw) // 2
    return array[top : top + nh, left : left + nw]


def random_crops(arrays: list[np.ndarray], count: int, side: int, rng: np.random.Generator) -> torch.Tensor:
    """``count`` random ``side²`` crops (image chosen uniformly, then the offset) → ``[count, 3, side, side]``."""
    crops = []
    for _ in range(count):
        array = arrays[int(rng.integers(len(arrays)))]
        top = int(rng.integers(array.shape[0] - side + 1))
        left = int(rng.integers(array.shape[1] - side + 1))
        crops.append(to_model_range(array[top : top + side, left : left + side]))
    return torch.stack(crops)


def reconstruct(vae: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Frozen-encoder posterior mean → decoder (full decode): ``[B, 3, H, W]`` → ``[B, 3, H, W]``."""
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    return vae.decode(z, mode="full").sample


def decoder_loss(recon: torch.Tensor, target: torch.Tensor, lpips_model: torch.nn.Module,
                 cfg: VaeTrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted post-training loss and its parts (images ``[B, 3, H, W]`` in [-1, 1])."""
    l2 = F.mse_loss(recon, target)
    c = target.shape[1]
    wavelet = F.l1_loss(haar_dwt2(recon)[:, c:], haar_dwt2(target)[:, c:])  # cH, cV, cD: detail only
    perceptual = lpips_model(recon, target).mean()
    total = cfg.w_l2 * l2 + cfg.w_wavelet * wavelet + cfg.w_lpips * perceptual
    parts = {"l2": l2, "wavelet": wavelet, "lpips": perceptual, "loss": total}
    return total, {name: float(value.detach()) for name, value in parts.items()}


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


def _export_vae(vae: torch.nn.Module, out: Path) -> Path:
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def post_train_vae(cfg: VaeTrainConfig, tracking: TrackingConfig) -> VaeReport:
    """Post-train the decoder of ``cfg.model``'s VAE; write ``cfg.out/vae`` and ``cfg.out/report.json``."""
    from ultraflux_core.tracking.runs import Tracker, flatten
    from ultraflux_core.tracking.uri import check_tracking_reachable
    from ultraflux_model.vae.autoencoder import UltraFluxAutoencoderKL

    out = Path(cfg.out)
    uri = tracking.resolve_uri(out)
    check_tracking_reachable(uri, tracking.check_timeout_s)
    images, skipped = load_images(cfg.images, cfg.crop)
    if len(images) < cfg.heldout + 1:
        raise UltraFluxError(
            f"{cfg.images} has {len(images)} usable images (≥ {cfg.crop}px), need more than vae_train.heldout="
            f"{cfg.heldout}; add images or lower heldout/crop"
        )
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(images)).tolist()
    heldout = [images[i][1] for i in order[: cfg.heldout]]
    pool = [images[i][1] for i in order[cfg.heldout :]]
    # the filter's vae subset is already the least-flat selection: rank again only for a plain folder
    share = 1.0 if Path(cfg.images).suffix == ".parquet" else cfg.least_flat
    train_arrays = [pool[i] for i in least_flat(pool, share, cfg.flat_patch)]

    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    from ultraflux_model.inference.pipeline import resolve_checkpoint

    base = resolve_checkpoint(cfg.model)  # a local folder, or a hub id fetched as safetensors only
    vae = UltraFluxAutoencoderKL.from_pretrained(base / "vae", torch_dtype=torch.float32).to(device)
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)  # post_quant_conv is absent in the F16 VAE; the decoder is all that trains
    vae.train()
    lpips_model = _lpips(cfg).to(device)
    extractor, fid_side = _fid_extractor(cfg)
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    out.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(uri, tracking.experiment, active=True, artifact_dir=out / "mlartifacts")
    tracker.start(f"vae-post/{out.name}", tags={"component": "vae", "images": str(cfg.images)})
    tracker.log_params(flatten({"vae_train": cfg.model_dump(mode="json")}))
    try:
        vae.eval()
        before = reconstruction_metrics(vae, heldout, lpips_model, extractor, fid_side, device)
        tracker.log_metrics({f"before/{k}": v for k, v in before.items()}, step=0)
        vae.train()
        losses = []
        for step in trange(cfg.steps, desc="vae decoder", unit="step"):
            x = random_crops(train_arrays, cfg.batch_size, cfg.crop, rng).to(device)
            loss, parts = decoder_loss(reconstruct(vae, x), x, lpips_model, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(parts["loss"])
            tracker.log_metrics(parts, step=step + 1)
        vae.eval()
        after = reconstruction_metrics(vae, heldout, lpips_model, extractor, fid_side, device)
        tracker.log_metrics({f"after/{k}": v for k, v in after.items()}, step=cfg.steps)
        export = _export_vae(vae, out / "vae")
        report = VaeReport(before=before, after=after, losses=losses, export=export, train_images=len(train_arrays),
                           heldout_images=len(heldout), skipped=skipped)
        report_path = out / "report.json"
        report_path.write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
        tracker.log_artifact(report_path)
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("FAILED")
        raise
    return report
