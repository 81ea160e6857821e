"""Training input, disk to device: uint8 batches from worker processes, finished on the training device.

Worker processes (``dataset.num_workers``; 0: the training process itself) decode, resize and apply the
geometric augmentation, and collate uint8 NCHW batches (a quarter of float32's bytes), pinned when training
on CUDA. The workers persist across epochs. ``DeviceBatches`` moves each batch to the device, normalises it
(``Preprocess.normalize_tensor``, the arithmetic of every inference backend) and erases rectangles
(``TrainTransform.erase``) there; on CUDA it does so on a side stream for batch k+1 while the model runs
batch k (the pattern of timm's PrefetchLoader).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from reid_deploy.data.dataset import LoadedBatch, SeededBatches, TrainDataset, collate_readable, skip_or_stop
from reid_deploy.data.transforms import TrainTransform
from reid_deploy.inference.preprocess import Preprocess

Batch = tuple[torch.Tensor, torch.Tensor]


def train_loader(dataset: TrainDataset, batches: SeededBatches, workers: int, device: torch.device,
                 seed: int = 0) -> DataLoader:
    """The uint8 batch loader: ``workers`` persistent processes, memory pinned for a CUDA ``device``.

    The loader draws its worker seeds from its own generator, never from the global torch RNG, so
    checkpointed RNG states replay exactly on resume (augmentation seeds come with the indices anyway).
    """
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_readable,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))


class DeviceBatches:
    """Iterates ``loader``'s uint8 batches as normalised, erased float32 batches on ``device`` (labels
    moved too). Unreadable images are named (or stop the run) as ``on_bad_image`` says; a batch whose
    images were all unreadable comes out as ``None``."""

    def __init__(self, loader: DataLoader, preprocess: Preprocess, transform: TrainTransform,
                 device: torch.device, on_bad_image: str = "skip"):
        self.loader, self.preprocess, self.transform, self.device = loader, preprocess, transform, device
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.loader)

    def prepare(self, batch: LoadedBatch) -> Batch | None:
        """One host batch -> the device batch the model trains on."""
        for bad in batch.unreadable:
            skip_or_stop(bad, self.on_bad_image)
        if batch.images is None:
            return None
        images = batch.images.to(self.device, non_blocking=True)
        labels = batch.labels.to(self.device, non_blocking=True)
        return self.transform.erase(self.preprocess.normalize_tensor(images)), labels

    def __iter__(self) -> Iterator[Batch | None]:
        if self.device.type != "cuda":
            yield from map(self.prepare, self.loader)
            return
        side = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)
        waiting, started = None, False
        for batch in self.loader:
            with torch.cuda.stream(side):
                ready = self.prepare(batch)
            if started:
                yield waiting
            main.wait_stream(side)
            for tensor in ready or ():  # made on the side stream, used on the main one: keep until used
                tensor.record_stream(main)
            waiting, started = ready, True
        if started:
            yield waiting
