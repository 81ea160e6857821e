"""Training input: the spec's augmentations applied with their probabilities and geometry (fixed seeds,
statistical bounds), uint8 batches from persistent worker processes finished on the device, and a batch
without augmentation equal to the evaluation preprocessing."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomErasing

from reid_deploy.data.dataset import SeededBatches, TrainDataset
from reid_deploy.data.market1501 import read_train
from reid_deploy.data.samplers import ShuffledBatchSampler
from reid_deploy.data.transforms import TrainTransform
from reid_deploy.errors import DataError
from reid_deploy.inference.preprocess import Preprocess
from reid_deploy.train.loader import DeviceBatches, train_loader

DRAWS = 2000
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(height: int = 12, width: int = 6) -> np.ndarray:
    """A uint8 CHW image with no zero pixel and no symmetry."""
    return np.random.default_rng(0).integers(1, 256, (3, height, width), dtype=np.uint8)


def test_flip_is_applied_with_its_probability():
    image = _image()
    for prob in (0.0, 0.3, 1.0):
        outputs = [TrainTransform(0, prob, 0.0).geometry(image, np.random.default_rng(seed)) for seed in range(DRAWS)]
        flipped = [np.array_equal(out, image[:, :, ::-1]) for out in outputs]
        assert all(f or np.array_equal(out, image) for f, out in zip(flipped, outputs))
        assert abs(np.mean(flipped) - prob) < 0.03  # 3 standard deviations of 2000 draws at p = 0.3


def test_padding_and_random_crop_place_the_image_uniformly():
    image, pad = _image(), 2
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)))
    windows = {(top, left): padded[:, top:top + 12, left:left + 6]
               for top in range(2 * pad + 1) for left in range(2 * pad + 1)}
    counts = dict.fromkeys(windows, 0)
    for seed in range(DRAWS):
        out = TrainTransform(pad, 0.0, 0.0).geometry(image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8 and out.flags.c_contiguous
        offset = [key for key, window in windows.items() if np.array_equal(out, window)]
        assert len(offset) == 1  # exactly one crop of the zero-padded image
        counts[offset[0]] += 1
    expected = DRAWS / len(counts)  # 80 per offset
    assert all(abs(c - expected) < 4 * math.sqrt(expected) for c in counts.values()), counts


def _erased_boxes(before: torch.Tensor, after: torch.Tensor) -> list[tuple[int, int, int, int] | None]:
    """Per image: (top, left, height, width) of the changed pixels, None when none changed; asserts that they
    form one full rectangle, changed in every channel."""
    boxes = []
    for b, a in zip(before, after):
        changed = a != b
        if not changed.any():
            boxes.append(None)
            continue
        rows, cols = changed.any(0).any(1).nonzero()[:, 0], changed.any(0).any(0).nonzero()[:, 0]
        top, left, height, width = int(rows[0]), int(cols[0]), len(rows), len(cols)
        assert changed[:, top:top + height, left:left + width].all() and changed.sum() == 3 * height * width
        boxes.append((top, left, height, width))
    return boxes


def test_random_erasing_follows_torchvision_random_erasing():
    shape, prob = (3, 32, 16), 0.4
    batch = torch.full((DRAWS, *shape), 7.0)
    torch.manual_seed(0)
    ours = TrainTransform(0, 0.0, prob).erase(batch)
    reference = RandomErasing(p=prob, value="random")
    theirs = torch.stack([reference(image) for image in batch])
    assert torch.equal(batch, torch.full_like(batch, 7.0))  # the input is left as it was
    stats = {}
    for name, after in (("ours", ours), ("torchvision", theirs)):
        boxes = [box for box in _erased_boxes(batch, after) if box]
        heights = np.array([box[2] for box in boxes], float)
        widths = np.array([box[3] for box in boxes], float)
        assert all(0 <= top <= 32 - h and 0 <= left <= 16 - w and h < 32 and w < 16 for top, left, h, w in boxes)
        noise = after[after != 7.0]
        stats[name] = {"rate": len(boxes) / DRAWS, "height": heights.mean(), "width": widths.mean(),
                       "area": (heights * widths).mean() / (32 * 16),
                       "log_aspect": np.log(heights / widths).mean(),
                       "top_frac": np.mean([box[0] / (32 - box[2]) if box[2] < 32 else 0.5 for box in boxes]),
                       "noise_mean": float(noise.mean()), "noise_std": float(noise.std())}
        assert len(set(boxes)) > 0.8 * len(boxes)  # drawn per image
    ours_s, theirs_s = stats["ours"], stats["torchvision"]
    assert abs(ours_s["rate"] - prob) < 0.035 and abs(theirs_s["rate"] - prob) < 0.035
    assert 0.02 <= ours_s["area"] <= 0.33 and abs(ours_s["area"] - theirs_s["area"]) < 0.015, stats
    for key, tolerance in (("height", 0.8), ("width", 0.5), ("log_aspect", 0.08), ("top_frac", 0.04)):
        assert abs(ours_s[key] - theirs_s[key]) < tolerance, (key, stats)
    assert abs(ours_s["noise_mean"]) < 0.01 and abs(ours_s["noise_std"] - 1) < 0.01, stats


def test_random_erasing_off_or_impossible_leaves_the_batch():
    batch = torch.rand(4, 3, 8, 4)
    assert TrainTransform(0, 0.0, 0.0).erase(batch) is batch
    one_pixel_wide = torch.rand(16, 3, 8, 1)  # no rectangle narrower than the image fits
    assert torch.equal(TrainTransform(0, 0.0, 1.0).erase(one_pixel_wide), one_pixel_wide)


@pytest.fixture
def train_records(demo_dir):
    return read_train(demo_dir / "bounding_box_train", num_classes=8)[:12]


def _input(records, transform: TrainTransform, workers: int, on_bad_image: str = "skip",
           dataset_class=TrainDataset) -> tuple[DeviceBatches, SeededBatches]:
    preprocess = Preprocess(64, 32, MEAN, STD)
    batches = SeededBatches(ShuffledBatchSampler(len(records), 4, seed=3), (3, 0))
    loader = train_loader(dataset_class(records, preprocess.to_uint8, transform), batches, workers,
                          torch.device("cpu"))
    return DeviceBatches(loader, preprocess, transform, torch.device("cpu"), on_bad_image), batches


def test_batch_without_augmentation_equals_the_evaluation_preprocessing(train_records):
    batches_in, keys = _input(train_records, TrainTransform(0, 0.0, 0.0), workers=1)
    assert batches_in.loader.persistent_workers and not batches_in.loader.pin_memory  # CPU: nothing to pin
    for epoch in range(2):
        keys.set_epoch(epoch)
        order = [[index for index, _ in batch] for batch in keys]
        seen = list(batches_in)
        assert len(seen) == len(order) == 3
        for (images, labels), indices in zip(seen, order):
            expected = Preprocess(64, 32, MEAN, STD).load_batch([train_records[i].path for i in indices])
            assert images.dtype == torch.float32 and images.shape == (4, 3, 64, 32)
            torch.testing.assert_close(images, torch.from_numpy(expected), rtol=0, atol=1e-6)
            assert labels.tolist() == [train_records[i].pid for i in indices]


def test_augmentation_depends_on_the_item_not_on_the_worker_processes(train_records):
    transform = TrainTransform(3, 0.5, 0.0)
    runs = []
    for workers in (0, 2):
        batches_in, keys = _input(train_records, transform, workers)
        images = []
        for epoch in range(2):
            keys.set_epoch(epoch)
            images.extend(batch.images for batch in batches_in.loader)
        runs.append(images)
    assert len(runs[0]) == len(runs[1]) == 6 and all(torch.equal(a, b) for a, b in zip(*runs))
    assert runs[0][0].dtype == torch.uint8 and runs[0][0].shape == (4, 3, 64, 32)


class _WorkerPids(TrainDataset):
    def __getitem__(self, key):
        image, _ = super().__getitem__(key)
        return image, os.getpid()


def test_worker_processes_persist_across_epochs(train_records):
    batches_in, keys = _input(train_records, TrainTransform(0, 0.0, 0.0), workers=2, dataset_class=_WorkerPids)
    pids = []
    for epoch in range(3):
        keys.set_epoch(epoch)
        pids.append({pid for _, labels in batches_in for pid in labels.tolist()})
    assert pids[0] == pids[1] == pids[2] and len(pids[0]) == 2 and os.getpid() not in pids[0]


def test_unreadable_image_is_named_and_skipped_or_stops_the_run(train_records, tmp_path, caplog):
    records = list(train_records)
    bad = tmp_path / Path(records[5].path).name
    bad.write_bytes(b"not an image")
    records[5] = records[5].__class__(str(bad), records[5].pid, records[5].camid)
    batches_in, _ = _input(records, TrainTransform(0, 0.0, 0.0), workers=1)
    with caplog.at_level(logging.WARNING):
        sizes = [len(labels) for _, labels in batches_in]
    assert sorted(sizes) == [3, 4, 4] and str(bad) in caplog.text  # named by the training process
    stopping, _ = _input(records, TrainTransform(0, 0.0, 0.0), workers=1, on_bad_image="error")
    with pytest.raises(DataError, match=f"cannot read image {bad}.*on_bad_image=skip") as raised:
        list(stopping)
    assert "\n" not in str(raised.value)  # one line, not a worker traceback


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_are_pinned_and_equal_the_cpu_batches(train_records):
    transform = TrainTransform(2, 0.5, 0.0)
    cpu_in, keys = _input(train_records, transform, workers=1)
    preprocess = Preprocess(64, 32, MEAN, STD)
    loader = train_loader(TrainDataset(train_records, preprocess.to_uint8, transform), keys, 1, torch.device("cuda"))
    assert all(batch.images.is_pinned() for batch in loader)
    cuda_in = DeviceBatches(loader, preprocess, transform, torch.device("cuda"))
    for (a, labels_a), (b, labels_b) in zip(cpu_in, cuda_in, strict=True):
        assert b.is_cuda and torch.equal(labels_a, labels_b.cpu())
        torch.testing.assert_close(a, b.cpu(), rtol=0, atol=1e-6)
