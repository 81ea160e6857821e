"""Features from elsewhere (a DeepStream pipeline, another extractor, ``reid inference``) for the index and
search commands: one split of a features ``.npz``, ``<split>_feats`` (float N x feat_dim, L2-normalised)
and ``<split>_paths`` (N names), checked so that bad input is one clear line."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reid_deploy.errors import DataError
from reid_deploy.inference.features import read_npz

UNIT_TOLERANCE = 1e-3  # largest | |x| - 1 | accepted for an L2-normalised feature


def check_unit_rows(feats: np.ndarray, where: str) -> None:
    """DataError naming the first row of float features [n, d] that holds NaN or infinity, or whose length is
    not 1 within UNIT_TOLERANCE (``where`` names the features: "features file F: gallery_feats")."""
    bad = np.flatnonzero(~np.isfinite(feats).all(1))
    if len(bad):
        raise DataError(f"{where} row {bad[0]} holds NaN or infinite values ({len(bad)} such row(s))")
    norms = np.linalg.norm(feats, axis=1)
    off = np.flatnonzero(np.abs(norms - 1) > UNIT_TOLERANCE)
    if len(off):
        raise DataError(f"{where} row {off[0]} has length {norms[off[0]]:.4g}, not 1 ({len(off)} such row(s)): "
                        f"features must be L2-normalised, as the models output them")


def read_features(path: str | Path, split: str, feat_dim: int | None = None) -> tuple[np.ndarray, list[str]]:
    """(float32 [N, feat_dim] features, N paths) of ``split`` ("gallery" or "query") in a features file;
    DataError when the file or a key is missing, the arrays do not fit, a feature is not finite or not
    unit length, ``feat_dim`` (when given) differs, or a path repeats."""
    names = (f"{split}_feats", f"{split}_paths")
    arrays = read_npz(path, names, names, f"{names[0]} and {names[1]}")
    feats, paths = arrays[names[0]], arrays[names[1]]
    where = f"features file {path}: {names[0]}"
    if feats.ndim != 2 or not len(feats) or not np.issubdtype(feats.dtype, np.floating):
        raise DataError(f"{where} must be a non-empty float N x feat_dim array, got {feats.dtype} {feats.shape}")
    if paths.shape != (len(feats),) or paths.dtype.kind not in "US":
        raise DataError(f"features file {path}: {names[1]} must hold {len(feats)} path strings, got "
                        f"{paths.dtype} {paths.shape}")
    if feat_dim is not None and feats.shape[1] != feat_dim:
        raise DataError(f"{where} has {feats.shape[1]} columns but the index holds feat_dim {feat_dim}")
    feats = feats.astype(np.float32, copy=False)
    check_unit_rows(feats, where)
    paths = [str(p) for p in paths]
    if len(set(paths)) != len(paths):
        seen: set[str] = set()
        repeated = next(p for p in paths if p in seen or seen.add(p))
        raise DataError(f"features file {path}: {names[1]} repeats {repeated}")
    return np.ascontiguousarray(feats), paths
