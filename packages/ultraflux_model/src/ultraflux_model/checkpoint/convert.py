"""The UltraFlux checkpoint layout from FLUX.1-dev, and assembled variants (``ultraflux convert``).

**flux-dev** (the paper's starting point): a diffusers FLUX.1-dev checkpoint becomes an UltraFlux-layout one.

* ``transformer/``: weights unchanged (hard-linked, copied across filesystems); ``config.json`` gains the
  official UltraFlux key ``method: "yarn"`` (Resonance 2D RoPE + YaRN; our class's RoPE window, θ and axis
  order keep their defaults, which are the official values). The position embedding has no weights, so the
  FLUX.1-dev tensors load into ``UltraFluxTransformer2DModel`` exactly.
* ``vae/``: the F16 VAE. The paper post-trains an F16 (16× downsampling) Flux VAE; the F16 construction is
  Diffusion-4K's Scale-Consistent VAE (Zhang et al., "Ultra-High-Resolution Image Synthesis: Data, Method and
  Evaluation", arXiv:2506.01331; github.com/zhang0jhon/diffusion-4k ``sc-vae/train_vae.py``), which starts from
  the FLUX.1-dev VAE weights with ``stride=2`` (encoder ``conv_in`` stride 2, decoder ×2 nearest upsample before
  ``conv_out``; no new parameters) and trains the decoder only. That initialisation is what ``--vae f16-init``
  (default) writes. The frozen encoder makes the training latents final already; the decoder needs
  ``ultraflux vae-train`` (UltraFlux's non-adversarial post-training) before images look right. ``--vae DIR``
  takes an existing F16 VAE folder instead (e.g. ``Owen777/UltraFlux-v1``'s ``vae/``).
* ``text_encoder{,_2}/``, ``tokenizer{,_2}/``, ``scheduler/``, ``model_index.json``: copied (hard-linked).

**assemble**: a complete checkpoint from a base with components swapped, e.g. UltraFlux-v1 with the
``Owen777/UltraFlux-v1-1-Transformer`` that the official inference now recommends.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ultraflux_core.errors import UltraFluxError
from ultraflux_core.files import link_or_copy

from ultraflux_model.checkpoint.layout import CHECKPOINT_PARTS, check_checkpoint_layout
from ultraflux_model.checkpoint.loading import unknown_config_keys
from ultraflux_model.checkpoint.resolve import F16_STRIDE, resolve_checkpoint, resolve_vae

YARN_KEYS = {"method": "yarn"}  # what the official UltraFlux transformer config adds to FLUX.1-dev's

def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UltraFluxError(f"cannot read {path}: {err}") from err


def _write_config(path: Path, config: dict) -> None:
    path.unlink()  # may be a hard link into the source checkpoint: never write through it
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def transformer_config_from_flux_dev(config: dict) -> dict:
    """FLUX.1-dev's transformer ``config.json`` → the UltraFlux one (Resonance-YaRN keys added)."""
    from ultraflux_model.modules.transformer import UltraFluxTransformer2DModel

    if config.get("_class_name") not in (None, "FluxTransformer2DModel"):
        raise UltraFluxError(
            f"transformer/config.json is a {config.get('_class_name')}, not a FluxTransformer2DModel: "
            "`convert flux-dev` expects a diffusers FLUX.1-dev (or FLUX.1-schnell) checkpoint"
        )
    out = {**config, **YARN_KEYS}
    unknown = unknown_config_keys(UltraFluxTransformer2DModel, out)
    if unknown:
        raise UltraFluxError(f"transformer/config.json has keys UltraFluxTransformer2DModel does not know: {unknown}")
    return out


def f16_vae_config(config: dict) -> dict:
    """A Flux VAE ``config.json`` → the F16 one (same weights, ``stride: 2``)."""
    from ultraflux_model.vae.autoencoder import UltraFluxAutoencoderKL

    if int(config.get("latent_channels", 0)) != 16:
        raise UltraFluxError(
            f"vae/config.json has latent_channels={config.get('latent_channels')}; the F16 VAE starts from the "
            "16-channel Flux VAE"
        )
    out = {**config, "stride": F16_STRIDE}
    unknown = unknown_config_keys(UltraFluxAutoencoderKL, out, UltraFluxAutoencoderKL.accepted_foreign_keys)
    if unknown:
        raise UltraFluxError(f"vae/config.json has keys UltraFluxAutoencoderKL does not know: {unknown}")
    return out


def convert_flux_dev(src: str | Path, dst: str | Path, vae: str = "f16-init") -> Path:
    """Write the UltraFlux layout at ``dst`` from the FLUX.1-dev checkpoint ``src`` (dir or hub id); see module doc."""
    root = resolve_checkpoint(src)
    check_checkpoint_layout(root)
    dst = Path(dst)
    if dst.exists():
        raise UltraFluxError(f"{dst} already exists; choose a new destination or remove it first")
    transformer = transformer_config_from_flux_dev(_read_config(root / "transformer" / "config.json"))
    # an existing F16 VAE: its folder, a checkpoint's vae/ or a hub id (other strides refused)
    vae_source = root / "vae" if vae == "f16-init" else resolve_vae(vae)
    vae_config = f16_vae_config(_read_config(vae_source / "config.json"))
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for part in CHECKPOINT_PARTS:
        source = vae_source if part == "vae" else root / part
        shutil.copytree(source, tmp / part, copy_function=link_or_copy,
                        ignore=shutil.ignore_patterns(".ultraflux-fingerprint.json"))
    _write_config(tmp / "transformer" / "config.json", transformer)
    _write_config(tmp / "vae" / "config.json", vae_config)
    if (root / "model_index.json").is_file():
        link_or_copy(str(root / "model_index.json"), str(tmp / "model_index.json"))
    check_checkpoint_layout(tmp)
    tmp.rename(dst)
    return dst
