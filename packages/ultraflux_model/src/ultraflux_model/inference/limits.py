"""The one request guard every entry point shares (``ultraflux generate``, the web app, the served pyfunc model, and
:func:`ultraflux_model.inference.pipeline.generate` itself, so a new front-end cannot skip it): pure, no model needed.

Bounds (docs/app.md, "Request limits"): steps 1 … ``serve.max_steps``; guidance finite in 0 … ``MAX_GUIDANCE``;
shift finite and positive; seeds 0 … 2**63-1 for every image of the request; prompts not blank; sizes positive
multiples of 32 and at most ``serve.max_pixels``; at most ``serve.max_images`` images per server request (a batch
run of the CLI checks everything but that count); a LoRA adapter only by a name the server lists, its scale finite
within ±``MAX_LORA_SCALE``. Each refusal is an ``UltraFluxError`` whose one-line
message names the parameter and its allowed range.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from dataclasses import dataclass

from ultraflux_core.errors import UltraFluxError

from ultraflux_model.config import (
    MAX_GUIDANCE,
    MAX_SEED,
    ServeConfig,
    check_image_size,
    check_lora_scale,
    nearest_valid_size,
)


@dataclass(frozen=True)
class Settings:
    """The per-request sampling settings, validated (plain ``int``/``float``, whatever the caller sent)."""

    steps: int
    guidance: float
    seed: int
    shift: float


def whole_number(name: str, value: object) -> int:
    """``value`` as an ``int`` when it is an exact whole number (``np.int64``, ``3.0``), else ``UltraFluxError``."""
    # bool is an int subclass, and numpy/pandas hand over np.int64 / whole floats: accept exact integers only.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UltraFluxError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if not math.isfinite(float(value)) or float(value) != int(value):
        raise UltraFluxError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise UltraFluxError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_settings(limits: ServeConfig, *, steps: object, guidance: object, seed: object, shift: object = 3.0,
                   images: int = 1) -> Settings:  # fmt: skip
    """``Settings`` for a request of ``images`` images (seeds ``seed … seed+images-1``), or ``UltraFluxError``."""
    n = whole_number("steps", steps)
    if not 1 <= n <= limits.max_steps:
        raise UltraFluxError(
            f"steps must be between 1 and {limits.max_steps} (serve.max_steps), got {n}; the official default is 50"
        )
    g = _finite("guidance", guidance)
    if not 0.0 <= g <= MAX_GUIDANCE:
        raise UltraFluxError(f"guidance must be between 0 and {MAX_GUIDANCE:g}, got {g:g}; the official default is 4")
    s = _finite("shift", shift)
    if s <= 0.0:
        raise UltraFluxError(f"shift must be a positive number, got {s:g}; the official value is 3")
    first = whole_number("seed", seed)
    last = first + max(images, 1) - 1
    if first < 0 or last > MAX_SEED:
        span = "seed" if images <= 1 else f"seeds {first} … {last} (seed + image index)"
        raise UltraFluxError(f"{span} must lie between 0 and 2**63-1 = {MAX_SEED}, got {first}")
    return Settings(steps=n, guidance=g, seed=first, shift=s)


def check_prompts(prompts: list[str]) -> None:
    """Raise ``UltraFluxError`` unless there is at least one prompt and none is blank."""
    if not prompts:
        raise UltraFluxError("no prompt given: describe the image to generate (--prompt or generate.prompts)")
    blank = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if blank:
        which = "the prompt is" if len(prompts) == 1 else f"prompt {blank[0] + 1} of {len(prompts)} is"
        raise UltraFluxError(f"{which} empty: describe the image to generate")


def check_sizes(limits: ServeConfig, sizes: list[tuple[int, int]]) -> None:
    """Raise ``UltraFluxError`` unless each ``(width, height)`` has sides that are positive multiples of 32 and at
    most ``limits.max_pixels`` pixels; each message names the nearest size that is accepted."""
    for width, height in sizes:
        check_image_size(width, height, limits.max_pixels)
        if width * height > limits.max_pixels:
            w, h = nearest_valid_size(width, height, limits.max_pixels)
            raise UltraFluxError(
                f"{width}x{height} is {width * height / 1e6:.1f} MP, over the limit of "
                f"{limits.max_pixels / 1e6:.1f} MP per image (serve.max_pixels); choose a smaller size, e.g. {w}x{h} "
                "at the same aspect ratio"
            )


def check_request(limits: ServeConfig, sizes: list[tuple[int, int]], images: int = 1) -> None:
    """Raise ``UltraFluxError`` unless every ``(width, height)`` is valid and within ``limits``.

    ``images`` is how many images the request makes (e.g. ``len(sizes) × images per size``). Checks, in order:
    the count, then :func:`check_sizes`. The sampling settings are :func:`check_settings`'s, the prompts
    :func:`check_prompts`'.
    """
    if images < 1:
        raise UltraFluxError(f"a request must ask for at least 1 image, got {images}")
    if images > limits.max_images:
        raise UltraFluxError(
            f"{images} images per request exceeds the limit of {limits.max_images} (serve.max_images); "
            "ask for fewer or raise the limit"
        )
    check_sizes(limits, sizes)


def check_lora(known: Collection[str], name: object, scale: object = 1.0) -> tuple[str | None, float]:
    """``(adapter name or None, scale)`` of a request's LoRA choice, or ``UltraFluxError``.

    ``name`` must be one of ``known`` (the adapters the server loaded at start), never a path: a client's text does
    not reach the filesystem, and a refusal lists the known names instead of echoing it. None or "" is no adapter.
    """
    if name is None or name == "":
        return None, 1.0
    if not isinstance(name, str) or name not in known:
        choices = ", ".join(sorted(known))
        raise UltraFluxError("unknown LoRA adapter: " + (f"choose one of the {len(known)} this server lists ({choices})"
                                                         if known else "this server was started without adapters"))
    return name, check_lora_scale(scale, "lora_scale")
