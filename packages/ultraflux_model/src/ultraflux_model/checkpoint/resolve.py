"""The one place that turns a model reference (local directory, hub id, ``models:/`` or ``runs:/`` URI) into a
local checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path

from ultraflux_core.errors import UltraFluxError
from ultraflux_core.tracking.uri import is_registry_uri

from ultraflux_model.release.fetch import fetch_release

# What a diffusers checkpoint needs from a hub repo: model_index.json at the root, and the components' configs,
# safetensors shards and tokenizer files in their subfolders. Nothing else at the root: repos such as FLUX.1-dev
# also ship the whole model as single original-format files (flux1-dev.safetensors, 23.8 GB; ae.safetensors) that
# diffusers never reads. Pickled weights (*.bin, *.pt) are never fetched.
HUB_PATTERNS = ("model_index.json", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model")
# A VAE alone: a checkpoint's vae/ folder, or a repo that is itself a diffusers AutoencoderKL (never the text
# encoders of a whole checkpoint, ~10 GB, that VAE post-training does not need).
VAE_HUB_PATTERNS = ("vae/*.json", "vae/*.safetensors", "config.json", "diffusion_pytorch_model*.safetensors")
F16_STRIDE = 2  # the F16 VAE's encoder conv_in stride (docs/design.md §3); stock diffusers VAEs have none (= 1)


def resolve_checkpoint(model: str | Path, tracking_uri: str | None = None) -> Path:
    """A local checkpoint directory for ``model``: the one place that turns a model reference into files.

    - a local directory: itself;
    - ``models:/name@alias``, ``models:/name/version``, ``models:/<model_id>``, ``runs:/<run>/<path>``: a release
      from the MLflow tracking server at ``tracking_uri`` (default ``$MLFLOW_TRACKING_URI``), downloaded once into
      the content-addressed cache (``$ULTRAFLUX_MODEL_CACHE``, default ``~/.cache/ultraflux/models``; see
      ``ultraflux_model.release.manifest``);
    - a hub id: fetched (or found in the HF cache) as a snapshot of :data:`HUB_PATTERNS`: the diffusers layout's
      safetensors, JSON and tokenizer files; pickled weights and root-level single-file checkpoints are never
      downloaded.
    """
    if is_registry_uri(model):
        return fetch_release(str(model), tracking_uri=tracking_uri)
    path = Path(model).expanduser()
    if path.exists() or str(model).startswith((".", "/", "~")):
        if not path.is_dir():
            raise UltraFluxError(f"checkpoint {path} does not exist (expected a directory with model_index.json)")
        return path
    return _hub_snapshot(str(model), HUB_PATTERNS)


def resolve_vae(source: str | Path, tracking_uri: str | None = None) -> Path:
    """A local F16 VAE folder (diffusers ``AutoencoderKL``: ``config.json`` + safetensors weights, ``stride: 2``).

    ``source``: such a folder, a checkpoint holding one in ``vae/`` (e.g. ``Owen777/UltraFlux-v1``), either as a
    hub id (only the VAE files are fetched), or a ``models:/``/``runs:/`` release. A VAE of another stride is
    refused: post-training and the 16× latents assume the F16 layout.
    """
    if is_registry_uri(source) or Path(source).expanduser().exists() or str(source).startswith((".", "/", "~")):
        root = resolve_checkpoint(source, tracking_uri)
    else:
        root = _hub_snapshot(str(source), VAE_HUB_PATTERNS)
    folder = root / "vae" if (root / "vae" / "config.json").is_file() else root
    config_path = folder / "config.json"
    if not config_path.is_file() or not any(folder.glob("*.safetensors")):
        raise UltraFluxError(
            f"{source} holds no VAE: expected a diffusers AutoencoderKL folder (config.json + .safetensors weights) "
            "or a checkpoint with one in vae/"
        )
    try:
        stride = int(json.loads(config_path.read_text()).get("stride", 1))
    except (OSError, ValueError) as err:
        raise UltraFluxError(f"cannot read {config_path}: {err}") from err
    if stride != F16_STRIDE:
        raise UltraFluxError(
            f"{folder} is not an F16 VAE (stride {stride}, need {F16_STRIDE}): start from an F16 VAE such as "
            "Owen777/UltraFlux-v1's vae/ or the one `ultraflux convert flux-dev` writes (--vae f16-init)"
        )
    return folder


def _hub_snapshot(repo: str, patterns: tuple[str, ...]) -> Path:
    """The local snapshot of hub repo ``repo`` restricted to ``patterns`` (fetched unless cached)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=list(patterns)))
    except Exception as err:  # offline, unknown repo, auth: the hub raises many types
        raise UltraFluxError(
            f"could not get checkpoint {repo!r} from the hub ({type(err).__name__}: {err}). "
            "Pass a local directory, or allow hub access (unset HF_HUB_OFFLINE, log in for gated repos)."
        ) from err
