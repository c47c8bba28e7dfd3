"""Request ceilings a served model enforces, so one request cannot exhaust the machine (pure, no model needed)."""

from __future__ import annotations

from ultraflux_model.config import check_image_size
from ultraflux_model.errors import UltraFluxError

DEFAULT_MAX_PIXELS = 5440 * 3072  # the largest 4K bucket (16.7 MP)
DEFAULT_MAX_IMAGES = 4


def check_request_limits(width: int, height: int, n_images: int, max_pixels: int, max_images: int) -> None:
    """Raise ``UltraFluxError`` unless ``n_images`` images of ``width`` × ``height`` fit the ceilings.

    Checks, in order: the image count, both sides positive multiples of 32 (the message names the nearest
    valid size), the pixels of one image.
    """
    if n_images < 1:
        raise UltraFluxError(f"a request must ask for at least 1 image, got {n_images}")
    if n_images > max_images:
        raise UltraFluxError(
            f"{n_images} images in one request exceeds the limit of {max_images}; send fewer rows per request"
        )
    check_image_size(width, height)
    if width * height > max_pixels:
        raise UltraFluxError(
            f"{width}x{height} is {width * height / 1e6:.1f} MP, over the limit of {max_pixels / 1e6:.1f} MP "
            "per image; choose a smaller size"
        )
