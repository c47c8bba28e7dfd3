"""Resumable training checkpoints and the consolidated diffusers-layout export.

A checkpoint is one folder ``step-XXXXXXXX/`` holding DeepSpeed's own state (``ds/``: ZeRO partitions of
weights and optimizer, scheduler), and per rank the trainer state (step, sampler position, RNG states;
``torch.load(weights_only=True)``-safe) and the EMA shard (safetensors). Every rank writes into a
temporary folder; once all are done rank 0 renames it into place and then rewrites the ``latest`` file
with ``os.replace``, so a crash at any moment leaves the previous checkpoint intact and ``latest``
pointing at a complete one. Only the newest ``keep_last`` checkpoints are kept.

DeepSpeed reads its own files with pickle: resume only from checkpoints this trainer wrote. Exports,
which are what gets shared, are safetensors + ``config.json``.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ultraflux_core.errors import UltraFluxError

from ultraflux_model.training.distributed import DistInfo, barrier
from ultraflux_model.training.ema import ShardedEma

DS_TAG = "ds"
LATEST = "latest"
WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop may touch, as tensors/ints (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointManager:
    """Save, find and load the resumable checkpoints of one stage."""

    def __init__(self, root: Path, keep_last: int, dist: DistInfo) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.dist = dist

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or ``None``."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not path.is_dir():
            raise UltraFluxError(f"{pointer} points at {path}, which is missing; delete {pointer} to start over")
        return path

    def _trainer_file(self, path: Path) -> Path:
        return path / f"trainer_rank{self.dist.rank:05d}.pt"

    def _ema_file(self, path: Path) -> Path:
        return path / f"ema_rank{self.dist.rank:05d}.safetensors"

    def save(self, engine: Any, step: int, trainer_state: dict[str, Any], ema: ShardedEma | None) -> Path:
        """Collective: every rank must call it. Returns the final checkpoint folder."""
        name = f"step-{step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a run killed while saving
            tmp.mkdir(parents=True)
        barrier()
        engine.save_checkpoint(str(tmp), tag=DS_TAG)
        state = {**trainer_state, "step": step, "world_size": self.dist.world_size, "rng": rng_state()}
        torch.save(state, self._trainer_file(tmp))
        if ema is not None:
            ema.save(self._ema_file(tmp))
        barrier()
        if self.dist.is_main:
            if final.exists():  # the same step saved again after a resume
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_text_atomic(self.root / LATEST, name + "\n")
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        steps = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            shutil.rmtree(old)

    def load(self, engine: Any, path: Path, ema: ShardedEma | None) -> dict[str, Any]:
        """Restore DeepSpeed state, EMA and RNGs from ``path``; returns the trainer state (step, sampler)."""
        trainer_file = self._trainer_file(path)
        if not trainer_file.is_file():
            raise UltraFluxError(
                f"{path} has no state for rank {self.dist.rank}: it was written by fewer ranks; "
                "resume with the number of ranks that wrote it"
            )
        state = torch.load(trainer_file, weights_only=True)
        if state["world_size"] != self.dist.world_size:
            raise UltraFluxError(
                f"{path} was written by {state['world_size']} ranks, this run has {self.dist.world_size}; "
                "resume with the same number of ranks (or start the stage over without --resume)"
            )
        load_path, _ = engine.load_checkpoint(str(path), tag=DS_TAG)
        if load_path is None:
            raise UltraFluxError(f"DeepSpeed could not load the checkpoint in {path}")
        if ema is not None:
            ema.load(self._ema_file(path))
        set_rng_state(state["rng"])
        return state


def gather_full_tensors(module: torch.nn.Module, names: list[str], dist: DistInfo) -> dict[str, torch.Tensor]:
    """Collective: the full CPU copies of ``module``'s parameters and buffers called ``names`` on the main rank ({}
    elsewhere), gathering ZeRO-3 partitions one tensor at a time (no rank holds more than one beyond its share)."""
    import deepspeed

    wanted = set(names)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if name not in wanted:
            continue
        zero3 = hasattr(tensor, "ds_id")
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None, enabled=zero3):
            if dist.is_main:
                state[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return state


def export_transformer(module: torch.nn.Module, out: Path, dist: DistInfo, *,
                       replace: dict[str, torch.Tensor] | None = None, max_shard_size: str = "10GB") -> Path:
    """Collective: gather the (possibly ZeRO-3-partitioned) weights and write a diffusers transformer folder.

    Parameters are gathered one at a time, so no rank ever holds more than one full tensor beyond its
    partition; rank 0 accumulates the CPU copy and writes sharded safetensors + ``config.json`` that
    ``UltraFluxTransformer2DModel.from_pretrained`` loads. ``replace`` (full CPU tensors on rank 0, e.g. the
    EMA weights) is written instead of the module's own tensors of those names. The folder appears atomically.
    """
    from huggingface_hub import save_torch_state_dict

    # Every rank walks every tensor (gathers are collective; only rank 0 knows ``replace``).
    state = gather_full_tensors(module, list(module.state_dict().keys()), dist)
    out = Path(out)
    if dist.is_main:
        unknown = sorted(set(replace or {}) - set(state))
        if unknown:
            raise UltraFluxError(f"replacement tensors {unknown[:5]} are not in the model's state dict")
        state.update(replace or {})
        tmp = out.with_name(f".tmp-{out.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_torch_state_dict(state, tmp, filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size)
        module.save_config(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    barrier()
    return out
