"""Market-1501 evaluation: CMC, mAP and mINP from a query x gallery distance matrix.

For each query, gallery entries with the same pid AND the same camera are ignored, as is junk
(pid -1); distractors (pid 0) count as wrong matches; a query with no true match left is skipped and
counted. Queries are processed in chunks with NumPy: no Python loop over queries x gallery.
"""

from __future__ import annotations

from typing import Any

import numpy as np

JUNK_PID = -1
_CHUNK_ELEMENTS = 1 << 22  # distance entries ranked at once (~4M: about 200 MB of work arrays)


def squared_euclidean(query_feats: np.ndarray, gallery_feats: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances of L2-normalised features: 2 - 2 q.g (float32, clipped at 0)."""
    dist = 2.0 - 2.0 * (np.asarray(query_feats, np.float32) @ np.asarray(gallery_feats, np.float32).T)
    return np.maximum(dist, 0.0, out=dist)


def l2_normalize(feats: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32)."""
    feats = np.asarray(feats, np.float32)
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


def ranked_matches(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                   g_camids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gallery order by ascending distance, and per ranked entry: counted (not ignored) and true match.

    Returns ``order``, ``valid`` and ``match`` of shape [n_query, n_gallery]; ties keep gallery order.
    """
    order = np.argsort(distmat, axis=1, kind="stable")
    pids, cams = g_pids[order], g_camids[order]
    same_pid = pids == q_pids[:, None]
    valid = ~(same_pid & (cams == q_camids[:, None])) & (pids != JUNK_PID)
    return order, valid, same_pid & valid & (q_pids[:, None] != JUNK_PID)


def compute_metrics(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                    g_camids: np.ndarray, max_rank: int = 50) -> dict[str, Any]:
    """mAP, mINP and the CMC curve (ranks 1..max_rank) over queries that have a true match.

    Returns ``{"mAP", "mINP", "cmc" (list), "num_valid_queries", "num_skipped_queries"}``; values are
    fractions 0-1 (0 with no valid query).
    """
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids, np.int64), np.asarray(g_pids, np.int64)
    q_camids, g_camids = np.asarray(q_camids, np.int64), np.asarray(g_camids, np.int64)
    n_query, n_gallery = distmat.shape
    if (len(q_pids), len(q_camids), len(g_pids), len(g_camids)) != (n_query, n_query, n_gallery, n_gallery):
        raise ValueError(f"distmat is {distmat.shape} but got {len(q_pids)}/{len(q_camids)} query and "
                         f"{len(g_pids)}/{len(g_camids)} gallery pids/camids")
    first_hit = np.zeros(max_rank, np.int64)  # valid queries whose first true match is at rank r
    ap_sum = inp_sum = 0.0
    num_valid = 0
    chunk = max(1, _CHUNK_ELEMENTS // max(n_gallery, 1))
    for lo in range(0, n_query, chunk):
        hi = min(lo + chunk, n_query)
        _, valid, match = ranked_matches(distmat[lo:hi], q_pids[lo:hi], g_pids, q_camids[lo:hi], g_camids)
        num_pos = match.sum(axis=1)
        has = num_pos > 0
        valid, match, num_pos = valid[has], match[has], num_pos[has]
        if not len(num_pos):
            continue
        rank = np.cumsum(valid, axis=1, dtype=np.int32)  # 1-based rank among the counted entries
        hits = np.cumsum(match, axis=1, dtype=np.int32)
        precision_at_hits = np.divide(hits, rank, out=np.zeros(rank.shape), where=match)
        ap_sum += float((precision_at_hits.sum(axis=1) / num_pos).sum())
        last_hit_rank = np.where(match, rank, 0).max(axis=1)
        inp_sum += float((num_pos / last_hit_rank).sum())
        first_hit_rank = np.where(match, rank, np.iinfo(np.int32).max).min(axis=1)
        first_hit += np.bincount(first_hit_rank[first_hit_rank <= max_rank] - 1, minlength=max_rank)
        num_valid += len(num_pos)
    denom = max(num_valid, 1)
    return {"mAP": ap_sum / denom, "mINP": inp_sum / denom,
            "cmc": (np.cumsum(first_hit) / denom).tolist(),
            "num_valid_queries": num_valid, "num_skipped_queries": n_query - num_valid}
