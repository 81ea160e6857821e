"""Images from disk as uint8 NCHW batches, decoded in worker processes and moved to the device ahead of use.

``image_batches`` runs a torch DataLoader: worker processes (``num_workers``; 0 loads in the calling
process) open, convert and resize each image (``Preprocess.load_uint8``) and collate uint8 NCHW batches, a
quarter of float32's bytes, pinned when the consumer computes on CUDA. Unreadable images travel beside
the batch (``LoadedBatch.unreadable``) so that the consumer names them. ``on_device`` copies batch k+1 to
the GPU on a side stream while the model runs batch k (the pattern of timm's PrefetchLoader).

Workers start with the ``forkserver`` method: forking a process that already runs threads (ONNX Runtime's
and torch's thread pools, CUDA, a progress bar) can deadlock the child, and ``spawn`` re-imports everything
per worker. Each worker receives only the preprocessing settings; the paths come batch by batch with the
indices, so start-up does not grow with the number of images. A worker that imports torch itself takes
seconds to start (3 s on an idle 2-core VM, 10 s on a busy one; forked: 0.06 s), so the CLI starts the fork
server early with torch preloaded (``start_worker_server``): it imports while the model loads, and workers
then start in 0.1-0.4 s. A job of fewer than ``SMALL_JOB`` images loads in the calling process. Scripts
that extract with workers need the usual ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from reid_deploy.console import log
from reid_deploy.errors import DataError
from reid_deploy.inference.preprocess import Preprocess

START_METHOD = "forkserver"
SMALL_JOB = 64  # fewer images load in the calling process: starting a worker costs more than they take
ItemKey = tuple[int, str]  # (position in the input, path)


class LoadedBatch(NamedTuple):
    """The readable images of one batch (uint8 NCHW; None when none was readable), their input positions,
    and the unreadable ones as (input position, reason)."""

    images: torch.Tensor | None
    indices: list[int]
    unreadable: list[tuple[int, str]]


class _ImageFiles(Dataset):
    """Item ``(position, path)`` -> ``(position, uint8 CHW tensor)``, or ``(position, reason)`` when unreadable."""

    def __init__(self, preprocess: Preprocess):
        self.preprocess = preprocess

    def __getitem__(self, key: ItemKey) -> tuple[int, torch.Tensor | str]:
        position, path = key
        try:
            return position, torch.from_numpy(self.preprocess.load_uint8(path))
        except DataError as exc:
            return position, str(exc)


class _PathBatches:
    """Batch sampler over ``paths``: lists of ``(position, path)`` keys, in input order."""

    def __init__(self, paths: Sequence[str], batch_size: int):
        self.paths, self.batch_size = paths, batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def __iter__(self) -> Iterator[list[ItemKey]]:
        for start in range(0, len(self.paths), self.batch_size):
            yield [(start + i, path) for i, path in enumerate(self.paths[start:start + self.batch_size])]


def _collate(items: list[tuple[int, torch.Tensor | str]]) -> LoadedBatch:
    readable = [(i, image) for i, image in items if isinstance(image, torch.Tensor)]
    unreadable = [(i, reason) for i, reason in items if isinstance(reason, str)]
    images = default_collate([image for _, image in readable]) if readable else None  # shared memory in a worker
    return LoadedBatch(images, [i for i, _ in readable], unreadable)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loader_workers(requested: int, images: int, batch_size: int) -> int:
    """Worker processes for a job: at most ``requested`` and the usable CPUs, none for a small job, and
    fewer than its batches (one batch gains nothing from a worker)."""
    if images < SMALL_JOB:
        return 0
    return max(0, min(requested, usable_cpus(), math.ceil(images / batch_size) - 1))


def start_worker_server(preload: Sequence[str] = ()) -> None:
    """Start the fork server of loader workers now, importing torch, this module and ``preload`` into it
    in the background (while the caller loads its model), so that workers then start in a fraction of a
    second. For a program's entry point only: it sets process-wide multiprocessing state."""
    import multiprocessing.forkserver

    multiprocessing.set_forkserver_preload(["torch", __name__, *preload])
    multiprocessing.forkserver.ensure_running()


@contextmanager
def image_batches(paths: Sequence[str], preprocess: Preprocess, batch_size: int, num_workers: int = 0,
                  pin_memory: bool = False) -> Iterator[Iterator[LoadedBatch]]:
    """The images of ``paths`` as ``LoadedBatch``es of up to ``batch_size``, in input order.

    ``num_workers`` worker processes (capped by ``loader_workers``) live for the whole iteration and are
    stopped when the block ends, also on an error.
    """
    workers = loader_workers(num_workers, len(paths), batch_size)
    if workers != num_workers and num_workers:
        log.debug("loading %d images with %d worker process(es) (dataset.num_workers=%d, %d usable CPUs)",
                  len(paths), workers, num_workers, usable_cpus())
    loader = DataLoader(_ImageFiles(preprocess), batch_sampler=_PathBatches(paths, batch_size),
                        collate_fn=_collate, num_workers=workers, pin_memory=pin_memory,
                        multiprocessing_context=multiprocessing.get_context(START_METHOD) if workers else None)
    batches = iter(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own clean-up, run now, not at GC
        if shutdown is not None:
            shutdown()


def on_device(batches: Iterator[LoadedBatch], device: torch.device) -> Iterator[LoadedBatch]:
    """``batches`` with their images on ``device``. On CUDA each copy is asynchronous (from pinned memory)
    on a side stream, issued one batch ahead: batch k+1 travels while the caller's kernels for batch k run."""
    if device.type != "cuda":
        yield from batches
        return
    side = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)
    waiting: LoadedBatch | None = None
    for batch in batches:
        with torch.cuda.stream(side):
            moved = batch if batch.images is None else \
                batch._replace(images=batch.images.to(device, non_blocking=True))
        if waiting is not None:
            yield waiting
        main.wait_stream(side)  # after the caller queued batch k: batch k+1's kernels wait for its copy
        if moved.images is not None:
            moved.images.record_stream(main)  # allocated on the side stream, used on the main one
        waiting = moved
    if waiting is not None:
        yield waiting
