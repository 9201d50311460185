"""A seeded per-epoch shuffle that every process and every resumption reproduces."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """Permutation of ``range(n)`` drawn from ``seed`` and the epoch number only.

    Independent of the global RNG, so restoring a checkpoint (or running on another world size)
    yields the same data order, and the authors' defect of never shuffling is not repeated.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
