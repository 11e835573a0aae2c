"""Batch samplers that shard across data-parallel ranks and can resume in the middle of an epoch.

A run killed at step N and resumed from its checkpoint must see exactly the batches the uninterrupted run would
have seen from step N on. Lightning restores the step counter and the epoch, then asks for a fresh data
iterator; it does not skip what the epoch already consumed. So the samplers here are deterministic per
(seed, epoch) and take a resume point: `resume_at(epoch, batches)` makes the next iteration of that epoch skip
its first `batches` batches (later epochs start at 0). The DataModule saves the point in every checkpoint.

Ranks: the data-parallel rank and size, not the global ones: under sequence parallelism the `sp_size` ranks of a
group share one sample (fpsa_train/sequence_parallel.py: consecutive ranks, dp_rank = rank // sp_size).
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableBatches(Sampler):
    """Base: subclasses build the epoch's batch list for this rank (`_epoch_batches`); this class skips the
    already-consumed head of the epoch a checkpoint was taken in."""

    epoch: int = 0
    _resume: tuple[int, int] | None = None

    @property
    def sampler(self) -> "ResumableBatches":
        """Lightning calls `set_epoch` on `dataloader.batch_sampler.sampler` at every epoch start, not on the batch
        sampler itself; this makes that call reach us."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches: int) -> None:
        """The next iteration over `epoch` starts after its first `batches` batches (of this rank)."""
        self._resume = (epoch, batches)

    def _skip(self) -> int:
        if self._resume is None:
            return 0
        epoch, batches = self._resume
        self._resume = None
        return batches if epoch == self.epoch else 0

    def _epoch_batches(self):
        raise NotImplementedError

    def __iter__(self):
        skip = self._skip()
        for j, batch in enumerate(self._epoch_batches()):  # generated in full: later batches' draws stay the same
            if j >= skip:
                yield batch


class ShardedBatchSampler(ResumableBatches):
    """Index batches of a map-style dataset: shuffled per (seed, epoch), batch j of the epoch to rank j mod
    num_replicas; every rank gets the same number of batches (the few left over are dropped: under ZeRO-3 every
    forward is a collective, so no rank may run one more batch than the others)."""

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool,
                 num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last
        self.num_replicas, self.rank = num_replicas, rank

    def _all_batches(self) -> list[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))
        else:
            order = torch.arange(self.n)
        batches = [order[i:i + self.batch_size].tolist() for i in range(0, self.n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches[:len(batches) - len(batches) % self.num_replicas]  # equal counts: ZeRO-3 ranks run in step

    def _epoch_batches(self):
        return self._all_batches()[self.rank::self.num_replicas]

    def __len__(self) -> int:
        return len(self._epoch_batches())
