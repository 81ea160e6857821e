"""Batch samplers for training: shuffled images (``softmax``) or P identities x K images (``triplet``).

Every epoch's order is a pure function of (seed, epoch), so a resumed run draws the same batches as an
uninterrupted one. With several processes (DDP) each rank takes every ``world_size``-th batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np


class _EpochSampler:
    def __init__(self, seed: int, rank: int, world_size: int):
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def batches(self) -> list[list[int]]:
        raise NotImplementedError

    def _mine(self) -> list[list[int]]:
        batches = self.batches()
        usable = len(batches) - len(batches) % self.world_size  # every rank gets as many batches
        return batches[self.rank:usable:self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._mine())

    def __len__(self) -> int:
        return len(self._mine())


class ShuffledBatchSampler(_EpochSampler):
    """All images shuffled, cut into full batches (the last partial batch is dropped)."""

    def __init__(self, num_images: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(seed, rank, world_size)
        self.num_images, self.batch_size = num_images, batch_size

    def batches(self) -> list[list[int]]:
        order = self._rng().permutation(self.num_images).tolist()
        return [order[i:i + self.batch_size] for i in range(0, len(order) - self.batch_size + 1, self.batch_size)]


class IdentityBatchSampler(_EpochSampler):
    """Batches of P = batch_size / K identities with K images each (reid-strong-baseline's sampler).

    Each identity's images are shuffled and cut into chunks of K; an identity with fewer than K images
    fills one chunk by sampling with replacement. Batches take P distinct identities that still have
    chunks, chosen at random, until fewer than P remain.
    """

    def __init__(self, pids: Sequence[int], batch_size: int, num_instances: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        super().__init__(seed, rank, world_size)
        if batch_size % num_instances:
            raise ValueError(f"batch_size {batch_size} is not a multiple of num_instances {num_instances}")
        self.k, self.p = num_instances, batch_size // num_instances
        self.index: dict[int, list[int]] = defaultdict(list)
        for i, pid in enumerate(pids):
            self.index[int(pid)].append(i)
        self.pids = sorted(self.index)

    def batches(self) -> list[list[int]]:
        rng = self._rng()
        chunks: dict[int, list[list[int]]] = {}
        for pid in self.pids:
            idxs = self.index[pid]
            order = rng.choice(idxs, size=self.k, replace=True).tolist() if len(idxs) < self.k \
                else rng.permutation(idxs).tolist()
            chunks[pid] = [order[i:i + self.k] for i in range(0, len(order) - self.k + 1, self.k)]
        batches = []
        available = [pid for pid in self.pids if chunks[pid]]
        while len(available) >= self.p:
            chosen = rng.choice(available, size=self.p, replace=False).tolist()
            batches.append([i for pid in chosen for i in chunks[pid].pop()])
            available = [pid for pid in available if chunks[pid]]
        return batches
