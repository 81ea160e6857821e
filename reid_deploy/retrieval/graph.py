"""The gallery's k-nearest-neighbour graph, kept in the index so that re-ranked searches need not rebuild it.

For every gallery item: its ``k`` nearest gallery items (itself included, nearest first) with their squared
Euclidean distances, and its largest distance to any gallery item (the row normalisation of k-reciprocal
re-ranking). Methods (``index.graph``):

- ``exact``: blocked matrix products over symmetric blocks (``knn.knn_graph``; CUDA when present), memory
  O(G k) plus one block. Adding items multiplies only the new x all blocks (``knn.extend_knn_graph``), and
  the result equals a graph built from scratch over all items.
- ``ivf`` / ``hnsw``: approximate FAISS searches, for millions of items on a CPU; the build reports the
  top-10 agreement with the exact lists on a sample of items. Later additions are merged exactly into it.

With the graph come the gallery's own k-reciprocal weights V for one k1 and its reciprocal sets
(``graph_rerank.gallery_weights``): a re-ranked search recomputes only the rows its queries change and
reads the others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from reid_deploy.console import log
from reid_deploy.retrieval.knn import KnnGraph, extend_knn_graph, farthest_of, knn_graph, rows_knn, torch_device

GRAPH_METHODS = ("exact", "ivf", "hnsw")
AGREEMENT_SAMPLE = 1000  # items whose approximate top 10 is compared with the exact one
AGREEMENT_TOP = 10


@dataclass
class GalleryGraph(KnnGraph):
    """``indices`` int32 [G, min(k, G)] gallery positions, ``distances`` float32 [G, min(k, G)], ``row_max``
    float32 [G]; ``agreement``: top-10 agreement with exact lists on a sample (approximate methods);
    ``weights``: V of the gallery for ``weights_k1`` (float32 CSR [G, G]), when computed, and ``sets`` its
    packed k-reciprocal sets (``graph_rerank.gallery_weights``; None in index files written before them)."""

    k: int = 32
    method: str = "exact"
    agreement: float | None = None
    weights: Any = None
    weights_k1: int = 0
    sets: np.ndarray | None = None

    @property
    def encoding(self) -> tuple[Any, np.ndarray | None]:
        """(weights, sets): what ``graph_rerank.rerank_topk_with_graph`` reads for every row its queries keep."""
        return self.weights, self.sets

    @property
    def width(self) -> int:
        return self.indices.shape[1]

    def covers(self, needed: int) -> bool:
        """Whether the lists hold the ``needed`` nearest items of every row (all items in small galleries)."""
        return self.width >= min(needed, len(self.row_max))


def build_graph(feats: np.ndarray, k: int, method: str = "exact", device: str = "auto", nlist: int = 1024,
                nprobe: int = 32, hnsw_m: int = 32, ef_search: int = 128) -> GalleryGraph:
    """The graph of ``feats`` (L2-normalised float32 [G, d]), with a progress bar; approximate methods
    log (and keep) their top-10 agreement with the exact lists on a sample."""
    if method not in GRAPH_METHODS:
        raise ValueError(f"unknown graph method {method!r}; choose one of {', '.join(GRAPH_METHODS)}")
    start = time.perf_counter()
    knn = knn_graph(feats, k, method, device, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search,
                    description=f"Neighbour graph ({method}, k={k})")
    graph = GalleryGraph(knn.indices.astype(np.int32), knn.distances.astype(np.float32),
                         knn.row_max.astype(np.float32), k, method)
    if method != "exact":
        graph.agreement = sample_agreement(graph, feats, device)
        log.info("neighbour graph (%s) of %d items in %.1f s: top-%d agreement with exact %.4f on %d items",
                 method, len(feats), time.perf_counter() - start, AGREEMENT_TOP, graph.agreement,
                 min(AGREEMENT_SAMPLE, len(feats)))
    else:
        log.info("neighbour graph (exact) of %d items in %.1f s", len(feats), time.perf_counter() - start)
    return graph


def with_weights(graph: GalleryGraph, feats: np.ndarray, k1: int) -> GalleryGraph:
    """``graph`` holding the gallery's k-reciprocal weights for ``k1`` (computed with a progress bar)."""
    from reid_deploy.retrieval.graph_rerank import gallery_weights

    start = time.perf_counter()
    graph.weights, graph.sets = gallery_weights(feats, graph, k1, description=f"Re-ranking weights (k1={k1})")
    graph.weights_k1 = k1
    log.info("re-ranking weights (k1=%d) of %d items in %.1f s", k1, len(feats), time.perf_counter() - start)
    return graph


def extend_graph(graph: GalleryGraph, feats: np.ndarray, device: str = "auto") -> GalleryGraph:
    """The graph of all of ``feats`` whose first ``len(graph.row_max)`` rows ``graph`` describes (without
    weights: compute them again with ``with_weights``)."""
    added = len(feats) - len(graph.row_max)
    grown = extend_knn_graph(graph, feats, graph.k, device, description=f"Neighbour graph (+{added} items)")
    return GalleryGraph(grown.indices.astype(np.int32), grown.distances, grown.row_max, graph.k, graph.method,
                        graph.agreement)


def without_rows(graph: GalleryGraph, feats: np.ndarray, kept: np.ndarray, device: str = "auto") -> GalleryGraph:
    """The graph of the rows ``kept`` (bool [G]) of ``feats``, whose graph is ``graph`` (without weights:
    compute them again with ``with_weights``). Rows whose list held a deleted item, or whose farthest item may
    be a deleted one, get their lists and maxima again from the kept rows (``knn.rows_knn``); every other row
    keeps its list, renumbered. So an exact graph stays equal to one built over the kept rows."""
    remaining = np.flatnonzero(kept)
    feats_kept = np.ascontiguousarray(feats[remaining], np.float32)
    width = min(graph.k, len(remaining))
    renumbered = np.cumsum(kept) - 1
    renumbered[~kept] = -1
    lists = renumbered[np.asarray(graph.indices[remaining, :width])]
    row_max = np.array(graph.row_max[remaining], np.float32)
    distances = np.array(graph.distances[remaining, :width], np.float32)
    if width < graph.width or not len(remaining):
        redo = np.arange(len(remaining))
    else:
        far = farthest_of(feats_kept, feats[~kept], device)
        redo = np.flatnonzero((lists < 0).any(1) | (far >= row_max - 1e-5 * np.maximum(np.abs(row_max), 1)))
    if len(redo):
        fresh = rows_knn(feats_kept, redo, width, device)
        lists[redo], distances[redo], row_max[redo] = fresh.indices, fresh.distances, fresh.row_max
    return GalleryGraph(lists.astype(np.int32), distances, row_max, graph.k, graph.method, graph.agreement)


def sample_agreement(graph: KnnGraph, feats: np.ndarray, device: str = "auto", sample: int = AGREEMENT_SAMPLE,
                     top: int = AGREEMENT_TOP, block: int = 65536) -> float:
    """Mean share of the exact ``top`` nearest items found among the graph's ``top`` first, over a random
    sample of rows (exact lists by a sample x G product in column blocks)."""
    import torch

    n = len(feats)
    top = min(top, n, graph.indices.shape[1])
    rows = np.sort(np.random.default_rng(0).choice(n, min(sample, n), replace=False))
    dev = torch_device(device)
    xs = torch.from_numpy(np.array(feats[rows], np.float32)).to(dev)
    best_d = torch.full((len(rows), top), float("inf"), device=dev)
    best_i = torch.zeros((len(rows), top), dtype=torch.int64, device=dev)
    with torch.inference_mode():
        for a in range(0, n, block):
            x = torch.from_numpy(np.array(feats[a:a + block], np.float32)).to(dev)
            dist = torch.addmm((x * x).sum(1)[None], xs, x.T, alpha=-2)
            d, i = torch.topk(torch.cat([best_d, dist], 1), top, dim=1, largest=False)
            best_i = torch.gather(torch.cat([best_i, torch.arange(a, a + len(x), device=dev).expand(len(rows), -1)],
                                            1), 1, i)
            best_d = d
    exact = best_i.cpu().numpy()
    found = np.asarray(graph.indices[rows, :top])
    return float(np.mean([len(np.intersect1d(a, b)) / top for a, b in zip(found, exact)]))
