"""The training dataset: Market-1501 records -> (augmented uint8 CHW tensor, label), unreadable images skipped.

Items are fetched by ``(index, seed)`` keys that ``SeededBatches`` adds to a batch sampler's indices: an
item's augmentation depends on its key alone, not on which worker process reads it, how many there are, or
whether the run was resumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from reid_deploy.console import log
from reid_deploy.data.market1501 import ImageRecord
from reid_deploy.data.transforms import TrainTransform, open_image
from reid_deploy.errors import DataError

ItemKey = tuple[int, tuple[int, ...]]  # (record index, seed of its augmentation)


class Unreadable(NamedTuple):
    """A training image that did not decode, and why."""

    path: str
    reason: str


class LoadedBatch(NamedTuple):
    """A collated batch: the readable items' uint8 NCHW images and labels (None when none was readable),
    and the unreadable items, named by the training process (loader workers only collect them)."""

    images: torch.Tensor | None
    labels: torch.Tensor | None
    unreadable: list[Unreadable]


def skip_or_stop(bad: Unreadable, on_bad_image: str) -> None:
    """``on_bad_image="skip"``: one warning naming the file; ``"error"``: DataError naming it."""
    if on_bad_image == "error":
        raise DataError(f"{bad.reason} (dataset.on_bad_image=skip skips unreadable images)")
    log.warning("skipping unreadable training image %s", bad.path)


def readable_records(records: Sequence[ImageRecord], channels: int = 3, on_bad_image: str = "skip"
                     ) -> list[ImageRecord]:
    """The records whose image decodes; the others are named in one warning each and counted
    (``on_bad_image="skip"``), or the first stops the run (``"error"``). Labels are kept as they are."""
    kept, bad = [], []
    for record in records:
        try:
            open_image(record.path, channels)
        except DataError as exc:
            skip_or_stop(Unreadable(str(record.path), str(exc)), on_bad_image)
            bad.append(record.path)
            continue
        kept.append(record)
    if bad:
        log.warning("skipped %d unreadable training image(s) of %d", len(bad), len(records))
    if not kept:
        raise DataError("none of the training images could be read")
    return kept


class TrainDataset(Dataset):
    """Images as resized (``to_uint8``: a decoded image -> uint8 CHW) and augmented (``transform.geometry``)
    uint8 CHW tensors, with their labels; an unreadable image gives an ``Unreadable``, which the training
    process hands to ``skip_or_stop`` with ``on_bad_image``."""

    def __init__(self, records: Sequence[ImageRecord], to_uint8: Callable[[Image.Image], np.ndarray],
                 transform: TrainTransform, channels: int = 3):
        self.records, self.to_uint8, self.transform, self.channels = list(records), to_uint8, transform, channels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: ItemKey) -> tuple[torch.Tensor, int] | Unreadable:
        index, seed = key
        record = self.records[index]
        try:
            img = open_image(record.path, self.channels)
        except DataError as exc:
            return Unreadable(str(record.path), str(exc))
        image = self.transform.geometry(self.to_uint8(img), np.random.default_rng(seed))
        return torch.from_numpy(image), record.pid


class SeededBatches:
    """A batch sampler (``set_epoch``, ``len``, iterating lists of indices) whose indices come out as
    ``(index, seed)`` keys; the seed is ``(*stream, epoch, batch number, position in the batch)``."""

    def __init__(self, batches, stream: Sequence[int]):
        self.batches, self.stream, self.epoch = batches, tuple(stream), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[ItemKey]]:
        for number, batch in enumerate(self.batches):
            yield [(index, (*self.stream, self.epoch, number, slot)) for slot, index in enumerate(batch)]


def collate_readable(items: list[tuple[torch.Tensor, int] | Unreadable]) -> LoadedBatch:
    """Stack the readable items of a batch; keep the unreadable ones aside."""
    unreadable = [item for item in items if isinstance(item, Unreadable)]
    readable = [item for item in items if not isinstance(item, Unreadable)]
    if not readable:
        return LoadedBatch(None, None, unreadable)
    images, labels = default_collate(readable)
    return LoadedBatch(images, labels, unreadable)
