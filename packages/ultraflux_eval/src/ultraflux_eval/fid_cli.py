"""``ultraflux-eval fid DIR_A DIR_B``: standard FID (or patch-FID) of two image folders, value on the last line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ultraflux_eval.errors import EvalError


def standard_fid(
    dir_a: Path,
    dir_b: Path,
    weights: Path,
    resize: str = "legacy",
    patch: bool = False,
    patch_size: int = 299,
    patches_per_image: int = 4,
    batch_size: int = 8,
    crop_size: int = 4096,
) -> float:
    """FID of the images of ``dir_a`` against ``dir_b`` with the standard Inception at ``weights``.

    ``resize``: ``legacy`` (squash to 299, torch-fidelity), ``clean`` (clean-fid) or ``d4k`` (Diffusion-4K: short
    side to ``crop_size``, centre crop, then ``legacy``; see :mod:`ultraflux_eval.metrics.inception`).

    ``patch``: native-resolution ``patch_size`` crops (:func:`~ultraflux_eval.metrics.fidelity.native_crops`) instead of
    whole resized images; 299 crops reach the network unresized.
    """
    from ultraflux_eval.metrics.fidelity import fid_inputs, frechet_distance, patch_inputs
    from ultraflux_eval.metrics.inception import INPUT_SIDE, RESIZE_MODES, load_standard_inception
    from ultraflux_eval.protocol.evaluate import list_images

    if resize not in RESIZE_MODES:
        raise EvalError(f"--resize must be one of {list(RESIZE_MODES)}, got {resize!r}")
    sets = []
    for folder in (dir_a, dir_b):
        images = list_images(folder)
        if len(images) < 2:
            raise EvalError(f"FID needs at least 2 images in {folder}, found {len(images)}")
        sets.append(images)
    extractor = load_standard_inception(weights)
    if patch:
        inputs = [patch_inputs(images, patch_size, patches_per_image) for images in sets]
    else:
        inputs = [fid_inputs(images, INPUT_SIDE, resize, crop_size) for images in sets]
    return frechet_distance(inputs[0], inputs[1], extractor, batch_size)


def _weights_from_manifest(weights_dir: Path) -> Path:
    from ultraflux_eval.backbones.weights import read_manifest, verify_weights

    verify_weights(weights_dir, ["inception"])
    return Path(weights_dir) / read_manifest(weights_dir)["backbones"]["inception"]


def fid_command(
    dir_a: Annotated[Path, typer.Argument(help="first image folder (e.g. the reference set)")],
    dir_b: Annotated[Path, typer.Argument(help="second image folder (e.g. generations)")],
    inception_weights: Annotated[Path | None, typer.Option(
        help="torch-fidelity Inception weights (weights-inception-2015-12-05-6726825d.pth); "
             "default: the `inception` entry of --weights-dir's manifest (sha256-verified)")] = None,
    weights_dir: Annotated[Path, typer.Option(help="folder with manifest.yaml")] = Path("storage/eval-weights"),
    resize: Annotated[str, typer.Option(metavar="legacy|clean|d4k",
        help="legacy (squash to 299: torch-fidelity), clean (clean-fid) or d4k (Diffusion-4K's protocol: short side "
             "to --crop-size, centre crop, then legacy; comparable with the paper's FID)")] = "legacy",
    crop_size: Annotated[int, typer.Option(
        min=1, help="d4k: the generation size the short side is resized to and centre-cropped at")] = 4096,
    patch: Annotated[bool, typer.Option(help="patch-FID: native-resolution crops, no resize")] = False,
    patch_size: Annotated[int, typer.Option(help="crop side for --patch")] = 299,
    patches_per_image: Annotated[int, typer.Option(help="crops per image for --patch")] = 4,
    batch_size: Annotated[int, typer.Option(help="images per Inception forward")] = 8,
) -> None:
    """Fréchet Inception Distance of DIR_A against DIR_B with the standard TF-ported Inception."""
    weights = inception_weights if inception_weights is not None else _weights_from_manifest(weights_dir)
    value = standard_fid(dir_a, dir_b, weights, resize, patch, patch_size, patches_per_image, batch_size, crop_size)
    protocol = f"d4k, crop {crop_size}" if resize == "d4k" else resize
    kind = f"patch-FID ({patch_size}px native crops, {patches_per_image}/image)" if patch else f"FID ({protocol})"
    typer.echo(f"{kind} of {dir_a} vs {dir_b} with {weights}")
    typer.echo(f"{value:.10g}")
