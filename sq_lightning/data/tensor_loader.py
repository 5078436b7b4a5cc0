"""Batches sliced from tensors held in memory, without DataLoader workers.

Small image data sets (CIFAR-10 is 184 MB as uint8) fit in memory; slicing a batch
out of one tensor and augmenting it in a vectorised way costs far less than a
DataLoader's per-sample ``__getitem__`` + collate, so no worker processes are needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Callable, Optional

import numpy as np
import torch

__all__ = ["ShardedBatchSampler", "TensorBatchLoader", "derive_seed", "rank_and_world"]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integers (seed, epoch, rank, stream ...), stable across runs."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def rank_and_world(trainer: Optional[object]) -> tuple[int, int]:
    """``(global_rank, world_size)`` of a DataModule's ``trainer``; ``(0, 1)`` without one."""
    if trainer is None:
        return 0, 1
    return trainer.global_rank, trainer.world_size


class ShardedBatchSampler:
    """Yields index batches of one rank's shard; ``set_epoch`` picks the permutation.

    With ``shuffle`` every rank draws the same permutation of all ``num_samples``
    indices from ``(seed, epoch)``, drops the last ``num_samples % world_size`` so that
    all ranks get the same number of batches (a DDP rank with one batch more would wait
    forever in the gradient all-reduce), and keeps every ``world_size``-th index from
    ``rank``. Without ``shuffle`` the order is ``0..N-1`` strided the same way and
    nothing is dropped, so evaluation sees every sample exactly once.

    ``set_epoch`` is called by Lightning before each training epoch. Without it, each
    new iteration moves on to the next epoch by itself.

    Args:
        num_samples: size of the data set.
        batch_size: samples per batch (the last batch may be smaller unless ``drop_last``).
        shuffle: draw a new permutation every epoch.
        seed: base seed of the permutations.
        rank: this process's index among ``world_size`` processes.
        world_size: number of processes sharing the data.
        drop_last: drop the last incomplete batch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        if not 0 <= rank < world_size:
            raise ValueError(f"`rank` must be in [0, world_size={world_size}), got {rank}.")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard_size(self) -> int:
        if self.shuffle:
            return self.num_samples // self.world_size
        return len(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        n = self.shard_size()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample order in ``epoch``."""
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            order = torch.randperm(self.num_samples, generator=g)
            order = order[: self.shard_size() * self.world_size]
        else:
            order = torch.arange(self.num_samples)
        return order[self.rank :: self.world_size]

    def claim_epoch(self) -> int:
        """The epoch of a new pass; the next pass gets the following one unless ``set_epoch``."""
        epoch = self.epoch
        self.epoch = epoch + 1
        return epoch

    def batches(self, epoch: int) -> Iterator[torch.Tensor]:
        """Index batches of ``epoch``."""
        order = self.indices(epoch)
        for b in range(len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.batches(self.claim_epoch())


class TensorBatchLoader:
    """Iterable of ``(transform(x[idx], generator), y[idx])`` over a batch sampler.

    Lightning treats it like any iterable dataloader; it finds ``set_epoch`` on
    ``.sampler``. The transform gets a generator seeded from ``(seed, epoch, rank)``, so
    augmentation is reproducible too.

    Args:
        inputs: all samples, first dimension indexed by the sampler.
        targets: labels aligned with ``inputs``.
        sampler: a :class:`ShardedBatchSampler`.
        transform: ``f(batch, generator) -> batch`` applied to each input batch;
            ``None`` returns the slices as they are.
    """

    # Lightning inspects these DataLoader attributes; no batch_sampler sits above `sampler`.
    batch_sampler = None

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        sampler: ShardedBatchSampler,
        transform: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None,
    ) -> None:
        if len(inputs) != len(targets) or len(inputs) != sampler.num_samples:
            raise ValueError(
                f"`inputs` ({len(inputs)}), `targets` ({len(targets)}) and `sampler.num_samples` "
                f"({sampler.num_samples}) must have the same length."
            )
        self.inputs = inputs
        self.targets = targets
        self.sampler = sampler
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        s = self.sampler
        epoch = s.claim_epoch()
        g = torch.Generator().manual_seed(derive_seed(s.seed, epoch, s.rank, 1))
        for idx in s.batches(epoch):
            x = self.inputs[idx]
            if self.transform is not None:
                x = self.transform(x, g)
            yield x, self.targets[idx]
