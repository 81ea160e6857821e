"""k-nearest-neighbour graph over one set of features, with each row's largest distance.

Distances are squared Euclidean, computed as ``|x|^2 + |y|^2 - 2 x.y`` in float32 (as the published
re-ranking code does). Methods:

- ``exact`` (default): blocked matrix products in torch (CUDA when present, else CPU). Only the blocks on
  and above the diagonal are multiplied (the distance matrix is symmetric), so the cost is about half of
  one N x N x d product; memory is O(N k) plus one block. Never stores N x N.
- ``faiss``: exact flat FAISS search (on all GPUs when faiss has them). Needs L2-normalised features.
- ``ivf`` / ``hnsw``: approximate FAISS indexes for millions of items. Need L2-normalised features.

For the FAISS methods the farthest item of ``x`` is the nearest item of ``-x`` (unit vectors:
``|x - y|^2 = 4 - |-x - y|^2``), so the row maximum is one more k=1 search.

The CUDA paths (torch on a GPU, faiss-gpu) are written for, but have not been run on, a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KNN_METHODS = ("exact", "faiss", "ivf", "hnsw")


@dataclass
class KnnGraph:
    """``indices[i]``: the ``k`` nearest items of item i (itself included), nearest first."""

    indices: np.ndarray  # int64 [N, k]
    distances: np.ndarray  # float32 [N, k], squared Euclidean
    row_max: np.ndarray  # float32 [N], largest distance of each row over all N items


def torch_device(device: str = "auto"):
    """``cuda`` when asked for or when ``auto`` finds a GPU, else ``cpu``."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def knn_graph(feats: np.ndarray, k: int, method: str = "exact", device: str = "auto",
              block: int = 6144, nlist: int = 1024, nprobe: int = 32, hnsw_m: int = 32,
              ef_search: int = 128, cross: np.ndarray | None = None) -> KnnGraph:
    """The ``k`` nearest neighbours of every row of ``feats`` among all rows, and each row's maximum.

    With ``cross`` (float32 [s, N - s], method ``exact`` only), the distances of the first s rows to the
    others are also written there as they are computed (the query x gallery block of re-ranking).
    """
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    k = min(k, len(feats))
    if method == "exact":
        return _knn_torch(feats, k, torch_device(device), block, cross)
    if method not in KNN_METHODS:
        raise ValueError(f"unknown kNN method {method!r}; choose one of {', '.join(KNN_METHODS)}")
    norms = np.linalg.norm(feats, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError(f"kNN method {method!r} needs L2-normalised features; use method='exact'")
    return _knn_faiss(feats, k, method, nlist, nprobe, hnsw_m, ef_search)


def _knn_torch(feats: np.ndarray, k: int, device, block: int, cross: np.ndarray | None) -> KnnGraph:
    import torch

    n = len(feats)
    x = torch.from_numpy(feats).to(device)
    sq = (x * x).sum(1)
    best_d = torch.full((n, k), float("inf"), device=device)
    best_i = torch.zeros((n, k), dtype=torch.int64, device=device)
    row_max = torch.full((n,), -float("inf"), device=device)
    starts = range(0, n, block)

    def merge(rows: slice, dist, offset: int) -> None:
        """Fold the candidates ``dist`` (rows x cols, columns from ``offset``) into rows' best lists."""
        kk = min(k, dist.shape[1])
        d, i = torch.topk(dist, kk, dim=1, largest=False, sorted=False)
        d = torch.cat([best_d[rows], d], 1)
        i = torch.cat([best_i[rows], i + offset], 1)
        d, pos = torch.topk(d, k, dim=1, largest=False, sorted=True)
        best_d[rows], best_i[rows] = d, torch.gather(i, 1, pos)
        row_max[rows] = torch.maximum(row_max[rows], dist.max(1).values)

    with torch.inference_mode():
        for a in starts:
            rows = slice(a, min(a + block, n))
            for b in starts[a // block:]:
                cols = slice(b, min(b + block, n))
                dist = torch.addmm(sq[None, cols], x[rows], x[cols].T, alpha=-2)
                dist += sq[rows, None]
                if cross is not None:
                    _fill_cross(cross, dist, rows, cols)
                merge(rows, dist, b)
                if b != a:
                    merge(cols, dist.T.contiguous(), a)
    return KnnGraph(best_i.cpu().numpy(), best_d.cpu().numpy(), row_max.cpu().numpy())


def _fill_cross(cross: np.ndarray, dist, rows: slice, cols: slice) -> None:
    """Copy the part of block ``dist`` with rows < s <= columns into ``cross`` [s, N - s]."""
    split = len(cross)
    r_end, c_start = min(rows.stop, split), max(cols.start, split)
    if rows.start < r_end and c_start < cols.stop:
        cross[rows.start:r_end, c_start - split:cols.stop - split] = \
            dist[:r_end - rows.start, c_start - cols.start:].cpu().numpy()


def ivf_lists(wanted: int, n: int) -> int:
    """Inverted lists for ``n`` training vectors: at most ``wanted``, with >= 39 points each (FAISS's minimum)."""
    return max(1, min(wanted, n // 39))


def _faiss_index(dim: int, method: str, n: int, nlist: int, nprobe: int, hnsw_m: int, ef_search: int):
    """An empty L2 FAISS index of ``method`` for ``n`` vectors, moved to all GPUs when faiss has them."""
    import faiss

    if method == "faiss":
        index = faiss.IndexFlatL2(dim)
    elif method == "ivf":
        index = faiss.index_factory(dim, f"IVF{ivf_lists(nlist, n)},Flat")
        index.nprobe = nprobe  # copied along to the GPU index
    else:
        index = faiss.index_factory(dim, f"HNSW{hnsw_m}")
        index.hnsw.efSearch = ef_search
    if method != "hnsw" and faiss.get_num_gpus() > 0:  # faiss-gpu has no HNSW
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def _knn_faiss(feats: np.ndarray, k: int, method: str, nlist: int, nprobe: int, hnsw_m: int,
               ef_search: int) -> KnnGraph:
    index = _faiss_index(feats.shape[1], method, len(feats), nlist, nprobe, hnsw_m, max(ef_search, k))
    if not index.is_trained:
        index.train(feats)
    index.add(feats)
    dist, idx = index.search(feats, k)
    far, _ = index.search(-feats, 1)
    return KnnGraph(idx.astype(np.int64), dist.astype(np.float32), (4.0 - far[:, 0]).astype(np.float32))
