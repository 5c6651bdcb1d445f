"""The training sampler: a seeded per-epoch order that every rank agrees on and that can resume mid-epoch.

`ResumableSampler` is torch's `DistributedSampler` (the permutation of epoch e is drawn from a generator
seeded with `seed + e`, never from the global RNG; rank r of W takes positions r, r + W, ... of it) that
can start an epoch part-way through: `resume(epoch, samples)` makes the next pass over `epoch` skip the
first `samples` indices of this rank's share. One process (W = 1) sees the whole permutation, so a run
on W ranks with batch size B gets, step by step, the global batches of a one-process run with batch
size W * B (each global batch split by rank interleaving).

Lightning leaves a `DistributedSampler` in place (it does not wrap it in its own), and calls `set_epoch`
before each training epoch. The position travels in checkpoints through the data module's `state_dict`
(`SplitDataModule`), which Lightning restores before it builds the loader, whatever the strategy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, samples: int) -> None:
        """Start at `epoch` (the sampler's epoch until `set_epoch` says otherwise), skipping the first
        `samples` indices of this rank's share; any later pass starts at the beginning."""
        self.set_epoch(epoch)
        self._resume = (int(epoch), int(samples))

    def __iter__(self) -> Iterator[int]:
        # A generator: the order is drawn when the first index is asked for, i.e. after Lightning's
        # set_epoch and after a checkpoint's position has been loaded (resume).
        skip = 0
        if self._resume is not None:
            epoch, samples = self._resume
            if epoch == self.epoch:
                skip = samples
            if epoch <= self.epoch:
                self._resume = None  # used (or passed: the run restarted at the next epoch)
        indices = list(super().__iter__())
        yield from indices[skip:]


class ResumableDataLoader(DataLoader):
    """The training loader. Lightning asks a loader for `state_dict` / `load_state_dict` to tell whether it
    resumes mid-epoch (and warns when it does not); this one does, through its `ResumableSampler` and the
    data module's state, so the loader's own state is empty."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass
