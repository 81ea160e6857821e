"""Market-1501 evaluation: CMC, mAP and mINP from a query x gallery distance matrix.

For each query, gallery entries with the same pid AND the same camera are ignored, as is junk
(pid -1); distractors (pid 0) count as wrong matches; a query with no true match left is skipped and
counted. Queries are processed in chunks with NumPy: no Python loop over queries x gallery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

JUNK_PID = -1
_CHUNK_ELEMENTS = 1 << 22  # distance entries ranked at once (~4M: about 200 MB of work arrays)


def squared_euclidean(query_feats: np.ndarray, gallery_feats: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances of L2-normalised features: 2 - 2 q.g (float32, clipped at 0)."""
    dist = np.asarray(query_feats, np.float32) @ np.asarray(gallery_feats, np.float32).T
    dist *= -2.0  # in place: -2 q.g + 2 rounds exactly as 2 - 2 q.g
    dist += 2.0
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


@dataclass
class RankedList:
    """The first counted gallery entries of one query, nearest first (ties in gallery order)."""

    query: int  # index of the query
    gallery: np.ndarray  # int64 gallery indices
    distances: np.ndarray  # their distances
    true: np.ndarray  # bool: a true match


def ranked_list(query: int, dist_row: np.ndarray, q_pid: int, q_camid: int, g_pids: np.ndarray,
                g_camids: np.ndarray, length: int) -> RankedList:
    """Query ``query``'s first ``length`` counted gallery entries (protocol-ignored entries left out)
    from its distance row."""
    valid, match = counted_and_true(np.array([q_pid]), g_pids, np.array([q_camid]), g_camids)
    counted = np.flatnonzero(valid[0])
    kept = counted[np.argsort(dist_row[counted], kind="stable")[:length]]
    return RankedList(query, kept, dist_row[kept], match[0, kept])


def _sorted_flags(candidates: np.ndarray, flags: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``flags`` in the order of ``candidates`` sorted row by row (ties keep the given order), as a
    [rows, max count] bool matrix (False past a row's count). ``candidates`` and ``flags`` hold each
    row's ``counts[row]`` entries one row after another."""
    width = counts.max(initial=0)
    filled = np.arange(width) < counts[:, None]
    if candidates.dtype == np.float32 and width < 2**30:
        # One uint64 key per entry: the distance's order-preserving bits, the entry's position in its row
        # (ties in the given order), the flag; sorted without an argsort.
        bits = (candidates + np.float32(0.0)).view(np.int32)  # -0.0 becomes 0.0: equal zeros tie
        keys = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64) + 2**31).astype(np.uint64) << np.uint64(32)
        slot = np.arange(len(candidates)) - np.repeat(np.cumsum(counts) - counts, counts)
        keys |= (slot.astype(np.uint64) << np.uint64(1)) | flags
        padded = np.full(filled.shape, np.iinfo(np.uint64).max, np.uint64)
        padded[filled] = keys
        padded.sort(axis=1)
        return ((padded & np.uint64(1)) != 0) & filled
    padded = np.full(filled.shape, np.inf, candidates.dtype)
    padded[filled] = candidates
    is_flag = np.zeros(filled.shape, bool)
    is_flag[filled] = flags
    return np.take_along_axis(is_flag, np.argsort(padded, axis=1, kind="stable"), axis=1)


class MetricsAccumulator:
    """mAP, mINP and the CMC curve over query rows of distances given chunk by chunk (each query row
    once, in any order), so that no query x gallery matrix need exist. The result does not depend on
    the chunking: each query's values are computed on its own and summed in query order.

    Only the counted entries no farther than a query's farthest true match can move a true match's
    rank, so only those are sorted (ties keep gallery order), not the whole gallery row.
    """

    def __init__(self, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray, g_camids: np.ndarray,
                 max_rank: int = 50):
        self.q_pids, self.g_pids = np.asarray(q_pids, np.int64), np.asarray(g_pids, np.int64)
        self.q_camids, self.g_camids = np.asarray(q_camids, np.int64), np.asarray(g_camids, np.int64)
        if len(self.q_pids) != len(self.q_camids) or len(self.g_pids) != len(self.g_camids):
            raise ValueError(f"got {len(self.q_pids)}/{len(self.q_camids)} query and {len(self.g_pids)}/"
                             f"{len(self.g_camids)} gallery pids/camids")
        self.max_rank = max_rank
        n_query = len(self.q_pids)
        self._ap = np.zeros(n_query)  # average precision of each query
        self._inp = np.zeros(n_query)  # inverse negative penalty of each query
        self._first_hit = np.zeros(n_query, np.int64)  # rank of the first true match; 0: none (skipped)
        self._added = np.zeros(n_query, bool)
        self._junk = self.g_pids == JUNK_PID
        self._by_pid = np.argsort(self.g_pids, kind="stable")  # gallery indices grouped by pid
        self._sorted_pids = self.g_pids[self._by_pid]

    def add(self, rows: slice, dist: np.ndarray) -> None:
        """The distances [rows, n_gallery] of the queries ``rows`` (a slice of the query indices)."""
        start, stop, step = rows.indices(len(self.q_pids))
        dist = np.asarray(dist)
        if not np.issubdtype(dist.dtype, np.floating):
            dist = dist.astype(np.float64)
        if step != 1 or dist.shape != (stop - start, len(self.g_pids)):
            raise ValueError(f"distances of shape {dist.shape} for query rows {start}:{stop}:{step} and "
                             f"{len(self.g_pids)} gallery items")
        if self._added[start:stop].any():
            raise ValueError(f"query rows {start}:{stop} were already added")
        chunk = max(1, _CHUNK_ELEMENTS // max(dist.shape[1], 1))
        for lo in range(0, len(dist), chunk):
            self._add_chunk(start + lo, dist[lo:lo + chunk])
        self._added[start:stop] = True

    def _add_chunk(self, start: int, dist: np.ndarray) -> None:
        queries = slice(start, start + len(dist))
        n = len(dist)
        # The (query, gallery) pairs of the same pid: ignored on the query's camera, true matches elsewhere.
        pair_row, pair_col = self._same_pid_pairs(self.q_pids[queries])
        same_cam = self.g_camids[pair_col] == self.q_camids[queries][pair_row]
        true_row, true_col = pair_row[~same_cam], pair_col[~same_cam]
        num_pos = np.bincount(true_row, minlength=n)
        farthest_match = np.full(n, -np.inf, dist.dtype)
        np.maximum.at(farthest_match, true_row, dist[true_row, true_col])
        # Candidates: counted entries no farther than the farthest true match.
        near = dist <= farthest_match[:, None]
        if self._junk.any():
            near &= ~self._junk
        near[pair_row[same_cam], pair_col[same_cam]] = False
        true = np.zeros(dist.shape, bool)
        true[true_row, true_col] = True
        counts = near.sum(axis=1)
        is_match = _sorted_flags(dist[near], true[near], counts)
        # Per true match, in rank order within its query: its query, its 1-based rank among the counted
        # entries and how many true matches rank up to it.
        query, rank = np.nonzero(is_match)
        rank += 1
        nth = np.arange(1, len(query) + 1) - np.repeat(np.cumsum(num_pos) - num_pos, num_pos)
        precision_sum = np.bincount(query, weights=nth / rank, minlength=len(dist))  # in rank order
        has = num_pos > 0
        last = np.cumsum(num_pos)[has] - 1  # each query's last true match in (query, rank)
        ap, inp, first_hit = np.zeros(len(dist)), np.zeros(len(dist)), np.zeros(len(dist), np.int64)
        ap[has] = precision_sum[has] / num_pos[has]
        inp[has] = num_pos[has] / rank[last]
        first_hit[has] = rank[last - num_pos[has] + 1]
        self._ap[queries], self._inp[queries], self._first_hit[queries] = ap, inp, first_hit

    def _same_pid_pairs(self, q_pids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, gallery index) of every gallery entry with the pid of query row ``row`` (a junk query:
        none), rows ascending."""
        first = np.searchsorted(self._sorted_pids, q_pids, side="left")
        count = np.searchsorted(self._sorted_pids, q_pids, side="right") - first
        count[q_pids == JUNK_PID] = 0
        rows = np.repeat(np.arange(len(q_pids)), count)
        offsets = np.arange(len(rows)) - np.repeat(np.cumsum(count) - count, count)
        return rows, self._by_pid[np.repeat(first, count) + offsets]

    def result(self) -> dict[str, Any]:
        """``{"mAP", "mINP", "cmc" (ranks 1..max_rank), "num_valid_queries", "num_skipped_queries"}``;
        fractions 0-1 (0 with no valid query)."""
        if not self._added.all():
            raise ValueError(f"{int((~self._added).sum())} query rows were never added")
        valid = self._first_hit > 0
        denom = max(int(valid.sum()), 1)
        hits = np.bincount(self._first_hit[valid & (self._first_hit <= self.max_rank)] - 1,
                           minlength=self.max_rank)
        return {"mAP": math.fsum(self._ap[valid]) / denom, "mINP": math.fsum(self._inp[valid]) / denom,
                "cmc": (np.cumsum(hits) / denom).tolist(), "num_valid_queries": int(valid.sum()),
                "num_skipped_queries": len(valid) - int(valid.sum())}


def compute_metrics(distmat: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_camids: np.ndarray,
                    g_camids: np.ndarray, max_rank: int = 50) -> dict[str, Any]:
    """mAP, mINP and the CMC curve (ranks 1..max_rank) of a whole query x gallery distance matrix, over
    queries that have a true match (see ``MetricsAccumulator``)."""
    distmat = np.asarray(distmat)
    if distmat.shape != (len(q_pids), len(g_pids)):
        raise ValueError(f"distmat is {distmat.shape} but got {len(q_pids)} query and {len(g_pids)} "
                         f"gallery pids")
    metrics = MetricsAccumulator(q_pids, g_pids, q_camids, g_camids, max_rank)
    metrics.add(slice(0, len(distmat)), distmat)
    return metrics.result()
