"""Latent packing and position ids of the Flux token layout (pure functions).

F16 VAE latents ``[B, 16, H/16, W/16]`` are packed 2×2 into tokens of 64 channels: an image of H×W
pixels becomes (H/32)·(W/32) tokens, token ``n = r·w + c`` (row-major) with id ``(0, r, c)``.
"""

from __future__ import annotations

import torch

from ultraflux_model.config import TOKEN_PX, check_image_size


def latent_hw(width: int, height: int, vae_factor: int = 16) -> tuple[int, int]:
    """Latent (height, width) for an image size; raises a clear error unless both sides are multiples of 32."""
    check_image_size(width, height)
    return height // vae_factor, width // vae_factor


def token_grid(width: int, height: int) -> tuple[int, int]:
    """Transformer token grid (rows, cols) of an image size."""
    check_image_size(width, height)
    return height // TOKEN_PX, width // TOKEN_PX


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → ``[B, (h/2)(w/2), 4C]`` (2×2 patches, channel-major inside a patch, as Flux)."""
    b, c, h, w = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2, got {h}x{w}")
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``[B, (h/2)(w/2), 4C]`` → ``[B, C, h, w]``."""
    b, n, d = x.shape
    if n != (h // 2) * (w // 2):
        raise ValueError(f"{n} tokens do not form a {h // 2}x{w // 2} grid")
    x = x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(rows: int, cols: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[rows·cols, 3]`` float ids ``(0, r, c)`` in row-major token order."""
    r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(r), r, c], dim=-1).reshape(-1, 3).float()


def text_ids(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[length, 3]`` zeros: text tokens carry no position on any axis."""
    return torch.zeros(length, 3, device=device)
