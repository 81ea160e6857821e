"""The published dense k-reciprocal re-ranking (Zhong et al., CVPR 2017), as a test and benchmark reference.

Written from the published algorithm (zhunzhong07/person-re-ranking ``re_ranking``, copied by
reid-strong-baseline and most ReID toolboxes) with its structure and cost: several dense N x N matrices
over all N = query + gallery items and Python loops over the items. Kept in float32 throughout (the
reid-strong-baseline copy stores V and the Jaccard matrix in float16, which costs about 1e-3 of accuracy).
Use ``reid_deploy.retrieval.rerank`` for real work.
"""

from __future__ import annotations

import numpy as np


def _k_reciprocal(initial_rank: np.ndarray, i: int, k: int) -> np.ndarray:
    forward = initial_rank[i, :k + 1]
    backward = initial_rank[forward, :k + 1]
    return forward[np.where(backward == i)[0]]


def dense_rerank(query_feats: np.ndarray, gallery_feats: np.ndarray, k1: int = 20, k2: int = 6,
                 lambda_value: float = 0.3) -> np.ndarray:
    """Re-ranked distances [n_query, n_gallery] (float32), computed with dense N x N matrices."""
    query_num = len(query_feats)
    feat = np.concatenate([query_feats, gallery_feats]).astype(np.float32)
    all_num = len(feat)
    sq = (feat * feat).sum(1)
    original_dist = sq[:, None] + sq[None, :] - 2 * (feat @ feat.T)
    original_dist = np.transpose(original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist, dtype=np.float32)
    initial_rank = np.argsort(original_dist).astype(np.int32)
    half = int(np.around(k1 / 2))
    for i in range(all_num):
        k_reciprocal_index = _k_reciprocal(initial_rank, i, k1)
        expansion = k_reciprocal_index
        for candidate in k_reciprocal_index:
            candidate_index = _k_reciprocal(initial_rank, candidate, half)
            if len(np.intersect1d(candidate_index, k_reciprocal_index)) > 2 / 3 * len(candidate_index):
                expansion = np.append(expansion, candidate_index)
        expansion = np.unique(expansion)
        weight = np.exp(-original_dist[i, expansion])
        V[i, expansion] = weight / np.sum(weight)
    original_dist = original_dist[:query_num]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
        del V_qe
    del initial_rank
    inv_index = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros((1, all_num), dtype=np.float32)
        non_zero = np.where(V[i, :] != 0)[0]
        for k in non_zero:
            images = inv_index[k]
            temp_min[0, images] += np.minimum(V[i, k], V[images, k])
        jaccard_dist[i] = 1 - temp_min / (2 - temp_min)
    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return final_dist[:query_num, query_num:]
