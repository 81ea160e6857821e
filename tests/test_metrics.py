"""Market-1501 metrics against a slow per-query reference written out here."""

from __future__ import annotations

import numpy as np
import pytest

from reid_deploy.evaluate import metrics as metrics_module
from reid_deploy.evaluate.metrics import (
    MetricsAccumulator,
    compute_metrics,
    l2_normalize,
    ranked_list,
    squared_euclidean,
)


def brute_force(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """One query at a time, straight from the protocol's definition."""
    aps, inps, cmcs, skipped = [], [], [], 0
    for i in range(len(q_pids)):
        ranked = sorted(range(len(g_pids)), key=lambda j: (distmat[i, j], j))
        kept = [j for j in ranked
                if g_pids[j] != -1 and not (g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i])]
        hits = [g_pids[j] == q_pids[i] and q_pids[i] != -1 for j in kept]
        if not any(hits):
            skipped += 1
            continue
        positions = [k + 1 for k, hit in enumerate(hits) if hit]  # 1-based ranks of the true matches
        aps.append(sum((n + 1) / rank for n, rank in enumerate(positions)) / len(positions))
        inps.append(len(positions) / positions[-1])
        cmcs.append([1.0 if positions[0] <= r else 0.0 for r in range(1, max_rank + 1)])
    return {"mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)), "cmc": np.mean(cmcs, axis=0).tolist(),
            "num_valid_queries": len(aps), "num_skipped_queries": skipped}


def random_case(seed: int, n_query: int, n_gallery: int, n_ids: int, n_cams: int):
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(1, n_ids + 1, n_query)
    q_pids[:2] = n_ids + 5  # identities that appear in no gallery: skipped
    q_pids[2] = -1  # a junk query: skipped
    g_pids = rng.integers(0, n_ids + 1, n_gallery)  # 0: distractors
    g_pids[rng.random(n_gallery) < 0.1] = -1  # junk gallery entries
    q_camids, g_camids = rng.integers(0, n_cams, n_query), rng.integers(0, n_cams, n_gallery)
    # A query whose only gallery matches are on its own camera: skipped.
    q_pids[3], q_camids[3] = n_ids + 7, 0
    g_pids[:3], g_camids[:3] = n_ids + 7, 0
    distmat = rng.random((n_query, n_gallery)).astype(np.float32)
    return distmat, q_pids, g_pids, q_camids, g_camids


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_metrics_equal_brute_force(seed, ties, dtype, monkeypatch):
    monkeypatch.setattr(metrics_module, "_CHUNK_ELEMENTS", 7 * 60)  # several query chunks
    case = random_case(seed, n_query=30, n_gallery=60, n_ids=6, n_cams=3)
    if ties:  # few distinct distances: equal distances rank in gallery order, -0.0 and 0.0 included
        distmat = np.round(case[0] * 4) / 4 - 0.25
        distmat[distmat == 0] = np.where(np.arange((distmat == 0).sum()) % 2, -0.0, 0.0)
        case = (distmat, *case[1:])
    case = (case[0].astype(dtype), *case[1:])
    got = compute_metrics(*case, max_rank=20)
    want = brute_force(*case, max_rank=20)
    assert got["num_valid_queries"] == want["num_valid_queries"]
    assert got["num_skipped_queries"] == want["num_skipped_queries"] >= 4
    assert got["mAP"] == pytest.approx(want["mAP"], abs=1e-12)
    assert got["mINP"] == pytest.approx(want["mINP"], abs=1e-12)
    np.testing.assert_allclose(got["cmc"], want["cmc"], atol=1e-12)


def test_same_camera_match_is_ignored_and_distractor_is_wrong():
    # Gallery by distance: same pid+camera (ignored), distractor (wrong), true match on another camera.
    distmat = np.array([[0.1, 0.2, 0.3]])
    result = compute_metrics(distmat, np.array([5]), np.array([5, 0, 5]), np.array([0]), np.array([0, 1, 1]),
                             max_rank=3)
    assert result["cmc"] == [0.0, 1.0, 1.0]
    assert result["mAP"] == pytest.approx(0.5)
    assert result["mINP"] == pytest.approx(0.5)


def test_no_valid_query_gives_zeros():
    result = compute_metrics(np.zeros((2, 2)), np.array([1, 2]), np.array([3, 4]), np.array([0, 0]),
                             np.array([1, 1]), max_rank=2)
    assert result == {"mAP": 0.0, "mINP": 0.0, "cmc": [0.0, 0.0], "num_valid_queries": 0,
                      "num_skipped_queries": 2}


def test_squared_euclidean_of_normalised_features():
    rng = np.random.default_rng(0)
    q, g = l2_normalize(rng.normal(size=(4, 8))), l2_normalize(rng.normal(size=(5, 8)))
    want = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    got = squared_euclidean(q, g)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert squared_euclidean(q, q).min() >= 0


@pytest.mark.parametrize("ties", [False, True])
def test_metrics_chunk_by_chunk_equal_the_whole_matrix_exactly(ties, monkeypatch):
    distmat, *labels = random_case(3, n_query=40, n_gallery=70, n_ids=6, n_cams=3)
    if ties:
        distmat = np.round(distmat * 4) / 4
    whole = compute_metrics(distmat, *labels, max_rank=20)
    assert whole["num_skipped_queries"] >= 4
    for elements in (70, 3 * 70, 1 << 22):  # internal chunks of 1 and 3 queries, and one chunk
        monkeypatch.setattr(metrics_module, "_CHUNK_ELEMENTS", elements)
        for rows_per_add in (1, 7, 40):
            acc = MetricsAccumulator(*labels, max_rank=20)
            starts = list(range(0, 40, rows_per_add))[::-1]  # rows given out of order
            for start in starts:
                acc.add(slice(start, start + rows_per_add), distmat[start:start + rows_per_add])
            assert acc.result() == whole


def test_metrics_accumulator_refuses_missing_and_repeated_rows():
    distmat, *labels = random_case(0, n_query=6, n_gallery=10, n_ids=3, n_cams=2)
    acc = MetricsAccumulator(*labels, max_rank=5)
    acc.add(slice(0, 4), distmat[:4])
    with pytest.raises(ValueError, match="2 query rows were never added"):
        acc.result()
    with pytest.raises(ValueError, match="already added"):
        acc.add(slice(3, 6), distmat[3:6])
    with pytest.raises(ValueError, match="distances of shape"):
        acc.add(slice(4, 6), distmat[4:5])


def test_ranked_list_leaves_out_ignored_entries_and_keeps_gallery_order_on_ties():
    # gallery: junk, same pid + camera (ignored), distractor, match, match (tie with the distractor)
    g_pids, g_camids = np.array([-1, 5, 0, 5, 5]), np.array([1, 0, 1, 1, 2])
    row = np.array([0.0, 0.1, 0.4, 0.2, 0.4], np.float32)
    ranked = ranked_list(7, row, 5, 0, g_pids, g_camids, length=3)
    assert ranked.query == 7
    assert ranked.gallery.tolist() == [3, 2, 4]
    assert ranked.true.tolist() == [True, False, True]
    np.testing.assert_array_equal(ranked.distances, row[[3, 2, 4]])
