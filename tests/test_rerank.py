"""Scalable k-reciprocal re-ranking against a slow per-item reference and the published dense algorithm."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from reid_deploy.retrieval import knn, rerank
from reid_deploy.retrieval.knn import extend_knn_graph, knn_graph
from reid_deploy.retrieval.rerank import rerank_distances, rerank_topk

sys.path.insert(0, str(Path(__file__).parents[1]))
from bench.dense_rerank_reference import dense_rerank

PARAMS = [(20, 6, 0.3), (7, 1, 0.5), (5, 3, 0.0), (4, 6, 0.2), (10, 2, 1.0)]


def clustered(n_query: int, n_gallery: int, dim: int = 12, ids: int = 10, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised features in identity clusters (so that reciprocal sets and expansions are non-trivial)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(ids, dim))
    x = centers[rng.integers(0, ids, n_query + n_gallery)] + 0.6 * rng.normal(size=(n_query + n_gallery, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return x[:n_query], x[n_query:]


def slow_rerank(query: np.ndarray, gallery: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """The algorithm item by item with Python sets and sums, straight from its definition (float64)."""
    x = np.concatenate([query, gallery]).astype(np.float64)
    n, nq = len(x), len(query)
    dist = [[float(((x[i] - x[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    d = [[dist[i][j] / max(dist[i]) for j in range(n)] for i in range(n)]
    rank = [sorted(range(n), key=lambda j, i=i: d[i][j]) for i in range(n)]

    def reciprocal(i: int, k: int) -> set[int]:
        return {j for j in rank[i][:k + 1] if i in rank[j][:k + 1]}

    half = round(k1 / 2)  # Python's round is numpy's around: halves to even
    v = []
    for i in range(n):
        r = reciprocal(i, k1)
        expanded = set(r)
        for c in r:
            h = reciprocal(c, half)
            if len(h & r) > 2 / 3 * len(h):
                expanded |= h
        total = sum(math.exp(-d[i][j]) for j in expanded)
        v.append({j: math.exp(-d[i][j]) / total for j in expanded})
    if k2 != 1:
        v = [{k: sum(v[m].get(k, 0.0) for m in rank[i][:k2]) / k2
              for k in set().union(*(v[m] for m in rank[i][:k2]))} for i in range(n)]
    out = np.empty((nq, n - nq))
    for qi in range(nq):
        for g in range(nq, n):
            shared = sum(min(v[qi][k], v[g][k]) for k in v[qi].keys() & v[g].keys())
            out[qi, g - nq] = (1 - lam) * (1 - shared / (2 - shared)) + lam * d[qi][g]
    return out


def same_ranking(a: np.ndarray, b: np.ndarray, ties: float = 0.0) -> bool:
    """Identical gallery orders; with ``ties`` > 0, entries closer than ``ties`` may swap (lambda = 0 makes
    mathematically equal Jaccard distances whose float32 sums differ in the last bit)."""
    if not ties:
        return bool((np.argsort(a, axis=1, kind="stable") == np.argsort(b, axis=1, kind="stable")).all())
    return all((np.diff(np.take_along_axis(y, np.argsort(x, axis=1, kind="stable"), 1), axis=1) >= -ties).all()
               for x, y in ((a, b), (b, a)))


@pytest.fixture(scope="module")
def small():
    return clustered(12, 48)


@pytest.mark.parametrize("k1,k2,lam", PARAMS)
def test_equals_slow_reference(small, k1, k2, lam):
    query, gallery = small
    expected = slow_rerank(query, gallery, k1, k2, lam)
    got = rerank_distances(query, gallery, k1, k2, lam)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert same_ranking(got, expected, ties=0.0 if lam else 1e-6)


@pytest.mark.parametrize("k1,k2,lam", PARAMS)
def test_equals_published_dense_algorithm(k1, k2, lam, monkeypatch):
    query, gallery = clustered(40, 160, dim=16, ids=14, seed=k1)
    monkeypatch.setattr(rerank, "CHUNK_ELEMENTS", 700)  # many query chunks
    expected = dense_rerank(query, gallery, k1, k2, lam)
    got = rerank_distances(query, gallery, k1, k2, lam)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert same_ranking(got, expected, ties=0.0 if lam else 1e-6)


def test_fewer_items_than_k1():
    query, gallery = clustered(3, 6, seed=7)
    for k1, k2 in ((20, 6), (4, 12)):
        np.testing.assert_allclose(rerank_distances(query, gallery, k1, k2, 0.3),
                                   dense_rerank(query, gallery, k1, k2, 0.3), atol=1e-5)


def test_jaccard_is_one_without_shared_support():
    """Two far-apart groups: a query shares no support with the other group's gallery items."""
    query, gallery = clustered(6, 30, ids=2, seed=3)
    gallery[15:] *= -1  # mirror half of the gallery far away
    got = rerank_distances(query, gallery, 5, 2, 0.0)
    assert (got == 1.0).any() and (got < 1.0).any()


@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.3), (6, 1, 0.0), (4, 3, 0.7)])
def test_topk_is_head_of_full_ranking(k1, k2, lam):
    query, gallery = clustered(30, 120, seed=5)
    full = rerank_distances(query, gallery, k1, k2, lam)
    plain = ((query[:, None, :] - gallery[None, :, :]) ** 2).sum(-1)
    order = np.stack([np.lexsort((p, f)) for p, f in zip(plain, full)])  # ties (lam = 0): plain distance
    indices, distances = rerank_topk(query, gallery, 15, k1, k2, lam)
    assert indices.shape == distances.shape == (30, 15)
    np.testing.assert_array_equal(indices, order[:, :15])
    np.testing.assert_array_equal(distances, np.take_along_axis(full, order[:, :15], 1))


def test_knn_graph_exact_with_blocks():
    x = np.concatenate(clustered(20, 77, seed=2)) * 3  # not normalised: the exact method takes any features
    d = (x * x).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * x @ x.T
    cross = np.full((20, 77), np.nan, np.float32)
    graph = knn_graph(x, 7, block=16, cross=cross)
    np.testing.assert_array_equal(graph.indices, np.argsort(d, axis=1, kind="stable")[:, :7])
    np.testing.assert_allclose(graph.distances, np.sort(d, axis=1)[:, :7], atol=1e-4)
    np.testing.assert_allclose(graph.row_max, d.max(1), rtol=1e-6)
    np.testing.assert_allclose(cross, d[:20, 20:], atol=1e-4)  # every query x gallery entry filled


def test_knn_graph_torch_reductions_equal_numpy(monkeypatch):
    """The block reductions a GPU runs in torch (here on CPU tensors) give the numpy path's graph, built
    whole and extended by new rows."""
    x = np.concatenate(clustered(20, 77, seed=3))
    expected = [knn_graph(x, 7, block=16), extend_knn_graph(knn_graph(x[:50], 7, block=16), x, 7, block=16)]
    monkeypatch.setattr(knn, "_in_numpy", lambda dist: False)
    got = [knn_graph(x, 7, block=16), extend_knn_graph(knn_graph(x[:50], 7, block=16), x, 7, block=16)]
    for want, have in zip(expected, got):
        np.testing.assert_array_equal(have.indices, want.indices)
        np.testing.assert_array_equal(have.distances, want.distances)
        np.testing.assert_array_equal(have.row_max, want.row_max)


def test_knn_graph_faiss_methods():
    x = np.concatenate(clustered(20, 180, dim=16, seed=4))
    exact = knn_graph(x, 8)
    flat = knn_graph(x, 8, method="faiss")
    np.testing.assert_array_equal(flat.indices, exact.indices)
    np.testing.assert_allclose(flat.row_max, exact.row_max, atol=1e-4)
    hnsw = knn_graph(x, 8, method="hnsw")
    assert np.mean([len(np.intersect1d(a, b)) for a, b in zip(hnsw.indices, exact.indices)]) > 7
    approx = rerank_distances(x[:20], x[20:], 7, 3, 0.3, knn_method="hnsw")
    assert same_ranking(approx, rerank_distances(x[:20], x[20:], 7, 3, 0.3))
    with pytest.raises(ValueError, match="normalised"):
        knn_graph(x * 2, 8, method="hnsw")
