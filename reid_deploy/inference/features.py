"""Batched feature extraction through any ``FeatureExtractor``, and the features ``.npz`` file.

Images go from disk to the device as uint8 batches (``inference.loader``: worker processes decode and
resize, pinned memory, asynchronous copies one batch ahead); ``FeatureExtractor.features`` normalises them
on the device, the one place of normalisation and flip for every backend. On CUDA the features of batch k
come back while the model already runs batch k+1. Unreadable images are skipped with a warning naming each
file (or stop the run when ``on_bad_image="error"``); the result says which input paths were kept.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from reid_deploy.console import log, progress
from reid_deploy.errors import DataError, missing_file

if TYPE_CHECKING:
    import torch

    from reid_deploy.inference.base import FeatureExtractor

NPZ_KEYS = ("query_feats", "gallery_feats", "query_pids", "gallery_pids", "query_camids", "gallery_camids",
            "query_paths", "gallery_paths")


@dataclass
class ExtractedFeatures:
    """Features of the readable images: ``feats[i]`` belongs to ``paths[i]`` = input ``kept[i]``."""

    feats: np.ndarray  # float32 [N, feat_dim], L2-normalised
    paths: list[str]
    kept: np.ndarray  # int64 indices into the input paths


@dataclass
class LabelledFeatures:
    """Features with their Market-1501 identities and 0-based cameras (one split: query or gallery)."""

    feats: np.ndarray
    pids: np.ndarray
    camids: np.ndarray
    paths: list[str]

    def __len__(self) -> int:
        return len(self.feats)

    def select(self, mask: np.ndarray) -> "LabelledFeatures":
        """The entries where ``mask`` (bool, or indices) holds."""
        index = np.flatnonzero(mask) if np.asarray(mask).dtype == bool else np.asarray(mask)
        return LabelledFeatures(self.feats[index], self.pids[index], self.camids[index],
                                [self.paths[i] for i in index])


@dataclass
class FeatureBatch:
    """One extracted batch: features of ``paths`` (input positions ``indices``)."""

    feats: np.ndarray
    paths: list[str]
    indices: np.ndarray


def iter_features(extractor: FeatureExtractor, paths: Sequence[str | Path], batch_size: int,
                  num_workers: int = 0, flip: bool = False, on_bad_image: str = "skip",
                  description: str = "features") -> Iterator[FeatureBatch]:
    """Yield features batch by batch as they are produced (for streaming writers).

    ``num_workers`` loader processes (0: load here; see ``loader.loader_workers`` for the cap). With
    ``flip`` each feature is the mean of the image's and its horizontal mirror's features, L2-normalised
    again. After the last batch, a warning names the count of skipped images; when none was readable,
    DataError.
    """
    from reid_deploy.inference.loader import image_batches, on_device

    if on_bad_image not in ("skip", "error"):
        raise ValueError(f"on_bad_image must be 'skip' or 'error', not {on_bad_image!r}")
    paths = [str(p) for p in paths]
    skipped: list[str] = []
    device = extractor.device
    with progress(f"Extracting {description}", total=len(paths)) as bar, \
            image_batches(paths, extractor.preprocess, batch_size, num_workers, device.type == "cuda") as loaded:
        waiting: _Running | None = None
        for batch in on_device(loaded, device):
            for index, reason in batch.unreadable:
                if on_bad_image == "error":
                    raise DataError(f"{reason} (dataset.on_bad_image=skip skips unreadable images)")
                log.warning("skipping unreadable image %s", paths[index])
                skipped.append(paths[index])
            bar.advance(len(batch.unreadable))
            running = None
            if batch.images is not None:  # queued on the device; collected after the next batch is queued
                running = _Running(extractor.features(batch.images, flip), [paths[i] for i in batch.indices],
                                   np.array(batch.indices, np.int64))
            if waiting is not None:
                yield waiting.collect()
                bar.advance(len(waiting.paths))
            waiting = running
        if waiting is not None:
            yield waiting.collect()
            bar.advance(len(waiting.paths))
    if skipped:
        log.warning("skipped %d unreadable image(s) of %d (%s)", len(skipped), len(paths), description)
    if paths and len(skipped) == len(paths):
        raise DataError(f"none of the {len(paths)} {description} images could be read (first: {skipped[0]})")


class _Running:
    """Features of one batch on their way to the host: an asynchronous copy into pinned memory on CUDA."""

    def __init__(self, feats: torch.Tensor, paths: list[str], indices: np.ndarray):
        import torch

        self.paths, self.indices, self.done = paths, indices, None
        if feats.device.type == "cuda":
            self.host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
            self.host.copy_(feats, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record(torch.cuda.current_stream(feats.device))
        else:
            self.host = feats

    def collect(self) -> FeatureBatch:
        if self.done is not None:
            self.done.synchronize()
        return FeatureBatch(self.host.numpy(), self.paths, self.indices)


def extract_features(extractor: FeatureExtractor, paths: Sequence[str | Path], batch_size: int,
                     num_workers: int = 0, flip: bool = False, on_bad_image: str = "skip",
                     description: str = "features") -> ExtractedFeatures:
    """Features of every readable image in ``paths``, in input order; see ``iter_features``."""
    feats = np.empty((len(paths), extractor.feat_dim), np.float32)  # filled in place: held once
    kept_paths: list[str] = []
    kept: list[np.ndarray] = []
    for batch in iter_features(extractor, paths, batch_size, num_workers, flip, on_bad_image, description):
        feats[len(kept_paths):len(kept_paths) + len(batch.paths)] = batch.feats
        kept_paths.extend(batch.paths)
        kept.append(batch.indices)
    indices = np.concatenate(kept) if kept else np.zeros(0, np.int64)
    return ExtractedFeatures(feats[:len(kept_paths)], kept_paths, indices)


def extract_labelled(extractor: FeatureExtractor, records: Sequence, batch_size: int, num_workers: int = 0,
                     flip: bool = False, on_bad_image: str = "skip", description: str = "features"
                     ) -> LabelledFeatures:
    """Features of Market-1501 records (``path``, ``pid``, ``camid``) with the labels of the kept images."""
    result = extract_features(extractor, [r.path for r in records], batch_size, num_workers, flip,
                              on_bad_image, description)
    pids = np.array([r.pid for r in records], np.int64)[result.kept]
    camids = np.array([r.camid for r in records], np.int64)[result.kept]
    return LabelledFeatures(result.feats, pids, camids, result.paths)


def save_features_npz(path: str | Path, query: LabelledFeatures, gallery: LabelledFeatures) -> None:
    """Write the features ``.npz`` (keys ``NPZ_KEYS``) atomically."""
    from reid_deploy.files import atomic_path

    arrays = {}
    for name, split in (("query", query), ("gallery", gallery)):
        arrays[f"{name}_feats"] = np.asarray(split.feats, np.float32)
        arrays[f"{name}_pids"] = np.asarray(split.pids, np.int64)
        arrays[f"{name}_camids"] = np.asarray(split.camids, np.int64)
        arrays[f"{name}_paths"] = np.array(split.paths, dtype=str) if split.paths else np.zeros(0, "<U1")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def read_npz(path: str | Path, keys: Sequence[str], required: Sequence[str], expected: str
             ) -> dict[str, np.ndarray]:
    """The arrays of ``keys`` that the features file ``path`` holds; DataError (one line) when the file is
    missing or unreadable or lacks one of ``required`` (``expected`` says what a good file holds)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(missing_file(path, "features file"))
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in required if k not in data.files]
            if missing:
                raise DataError(f"features file {path} lacks key(s) {', '.join(missing)} (expected {expected})")
            return {k: data[k] for k in keys if k in data.files}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot read features file {path}: {first[:200]}") from None


def load_features_npz(path: str | Path) -> tuple[LabelledFeatures, LabelledFeatures]:
    """Query and gallery features from a ``.npz``; DataError naming what is missing or inconsistent.

    ``query_paths`` / ``gallery_paths`` may be absent (features from another tool: six arrays); the
    split's paths are then empty strings."""
    required = [k for k in NPZ_KEYS if not k.endswith("_paths")]
    arrays = read_npz(path, NPZ_KEYS, required, f"{', '.join(required)}, optionally query_paths and gallery_paths")
    splits = []
    for name in ("query", "gallery"):
        feats = arrays[f"{name}_feats"]
        if feats.ndim != 2 or feats.shape[0] == 0 or not np.issubdtype(feats.dtype, np.floating):
            raise DataError(f"features file {path}: {name}_feats must be a non-empty float N x feat_dim "
                            f"array, got {feats.dtype} {feats.shape}")
        arrays.setdefault(f"{name}_paths", np.full(feats.shape[0], "", "<U1"))
        for suffix in ("pids", "camids", "paths"):
            other = arrays[f"{name}_{suffix}"]
            if other.shape != (feats.shape[0],):
                raise DataError(f"features file {path}: {name}_{suffix} has shape {other.shape} but "
                                f"{name}_feats has {feats.shape[0]} rows")
        for suffix in ("pids", "camids"):
            if not np.issubdtype(arrays[f"{name}_{suffix}"].dtype, np.integer):
                raise DataError(f"features file {path}: {name}_{suffix} must be integers, got "
                                f"{arrays[f'{name}_{suffix}'].dtype}")
        if not np.isfinite(feats).all():
            raise DataError(f"features file {path}: {name}_feats holds NaN or infinite values")
        splits.append(LabelledFeatures(feats.astype(np.float32, copy=False),
                                       arrays[f"{name}_pids"].astype(np.int64),
                                       arrays[f"{name}_camids"].astype(np.int64),
                                       arrays[f"{name}_paths"].astype(str).tolist()))
    query, gallery = splits
    if query.feats.shape[1] != gallery.feats.shape[1]:
        raise DataError(f"features file {path}: query_feats has {query.feats.shape[1]} columns but "
                        f"gallery_feats has {gallery.feats.shape[1]}")
    return query, gallery
