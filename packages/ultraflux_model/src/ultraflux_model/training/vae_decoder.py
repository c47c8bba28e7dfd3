"""F16 VAE decoder post-training, the model side: the encoder frozen, the decoder tuned for detail.

loss = w_l2·MSE(x̂, x) + w_wavelet·L1(high-frequency Haar sub-bands of x̂ and x) + w_lpips·perceptual(x̂, x)

on random square crops, AdamW; the latents are the frozen encoder's posterior means, so only the decoder moves.
The perceptual network (LPIPS) arrives as an argument. Choosing the images (the least-flat share), the held-out
before/after reconstruction report and its tracking are the job above the model and metrics packages
(``ultraflux_data.vae_post``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import trange

from ultraflux_model.config import TOKEN_PX, VaeTrainConfig
from ultraflux_model.diffusion.losses import haar_dwt2


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


def export_vae(vae: torch.nn.Module, out: Path) -> Path:
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def decoder_trainable_vae(vae_dir: Path, device: torch.device) -> torch.nn.Module:
    """The F16 VAE of ``vae_dir`` (a diffusers AutoencoderKL folder, ``checkpoint.resolve.resolve_vae``) in float32
    with only the decoder trainable (``post_quant_conv`` is absent in the F16 VAE: the decoder is all that trains)."""
    from ultraflux_model.vae.autoencoder import UltraFluxAutoencoderKL

    vae = UltraFluxAutoencoderKL.from_pretrained(Path(vae_dir), torch_dtype=torch.float32).to(device)
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    return vae


def train_decoder(
    vae: torch.nn.Module, arrays: list[np.ndarray], perceptual: torch.nn.Module, cfg: VaeTrainConfig,
    rng: np.random.Generator, on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> list[float]:
    """``cfg.steps`` AdamW steps on random ``cfg.crop``² crops of ``arrays`` (uint8 ``[H, W, 3]``); returns the
    losses. ``on_step(step, parts)`` sees each step's loss parts (1-based step)."""
    device = next(vae.parameters()).device
    params = [p for p in vae.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    vae.train()
    losses = []
    for step in trange(cfg.steps, desc="vae decoder", unit="step"):
        x = random_crops(arrays, cfg.batch_size, cfg.crop, rng).to(device)
        loss, parts = decoder_loss(reconstruct(vae, x), x, perceptual, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(parts["loss"])
        if on_step is not None:
            on_step(step + 1, parts)
    vae.eval()
    return losses
