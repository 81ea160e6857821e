"""The training dataset: Market-1501 records -> (augmented tensor, label), unreadable images skipped."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from reid_deploy.console import log
from reid_deploy.data.market1501 import ImageRecord
from reid_deploy.data.transforms import open_image
from reid_deploy.errors import DataError


def readable_records(records: Sequence[ImageRecord], channels: int = 3, on_bad_image: str = "skip"
                     ) -> list[ImageRecord]:
    """The records whose image decodes; the others are named in one warning each and counted
    (``on_bad_image="skip"``), or the first stops the run (``"error"``). Labels are kept as they are."""
    kept, bad = [], []
    for record in records:
        try:
            open_image(record.path, channels)
        except DataError as exc:
            if on_bad_image == "error":
                raise DataError(f"{exc} (dataset.on_bad_image=skip skips unreadable images)") from None
            log.warning("skipping unreadable training image %s", record.path)
            bad.append(record.path)
            continue
        kept.append(record)
    if bad:
        log.warning("skipped %d unreadable training image(s) of %d", len(bad), len(records))
    if not kept:
        raise DataError("none of the training images could be read")
    return kept


class TrainDataset(Dataset):
    """Images and labels; an unreadable image gives ``None`` (``on_bad_image="skip"``, with a warning
    naming the file) or raises DataError (``"error"``)."""

    def __init__(self, records: Sequence[ImageRecord], transform: Callable, channels: int = 3,
                 on_bad_image: str = "skip"):
        self.records, self.transform = list(records), transform
        self.channels, self.on_bad_image = channels, on_bad_image

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        record = self.records[index]
        try:
            img = open_image(record.path, self.channels)
        except DataError as exc:
            if self.on_bad_image == "error":
                raise DataError(f"{exc} (dataset.on_bad_image=skip skips unreadable images)") from None
            log.warning("skipping unreadable training image %s", record.path)
            return None
        return self.transform(img), record.pid


def collate_readable(items: list[Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stack the readable items of a batch; None when none was readable."""
    items = [item for item in items if item is not None]
    return default_collate(items) if items else None
