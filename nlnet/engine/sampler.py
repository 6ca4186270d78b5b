"""A data-order sampler that can be sharded across processes and resumed in the middle of an epoch.

The order of epoch ``e`` is a permutation drawn from ``(seed, e)`` alone, so any process can rebuild it at any
time; rank ``r`` of ``w`` takes every ``w``-th element starting at ``r`` (as ``DistributedSampler`` does), and
a resumed run skips the samples it already consumed. With per-process batch ``b``, the ``i``-th batches of all
ranks together hold exactly elements ``[i*w*b, (i+1)*w*b)`` of the permutation, which is the ``i``-th batch
of a single process with batch ``w*b``: multi-process and single-process runs see the same global batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

__all__ = ["ResumableSampler"]


class ResumableSampler(Sampler[int]):
    """Indices of one process's shard of one epoch, optionally starting part-way through.

    Args:
        num_samples: size of the dataset.
        shuffle: permute per epoch (training) or keep the dataset order (evaluation).
        seed: with the epoch, determines the permutation.
        rank: this process's rank.
        world_size: number of processes.
        pad: repeat leading elements so every rank gets the same number of indices (training, where ranks
            must run the same number of steps); without it, ranks may differ by one (evaluation, where every
            video must be seen exactly once).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Selects the epoch and how many of this rank's indices to skip (``batches_done * batch_size``)."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.epoch = epoch
        self.start = start

    def order(self) -> np.ndarray:
        """The whole epoch's order over all ranks (before sharding), shape (num_samples or padded,)."""
        if self.shuffle:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
            order = rng.permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        if self.pad and self.num_samples % self.world_size:
            extra = self.world_size - self.num_samples % self.world_size
            order = np.concatenate([order, np.resize(order, extra)])
        return order

    def _shard(self) -> np.ndarray:
        return self.order()[self.rank :: self.world_size][self.start :]

    def __iter__(self) -> Iterator[int]:
        return iter(self._shard().tolist())

    def __len__(self) -> int:
        total = self.num_samples
        if self.pad:
            total = -(-total // self.world_size) * self.world_size
        return max(0, len(range(self.rank, total, self.world_size)) - self.start)

    def state_dict(self) -> dict[str, int]:
        """Where the sampler stands (saved in checkpoints for the record; the loop recomputes it)."""
        return {"seed": self.seed, "epoch": self.epoch, "start": self.start, "world_size": self.world_size}
