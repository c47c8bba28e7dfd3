"""Loading official-layout checkpoints: a local directory or a hub id, safetensors only, strict config keys.

diffusers silently ignores unknown ``config.json`` keys and happily unpickles ``.bin`` weights; for
checkpoints that come from the internet we want the opposite on both counts.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ultraflux_core.tracking.uri import is_registry_uri
from ultraflux_model.errors import UltraFluxError
from ultraflux_model.filesystem import link_or_copy
from ultraflux_model.release import fetch_release

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CHECKPOINT_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
MODEL_PARTS = {
    "transformer": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
_HASH_CACHE = ".ultraflux-fingerprint.json"


def _component_dir(path: str | os.PathLike, subfolder: str | None) -> Path:
    return Path(path) / subfolder if subfolder else Path(path)


def check_local_component(directory: Path, weights_name: str) -> None:
    """Fail clearly when a local component directory lacks config or safetensors weights."""
    if not directory.is_dir():
        raise UltraFluxError(f"checkpoint directory {directory} does not exist")
    if not (directory / "config.json").is_file():
        raise UltraFluxError(f"{directory} has no config.json: expected a diffusers-layout component directory")
    has_safetensors = any(directory.glob(f"{weights_name}*.safetensors")) or any(
        directory.glob(f"{weights_name}.safetensors.index.json")
    )
    if has_safetensors:
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise UltraFluxError(
            f"{directory} only has pickled weights ({', '.join(pickled)}); refusing to unpickle them. "
            "Convert them to safetensors (safetensors.torch.save_file) from a trusted environment."
        )
    raise UltraFluxError(f"{directory} has no {weights_name}.safetensors (or sharded index): weights are missing")


def unknown_config_keys(cls: type, config: dict[str, Any], accepted: frozenset[str] = frozenset()) -> list[str]:
    """Keys of ``config`` that ``cls.__init__`` does not take (private ``_*`` keys are metadata, always allowed)."""
    expected = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    return sorted(k for k in config if not k.startswith("_") and k not in expected and k not in accepted)


class StrictPretrainedMixin:
    """``from_pretrained`` that refuses unknown config keys and pickled weights, with messages that name the file.

    Works for a local directory and for a hub id (the config is fetched first, then validated).
    """

    weights_name = "diffusion_pytorch_model"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):  # type: ignore[override]
        subfolder = kwargs.get("subfolder")
        local = _component_dir(pretrained_model_name_or_path, subfolder)
        is_local = Path(pretrained_model_name_or_path).exists() or str(pretrained_model_name_or_path).startswith(
            (".", "/")
        )
        if is_local:
            check_local_component(local, cls.weights_name)
            config = json.loads((local / "config.json").read_text())
        else:
            try:
                config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder)  # type: ignore[attr-defined]
            except Exception as err:  # hub errors come in many types; the message is what matters
                raise UltraFluxError(
                    f"could not fetch {pretrained_model_name_or_path!r}"
                    f"{'/' + subfolder if subfolder else ''}/config.json: {err}. "
                    "Pass a local checkpoint directory, or make the hub reachable (HF_HUB_OFFLINE=0)."
                ) from err
        unknown = unknown_config_keys(cls, config, getattr(cls, "accepted_foreign_keys", frozenset()))
        if unknown:
            raise UltraFluxError(
                f"{pretrained_model_name_or_path}{'/' + subfolder if subfolder else ''}/config.json has keys that "
                f"{cls.__name__} does not know: {', '.join(unknown)}. Remove them or fix their spelling."
            )
        kwargs["use_safetensors"] = True
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(  # type: ignore[misc]
            pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
        )
        # diffusers would silently random-initialise missing tensors; a checkpoint that does not cover the
        # model exactly is a broken checkpoint.
        problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
        if problems:
            source = f"{pretrained_model_name_or_path}{'/' + subfolder if subfolder else ''}"
            raise UltraFluxError(mismatch_message(source, cls.__name__, problems))
        return (model, info) if wants_info else model


def mismatch_message(source: str, class_name: str, problems: dict[str, list[Any]]) -> str:
    """One line naming (up to five of) the missing / unexpected / mis-shaped tensors of a checkpoint."""
    detail = "; ".join(
        f"{k}: {', '.join(map(str, v[:5]))}{' ...' if len(v) > 5 else ''}" for k, v in problems.items() if v
    )
    return f"weights in {source} do not match {class_name} built from its config.json ({detail})"


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
      ``ultraflux_model.release``);
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


def check_checkpoint_layout(root: Path) -> None:
    """Fail clearly unless ``root`` holds every component directory, with safetensors weights for the models."""
    missing = [part for part in CHECKPOINT_PARTS if not (root / part).is_dir()]
    if missing:
        raise UltraFluxError(
            f"{root} is not a complete UltraFlux checkpoint: missing {', '.join(missing)}/ "
            f"(expected {', '.join(CHECKPOINT_PARTS)}; `ultraflux init-tiny DIR` writes a complete tiny one)"
        )
    for part, weights in MODEL_PARTS.items():
        check_local_component(root / part, weights)


def assemble_checkpoint(base: Path | str, out: Path | str, replace: dict[str, Path | str | None]) -> Path:
    """A complete checkpoint at ``out``: ``base``'s components with some replaced (e.g. a trained transformer/).

    ``replace`` maps component names to diffusers-layout directories (``None`` keeps the base one). Files are
    copied (hard-linked where possible) into a temporary sibling first and renamed into place, so ``out`` is
    either the previous complete checkpoint or the new one, never a mix.
    """
    root = resolve_checkpoint(base)
    check_checkpoint_layout(root)
    out = Path(out)
    for part, source in replace.items():
        if part not in MODEL_PARTS:
            raise UltraFluxError(f"cannot replace {part!r}: replaceable components are {', '.join(MODEL_PARTS)}")
        if source is not None:
            check_local_component(Path(source), MODEL_PARTS[part])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for part in CHECKPOINT_PARTS:
        shutil.copytree(
            Path(replace.get(part) or root / part),
            tmp / part,
            copy_function=link_or_copy,
            ignore=shutil.ignore_patterns(_HASH_CACHE),
        )
    if (root / "model_index.json").is_file():
        shutil.copy2(root / "model_index.json", tmp / "model_index.json")
    check_checkpoint_layout(tmp)
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def fingerprint(directory: Path) -> str:
    """sha256 over every file of a checkpoint directory (names + contents), cached by (size, mtime).

    Used to key latent/text caches and to record which weights produced an image; content-based so a
    fine-tuned VAE with unchanged shapes still gets a new key.
    """
    directory = Path(directory)
    cache_path = directory / _HASH_CACHE
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != _HASH_CACHE)
    stamp = [[str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    try:
        cached = json.loads(cache_path.read_text())
        if cached.get("stamp") == stamp:
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(directory)).encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
    value = digest.hexdigest()
    try:
        cache_path.write_text(json.dumps({"stamp": stamp, "sha256": value}))
    except OSError:  # read-only checkpoints are fine: we just recompute next time
        pass
    return value
