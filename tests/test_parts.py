"""Row ranges in threads: the same results, bit for bit, whatever the number of threads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_rerank import clustered

from reid_deploy.retrieval import parts
from reid_deploy.retrieval.graph import build_graph
from reid_deploy.retrieval.graph_rerank import gallery_weights, rerank_topk_with_graph
from reid_deploy.retrieval.rerank import _pair_distances, reciprocal_mask, rerank_distances, squared_norms


def threads(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: n)


@pytest.mark.parametrize("n,count,min_rows", [(0, 3, 1), (1, 3, 1), (10, 3, 1), (100, 4, 30), (7, 16, 1), (50, 1, 1)])
def test_slices_cover_the_rows_in_order(monkeypatch, n, count, min_rows):
    threads(monkeypatch, count)
    seen = parts.in_parts(lambda part: part, n, min_rows)
    assert seen[0].start == 0 and seen[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(seen, seen[1:]))
    assert len(seen) <= max(1, min(count, n // min_rows))
    assert all(s.stop - s.start >= min(min_rows, n) for s in seen)


def test_pair_distances_do_not_depend_on_the_threads(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    i, j = rng.integers(0, 50, 1000), rng.integers(0, 50, 1000)
    got = {}
    for count in (1, 5):
        threads(monkeypatch, count)
        got[count] = _pair_distances(lambda ids: x.take(ids, 0), squared_norms(x), i, j, chunk=4)
    np.testing.assert_array_equal(got[1], got[5])
    np.testing.assert_allclose(got[1], ((x[i] - x[j]) ** 2).sum(1), rtol=1e-4, atol=1e-4)


def test_search_and_weights_do_not_depend_on_the_threads(monkeypatch):
    query, gallery = clustered(30, 400, dim=16, ids=40, seed=3)
    graph = build_graph(gallery, 24)
    results = {}
    for count in (1, 3, 8):
        threads(monkeypatch, count)
        monkeypatch.setattr(parts, "ROWS", 1 if count > 1 else 1024)
        weights, sets = gallery_weights(gallery, graph, 20)
        results[count] = (weights, sets, *rerank_topk_with_graph(query, gallery, graph, 10, encoding=(weights, sets)),
                          *rerank_topk_with_graph(query, gallery, graph, 10), rerank_distances(query, gallery),
                          reciprocal_mask(graph.indices, 20, chunk=16))
    for count in (3, 8):
        one, many = results[1], results[count]
        assert (one[0] != many[0]).nnz == 0 and np.array_equal(one[0].data, many[0].data)
        for a, b in zip(one[1:], many[1:]):
            np.testing.assert_array_equal(a, b)
