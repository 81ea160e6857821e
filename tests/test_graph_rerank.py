"""Re-ranked search from the index's cached neighbour graph equals the from-scratch ``rerank_topk``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_rerank import clustered

from reid_deploy.retrieval import graph_rerank
from reid_deploy.retrieval.graph import build_graph, extend_graph
from reid_deploy.retrieval.graph_rerank import gallery_weights, rerank_topk_per_query, rerank_topk_with_graph
from reid_deploy.retrieval.rerank import rerank_topk

PARAMS = [(20, 6, 0.3), (7, 1, 0.5), (5, 3, 0.0), (4, 6, 0.2), (10, 2, 1.0), (3, 8, 0.3), (6, 1, 0.0)]


def assert_same(query: np.ndarray, gallery: np.ndarray, graph, top_k: int, k1: int, k2: int, lam: float) -> None:
    """Equal to the reference with the gallery's cached weights and sets, with its weights only (an index
    written before the sets) and computing every row needed."""
    expected_i, expected_d = rerank_topk(query, gallery, top_k, k1, k2, lam)
    weights, sets = gallery_weights(gallery, graph, k1)
    for encoding in ((weights, sets), (weights, None), None):
        got_i, got_d = rerank_topk_with_graph(query, gallery, graph, top_k, k1, k2, lam, encoding=encoding)
        np.testing.assert_array_equal(got_i, expected_i)
        np.testing.assert_allclose(got_d, expected_d, atol=1e-5)


@pytest.fixture(scope="module")
def data():
    return clustered(40, 300, dim=16, ids=30, seed=11)


@pytest.mark.parametrize("k1,k2,lam", PARAMS)
def test_equals_reference_after_build(data, k1, k2, lam):
    query, gallery = data
    assert_same(query, gallery, build_graph(gallery, 32), 15, k1, k2, lam)


@pytest.mark.parametrize("k1,k2,lam", PARAMS[:4])
def test_equals_reference_after_add(data, k1, k2, lam):
    query, gallery = data
    graph = extend_graph(extend_graph(build_graph(gallery[:120], 24), gallery[:250]), gallery)
    assert_same(query, gallery, graph, 10, k1, k2, lam)


def test_every_path_of_the_search(monkeypatch):
    """Small blocks, a radius sampled from the gallery that is too small for some queries, and
    kept plain lists too short for others: the queries concerned are scanned again, the result stays exact."""
    monkeypatch.setattr(graph_rerank, "SCAN_ELEMENTS", 400)
    monkeypatch.setattr(graph_rerank, "RADIUS_SAMPLE_MIN", 16)
    monkeypatch.setattr(graph_rerank, "RADIUS_SAMPLE_SHARE", 4)
    monkeypatch.setattr(graph_rerank, "PLAIN_EXTRA", 0)
    rescans = []
    nearest = graph_rerank._nearest
    monkeypatch.setattr(graph_rerank, "_nearest", lambda q, *a: rescans.append(len(q)) or nearest(q, *a))
    query, gallery = clustered(20, 300, dim=8, ids=10, seed=5)
    graph = build_graph(gallery, 24)
    for margin, top_k, lam in ((0.3, 10, 0.3), (3.0, 21, 1.0)):
        monkeypatch.setattr(graph_rerank, "RADIUS_MARGIN", margin)
        rescans.clear()
        assert_same(query, gallery, graph, top_k, 20, 6, lam)
        assert rescans  # radius too small (first case); top k beyond the kept plain list (second)


def test_pairs_left_out_cannot_reach_the_top(monkeypatch):
    """A loose bound (one list item summed exactly) and exact sums over a few queries at a time: the result
    stays the reference's, with fewer pairs summed than share support."""
    monkeypatch.setattr(graph_rerank, "LIMIT_ITEMS", 1)
    monkeypatch.setattr(graph_rerank, "OVERLAP_ELEMENTS", 64)
    counts = []
    reachable = graph_rerank._reachable_pairs

    def counted(vq, vg, *args):
        kept = reachable(vq, vg, *args)
        counts.append((len(kept.q), (vq @ vg.T).nnz))
        return kept

    monkeypatch.setattr(graph_rerank, "_reachable_pairs", counted)
    query, gallery = clustered(30, 400, dim=8, ids=40, seed=3)
    for lam in (0.0, 0.3):
        assert_same(query, gallery, build_graph(gallery, 24), 5, 20, 6, lam)
    assert all(0 < kept <= sharing for kept, sharing in counts)
    assert counts[-1][0] < counts[-1][1] / 2  # lambda 0.3: the plain distance rules most pairs out


def test_random_shapes():
    rng = np.random.default_rng(0)
    for trial in range(8):
        n_query, n_gallery = int(rng.integers(1, 30)), int(rng.integers(2, 150))
        query, gallery = clustered(n_query, n_gallery, dim=int(rng.integers(4, 16)), ids=int(rng.integers(2, 20)),
                                   seed=trial)
        k1, k2 = int(rng.integers(1, 25)), int(rng.integers(1, 9))
        graph = build_graph(gallery, max(k1 + 1, k2) + int(rng.integers(0, 4)))
        assert_same(query, gallery, graph, int(rng.integers(1, 20)), k1, k2, float(rng.choice([0.0, 0.3, 1.0])))


def test_gallery_smaller_than_the_lists():
    query, gallery = clustered(4, 6, seed=7)
    for k1, k2 in ((20, 6), (4, 12)):
        assert_same(query, gallery, build_graph(gallery, 32), 6, k1, k2, 0.3)


def test_graph_narrower_than_k1_is_refused(data):
    query, gallery = data
    with pytest.raises(ValueError, match="does not cover 21 neighbours"):
        rerank_topk_with_graph(query, gallery, build_graph(gallery, 8), 10, k1=20)


def test_queries_far_from_the_gallery():
    """Queries that enter no gallery item's list (every cached row is used as it is)."""
    query, gallery = clustered(6, 120, ids=3, seed=9)
    gallery = gallery[gallery @ query.mean(0) > 0]  # the gallery on the other side of the sphere
    assert_same(-np.abs(query), np.abs(gallery), build_graph(np.abs(gallery), 24), 8, 10, 3, 0.3)


def test_torch_path_of_the_gallery_pass(monkeypatch):
    """The per-block statistics a GPU runs in torch (here on CPU tensors) give the same result as numpy's."""
    original = graph_rerank._Ops.__init__

    def torch_ops(self, dev):
        original(self, dev)
        self.numpy = False

    monkeypatch.setattr(graph_rerank._Ops, "__init__", torch_ops)
    monkeypatch.setattr(graph_rerank, "SCAN_ELEMENTS", 400)
    monkeypatch.setattr(graph_rerank, "RADIUS_SAMPLE_MIN", 16)
    query, gallery = clustered(20, 300, dim=8, ids=10, seed=6)
    assert_same(query, gallery, build_graph(gallery, 24), 10, 12, 4, 0.3)


@pytest.mark.parametrize("k1", [20, 7, 3])
def test_rows_read_from_the_gallery_keep_their_weights(k1):
    """Every gallery row the queries change (its V row, recomputed over queries + gallery, differs from the
    gallery's own) is among those the search recomputes (``dirty``), with and without the cached sets; rows
    only near a changed H set whose H joins neither before nor after are left out."""
    query, gallery = clustered(40, 400, dim=8, ids=30, seed=k1)
    graph = build_graph(gallery, 32)
    weights, sets = gallery_weights(gallery, graph, k1)
    kk = max(k1 + 1, 6)
    scan = graph_rerank._scan(query, gallery, graph, kk, 200, torch.device("cpu"))
    every = np.arange(len(gallery)) + len(query)
    fresh = graph_rerank._LocalGraph(query, gallery, graph, scan, kk, k1).encode(every)
    differs = (np.abs(fresh[:, len(query):] - weights).max(1).toarray().ravel() > 0) | \
        (fresh[:, :len(query)].getnnz(1) > 0)
    assert differs.any()
    for packed in (sets, None):
        local = graph_rerank._LocalGraph(query, gallery, graph, scan, kk, k1, packed)
        dirty = local.dirty()
        assert set(every[differs]) <= set(dirty)
        h_changed = local._check_sets(np.unique(np.concatenate([local.changed + len(query), every])), "h")[0]
        assert len(dirty) < len(set(dirty) | set(local.matrix("r")[h_changed].indices))


@pytest.mark.parametrize("k1,k2,lam", PARAMS[:3])
def test_per_query_rows_are_the_queries_searched_alone(k1, k2, lam):
    """Each row of a per-query batch is the same bits as that query alone, and alone it equals the reference
    re-ranking of that one query (no other query among its neighbours)."""
    query, gallery = clustered(24, 400, dim=16, ids=30, seed=3)
    query[5] = query[4]  # a duplicated query: both rows alone, not each other's neighbour
    graph = build_graph(gallery, 32)
    encoding = gallery_weights(gallery, graph, k1)
    alone = [rerank_topk_per_query(query[i:i + 1], gallery, graph, 12, k1, k2, lam, encoding=encoding)
             for i in range(len(query))]
    for size in (2, 9, 24):
        got_i, got_d = rerank_topk_per_query(query[:size], gallery, graph, 12, k1, k2, lam, encoding=encoding)
        np.testing.assert_array_equal(got_i, np.concatenate([a[0] for a in alone[:size]]))
        np.testing.assert_array_equal(got_d, np.concatenate([a[1] for a in alone[:size]]))
    for i in (0, 4, 5, 17):
        expected_i, expected_d = rerank_topk(query[i:i + 1], gallery, 12, k1, k2, lam)
        np.testing.assert_array_equal(alone[i][0], expected_i)
        np.testing.assert_allclose(alone[i][1], expected_d, atol=1e-5)
    pooled_i, _ = rerank_topk_with_graph(query, gallery, graph, 12, k1, k2, lam, encoding=encoding)
    assert (pooled_i != np.concatenate([a[0] for a in alone])).any()  # pooling queries changes answers


def test_per_query_on_a_large_gallery_with_a_radius(monkeypatch):
    """The sampled radius and the rescans of the gallery pass keep per-query rows equal to queries alone."""
    monkeypatch.setattr(graph_rerank, "RADIUS_SAMPLE_MIN", 64)
    monkeypatch.setattr(graph_rerank, "PLAIN_EXTRA", 4)
    query, gallery = clustered(20, 3000, dim=16, ids=200, seed=8)
    graph = build_graph(gallery, 24)
    encoding = gallery_weights(gallery, graph, 20)
    got_i, got_d = rerank_topk_per_query(query, gallery, graph, 10, encoding=encoding)
    for i in range(0, 20, 3):
        one_i, one_d = rerank_topk_per_query(query[i:i + 1], gallery, graph, 10, encoding=encoding)
        np.testing.assert_array_equal(got_i[i:i + 1], one_i)
        np.testing.assert_array_equal(got_d[i:i + 1], one_d)
        expected_i, expected_d = rerank_topk(query[i:i + 1], gallery, 10)
        np.testing.assert_array_equal(one_i, expected_i)
        np.testing.assert_allclose(one_d, expected_d, atol=1e-5)
