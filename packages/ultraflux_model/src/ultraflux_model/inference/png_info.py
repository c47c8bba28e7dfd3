"""The generation settings inside the PNG itself: the ``parameters`` text chunk that AUTOMATIC1111, Forge, ComfyUI's
readers, Civitai and most image viewers read (prompt, steps, guidance, seed, size, model hash), beside our JSON
sidecar. One writer for every PNG our generator saves (``ultraflux generate``, the Studio, the evaluation grid).

The text follows A1111's layout: the prompt, then one line of ``Key: value`` pairs. FLUX-family guidance is
distilled (a model input, not classifier-free guidance), so it is written as Forge writes FLUX images:
``CFG scale: 1, Distilled CFG Scale: <guidance>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

PARAMETERS = "parameters"  # the chunk's keyword, as A1111 writes it
MODEL_HASH_CHARS = 10  # A1111's short model hash: the first 10 hex of the sha256


def model_name(model: str) -> str:
    """What the ``Model:`` field shows: a registry/hub reference as it is, a local path by its last component (no
    machine path inside a shared image)."""
    if "://" in model or model.startswith(("models:/", "runs:/")) or not ("/" in model or "\\" in model):
        return model
    path = Path(model)
    return path.name if path.is_absolute() or path.exists() else model


def parameters_text(sidecar: Mapping[str, Any]) -> str:
    """The A1111-style ``parameters`` text of one image from its sidecar (``prompt``, ``steps``, ``guidance``,
    ``seed``, ``width``, ``height``, ``model_hash``, ``model``, ``shift``)."""
    pairs = [
        ("Steps", sidecar["steps"]),
        ("Sampler", "Euler"),
        ("Schedule type", "Simple"),
        ("CFG scale", 1),
        ("Distilled CFG Scale", f"{float(sidecar['guidance']):g}"),
        ("Seed", sidecar["seed"]),
        ("Size", f"{sidecar['width']}x{sidecar['height']}"),
        ("Model hash", str(sidecar.get("model_hash", ""))[:MODEL_HASH_CHARS]),
        ("Model", model_name(str(sidecar.get("model", "")))),
        ("Shift", f"{float(sidecar.get('shift', 3.0)):g}"),
        ("Version", "UltraFlux"),
    ]
    # A comma or newline in a value would split A1111's key/value line: such values are quoted, as A1111 does.
    line = ", ".join(f"{k}: {_quoted(str(v))}" for k, v in pairs if v != "")
    return f"{sidecar['prompt']}\n{line}"


def _quoted(value: str) -> str:
    return '"' + value.replace('"', '\\"') + '"' if ("," in value or "\n" in value) else value


def png_info(sidecar: Mapping[str, Any]) -> PngImagePlugin.PngInfo:
    """The ``pnginfo`` for ``Image.save``: one ``parameters`` text chunk (UTF-8, iTXt when needed)."""
    info = PngImagePlugin.PngInfo()
    text = parameters_text(sidecar)
    if text.isascii():
        info.add_text(PARAMETERS, text)
    else:
        info.add_itxt(PARAMETERS, text)
    return info


def read_parameters(path: Path) -> str | None:
    """The ``parameters`` text of a PNG (``None`` when it has none)."""
    with Image.open(path) as image:
        value = image.info.get(PARAMETERS)
    return str(value) if value is not None else None
