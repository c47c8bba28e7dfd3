"""The bucketed batch sampler of training: every batch holds one aspect-ratio bucket, deterministic and resumable."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import numpy as np
from ultraflux_core.errors import UltraFluxError


class BucketBatchSampler:
    """Batches of dataset indices where every batch holds one bucket only (a ``DataLoader`` ``batch_sampler``).

    Order is a pure function of ``(seed, epoch)``: within each bucket the indices are shuffled, cut into batches
    of ``batch_size`` (a short tail is dropped when ``drop_last``), and the batches of all buckets are shuffled
    together. With ``world_size > 1`` the global batch list is cut to a multiple of ``world_size`` (wrapped
    around when ``drop_last`` is false) and rank ``r`` takes batches ``r, r + world_size, …`` — disjoint across
    ranks and the same count on each, so collective ops never wait on a rank that ran out. With
    ``step_batches`` (gradient-accumulation rounds per optimizer step) the cut is to a multiple of
    ``world_size × step_batches``, so an epoch never ends inside an optimizer step and every split of a global
    batch over ranks and rounds sees the same batches per step.

    ``state_dict()`` records the epoch and how many batches this rank has yielded in it; after
    ``load_state_dict`` the next iteration continues with the identical remaining batches. (With DataLoader
    workers, batches are prefetched: store the number of batches the training loop consumed as ``position``.)
    """

    def __init__(
        self,
        bucket_keys: Sequence[Hashable],
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        step_batches: int = 1,
    ) -> None:
        if batch_size < 1 or step_batches < 1:
            raise UltraFluxError(f"batch_size and step_batches must be at least 1, got {batch_size}, {step_batches}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UltraFluxError(f"rank {rank} is not in [0, world_size={world_size})")
        self._groups: dict[Hashable, list[int]] = defaultdict(list)
        for index, key in enumerate(bucket_keys):
            self._groups[key].append(index)
        # A fixed bucket order independent of hashing/insertion: sort by repr.
        self._keys = sorted(self._groups, key=repr)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.step_batches = step_batches
        self.epoch = 0
        self.position = 0

    def _global_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[list[int]] = []
        for key in self._keys:
            indices = np.array(self._groups[key])[rng.permutation(len(self._groups[key]))].tolist()
            stop = len(indices) - len(indices) % self.batch_size if self.drop_last else len(indices)
            batches.extend(indices[i : i + self.batch_size] for i in range(0, stop, self.batch_size))
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
        per_step = self.world_size * self.step_batches
        if per_step > 1 and batches:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % per_step]
            else:
                short = (-len(batches)) % per_step
                batches = batches + (batches * (short // len(batches) + 1))[:short]
        return batches

    def _rank_batches(self) -> list[list[int]]:
        return self._global_batches()[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self._rank_batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._rank_batches()
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        # A finished epoch starts again from its first batch if iterated once more without set_epoch.
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; the in-epoch position resets only when the epoch changes."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "step_batches": self.step_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("seed", "batch_size", "world_size", "step_batches"):
            if name in state and state[name] != getattr(self, name):
                raise UltraFluxError(
                    f"sampler state was saved with {name}={state[name]} but this sampler has "
                    f"{name}={getattr(self, name)}; resume with the same data settings"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
