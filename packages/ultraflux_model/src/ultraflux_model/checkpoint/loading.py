"""Strict loading of diffusers-layout components: safetensors only, unknown config keys refused, a checkpoint that
does not cover the model exactly refused.

diffusers silently ignores unknown ``config.json`` keys and happily unpickles ``.bin`` weights; for checkpoints
that come from the internet we want the opposite on both counts.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

from ultraflux_core.errors import UltraFluxError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
