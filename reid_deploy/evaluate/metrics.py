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


def counted_and_true(q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray, g_camids: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The protocol's masks [n_query, n_gallery], gallery in its own order: ``valid`` (counted: not junk,
    not the query's pid on the query's camera) and ``match`` (valid and the query's pid; a junk query
    has none)."""
    same_pid = g_pids == q_pids[:, None]
    valid = ~(same_pid & (g_camids == q_camids[:, None])) & (g_pids != JUNK_PID)
    return valid, same_pid & valid & (q_pids[:, None] != JUNK_PID)


def ranked_matches(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                   g_camids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gallery order by ascending distance, and per ranked entry: counted (not ignored) and true match.

    Returns ``order``, ``valid`` and ``match`` of shape [n_query, n_gallery]; ties keep gallery order.
    """
    order = np.argsort(distmat, axis=1, kind="stable")
    valid, match = counted_and_true(q_pids, g_pids, q_camids, g_camids)
    return order, np.take_along_axis(valid, order, axis=1), np.take_along_axis(match, order, axis=1)


def compute_metrics(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                    g_camids: np.ndarray, max_rank: int = 50) -> dict[str, Any]:
    """mAP, mINP and the CMC curve (ranks 1..max_rank) over queries that have a true match.

    Only the counted entries no farther than a query's farthest true match can move a true match's
    rank, so only those are sorted (ties keep gallery order), not the whole gallery row.
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
        dist = distmat[lo:lo + chunk]
        valid, match = counted_and_true(q_pids[lo:lo + chunk], g_pids, q_camids[lo:lo + chunk], g_camids)
        num_pos = match.sum(axis=1)
        farthest_match = np.where(match, dist, -np.inf).max(axis=1)
        # Compact each query's candidates to the left of a [queries, max candidates] matrix (gallery
        # order kept, padding +inf after them), then rank them with a stable sort.
        rows, cols = np.nonzero(valid & (dist <= farthest_match[:, None]))
        counts = np.bincount(rows, minlength=len(dist))
        slot = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
        candidates = np.full((len(dist), counts.max(initial=0)), np.inf, dist.dtype)
        candidates[rows, slot] = dist[rows, cols]
        is_match = np.zeros(candidates.shape, bool)
        is_match[rows, slot] = match[rows, cols]
        is_match = np.take_along_axis(is_match, np.argsort(candidates, axis=1, kind="stable"), axis=1)
        has = num_pos > 0
        is_match, num_pos = is_match[has], num_pos[has]
        rank = np.arange(1, is_match.shape[1] + 1)  # 1-based rank among the counted entries
        hits = np.cumsum(is_match, axis=1)
        ap_sum += float((np.where(is_match, hits / rank, 0.0).sum(axis=1) / num_pos).sum())
        inp_sum += float((num_pos / np.where(is_match, rank, 0).max(axis=1, initial=0)).sum())
        never = np.iinfo(np.int64).max
        first_hit_rank = np.where(is_match, rank, never).min(axis=1, initial=never)
        first_hit += np.bincount(first_hit_rank[first_hit_rank <= max_rank] - 1, minlength=max_rank)
        num_valid += int(has.sum())
    denom = max(num_valid, 1)
    return {"mAP": ap_sum / denom, "mINP": inp_sum / denom,
            "cmc": (np.cumsum(first_hit) / denom).tolist(),
            "num_valid_queries": num_valid, "num_skipped_queries": n_query - num_valid}
