"""The official checkpoint layout: the seven component folders, the completeness check, assembling a checkpoint
from parts, and the content fingerprint of a folder."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ultraflux_core.errors import UltraFluxError
from ultraflux_core.files import link_or_copy

from ultraflux_model.checkpoint.files import checkpoint_files
from ultraflux_model.checkpoint.loading import check_local_component
from ultraflux_model.checkpoint.resolve import resolve_checkpoint

CHECKPOINT_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
MODEL_PARTS = {
    "transformer": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
_HASH_CACHE = ".ultraflux-fingerprint.json"


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
    either the previous complete checkpoint or the new one, never a mix. A link that leaves its folder (in ``base``
    or a replacement) is refused before anything is copied; links inside are copied as regular files.
    """
    root = resolve_checkpoint(base)
    check_checkpoint_layout(root)
    checkpoint_files(root)
    out = Path(out)
    for part, source in replace.items():
        if part not in MODEL_PARTS:
            raise UltraFluxError(f"cannot replace {part!r}: replaceable components are {', '.join(MODEL_PARTS)}")
        if source is not None:
            check_local_component(Path(source), MODEL_PARTS[part])
            checkpoint_files(source)
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
