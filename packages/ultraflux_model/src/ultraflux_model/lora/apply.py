"""Generating with LoRA adapters: an adapter folder read and checked against the model it is applied to, loaded into
the transformer through diffusers' PEFT backend (``load_lora_adapter``, the path ``FluxPipeline.load_lora_weights``
takes), weighted per request, and optionally fused into the weights with an exact unfuse.

Adapters stay loaded once read (keyed by the sha256 of their weights), so a server that switches adapters between
requests only re-weights them: ``activate`` sets each layer's scale to ``scale · alpha / rank`` and turns the rest
off; a request without adapters runs the base layers alone (peft's disabled path, bit-identical to no adapter).

Fusing merges ``Σ scale·(alpha/rank)·B·A`` into each adapted weight (no extra matmuls per step). peft's unmerge
subtracts the same delta again, which is not the base weight bit for bit in floating point, so ``fuse`` keeps a copy
of every adapted base weight (on the CPU) and ``unfuse`` writes it back: the base is restored exactly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ultraflux_core.errors import UltraFluxError
from ultraflux_core.files import file_sha256

from ultraflux_model.checkpoint.layout import fingerprint
from ultraflux_model.config import parse_lora_spec
from ultraflux_model.lora.adapters import ADAPTER_FILE, META_FILE, PREFIX, read_meta

_KEY = re.compile(r"^transformer\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass(frozen=True)
class Adapter:
    """An adapter folder, read and checked: its metadata and the sha256 of its weights file."""

    folder: Path
    meta: dict[str, Any]
    sha256: str
    label: str | None = None  # the name a server lists it under (its folder may be a download's temporary one)

    @property
    def name(self) -> str:
        """What people call it: ``label``, else the folder's name."""
        return self.label or self.folder.name

    @property
    def weights(self) -> Path:
        return self.folder / ADAPTER_FILE

    @property
    def key(self) -> str:
        """The peft adapter name inside the transformer: by content, so one adapter is loaded once."""
        return f"lora_{self.sha256[:16]}"

    @property
    def rank(self) -> int:
        return int(self.meta["rank"])

    @property
    def alpha(self) -> float:
        return float(self.meta["alpha"])

    def record(self, scale: float) -> dict[str, Any]:
        """The sidecar entry of this adapter at ``scale`` (``folder``, not ``path``: Gradio takes a JSON object with a
        ``path`` for a file to serve)."""
        return {"name": self.name, "folder": str(self.folder), "sha256": self.sha256, "scale": scale,
                "rank": self.rank, "alpha": self.alpha, "base": self.meta["base"]}  # fmt: skip


def read_adapter(path: str | Path) -> Adapter:
    """The adapter folder ``path`` (or its weights file), checked; ``UltraFluxError`` naming what is wrong."""
    path = Path(path)
    folder = path.parent if path.name == ADAPTER_FILE and path.is_file() else path
    if not folder.exists():
        raise UltraFluxError(f"LoRA adapter {path} does not exist")
    meta = read_meta(folder)
    if meta["method"] != "lora":
        raise UltraFluxError(f"LoRA adapter {folder}: method {meta['method']!r} is not 'lora'")
    rank, alpha = meta["rank"], meta["alpha"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UltraFluxError(f"LoRA adapter {folder}: rank must be a positive whole number, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise UltraFluxError(f"LoRA adapter {folder}: alpha must be a positive number, got {alpha!r}")
    return Adapter(folder, meta, file_sha256(folder / ADAPTER_FILE))


def base_fingerprints(checkpoint_root: Path, transformer_root: Path | None = None) -> set[str]:
    """What an adapter's ``base_fingerprint`` may name: the checkpoint's content hash (a sidecar's ``model_hash``) or
    that of the transformer folder the pipeline runs (its own ``transformer/`` or the one given with --transformer).
    """
    transformer = transformer_root or Path(checkpoint_root) / "transformer"
    if transformer_root is not None:
        return {fingerprint(transformer)}  # another transformer: the checkpoint's hash says nothing about it
    return {fingerprint(Path(checkpoint_root)), fingerprint(transformer)}


def check_base(adapter: Adapter, allowed: set[str]) -> None:
    """Refuse an adapter trained on other weights than the model's (``allowed``: :func:`base_fingerprints`)."""
    if adapter.meta["base_fingerprint"] not in allowed:
        raise UltraFluxError(
            f"LoRA adapter {adapter.name} was trained on {adapter.meta['base']} (fingerprint "
            f"{str(adapter.meta['base_fingerprint'])[:12]}), not on this model's transformer (fingerprint "
            f"{sorted(allowed)[0][:12]}): use it with its base model or train it again on this one"
        )


def adapter_state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's diffusers-format tensors: per module ``lora_A`` (rank × in) and ``lora_B`` (out × rank)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(adapter.weights))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise UltraFluxError(f"LoRA adapter {adapter.name}: {ADAPTER_FILE} cannot be read ({err})") from None
    parts: dict[str, set[str]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise UltraFluxError(f"LoRA adapter {adapter.name}: unexpected key {key!r} (expected "
                                 "transformer.<module>.lora_A.weight / lora_B.weight)")  # fmt: skip
        if match["part"] == "A" and tensor.shape[0] != adapter.rank:
            raise UltraFluxError(f"LoRA adapter {adapter.name}: {key} has rank {tensor.shape[0]}, its "
                                 f"{META_FILE} says {adapter.rank}")  # fmt: skip
        parts.setdefault(match["module"], set()).add(match["part"])
    incomplete = sorted(m for m, p in parts.items() if p != {"A", "B"})
    if not parts or incomplete:
        raise UltraFluxError(f"LoRA adapter {adapter.name}: no complete lora_A/lora_B pair"
                             + (f" for {incomplete[0]}" if incomplete else ""))  # fmt: skip
    return tensors


def modules_of(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The adapted module names of a diffusers-format LoRA state dict (without the ``transformer.`` prefix)."""
    return sorted({m["module"] for key in state_dict if (m := _KEY.match(key))})


def lora_config(adapter: Adapter, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """peft ``LoraConfig`` keywords that rebuild the adapter exactly as trained: its rank and alpha (the file alone
    would be read with alpha = rank) on exactly its modules (a regex, so ``proj_out`` matches no other layer)."""
    names = "|".join(re.escape(name) for name in modules_of(state_dict))
    return {"r": adapter.rank, "lora_alpha": adapter.alpha, "target_modules": f"^({names})$", "lora_dropout": 0.0,
            "bias": "none"}  # fmt: skip


def _tuner_layers(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, module) for name, module in transformer.named_modules() if isinstance(module, BaseTunerLayer)]


@dataclass
class LoraState:
    """What a pipeline's transformer holds: the loaded adapters, the active ``{key: scale}``, the fused snapshot."""

    loaded: dict[str, Adapter]
    active: dict[str, float]
    fused: dict[str, torch.Tensor] | None = None  # module name → its base weight before fusing (CPU copy)


def state_of(pipe: Any) -> LoraState:
    """The pipeline's adapter state (created empty on first use)."""
    state = getattr(pipe, "lora_state", None)
    if state is None:
        state = LoraState({}, {})
        pipe.lora_state = state
    return state


def fuse(pipe: Any) -> None:
    """Merge the active adapters into the weights, keeping a CPU copy of each adapted base weight for ``unfuse``."""
    state = state_of(pipe)
    if state.fused is not None or not state.active:
        return
    layers = _tuner_layers(pipe.transformer)
    state.fused = {name: module.get_base_layer().weight.detach().to("cpu", copy=True) for name, module in layers}
    pipe.transformer.fuse_lora(adapter_names=list(state.active))


def unfuse(pipe: Any) -> None:
    """Undo :func:`fuse`: the saved base weights are written back (bit for bit), the adapters stay loaded."""
    state = state_of(pipe)
    if state.fused is None:
        return
    pipe.transformer.unfuse_lora()  # peft's bookkeeping (which adapters are merged)
    with torch.no_grad():
        for name, module in _tuner_layers(pipe.transformer):
            module.get_base_layer().weight.copy_(state.fused[name])
    state.fused = None


def activate(pipe: Any, adapters: Sequence[tuple[Adapter, float]], *, fuse_weights: bool = False) -> None:
    """Make exactly ``adapters`` (each at its scale) act on the next sampling: load those not loaded yet, set the
    scales, turn every other adapter off, and fuse when asked. An empty list leaves the base model alone.

    Adapters already checked against the model's base (:func:`check_base`); a fused state that does not match the
    request is unfused first, so each request sees only its own adapters.
    """
    state = state_of(pipe)
    wanted = {adapter.key: scale for adapter, scale in adapters}
    if len(wanted) != len(adapters):
        raise UltraFluxError("the same LoRA adapter is given twice: give it once with the scale you want")
    if state.fused is not None and (not fuse_weights or wanted != state.active):
        unfuse(pipe)
    transformer = pipe.transformer
    for adapter, _ in adapters:
        if adapter.key not in state.loaded:
            tensors = adapter_state_dict(adapter)
            # the metadata's keys carry the prefix too: diffusers strips it from both
            transformer.load_lora_adapter(tensors, prefix="transformer", adapter_name=adapter.key,
                                          metadata={PREFIX + k: v for k, v in lora_config(adapter, tensors).items()},
                                          _pipeline=pipe)  # fmt: skip
            state.loaded[adapter.key] = adapter
    if state.loaded:
        if wanted:
            transformer.enable_lora()
            transformer.set_adapters(list(wanted), list(wanted.values()))
        else:
            transformer.disable_lora()
    state.active = wanted
    if fuse_weights:
        fuse(pipe)


def read_specs(specs: Sequence[str]) -> list[tuple[Adapter, float]]:
    """``PATH[:SCALE]`` entries (``--lora``) read and checked as adapter folders, before any model is loaded."""
    return [(read_adapter(path), scale) for path, scale in map(parse_lora_spec, specs)]


def use_adapters(pipe: Any, adapters: Sequence[tuple[Adapter, float]], *, fuse_weights: bool = False
                 ) -> list[dict[str, Any]]:
    """Apply ``adapters`` (:func:`read_specs`) to a loaded pipeline: each checked against the model it runs
    (``pipe.checkpoint_root`` / ``pipe.transformer_root``), then :func:`activate`; returns the sidecar records.
    A pipeline that never had adapters is left untouched when there are none."""
    if adapters:
        allowed = base_fingerprints(pipe.checkpoint_root, getattr(pipe, "transformer_root", None))
        for adapter, _ in adapters:
            check_base(adapter, allowed)
    if adapters or getattr(pipe, "lora_state", None) is not None:
        activate(pipe, adapters, fuse_weights=fuse_weights)
    return [adapter.record(scale) for adapter, scale in adapters]
