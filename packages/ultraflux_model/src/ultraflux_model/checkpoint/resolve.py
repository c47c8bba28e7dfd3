"""The one place that turns a model reference (local directory, hub id, ``models:/`` or ``runs:/`` URI) into a
local checkpoint directory."""

from __future__ import annotations

from pathlib import Path

from ultraflux_core.errors import UltraFluxError
from ultraflux_core.tracking.uri import is_registry_uri

from ultraflux_model.release.fetch import fetch_release

# What a diffusers checkpoint needs from a hub repo: model_index.json at the root, and the components' configs,
# safetensors shards and tokenizer files in their subfolders. Nothing else at the root: repos such as FLUX.1-dev
# also ship the whole model as single original-format files (flux1-dev.safetensors, 23.8 GB; ae.safetensors) that
# diffusers never reads. Pickled weights (*.bin, *.pt) are never fetched.
HUB_PATTERNS = ("model_index.json", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model")


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
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(str(model), allow_patterns=list(HUB_PATTERNS))
        )
    except Exception as err:  # offline, unknown repo, auth: the hub raises many types
        raise UltraFluxError(
            f"could not get checkpoint {model!r} from the hub ({type(err).__name__}: {err}). "
            "Pass a local directory, or allow hub access (unset HF_HUB_OFFLINE, log in for gated repos)."
        ) from err
