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

The torch CUDA path ran on an H100 (tests and bench); the faiss-gpu path has not been run (no faiss-gpu there).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

KNN_METHODS = ("exact", "faiss", "ivf", "hnsw")
# rows and columns of a distance block: the diagonal blocks are computed whole (twice the upper half's
# work), so smaller blocks waste less; 3072 measured faster than 6144 and 2048 on 2 cores (Market, 40,000 x 256)
BLOCK = 3072
SCORES_PER_BLOCK = 1 << 24  # query x gallery scores per block of ``top_inner_products`` (64 MB)
QUERY_CHUNK = 4096  # queries per pass of ``top_inner_products`` over the gallery (blocks >= 4096 wide)
RESCORE_EXTRA = 16  # candidates per query beyond k that ``top_inner_products`` re-scores exactly
TRAIN_PER_LIST = 64  # IVF k-means sample per inverted list (FAISS needs >= 39; more barely helps)


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


def rows_tensor(rows: np.ndarray, device):
    """float32 rows as a torch tensor on ``device``: the array's own memory when it is a writable C-ordered
    float32 array in RAM (no copy), else a copy (torch refuses read-only memory, such as a memory-mapped index)."""
    import torch

    if not (rows.dtype == np.float32 and rows.flags.c_contiguous and rows.flags.writeable):
        rows = np.array(rows, np.float32)
    return torch.from_numpy(rows).to(device)


def top_inner_products(queries: np.ndarray, gallery: np.ndarray, k: int, device: str = "auto",
                       max_norm: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``min(k, len(gallery))`` largest inner products with the gallery rows: (gallery positions
    int64, scores float32), largest first, equal scores in position order.

    Blocked float32 products in torch on ``device`` (CUDA when present; at most SCORES_PER_BLOCK scores at a
    time, faster than FAISS's flat search) only choose candidates: k + RESCORE_EXTRA per query, re-scored by
    ``exact_inner_products``. So a score does not depend on the query batch, the block shapes or the BLAS
    code path of the CPU, and identical rows score identically. Where the weakest candidate's product lies
    within the float32 product's error bound of the k-th exact score (near-ties at the cut), that query's
    candidates are every item within the bound, from one more pass. ``max_norm``: the largest gallery row
    norm (the bound's scale; measured in the pass when not given)."""
    dev, k, n = torch_device(device), min(k, len(gallery)), len(gallery)
    queries = np.ascontiguousarray(queries, np.float32)
    if not len(queries) or k == 0:
        return np.zeros((len(queries), k), np.int64), np.zeros((len(queries), k), np.float32)
    wide = min(n, k + RESCORE_EXTRA)
    cand_i, cand_v, measured = _product_candidates(queries, gallery, wide, dev, max_norm is None)
    top_i, top_s = _exact_top(queries, gallery, cand_i, k)
    if wide < n:
        scale = max_norm if max_norm is not None else measured
        bound = (queries.shape[1] + 4) * 2.0 ** -23 * np.linalg.norm(queries, axis=1) * scale
        doubt = np.flatnonzero(cand_v.min(1) >= top_s[:, -1] - bound)
        for q in doubt:  # near-ties at the k-th score: every item the product puts within the bound
            near = _product_above(queries[q], gallery, top_s[q, -1] - bound[q], dev)
            top_i[q], top_s[q] = (x[0] for x in _exact_top(queries[q:q + 1], gallery, near[None], k))
    return top_i, top_s


def exact_inner_products(queries: np.ndarray, gallery: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """float32 [nq, c]: each query's inner products with the gallery rows ``positions`` [nq, c], summed in
    float64 (products of float32 are exact there) in the same order for every pair, then rounded once: the
    same bits for the same two vectors, whatever the batch, the row's position or the thread count."""
    rows = np.asarray(gallery[positions.reshape(-1)], np.float64).reshape(*positions.shape, -1)
    return (rows * np.asarray(queries, np.float64)[:, None, :]).sum(-1).astype(np.float32)


def _exact_top(queries: np.ndarray, gallery: np.ndarray, candidates: np.ndarray, k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each query's ``candidates`` by exact score, ties in position order."""
    scores = exact_inner_products(queries, gallery, candidates)
    order = np.lexsort((candidates, -scores), axis=1)[:, :k]
    return np.take_along_axis(candidates, order, 1), np.take_along_axis(scores, order, 1)


def _product_candidates(queries: np.ndarray, gallery: np.ndarray, wide: int, dev, measure_norm: bool
                        ) -> tuple[np.ndarray, np.ndarray, float]:
    """(positions int64, float32 products) of each query's ``wide`` largest blocked products (unsorted), and
    the largest gallery row norm when ``measure_norm`` (else 0)."""
    import torch

    indices, scores, largest = [], [], 0.0
    with torch.inference_mode():
        for first in range(0, len(queries), QUERY_CHUNK):
            x = torch.from_numpy(queries[first:first + QUERY_CHUNK]).to(dev)
            best_v = torch.full((len(x), wide), -float("inf"), device=dev)
            best_i = torch.zeros((len(x), wide), dtype=torch.int64, device=dev)
            cols = max(wide, min(65536, SCORES_PER_BLOCK // len(x)))
            for a in range(0, len(gallery), cols):
                block = rows_tensor(gallery[a:a + cols], dev)
                if measure_norm and not first:
                    largest = max(largest, float(torch.linalg.vector_norm(block, dim=1).max()))
                best_v, best_i = merge_top(best_v, best_i, x @ block.T, a, largest=True)
            indices.append(best_i.cpu().numpy())
            scores.append(best_v.cpu().numpy())
    return np.concatenate(indices), np.concatenate(scores), largest


def _product_above(query: np.ndarray, gallery: np.ndarray, threshold: float, dev) -> np.ndarray:
    """Positions (int64, ascending) of the gallery rows whose blocked product with ``query`` is at least
    ``threshold``."""
    import torch

    x, found = torch.from_numpy(query[None]).to(dev), []
    with torch.inference_mode():
        for a in range(0, len(gallery), 65536):
            block = rows_tensor(gallery[a:a + 65536], dev)
            found.append((x @ block.T)[0].ge(threshold).nonzero()[:, 0].cpu().numpy() + a)
    return np.concatenate(found)


def rows_knn(feats: np.ndarray, rows: np.ndarray, k: int, device: str = "auto", block: int = 65536) -> KnnGraph:
    """The lists of the rows ``rows`` (positions) of ``feats`` among all rows, exactly: their ``k`` nearest
    items (itself included; ties in position order), squared distances and row maxima, as ``knn_graph``
    gives them for those rows (to float rounding). At most SCORES_PER_BLOCK distances at a time."""
    import torch

    dev, k = torch_device(device), min(k, len(feats))
    indices, distances, maxima = [], [], []
    chunk = max(1, SCORES_PER_BLOCK // block)
    with torch.inference_mode():
        squares = torch.cat([torch.zeros(0, device=dev)] + [(y * y).sum(1) for y in (
            rows_tensor(feats[a:a + block], dev) for a in range(0, len(feats), block))])  # once, not per chunk
        for first in range(0, len(rows), chunk):
            x = torch.from_numpy(np.ascontiguousarray(feats[rows[first:first + chunk]], np.float32)).to(dev)
            sq = (x * x).sum(1)
            best_d = torch.full((len(x), k), float("inf"), device=dev)
            best_i = torch.zeros((len(x), k), dtype=torch.int64, device=dev)
            row_max = torch.full((len(x),), -float("inf"), device=dev)
            for a in range(0, len(feats), block):
                y = rows_tensor(feats[a:a + block], dev)
                dist = torch.addmm(squares[None, a:a + block], x, y.T, alpha=-2)
                dist += sq[:, None]
                row_max = torch.maximum(row_max, dist.amax(1))
                best_d, best_i = merge_top(best_d, best_i, dist, a)
            d, i = best_d.cpu().numpy(), best_i.cpu().numpy()
            order = np.lexsort((i, d), axis=1)
            indices.append(np.take_along_axis(i, order, 1))
            distances.append(np.take_along_axis(d, order, 1))
            maxima.append(row_max.cpu().numpy())
    if not indices:
        return KnnGraph(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros(0, np.float32))
    return KnnGraph(np.concatenate(indices), np.concatenate(distances), np.concatenate(maxima))


def farthest_of(feats: np.ndarray, others: np.ndarray, device: str = "auto") -> np.ndarray:
    """float32 [len(feats)]: each row's largest squared distance to the rows of ``others`` (rows of ``feats``
    in chunks of about SCORES_PER_BLOCK distances)."""
    import torch

    dev = torch_device(device)
    y = torch.from_numpy(np.ascontiguousarray(others, np.float32)).to(dev)
    sq_y, parts = (y * y).sum(1), [np.zeros(0, np.float32)]
    chunk = max(1, SCORES_PER_BLOCK // max(1, len(others)))
    with torch.inference_mode():
        for a in range(0, len(feats), chunk):
            x = rows_tensor(feats[a:a + chunk], dev)
            dist = torch.addmm(sq_y[None], x, y.T, alpha=-2)
            dist += (x * x).sum(1)[:, None]
            parts.append(dist.amax(1).cpu().numpy())
    return np.concatenate(parts)


def merge_top(best_v, best_i, block, offset: int, largest: bool = False):
    """Fold a block of values (columns from ``offset``; torch) into each row's best ``k`` (unsorted): the
    smallest, or the largest with ``largest``."""
    import torch

    v, i = torch.topk(block, min(best_v.shape[1], block.shape[1]), dim=1, largest=largest, sorted=False)
    v_top, pos = torch.topk(torch.cat([best_v, v], 1), best_v.shape[1], dim=1, largest=largest, sorted=False)
    return v_top, torch.gather(torch.cat([best_i, i + offset], 1), 1, pos)


def knn_graph(feats: np.ndarray, k: int, method: str = "exact", device: str = "auto",
              block: int = BLOCK, nlist: int = 1024, nprobe: int = 32, hnsw_m: int = 32,
              ef_search: int = 128, cross: np.ndarray | None = None, description: str | None = None
              ) -> KnnGraph:
    """The ``k`` nearest neighbours of every row of ``feats`` among all rows, and each row's maximum.

    With ``cross`` (float32 [s, N - s], method ``exact`` only), the distances of the first s rows to the
    others are also written there as they are computed (the query x gallery block of re-ranking).
    With ``description``, a progress bar of that name follows the work.
    """
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    if not feats.flags.writeable:  # a memory-mapped index: torch wants its own copy
        feats = feats.copy()
    k = min(k, len(feats))
    if method == "exact":
        return _knn_torch(feats, k, torch_device(device), block, cross, description=description)
    if method not in KNN_METHODS:
        raise ValueError(f"unknown kNN method {method!r}; choose one of {', '.join(KNN_METHODS)}")
    norms = np.linalg.norm(feats, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise ValueError(f"kNN method {method!r} needs L2-normalised features; use method='exact'")
    return _knn_faiss(feats, k, method, nlist, nprobe, hnsw_m, ef_search, description)


def extend_knn_graph(graph: KnnGraph, feats: np.ndarray, k: int, device: str = "auto", block: int = BLOCK,
                     description: str | None = None) -> KnnGraph:
    """The graph of all rows of ``feats`` from ``graph``, the graph of its first ``len(graph.row_max)`` rows:
    the new rows get their lists against every row, the old rows take in new rows that are nearer, and
    every row maximum covers the new rows. Only new x all blocks are multiplied. Equal to ``knn_graph``
    of all rows (method ``exact``) when ``graph`` is exact, whatever the split."""
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    return _knn_torch(feats, min(k, len(feats)), torch_device(device), block, None, graph, description)


def _knn_torch(feats: np.ndarray, k: int, device, block: int, cross: np.ndarray | None,
               init: KnnGraph | None = None, description: str | None = None) -> KnnGraph:
    import torch

    n = len(feats)
    start = 0 if init is None else len(init.row_max)
    x = torch.from_numpy(feats).to(device)
    sq = (x * x).sum(1)
    best_d = torch.full((n, k), float("inf"), device=device)
    best_i = torch.zeros((n, k), dtype=torch.int64, device=device)
    row_max = torch.full((n,), -float("inf"), device=device)
    if init is not None:
        width = min(k, init.indices.shape[1])
        best_d[:start, :width] = torch.from_numpy(np.array(init.distances[:, :width], np.float32)).to(device)
        best_i[:start, :width] = torch.from_numpy(np.array(init.indices[:, :width], np.int64)).to(device)
        row_max[:start] = torch.from_numpy(np.array(init.row_max, np.float32)).to(device)
    old = [(b, min(b + block, start)) for b in range(0, start, block)]  # old rows: columns only
    # diagonal blocks first: every row then has a full list (a block holds k items), and later blocks merge
    # only their entries below its k-th distance (a first top-k down a block's columns costs 3x one along rows)
    pairs = [(a, (a, min(a + block, n))) for a in range(start, n, block)] + \
        [(a, col) for a in range(start, n, block) for col in old + [(b, min(b + block, n))
                                                                    for b in range(a + block, n, block)]]

    def merge(rows: slice, dist, offset: int, dim: int) -> None:
        """Fold the candidates in ``dist`` into rows' best lists: its rows (``dim`` 1) or columns (``dim`` 0)
        are ``rows``, its other axis holds items from ``offset``. Once a row's list is full, only entries
        below its current k-th distance are candidates (no top-k over the whole block)."""
        row_max[rows] = torch.maximum(row_max[rows], _reduce_max(dist, dim))
        bound = best_d[rows, k - 1]
        if torch.isinf(bound).any():
            d, i = torch.topk(dist, min(k, dist.shape[dim]), dim=dim, largest=False, sorted=False)
            cand_d, cand_i = (d, i + offset) if dim == 1 else (d.T, i.T + offset)
        else:
            r, c = _below(dist, bound[:, None] if dim == 1 else bound[None, :])
            if not len(r):
                return
            own, other, value = (r, c, dist[r, c])
            if dim == 0:
                order = torch.argsort(c, stable=True)
                own, other, value = c[order], r[order], value[order]
            cand_d, slot = ragged_rows(own, value, bound.shape[0], float("inf"))
            cand_i = torch.zeros(cand_d.shape, dtype=torch.int64, device=device)
            cand_i[own, slot] = other + offset
        d, pos = torch.topk(torch.cat([best_d[rows], cand_d], 1), k, dim=1, largest=False, sorted=True)
        best_d[rows], best_i[rows] = d, torch.gather(torch.cat([best_i[rows], cand_i], 1), 1, pos)

    # every block's distances go to one reused buffer: a fresh block (36 MB at 3072) costs its page faults
    # again, about 15 % of the product on the CPU
    buffer = torch.empty(min(block, n) ** 2, device=device)
    with torch.inference_mode(), _progress(description, len(pairs)) as advance:
        for a, (b, b_end) in pairs:
            rows, cols = slice(a, min(a + block, n)), slice(b, b_end)
            shape = (rows.stop - rows.start, b_end - b)
            dist = torch.addmm(sq[None, cols], x[rows], x[cols].T, alpha=-2,
                               out=buffer[:shape[0] * shape[1]].view(shape))
            dist += sq[rows, None]
            if cross is not None:
                _fill_cross(cross, dist, rows, cols)
            merge(rows, dist, b, 1)
            if b != a:
                merge(cols, dist, a, 0)
            advance()
    return KnnGraph(best_i.cpu().numpy(), best_d.cpu().numpy(), row_max.cpu().numpy())


def _in_numpy(dist) -> bool:
    """Whether a block's reductions run in numpy (a CPU tensor) rather than torch (a GPU's)."""
    return dist.device.type == "cpu"


def _reduce_max(dist, dim: int):
    """``dist.amax(dim)``; on the CPU by numpy (one thread on the tensor's memory: no dispatch cost)."""
    import torch

    return torch.from_numpy(dist.numpy().max(dim)) if _in_numpy(dist) else dist.amax(dim)


def _below(dist, bound):
    """(rows, columns) of the entries of ``dist`` below ``bound`` (broadcast); on the CPU by numpy's flat
    nonzero, far faster than a 2-D nonzero."""
    import torch

    if not _in_numpy(dist):
        return (dist < bound).nonzero(as_tuple=True)
    flat = torch.from_numpy(np.flatnonzero(dist.numpy() < bound.numpy()))
    return flat // dist.shape[1], flat % dist.shape[1]


def ragged_rows(rows, values, n_rows: int, fill):
    """(``values`` laid out by ``rows`` (ascending) into a padded [n_rows, longest row] tensor, each value's
    slot in its row)."""
    import torch

    counts = torch.bincount(rows, minlength=n_rows)
    slot = torch.arange(len(rows), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
    padded = torch.full((n_rows, int(counts.max()) if len(rows) else 0), fill, dtype=values.dtype,
                        device=values.device)
    padded[rows, slot] = values
    return padded, slot


@contextmanager
def _progress(description: str | None, total: int) -> Iterator[Callable[[], None]]:
    """``advance()`` of a progress bar named ``description``, or a no-op without one."""
    if description is None:
        yield lambda: None
        return
    from reid_deploy.console import progress

    with progress(description, total) as bar:
        yield bar.advance


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
               ef_search: int, description: str | None = None, batch: int = 16384) -> KnnGraph:
    index = _faiss_index(feats.shape[1], method, len(feats), nlist, nprobe, hnsw_m, max(ef_search, k))
    if not index.is_trained:  # k-means on TRAIN_PER_LIST points per list at most (a random sample)
        lists = ivf_lists(nlist, len(feats))
        sample = np.random.default_rng(0).choice(len(feats), min(len(feats), TRAIN_PER_LIST * lists), replace=False)
        index.train(feats[np.sort(sample)])
    index.add(feats)
    n = len(feats)
    idx, dist, far = np.empty((n, k), np.int64), np.empty((n, k), np.float32), np.empty(n, np.float32)
    with _progress(description, -(-n // batch)) as advance:
        for a in range(0, n, batch):
            rows = slice(a, min(a + batch, n))
            dist[rows], idx[rows] = index.search(feats[rows], k)
            far[rows] = index.search(-feats[rows], 1)[0][:, 0]
            advance()
    return KnnGraph(idx, dist, (4.0 - far).astype(np.float32))
