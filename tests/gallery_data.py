"""Synthetic unit features for the tests of the search service."""

from __future__ import annotations

import numpy as np


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, ids: int, seed: int) -> np.ndarray:
    """Unit features in identity clusters (non-trivial reciprocal sets)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(ids, dim))
    return unit_rows(centers[rng.integers(0, ids, n)] + 0.6 * rng.normal(size=(n, dim)))
