"""The request guard every serving front-end shares (web app, served pyfunc model): pure, no model needed."""

from __future__ import annotations

from ultraflux_core.errors import UltraFluxError

from ultraflux_model.config import ServeConfig, check_image_size


def check_request(limits: ServeConfig, sizes: list[tuple[int, int]], images: int = 1) -> None:
    """Raise ``UltraFluxError`` unless every ``(width, height)`` is valid and within ``limits``.

    ``images`` is how many images the request makes (e.g. ``len(sizes) × images per size``). Checks, in order:
    the count, each side a positive multiple of 32 (the message names the nearest valid size), each image's
    pixel count.
    """
    if images < 1:
        raise UltraFluxError(f"a request must ask for at least 1 image, got {images}")
    if images > limits.max_images:
        raise UltraFluxError(
            f"{images} images per request exceeds the limit of {limits.max_images} (serve.max_images); "
            "ask for fewer or raise the limit"
        )
    for width, height in sizes:
        check_image_size(width, height)
        if width * height > limits.max_pixels:
            raise UltraFluxError(
                f"{width}x{height} is {width * height / 1e6:.1f} MP, over the limit of "
                f"{limits.max_pixels / 1e6:.1f} MP per image (serve.max_pixels); choose a smaller size"
            )
