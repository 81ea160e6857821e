"""Re-ranked search against the gallery's cached neighbour graph: the cost is the queries' own work.

The result equals ``rerank.rerank_topk`` over the same query batch and gallery (the reference, which builds
the k-nearest-neighbour graph of all N = queries + gallery items and encodes every row). Here, with
K' = max(k1 + 1, k2) and the gallery's cached lists (``graph.GalleryGraph``, at least K' wide):

1. one pass over the gallery in column blocks multiplies queries x gallery (the q x G x d product) and keeps
   each query's nearest gallery items, each query's row maximum, each gallery item's new row maximum
   (max of the cached one and its distances to the queries) and the (query, gallery item) pairs where the
   query is nearer than the item's K'-th cached neighbour: only those items' lists change;
2. the lists of queries (over gallery and queries) and of the changed items are merged; every other
   item's list is its cached one;
3. the k-reciprocal sets, expansions and weights (steps 2-4 of the algorithm) are computed only for the
   rows the queries' results depend on: the rows of the queries' k2 nearest items (their query expansion),
   then the support ``Sup`` of those rows, and every row whose expanded set can meet ``Sup`` (the
   k1-reciprocal sets of ``Sup`` and of its round(k1/2)-reciprocal sets, since both relations are
   symmetric); gallery items whose k2 nearest hold such a row are the only ones with a Jaccard distance
   below 1. With the gallery's own weights and reciprocal sets (``gallery_weights``, kept in the index),
   only the queries' rows and the gallery rows whose weights the queries change are computed
   (``_LocalGraph.dirty``); every other row's sets and weights are read;
4. Jaccard distances are summed over shared support only, and only for the pairs whose final distance
   can reach the query's top k (a bound on the k-th from the query's plain list, an upper bound of each
   pair's overlap from one sparse product); every other gallery item ranks as if its Jaccard were 1, by
   its plain distance, so the nearest plain items kept in pass 1 complete the top k (queries with too
   few of them are scanned again with a longer list).

The set algebra uses the same scipy/numpy operations as the reference on the same rows, so the values
match it (to float rounding of the distance products). Dense work runs in torch on ``device`` (CUDA when
present; tests and bench run on an H100); the sparse set algebra is on the CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from reid_deploy.retrieval.knn import KnnGraph, merge_top, torch_device
from reid_deploy.retrieval.parts import in_parts, joined_in_parts, stacked_in_parts, threads
from reid_deploy.retrieval.rerank import _bool_csr, _pair_distances, expanded_sets, squared_norms

SCAN_ELEMENTS = 1 << 22  # query x gallery entries per block of the gallery pass
SCAN_COLUMNS = 1 << 16  # at most this many gallery items per block (a few queries scanned again)
ROW_GROUP = 16  # query rows of a product are padded to a multiple of this (x86 MKL: one kernel from 13 rows up)
SUMMARY_ELEMENTS = 1 << 18  # entries of a block summarised at a time on the CPU (1 MiB: fits a core's cache)
RADIUS_MARGIN = 3  # items expected within a query's radius, as a multiple of the plain list kept
RADIUS_SAMPLE_SHARE, RADIUS_SAMPLE_MIN = 16, 8192  # gallery sample for the radius: 1/16th, at least 8192
PLAIN_EXTRA = 128  # nearest plain gallery items kept per query beyond max(K', top_k)
SET_CHUNK = 8192  # rows per chunk of the reciprocal-set computation
LIMIT_ITEMS = 20  # first plain items per query whose S bounds the query's k-th final distance
OVERLAP_ELEMENTS = 1 << 24  # query x support entries spread densely at a time for exact pair sums


def rerank_topk_with_graph(query_feats: np.ndarray, gallery_feats: np.ndarray, graph: KnnGraph, top_k: int,
                           k1: int = 20, k2: int = 6, lambda_value: float = 0.3, device: str = "auto",
                           encoding: tuple[sp.csr_matrix, np.ndarray | None] | None = None,
                           phases: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``top_k`` re-ranked gallery items of each query: (indices int64, distances float32), each
    [n_query, top_k], as ``rerank.rerank_topk`` returns them. ``graph`` holds the gallery's lists (gallery
    positions, nearest first, itself included), their squared distances and row maxima, at least
    max(k1 + 1, k2) wide (or the whole gallery); ``encoding``, when given, is what ``gallery_weights``
    returns for this graph and k1 (the packed sets may be None: they are then computed where needed).
    ``phases``, when given, receives the seconds of each step: ``gallery_pass`` (step 1, on ``device``),
    then the CPU set algebra: ``weights`` (steps 2-3 and the query expansion), ``pairs`` (the Jaccard sums of
    step 4) and ``select`` (the top k)."""
    nq, ng = len(query_feats), len(gallery_feats)
    kk, top_k = _checked(graph, nq, ng, top_k, k1, k2)
    if nq == 0 or top_k == 0:
        return np.zeros((nq, top_k), np.int64), np.zeros((nq, top_k), np.float32)
    dev = torch_device(device)
    queries = np.ascontiguousarray(query_feats, np.float32)
    clock = _Clock(phases)
    scan = _scan(queries, gallery_feats, graph, kk, min(ng, max(kk, top_k) + PLAIN_EXTRA), dev)
    clock.lap("gallery_pass")
    return _rerank_scanned(queries, gallery_feats, graph, scan, kk, top_k, k1, k2, lambda_value, dev, encoding,
                           clock)


def rerank_topk_per_query(query_feats: np.ndarray, gallery_feats: np.ndarray, graph: KnnGraph, top_k: int,
                          k1: int = 20, k2: int = 6, lambda_value: float = 0.3, device: str = "auto",
                          encoding: tuple[sp.csr_matrix, np.ndarray | None] | None = None,
                          phases: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """As ``rerank_topk_with_graph``, but every query re-ranked on its own (the other queries are not among
    its neighbours, nor it among theirs): row i is the result of query i searched alone, whatever else the
    batch holds (the service's contract), from one gallery pass for the whole batch. The pass's products
    have fixed shapes (query rows in groups of ROW_GROUP, SCAN_COLUMNS gallery items per block), so a
    query's distances are the same bits alone and in any batch."""
    nq, ng = len(query_feats), len(gallery_feats)
    kk, top_k = _checked(graph, 1, ng, top_k, k1, k2)
    if nq == 0 or top_k == 0:
        return np.zeros((nq, top_k), np.int64), np.zeros((nq, top_k), np.float32)
    dev = torch_device(device)
    queries = np.ascontiguousarray(query_feats, np.float32)
    clock = _Clock(phases)
    plain = min(ng, max(kk, top_k) + PLAIN_EXTRA)
    scan = _scan(queries, gallery_feats, graph, kk, plain, dev, SCAN_COLUMNS)
    clock.lap("gallery_pass")
    found = [_rerank_scanned(queries[q:q + 1], gallery_feats, graph, _alone(scan, q, kk, graph.row_max), kk,
                             top_k, k1, k2, lambda_value, dev, encoding, clock) for q in range(nq)]
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def _checked(graph: KnnGraph, nq: int, ng: int, top_k: int, k1: int, k2: int) -> tuple[int, int]:
    """(K' = min(max(k1 + 1, k2), N), top k within the gallery); ValueError when the graph is too narrow."""
    kk = min(max(k1 + 1, k2), nq + ng)
    if graph.indices.shape[1] < min(kk, ng) or len(graph.row_max) != ng:
        raise ValueError(f"the graph ({graph.indices.shape[1]} neighbours of {len(graph.row_max)} items) does "
                         f"not cover {min(kk, ng)} neighbours of {ng} items")
    return kk, min(top_k, ng)


def _rerank_scanned(queries: np.ndarray, gallery: np.ndarray, graph: KnnGraph, scan: _Scan, kk: int, top_k: int,
                    k1: int, k2: int, lambda_value: float, dev, encoding, clock: _Clock
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Steps 2-4 after the gallery pass ``scan`` of ``queries``."""
    weights, packed_sets = encoding if encoding is not None else (None, None)
    local = _LocalGraph(queries, gallery, graph, scan, kk, k1, packed_sets)
    vq, vg, held = local.expanded_rows(k2, weights)
    clock.lap("weights")
    shared = _reachable_pairs(vq, vg, held, scan.top_i, scan.top_d, scan.query_max, top_k, lambda_value)
    clock.lap("pairs")
    found = _select(scan.top_i, scan.top_d, scan.query_max, shared, queries, gallery, top_k, lambda_value, dev)
    clock.lap("select")
    return found


class _Clock:
    """Seconds between laps, added to ``phases`` under each lap's name (nothing without ``phases``)."""

    def __init__(self, phases: dict[str, float] | None):
        self.phases, self.last = phases, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        if self.phases is not None:
            self.phases[name] = self.phases.get(name, 0.0) + now - self.last
        self.last = now


@dataclass
class _Scan:
    """What pass 1 keeps (numpy; float32 distances; gallery positions)."""

    top_i: np.ndarray  # int64 [nq, P] nearest gallery items of each query, nearest first
    top_d: np.ndarray  # float32 [nq, P] their distances
    lists: np.ndarray  # int64 [nq, K'] each query's nearest items of all N (queries first, then gallery)
    query_max: np.ndarray  # float32 [nq] row maximum of each query over all N
    gallery_max: np.ndarray  # float32 [ng] row maximum of each gallery item, queries included
    gallery_squares: np.ndarray  # float32 [ng] ``squared_norms`` of the gallery
    pair_q: np.ndarray  # int64: (query, gallery item) pairs where the query is within the item's K'-th
    pair_g: np.ndarray  # int64   cached distance
    pair_d: np.ndarray  # float32
    gallery_row_max: np.ndarray  # float32 [nq] each query's row maximum over the gallery alone
    over_q: np.ndarray  # int64: (query, gallery item) pairs farther than the item's cached row maximum
    over_g: np.ndarray  # int64
    over_d: np.ndarray  # float32


def _alone(scan: _Scan, q: int, kk: int, cached_max: np.ndarray) -> _Scan:
    """What the gallery pass gives for query ``q`` searched alone: its own list (itself first: distance 0),
    row maximum over the gallery, and the gallery items whose lists or row maxima it alone changes."""
    pairs, over = scan.pair_q == q, scan.over_q == q
    gallery_max = np.array(cached_max, np.float32)
    np.maximum.at(gallery_max, scan.over_g[over], scan.over_d[over])
    lists, _ = _sorted_rows(np.concatenate([[0], scan.top_i[q] + 1])[None],
                            np.concatenate([[0], scan.top_d[q]]).astype(np.float32)[None], kk)
    none = np.zeros(int(over.sum()), np.int64)
    return _Scan(scan.top_i[q:q + 1], scan.top_d[q:q + 1], lists, np.maximum(scan.gallery_row_max[q:q + 1], 0),
                 gallery_max, scan.gallery_squares, np.zeros(int(pairs.sum()), np.int64), scan.pair_g[pairs],
                 scan.pair_d[pairs], scan.gallery_row_max[q:q + 1], none, scan.over_g[over], scan.over_d[over])


def _scan(queries: np.ndarray, gallery: np.ndarray, graph: KnnGraph, kk: int, plain: int, dev,
          columns: int | None = None) -> _Scan:
    """Pass 1 over the gallery in column blocks (see the module docstring).

    One product per block gives ``D' = |g|^2 - 2 q.g`` (queries and gallery rows extended by one column);
    ``|q|^2`` is added only where a value leaves the pass, since a per-row constant does not change a
    row's order, and columns are tested against bounds that rounding keeps conservative. In a large
    gallery each query's ``plain`` nearest items are found among the entries below a radius estimated on
    a gallery sample; queries with too few entries below it are scanned again exactly. The products run
    in torch on ``dev``, the per-block statistics in ``_Ops`` (numpy on the CPU, torch on a GPU); what
    leaves a block is small and is handled in numpy. ``columns``: gallery items per block (default: as many
    as SCAN_ELEMENTS entries allow)."""
    nq, ng = len(queries), len(gallery)
    ops = _Ops(dev)
    xq = torch.from_numpy(queries).to(dev)
    sq_t = (xq * xq).sum(1)
    sq = sq_t.cpu().numpy()
    sq_lo, sq_hi, sq_b = sq.min(), sq.max(), ops.array(sq)
    ext_q = torch.cat([xq, torch.ones(nq, 1, device=dev)], 1)
    radius = _radius(ext_q, gallery, plain, ops)
    row_max = ops.array(np.full(nq, -np.inf, np.float32))
    gallery_max, gallery_squares = np.empty(ng, np.float32), np.empty(ng, np.float32)
    found, pairs, over = [], [], []
    best = None if radius is not None else (torch.full((nq, plain), float("inf"), device=dev),
                                            torch.zeros((nq, plain), dtype=torch.int64, device=dev))
    for a, product in _blocks(ext_q, gallery, dev, gallery_squares, columns):
        dist = ops.block(product)
        block_max, column_min, column_max, below = ops.summary(dist, radius)
        if best is None:
            found.append((below[0], below[1] + a, below[2]))
        else:
            best = merge_top(*best, product, a)
        row_max = ops.maximum(row_max, block_max)
        end = a + dist.shape[1]
        cached_max = np.array(graph.row_max[a:end], np.float32)
        near = np.array(graph.distances[a:end, kk - 1], np.float32) if graph.indices.shape[1] >= kk else \
            np.full(end - a, np.inf, np.float32)
        flagged = np.flatnonzero((column_min + sq_lo <= near) | (column_max + sq_hi > cached_max))
        new_max = cached_max.copy()
        if len(flagged):
            exact = ops.columns(dist, flagged)
            exact += sq_b[:, None]
            new_max[flagged] = np.maximum(cached_max[flagged], ops.host(ops.amax(exact, 0)))
            for found_pairs, mask in ((pairs, exact <= ops.array(near[flagged])[None, :]),
                                      (over, exact > ops.array(cached_max[flagged])[None, :])):
                flat = ops.flat_nonzero(mask)
                found_pairs.append((ops.host(flat // len(flagged)), flagged[ops.host(flat % len(flagged))] + a,
                                    ops.host(exact.reshape(-1)[flat])))
        gallery_max[a:end] = new_max
    if best is None:
        top_i, top_d = _nearest_found(found, nq, plain)
        short = np.flatnonzero(np.isinf(top_d[:, -1]))
        if len(short):  # fewer than ``plain`` items within the radius: scan these queries exactly
            top_i[short], top_d[short] = _nearest(queries[short], gallery, plain, dev, columns)
    else:
        top_i, top_d = _sorted_rows(best[1].cpu().numpy(), best[0].cpu().numpy())
    top_d += sq[:, None]
    with torch.inference_mode():
        between = torch.addmm(sq_t[None], xq, xq.T, alpha=-2)
        between += sq_t[:, None]
    between = between.cpu().numpy()
    gallery_row_max = (ops.host(row_max) + sq).astype(np.float32)
    query_max = np.maximum(gallery_row_max, between.max(1))
    lists, _ = _sorted_rows(np.concatenate([np.broadcast_to(np.arange(nq), (nq, nq)), top_i + nq], 1),
                            np.concatenate([between, top_d], 1), kk)
    return _Scan(top_i, top_d, lists, query_max, gallery_max, gallery_squares, *_joined(pairs), gallery_row_max,
                 *_joined(over))


def _joined(found: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(queries int64, gallery items int64, distances float32) of the pairs found block by block."""
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    q, g, d = (np.concatenate(x) for x in zip(*found))
    return q.astype(np.int64), g.astype(np.int64), d.astype(np.float32)


class _Ops:
    """The per-block array operations of the gallery pass: numpy on the CPU (one thread, on the product's
    own memory: small torch CPU operations cost more in dispatch and thread hand-offs than in work), torch
    on a GPU."""

    def __init__(self, dev):
        self.dev, self.numpy = dev, dev.type == "cpu"

    def block(self, product: torch.Tensor):
        return product.numpy() if self.numpy else product

    def array(self, values: np.ndarray):
        return values if self.numpy else torch.from_numpy(values).to(self.dev)

    def host(self, values) -> np.ndarray:
        return values if self.numpy else values.cpu().numpy()

    def amax(self, values, axis: int):
        return values.max(axis) if self.numpy else values.amax(axis)

    def maximum(self, a, b):
        return np.maximum(a, b) if self.numpy else torch.maximum(a, b)

    def summary(self, dist, radius) -> tuple:
        """Of a block of the gallery pass: (each row's maximum, each column's minimum and maximum (numpy), the
        entries below their row's ``radius`` as numpy (row, column, value); None without ``radius``). On the
        CPU a few rows at a time, so that every statistic reads them from the core's cache."""
        nq, width = dist.shape
        if not self.numpy:
            below = None
            if radius is not None:
                flat = (dist < radius[:, None]).reshape(-1).nonzero()[:, 0]
                below = tuple(x.cpu().numpy() for x in (flat // width, flat % width, dist.reshape(-1)[flat]))
            return dist.amax(1), dist.amin(0).cpu().numpy(), dist.amax(0).cpu().numpy(), below
        rows = max(1, SUMMARY_ELEMENTS // width)
        row_max = np.empty(nq, np.float32)
        column_min, column_max = np.full(width, np.inf, np.float32), np.full(width, -np.inf, np.float32)
        parts = []
        for a in range(0, nq, rows):
            part = dist[a:a + rows]
            part.max(1, out=row_max[a:a + rows])
            np.minimum(column_min, part.min(0), out=column_min)
            np.maximum(column_max, part.max(0), out=column_max)
            if radius is not None:
                flat = np.flatnonzero(part < radius[a:a + rows, None])
                parts.append((flat // width + a, flat % width, part.reshape(-1)[flat]))
        below = tuple(np.concatenate(x) for x in zip(*parts)) if radius is not None else None
        return row_max, column_min, column_max, below

    def columns(self, values, positions: np.ndarray):
        """A copy of the columns ``positions`` of ``values``."""
        return np.take(values, positions, 1) if self.numpy else values.index_select(1, self.array(positions))

    def flat_nonzero(self, mask):
        """Positions of the true entries in the flattened ``mask`` (much faster than 2-D nonzero in numpy)."""
        return np.flatnonzero(mask) if self.numpy else mask.reshape(-1).nonzero()[:, 0]

    def kth_smallest(self, values, k: int):
        """Each row's k-th smallest value (1-based)."""
        return np.partition(values, k - 1, axis=1)[:, k - 1] if self.numpy else \
            torch.kthvalue(values, k, dim=1).values


def _blocks(ext_q: torch.Tensor, gallery: np.ndarray, dev, squares: np.ndarray | None = None,
            columns: int | None = None):
    """(first column, ``D'`` [nq, block]) over the gallery in column blocks of ``columns`` items (default: as
    many as SCAN_ELEMENTS entries allow); ``squares``, when given, receives the gallery's ``squared_norms``."""
    cols = columns or min(max(256, SCAN_ELEMENTS // len(ext_q)), SCAN_COLUMNS)
    with torch.inference_mode():
        for a in range(0, len(gallery), cols):
            ext_g = _extended(gallery[a:a + cols])
            if squares is not None:
                squares[a:a + cols] = ext_g[:, -1]
            yield a, _product(ext_q, torch.from_numpy(ext_g).to(dev))


def _product(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``rows @ columns.T`` with ``rows`` padded by zero rows to a multiple of ROW_GROUP: BLAS libraries pick
    another kernel (other rounding) for a few rows than for many, and a row's products must not depend on how
    many rows come with it."""
    pad = -len(rows) % ROW_GROUP
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
    return (rows @ columns.T)[:len(rows) - pad]


def _extended(rows: np.ndarray) -> np.ndarray:
    """[n, d + 1]: -2 x and |x|^2, so that (q, 1) . (-2 g, |g|^2) = |g|^2 - 2 q.g."""
    out = np.empty((len(rows), rows.shape[1] + 1), np.float32)
    np.multiply(rows, -2, out=out[:, :-1])
    out[:, -1] = squared_norms(rows)
    return out


def _radius(ext_q: torch.Tensor, gallery: np.ndarray, plain: int, ops: _Ops):
    """Per query, a ``D'`` bound below which about RADIUS_MARGIN x ``plain`` gallery items are expected
    (from a random sample of the gallery); None for a small gallery (every block is then merged)."""
    nq, ng = len(ext_q), len(gallery)
    size = max(RADIUS_SAMPLE_MIN, ng // RADIUS_SAMPLE_SHARE)
    if ng <= size or RADIUS_MARGIN * plain >= ng:
        return None
    rank = int(np.ceil(RADIUS_MARGIN * plain * size / ng))
    sample = np.sort(np.random.default_rng(0).choice(ng, size, replace=False))
    ext_s = torch.from_numpy(_extended(gallery[sample])).to(ops.dev)
    rows = max(1, SCAN_ELEMENTS // size)
    parts = []
    with torch.inference_mode():
        for a in range(0, nq, rows):
            parts.append(ops.kth_smallest(ops.block(_product(ext_q[a:a + rows], ext_s)), rank))
    return np.concatenate(parts) if ops.numpy else torch.cat(parts)


def _nearest_found(found: list[tuple[np.ndarray, ...]], nq: int, plain: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``plain`` smallest found entries of each row (ascending; infinite where a row has fewer)."""
    r, c, v = (np.concatenate(x) for x in zip(*found))
    order = np.argsort((r.astype(np.int64) << 32) + _sortable(v) + (1 << 31), kind="stable")  # by row, then value
    r, c, v = r[order], c[order], v[order]
    slot = _slots(r, nq)
    keep = slot < plain
    top_i = np.zeros((nq, plain), np.int64)
    top_d = np.full((nq, plain), np.inf, np.float32)
    top_i[r[keep], slot[keep]], top_d[r[keep], slot[keep]] = c[keep], v[keep]
    return top_i, top_d


def _nearest(queries: np.ndarray, gallery: np.ndarray, plain: int, dev, columns: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """The ``plain`` nearest gallery items of each query by ``D'`` (positions, values; ascending), exactly
    (``columns`` as for ``_blocks``)."""
    nq = len(queries)
    xq = torch.from_numpy(queries).to(dev)
    ext_q = torch.cat([xq, torch.ones(nq, 1, device=dev)], 1)
    best_d = torch.full((nq, plain), float("inf"), device=dev)
    best_i = torch.zeros((nq, plain), dtype=torch.int64, device=dev)
    for a, dist in _blocks(ext_q, gallery, dev, columns=columns):
        best_d, best_i = merge_top(best_d, best_i, dist, a)
    return _sorted_rows(best_i.cpu().numpy(), best_d.cpu().numpy())


def _sorted_rows(index: np.ndarray, value: np.ndarray, keep: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's entries in ascending ``value`` (float32; ties in column order), the first ``keep`` of them."""
    width = value.shape[1]
    keys = ((_sortable(value) + (1 << 31)) << 31) + np.arange(width)  # value, then column: distinct per row
    if keep is not None and keep < width:
        keys = np.partition(keys, keep - 1, axis=1)[:, :keep]
    keys.sort(axis=1)
    order = keys & ((1 << 31) - 1)
    return np.take_along_axis(index, order, 1), np.take_along_axis(value, order, 1)


def _slots(rows: np.ndarray, n_rows: int) -> np.ndarray:
    """Each entry's position within its row (``rows`` ascending)."""
    counts = np.bincount(rows, minlength=n_rows)
    return np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)


def _ragged(rows: np.ndarray, values: np.ndarray, n_rows: int, fill) -> tuple[np.ndarray, np.ndarray]:
    """(``values`` laid out by ``rows`` (ascending) into a padded [n_rows, longest row] array, slots)."""
    slot = _slots(rows, n_rows)
    padded = np.full((n_rows, int(slot.max()) + 1 if len(rows) else 0), fill, dtype=values.dtype)
    padded[rows, slot] = values
    return padded, slot


class _LocalGraph:
    """The merged graph of queries + gallery (N-space: queries 0..nq-1, then gallery), read lazily: cached
    gallery lists, replaced where queries changed them; reciprocal sets computed only for rows asked for.
    Without ``scan`` it is the gallery's own graph (no queries)."""

    def __init__(self, queries: np.ndarray, gallery: np.ndarray, graph: KnnGraph, scan: _Scan | None, kk: int,
                 k1: int, packed_sets: np.ndarray | None = None):
        self.queries, self.gallery, self.graph, self.scan = queries, gallery, graph, scan
        self.packed_sets = packed_sets  # the gallery's own sets (``pack_sets``), read once ``dirty`` ran
        self.sets_checked = False  # whether ``dirty`` found the rows whose own sets the queries changed
        self.nq, self.ng, self.kk, self.k1 = len(queries), len(gallery), kk, k1
        self.n = self.nq + self.ng
        self.half = int(np.around(k1 / 2))
        self.row_max = np.asarray(graph.row_max, np.float32) if scan is None else \
            np.concatenate([scan.query_max, scan.gallery_max])
        self.squares = squared_norms(gallery) if scan is None else \
            np.concatenate([squared_norms(queries), scan.gallery_squares])  # |x|^2 of every row, N-space
        self.changed, self.changed_lists = self._changed_lists()
        cached = graph.indices[:, :kk]
        self.own = np.empty(cached.shape, np.int32)  # the gallery's lists, N-space
        np.add(cached, self.nq, out=self.own, casting="unsafe")
        if self.nq:  # merged lists of every row (N-space); in a gallery smaller than K' every row changed
            self.table = np.full((self.n, kk), -1, np.int32)
            self.table[:self.nq] = scan.lists
            self.table[self.nq:, :self.own.shape[1]] = self.own
            self.table[self.changed + self.nq] = self.changed_lists
        else:
            self.table = self.own
        self.known = {"r": np.zeros(self.n, bool), "h": np.zeros(self.n, bool)}  # rows with sets computed
        self.sets: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"r": [], "h": []}
        self.matrices: dict[str, sp.csr_matrix] = {}
        self.narrowed: dict[tuple[str, int], np.ndarray] = {}

    def _changed_lists(self) -> tuple[np.ndarray, np.ndarray]:
        """Gallery items whose K' nearest take in queries, and their merged lists (N-space)."""
        s, kk = self.scan, self.kk
        if s is None or not len(s.pair_g):
            return np.zeros(0, np.int64), np.zeros((0, kk), np.int64)
        changed = _unique(s.pair_g)
        order = np.lexsort((s.pair_d, s.pair_g))
        g, q, d = s.pair_g[order], s.pair_q[order], s.pair_d[order]
        first = np.searchsorted(g, changed)
        rank = np.arange(len(g)) - np.repeat(first, np.diff(np.append(first, len(g))))
        keep = rank < kk
        row = np.searchsorted(changed, g[keep])
        q_d = np.full((len(changed), kk), np.inf, np.float32)
        q_i = np.zeros((len(changed), kk), np.int64)
        q_d[row, rank[keep]], q_i[row, rank[keep]] = d[keep], q[keep]
        cand_d = np.concatenate([np.asarray(self.graph.distances[changed, :kk]), q_d], 1)
        cand_i = np.concatenate([np.asarray(self.graph.indices[changed, :kk], np.int64) + self.nq, q_i], 1)
        return changed, _sorted_rows(cand_i, cand_d, kk)[0].astype(np.int32)

    def cached_lists(self, ids: np.ndarray, width: int | None = None) -> np.ndarray:
        """int32 [len(ids), <= K']: the gallery's own lists (N-space) of gallery rows ``ids`` (N-space), their
        first ``width`` items."""
        return self._narrow("own", width).take(ids - self.nq, 0)

    def lists(self, ids: np.ndarray, width: int | None = None) -> np.ndarray:
        """int32 [len(ids), <= K']: the merged nearest items of each row (N-space), their first ``width``; a
        changed row's list holds K' items even where the gallery's own is shorter (a gallery smaller than K')."""
        return self._narrow("table", width).take(ids, 0)

    def _narrow(self, name: str, width: int | None) -> np.ndarray:
        """The first ``width`` columns of ``table`` or ``own``, kept contiguous (gathering them is faster)."""
        full = getattr(self, name)
        if width is None or width >= full.shape[1]:
            return full
        if (name, width) not in self.narrowed:
            self.narrowed[(name, width)] = np.ascontiguousarray(full[:, :width])
        return self.narrowed[(name, width)]

    def ensure_sets(self, ids: np.ndarray, kinds: tuple[str, ...] = ("r", "h")) -> None:
        """Compute the ``r`` (k1) and/or ``h`` (round(k1/2)) reciprocal sets of the rows ``ids`` not yet known."""
        ids = _unique(ids)
        for kind in kinds:
            new = ids[~self.known[kind][ids]]
            k = self.k1 if kind == "r" else self.half
            if self.sets_checked and self.packed_sets is not None:  # gallery rows ``dirty`` did not compute
                own = new >= self.nq
                self._keep(kind, new[own], self._own_sets(new[own], kind))
                new = new[~own]
            for a in range(0, len(new), SET_CHUNK):
                self._keep(kind, new[a:a + SET_CHUNK], _reciprocal_pairs(new[a:a + SET_CHUNK], self.lists, k))

    def _keep(self, kind: str, ids: np.ndarray, pairs: tuple[np.ndarray, np.ndarray]) -> None:
        """Store the ``kind`` sets ((row, member) pairs) of rows ``ids`` whose sets are not yet known; the
        matrices built from the earlier ones are dropped."""
        unknown = ~self.known[kind][pairs[0]]
        self.known[kind][ids] = True
        self.sets[kind].append((pairs[0][unknown], pairs[1][unknown]))
        self.matrices.pop(kind, None)
        if kind == "h":
            self.matrices.pop("h_t", None)

    def _own_sets(self, ids: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """The (row, member) pairs of the gallery's own ``kind`` sets of gallery rows ``ids`` (N-space), read
        from ``packed_sets``."""
        k, first = (self.k1, 0) if kind == "r" else (self.half, _packed_bytes(self.k1))
        bits = np.unpackbits(self.packed_sets[ids - self.nq, first:first + _packed_bytes(k)], axis=1,
                             count=k + 1, bitorder="little")[:, :self.own.shape[1]]
        rows, rank = np.nonzero(bits)
        return ids[rows], self.own[ids[rows] - self.nq, rank]

    def pack_sets(self) -> np.ndarray:
        """Compute the ``r`` and ``h`` sets of every row of the gallery's own graph (no queries); uint8
        [G, _packed_bytes(k1) + _packed_bytes(round(k1/2))]: per row the bits (little-endian) of the list
        positions in its k1-, then round(k1/2)-reciprocal set."""
        packed = np.zeros((self.ng, _packed_bytes(self.k1) + _packed_bytes(self.half)), np.uint8)
        for kind, k, first in (("r", self.k1, 0), ("h", self.half, _packed_bytes(self.k1))):
            for a in range(0, self.ng, SET_CHUNK):
                ids = np.arange(a, min(a + SET_CHUNK, self.ng))
                forward, mask = _reciprocal_masks(ids, self.lists, k)
                rows, rank = np.nonzero(mask)
                self._keep(kind, ids, (ids[rows], forward[rows, rank]))
                bits = np.zeros((len(ids), k + 1), bool)  # lists shorter than k + 1 in a small gallery
                bits[:, :mask.shape[1]] = mask
                packed[a:a + len(ids), first:first + _packed_bytes(k)] = np.packbits(bits, axis=1, bitorder="little")
        return packed

    def matrix(self, name: str) -> sp.csr_matrix:
        """The known ``r`` (k1) or ``h`` (round(k1/2)) reciprocal sets as a 0/1 CSR matrix [N, N]; ``h_t``:
        the transpose of ``h``."""
        if name not in self.matrices:
            if name == "h_t":
                self.matrices[name] = self.matrix("h").T.tocsr()
            else:
                rows, cols = (np.concatenate(x) for x in zip(*self.sets[name])) if self.sets[name] else \
                    (np.zeros(0, np.int64), np.zeros(0, np.int64))
                self.matrices[name] = _bool_csr(rows, cols, (self.n, self.n))
        return self.matrices[name]

    def encode(self, ids: np.ndarray) -> sp.csr_matrix:
        """Rows ``ids`` (sorted, unique) of V, the normalised k-reciprocal weights: float32 CSR
        [len(ids), N], computed as ``rerank.encode`` computes them (steps 2-4)."""
        self.ensure_sets(ids, ("r",))
        r_rows = self.matrix("r")[ids]
        self.ensure_sets(r_rows.indices, ("h",))  # the candidates' round(k1/2)-reciprocal sets
        expanded = expanded_sets(r_rows, self.matrix("h"), self.matrix("h_t"))
        i = np.repeat(ids, np.diff(expanded.indptr))
        j = expanded.indices
        scale = self.row_max[i]  # 0 only where every item equals this one (a gallery of one): weights 1
        distances = _pair_distances(self.features, self.squares, i, j)
        weight = np.exp(-np.divide(distances, scale, out=np.zeros_like(scale), where=scale > 0))
        v = sp.csr_matrix((weight.astype(np.float32), j, expanded.indptr), shape=(len(ids), self.n))
        with np.errstate(divide="ignore"):  # an empty row (an approximate list missing the item itself)
            scale = (1.0 / np.asarray(v.sum(axis=1)).ravel()).astype(np.float32)
        return sp.diags(scale) @ v

    def features(self, ids: np.ndarray) -> np.ndarray:
        """The feature rows of N-space rows ``ids``."""
        rows = np.take(self.gallery, np.maximum(ids - self.nq, 0), 0)
        is_query = ids < self.nq
        if is_query.any():
            rows[is_query] = self.queries.take(ids[is_query], 0)
        return rows

    def dirty(self) -> np.ndarray:
        """Gallery rows (N-space) whose V row differs from the gallery's own (``gallery_weights``).

        R(m) changes only when m's list took in queries or m left the first k1 + 1 of a list that did;
        likewise H(c) with round(k1/2) + 1; the expanded set E(m) changes only when R(m) changed or R(m)
        holds a c whose H(c) changed and joins E(m) before or after (``_joining``); the weights also change
        with the row maximum."""
        nq = self.nq
        rows = self.changed + nq
        new = self.changed_lists
        old = self.cached_lists(rows)
        candidates = []
        for k in (self.k1, self.half):
            kept = (old[:, :k + 1, None] == new[:, None, :k + 1]).any(-1)
            candidates.append(_unique(np.concatenate([rows, old[:, :k + 1][~kept]])))
        (r_changed, _), (h_changed, h_own) = (self._check_sets(ids, kind) for ids, kind in zip(candidates, "rh"))
        self.sets_checked = True
        moved_max = np.flatnonzero(self.scan.gallery_max != np.asarray(self.graph.row_max)) + nq
        dirty = _unique(np.concatenate([r_changed, self._joining(h_changed, h_own, r_changed), moved_max]))
        return dirty[dirty >= nq]

    def _joining(self, h_changed: np.ndarray, h_own: tuple[np.ndarray, np.ndarray], r_changed: np.ndarray
                 ) -> np.ndarray:
        """The gallery rows m outside ``r_changed`` with a c of ``h_changed`` in R(m) whose H(c) joins E(m)
        (|R(m) & H(c)| > 2/3 |H(c)|, as ``encode`` accepts it) with the merged or with the gallery's own H(c)
        (``h_own``: its (row, member) pairs): only their expanded sets change with H."""
        self.ensure_sets(h_changed, ("r",))
        by_c = self.matrix("r")[h_changed].tocoo()  # m in R(c): c in R(m), R being symmetric
        outside = np.ones(self.n, bool)
        outside[r_changed] = False
        outside[:self.nq] = False
        keep = outside[by_c.col]
        c, m = h_changed[by_c.row[keep]], by_c.col[keep]
        self.ensure_sets(m, ("r",))
        r_sets = self.matrix("r")[m]
        joins = np.zeros(len(m), bool)
        for h_sets in (self.matrix("h"), _bool_csr(*h_own, (self.n, self.n))):
            h_rows = h_sets[c]
            joins |= np.asarray(r_sets.multiply(h_rows).sum(1)).ravel() > 2 / 3 * np.diff(h_rows.indptr)
        return _unique(m[joins])

    def _check_sets(self, ids: np.ndarray, kind: str) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """(of gallery rows ``ids`` (N-space, sorted, unique) those whose ``kind`` set under the merged lists
        differs from the gallery's own, the own sets' (row, member) pairs); the merged sets are kept."""
        k = self.k1 if kind == "r" else self.half
        new = _reciprocal_pairs(ids, self.lists, k)
        old = self._own_sets(ids, kind) if self.packed_sets is not None else \
            _reciprocal_pairs(ids, self.cached_lists, k)
        self._keep(kind, ids, new)
        return _differing_rows(new, old, self.n), old

    def expanded_rows(self, k2: int, weights: sp.csr_matrix | None
                      ) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
        """Step 5 for the pairs that share support: (V' rows of the queries [nq, N], V' rows of every gallery
        item whose k2 nearest hold a row meeting the queries' support, on the support's columns, those items
        (gallery positions, ascending)).

        With ``weights`` (the gallery's own V for this k1), only the queries' rows and the gallery rows the
        queries changed (``dirty``) are encoded; every other row is read from it. Without, the rows that can
        meet the support are encoded: the k1-reciprocal sets of the support and of its round(k1/2)-
        reciprocal sets (both relations are symmetric)."""
        queries = np.arange(self.nq)
        nearest = min(k2, self.kk)
        expanded_by = _unique(self.lists(queries, nearest).ravel()) if k2 != 1 else queries
        in_support = np.zeros(self.n, bool)
        if weights is not None:
            fresh = _unique(np.concatenate([queries, self.dirty()]))
            v_fresh = self.encode(fresh)
            own = np.isin(fresh, expanded_by)
            from_cache = expanded_by[~np.isin(expanded_by, fresh)]
            query_side = [(fresh[own], v_fresh[np.flatnonzero(own)]),
                          (from_cache, _shifted(_rows(weights, from_cache - self.nq), self.nq, self.n))]
            in_support[np.concatenate([v.indices for _, v in query_side])] = True
            clean = np.ones(self.ng, bool)
            clean[fresh[fresh >= self.nq] - self.nq] = False
            hit, cached = _meeting(weights, in_support[self.nq:], clean)
            fresh_hit, fresh_sup = _meeting(v_fresh, in_support)
            gallery_side = [(fresh[fresh_hit], fresh_sup), (hit + self.nq, _shifted(cached, self.nq, self.n))]
        else:
            v_query_side = self.encode(expanded_by)
            query_side = [(expanded_by, v_query_side)]
            support = _unique(v_query_side.indices)
            in_support[support] = True
            self.ensure_sets(support)
            reach = _unique(self.matrix("h")[support].indices)  # H(Sup): expansions that can bring Sup in
            self.ensure_sets(reach, ("r",))
            r_set = self.matrix("r")
            candidates = _unique(np.concatenate([r_set[support].indices, r_set[reach].indices]))
            candidates = candidates[~np.isin(candidates, expanded_by)]
            gallery_side = []
            for rows, v in ((expanded_by, v_query_side), (candidates, self.encode(candidates))):
                hit, v = _meeting(v, in_support)
                gallery_side.append((rows[hit], v))
        v_query_rows, _ = _spread(query_side, self.n)
        v_support, rows = _spread(gallery_side, self.n)  # rows meeting the support, support columns only
        in_rows = np.zeros(self.n, bool)
        in_rows[rows] = True
        if k2 != 1:
            held = in_rows[self._narrow("own", nearest)].any(1)
            if len(self.changed):
                held[self.changed] = in_rows[self.changed_lists[:, :nearest]].any(1)
        else:
            held = in_rows[self.nq:].copy()
        gallery = np.flatnonzero(held)
        v_query = self._expand(queries, v_query_rows, k2)
        return v_query, self._expand(gallery + self.nq, v_support, k2), gallery

    def _expand(self, ids: np.ndarray, v_all: sp.csr_matrix, k2: int) -> sp.csr_matrix:
        """Step 5 (query expansion) for rows ``ids``: the mean of the V rows of their k2 nearest."""
        if k2 == 1:
            return v_all[ids]
        nearest = np.sort(self.lists(ids, min(k2, self.kk)), axis=1)  # the reference's order of the sums
        width = nearest.shape[1]
        mean = sp.csr_matrix((np.full(nearest.size, 1.0 / width, np.float32), nearest.ravel(),
                              np.arange(0, nearest.size + 1, width)), shape=(len(ids), self.n))
        return stacked_in_parts(lambda part: mean[part] @ v_all, len(ids))


def gallery_weights(gallery: np.ndarray, graph: KnnGraph, k1: int, chunk: int = 65536,
                    description: str | None = None) -> tuple[sp.csr_matrix, np.ndarray]:
    """(V of the gallery alone (steps 2-4 on its own graph, no queries), float32 CSR [G, G]; its k1- and
    round(k1/2)-reciprocal sets, packed as ``_LocalGraph.pack_sets`` packs them): what a re-ranked search
    reads for every row its queries do not change (see ``_LocalGraph.dirty``)."""
    from reid_deploy.retrieval.knn import _progress

    ng = len(gallery)
    local = _LocalGraph(np.zeros((0, gallery.shape[1]), np.float32), gallery, graph, None, min(k1 + 1, ng), k1)
    packed = local.pack_sets()
    parts = []
    with _progress(description, -(-ng // chunk)) as advance:
        for a in range(0, ng, chunk):
            parts.append(local.encode(np.arange(a, min(a + chunk, ng))))
            advance()
    return (sp.vstack(parts).tocsr() if parts else sp.csr_matrix((0, 0), dtype=np.float32)), packed


def _reciprocal_masks(ids: np.ndarray, lists, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(the first k + 1 items of the lists of rows ``ids``, bool of the same shape: whether the item is in the
    row's k-reciprocal set) under ``lists`` ((ids, width) -> the first ``width`` of their neighbour lists,
    nearest first, at least k + 1 wide or complete)."""
    forward = lists(ids, k + 1)
    back = lists(forward.ravel(), k + 1)
    back = back.reshape(*forward.shape, back.shape[1])
    return forward, (back == ids[:, None, None]).any(-1)


def _reciprocal_pairs(ids: np.ndarray, lists, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The (row, member) pairs of the k-reciprocal sets of rows ``ids`` under ``lists`` (as
    ``_reciprocal_masks``)."""

    def pairs(part: slice) -> tuple[np.ndarray, np.ndarray]:
        forward, mask = _reciprocal_masks(ids[part], lists, k)
        rows, rank = np.nonzero(mask)
        return ids[part][rows], forward[rows, rank]

    return joined_in_parts(pairs, len(ids))


def _differing_rows(new: tuple[np.ndarray, np.ndarray], old: tuple[np.ndarray, np.ndarray], span: int
                    ) -> np.ndarray:
    """The rows whose sets differ between the (row, member) pairs ``new`` and ``old`` (each ordered by row,
    members distinct); ``span``: more than any row number."""
    return _unique(np.setxor1d(new[0] * span + new[1], old[0] * span + old[1], assume_unique=True) // span)


def _packed_bytes(k: int) -> int:
    """Bytes of a k-reciprocal set packed as bits over the first k + 1 list positions."""
    return -(-(k + 1) // 8)


def _unique(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (by sorting: numpy's hashing ``np.unique`` is far slower on large arrays)."""
    values = np.sort(values, kind="stable")
    return values[np.concatenate([[True], values[1:] != values[:-1]])] if len(values) else values


def _unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, each value's position among them)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    first = np.concatenate([[True], ordered[1:] != ordered[:-1]]) if len(values) else np.zeros(0, bool)
    inverse = np.empty(len(values), np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse


def _rows(matrix: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
    return matrix[rows] if len(rows) else sp.csr_matrix((0, matrix.shape[1]), dtype=matrix.dtype)


def _spread(parts: list[tuple[np.ndarray, sp.csr_matrix]], n: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """(CSR [n, n] holding the rows of ``parts`` ((N-space rows, their CSR rows), disjoint) at their
    places, those rows sorted)."""
    rows = np.concatenate([r for r, _ in parts])
    order = np.argsort(rows)
    v = sp.vstack([m for _, m in parts]).tocsr()[order]
    counts = np.zeros(n, np.int64)
    counts[rows[order]] = np.diff(v.indptr)
    return sp.csr_matrix((v.data, v.indices, np.concatenate([[0], np.cumsum(counts)])), shape=(n, n)), rows[order]


def _shifted(v: sp.csr_matrix, offset: int, n: int) -> sp.csr_matrix:
    """Gallery-position columns moved to N-space (``offset`` queries first), ``n`` columns."""
    return sp.csr_matrix((v.data, v.indices.astype(np.int64) + offset, v.indptr), shape=(v.shape[0], n))


def _meeting(v: sp.csr_matrix, columns: np.ndarray, rows: np.ndarray | None = None
             ) -> tuple[np.ndarray, sp.csr_matrix]:
    """(the rows of ``v`` with entries in the ``columns`` mask (among the ``rows`` mask, when given), those
    rows with only those entries)."""
    at = np.flatnonzero(columns[v.indices])
    row = np.searchsorted(v.indptr, at, side="right") - 1
    if rows is not None:
        keep = rows[row]
        at, row = at[keep], row[keep]
    first = np.flatnonzero(np.concatenate([[True], row[1:] != row[:-1]])) if len(row) else np.zeros(0, np.int64)
    indptr = np.append(first, len(row))
    return row[first], sp.csr_matrix((v.data[at], v.indices[at], indptr), shape=(len(first), v.shape[1]))


@dataclass
class _Shared:
    """Query x gallery pairs with shared support, ordered by (query, gallery item): S = sum_k min(V'[q, k],
    V'[g, k]) (float64)."""

    q: np.ndarray
    g: np.ndarray
    s: np.ndarray


def _reachable_pairs(vq: sp.csr_matrix, vg: sp.csr_matrix, held: np.ndarray, top_i: np.ndarray, top_d: np.ndarray,
                     query_max: np.ndarray, top_k: int, lambda_value: float) -> _Shared:
    """The (query, gallery item) pairs with shared support whose final distance can reach the top k, with
    S = sum_k min(V'[q, k], V'[g, k]) summed exactly in float64 (``vg``: the V' rows of the gallery items
    ``held``, support columns only; ``top_i`` / ``top_d``: each query's nearest plain items and their
    distances, ascending). Every pair left out has a final distance beyond the query's k-th; ``_select``
    takes it as Jaccard 1, which only raises it.

    A bound on each query's k-th final distance comes from its plain list: S exact for the first
    LIMIT_ITEMS items, 0 for the rest. A pair with plain distance d reaches it only when S is at least
    what (1 - lambda) J + lambda d <= bound asks (J = 1 - S / (2 - S)); d is the item's own for list
    items and at least the list's last for every other item. S <= sum_k sqrt(V'[q, k] V'[g, k]) (as
    min(a, b) <= sqrt(ab)): that bound, one sparse product, picks the pairs whose S is summed."""
    nq, plain = top_i.shape
    if not len(held) or not vq.nnz:
        return _Shared(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    lam, one_minus = np.float32(lambda_value), np.float32(1 - lambda_value)
    dist = top_d / query_max[:, None]
    head = min(LIMIT_ITEMS, plain)
    head_q = np.repeat(np.arange(nq), head)
    head_at, head_held = _find(held, top_i[:, :head].ravel())
    head_s = np.zeros(nq * head)
    head_s[head_held] = _overlaps(vq, vg, head_q[head_held], head_at[head_held])
    finals = one_minus + lam * dist  # S taken as 0 beyond the head: never below the item's final distance
    finals[:, :head] = one_minus * (1 - head_s / (2 - head_s)).astype(np.float32).reshape(nq, head) + \
        lam * dist[:, :head]
    bound = np.partition(finals, top_k - 1, axis=1)[:, top_k - 1] + np.float32(1e-5)

    def least(d: np.ndarray, q: np.ndarray) -> np.ndarray:
        """The S a pair of query ``q`` with plain distance ``d`` needs to reach the bound."""
        if one_minus <= 0:  # lambda = 1: the final distance is the plain one, S plays no part
            return np.full(len(q), np.inf)
        t = 1 - (bound[q] - lam * d) / one_minus  # S / (2 - S) must reach t
        return np.where(t > 0, 2 * t / (1 + np.maximum(t, 0)), 0)

    root_q_t = vq.T.tocsr()
    root_q_t.data = np.sqrt(root_q_t.data)
    beyond_head = least(dist[:, min(head, plain - 1)], np.arange(nq))  # the least any pair beyond the head needs
    span = int(top_i.max()) + 1
    list_keys = (np.arange(nq)[:, None] * span + top_i).ravel()
    ordered = np.argsort(list_keys)
    list_keys = list_keys[ordered]

    def candidates(part: slice) -> tuple[np.ndarray, np.ndarray]:
        """(query, row of ``vg``) pairs beyond the head whose bound reaches what they need, rows ``part``."""
        root_g = vg[part]
        root_g.data = np.sqrt(root_g.data)
        upper = (root_g @ root_q_t).tocsr()  # [rows, nq]: the bound of S, in float32 (hence the margin)
        g_at = np.repeat(np.arange(part.start, part.stop), np.diff(upper.indptr))
        q, ub = upper.indices.astype(np.int64), upper.data * np.float32(1 + 1e-4) + np.float32(1e-6)
        keep = ub >= beyond_head[q]
        q, g_at, ub = q[keep], g_at[keep], ub[keep]
        at, in_list = _find(list_keys, q * span + held[g_at])
        slot = np.where(in_list, ordered[at] % plain, plain)  # the item's place in the query's list (plain: beyond)
        need = least(np.where(in_list, dist[q, np.minimum(slot, plain - 1)], dist[q, -1]), q)
        keep = (slot >= head) & (ub >= need)
        return q[keep], g_at[keep]

    q, g_at = joined_in_parts(candidates, len(held))
    shares = head_s > 0
    s = np.concatenate([head_s[shares], _overlaps(vq, vg, q, g_at)])
    q, g = np.concatenate([head_q[shares], q]), held[np.concatenate([head_at[shares], g_at])]
    order = np.lexsort((g, q))
    return _Shared(q[order], g[order], s[order])


def _overlaps(vq: sp.csr_matrix, vg: sp.csr_matrix, q: np.ndarray, g_at: np.ndarray) -> np.ndarray:
    """S = sum_k min(vq[q, k], vg[g, k]) of each pair (query ``q``, row ``g_at`` of ``vg``), float64, with
    the queries' rows spread densely over their support, a chunk of queries at a time (ranges of queries in
    threads, each with its own chunk)."""
    out = np.zeros(len(q))
    if not len(q):
        return out
    nq = vq.shape[0]
    support, column = _unique_inverse(vq.indices)
    entry_q = np.repeat(np.arange(nq), np.diff(vq.indptr))
    place = np.full(vq.shape[1], -1, np.int64)
    place[support] = np.arange(len(support))
    rows = max(1, OVERLAP_ELEMENTS // threads() // max(len(support), 1))
    by_query = np.argsort(q, kind="stable")
    sorted_q = q[by_query]
    counts = np.diff(vg.indptr)

    def fill(part: slice) -> None:
        dense = np.zeros((min(rows, part.stop - part.start), len(support) + 1), np.float32)  # last: outside
        for first in range(part.start, part.stop, rows):
            end = min(first + rows, part.stop)
            a, b = np.searchsorted(sorted_q, [first, end])
            if a == b:
                continue
            mine = slice(vq.indptr[first], vq.indptr[end])
            dense[entry_q[mine] - first, column[mine]] = vq.data[mine]
            pairs = by_query[a:b]
            count = counts[g_at[pairs]].astype(np.int64)
            total = int(count.sum())
            starts = np.repeat(vg.indptr[g_at[pairs]].astype(np.int64) - (np.cumsum(count) - count), count) + \
                np.arange(total)
            pair_of = np.repeat(np.arange(b - a), count)
            flat = (q[pairs] - first)[pair_of] * dense.shape[1] + place.take(vg.indices.take(starts))
            values = np.minimum(dense.ravel().take(flat), vg.data.take(starts))
            out[pairs] = np.bincount(pair_of, values.astype(np.float64), minlength=b - a)
            dense[entry_q[mine] - first, column[mine]] = 0

    in_parts(fill, nq, min_rows=1)
    return out


def _select(top_i: np.ndarray, top_d: np.ndarray, query_max: np.ndarray, shared: _Shared, queries: np.ndarray,
            gallery: np.ndarray, top_k: int, lambda_value: float, dev) -> tuple[np.ndarray, np.ndarray]:
    """Step 7 and the top k, ordered by (final, plain distance) as ``rerank_topk`` orders them.

    ``top_i`` / ``top_d``: each query's nearest plain items (ascending), whose final distances are exact
    here (Jaccard from the pairs, or exactly 1 without shared support). Every other gallery item lies
    beyond the list's last plain distance: without shared support it ranks after the list's last item;
    a pair with shared support has final >= (1 - lambda) J + lambda (last plain / row max), and
    <= (1 - lambda) J + lambda, so plain distances are computed only for pairs whose lower bound can
    reach the top k. A query whose answer could still hold an item beyond the list without shared support
    is scanned again with a longer list. Float32 arithmetic as in ``rerank_topk``."""
    nq, ng = len(queries), len(gallery)
    lam = np.float32(lambda_value)
    one_minus = np.float32(1 - lambda_value)
    never = np.iinfo(np.int64).max
    q, g, s = shared.q, shared.g, shared.s
    part = one_minus * (1 - s / (2 - s)).astype(np.float32)  # final = part + lambda * dist, as rerank_topk
    pair_pos, in_shared = _find(q * ng + g, np.arange(nq)[:, None] * ng + top_i)
    part_t = np.full(top_d.shape, one_minus * np.float32(1.0), np.float32)
    part_t[in_shared] = part[pair_pos[in_shared]]
    dist_t = top_d / query_max[:, None]
    final_t = part_t + lam * dist_t
    outside = np.ones(len(q), bool)
    outside[pair_pos[in_shared]] = False
    q, g, part = q[outside], g[outside], part[outside]
    upper, _ = _ragged(q, part + np.float32(lambda_value * 1.001 + 1e-6), nq, np.float32(np.inf))
    candidates = np.concatenate([final_t, upper], 1)
    limit = np.partition(candidates, top_k - 1, axis=1)[:, top_k - 1]
    keep = part + lam * dist_t[q, -1] <= limit[q] + np.float32(1e-6)  # margin: pair distances round differently
    q, g, part = q[keep], g[keep], part[keep]
    dist_s = _pair_plain(queries, gallery, q, g) / query_max[q]
    final_s = part + lam * dist_s
    key_s, slot = _ragged(q, _order_key(final_s, dist_s), nq, never)
    index_s = np.zeros(key_s.shape, np.int64)
    index_s[q, slot] = g
    final_pad = np.zeros(key_s.shape, np.float32)
    final_pad[q, slot] = final_s
    keys = np.concatenate([_order_key(final_t, dist_t), key_s], 1)
    pos = np.argpartition(keys, top_k - 1, axis=1)[:, :top_k]
    pos = np.take_along_axis(pos, np.argsort(np.take_along_axis(keys, pos, 1), axis=1, kind="stable"), 1)
    indices = np.take_along_axis(np.concatenate([top_i, index_s], 1), pos, 1)
    distances = np.take_along_axis(np.concatenate([final_t, final_pad], 1), pos, 1)
    last = dist_t[:, -1]  # items outside the list without shared support: Jaccard 1, plain beyond the last
    beyond = _order_key(one_minus * np.float32(1.0) + lam * last, last)
    kth = np.take_along_axis(keys, pos[:, -1:], 1)[:, 0]
    short = np.flatnonzero((kth >= beyond) & ((~in_shared).sum(1) < top_k) & (top_i.shape[1] < ng))
    if len(short):  # scan these queries again with a list longer than their pairs with shared support
        sub = np.full(nq, -1)
        sub[short] = np.arange(len(short))
        mine = sub[shared.q] >= 0
        longer = min(ng, top_k + int(np.bincount(shared.q[mine]).max(initial=0)))
        longer_i, longer_d = _nearest(queries[short], gallery, longer, dev)
        longer_d += squared_norms(queries[short])[:, None]
        indices[short], distances[short] = _select(
            longer_i, longer_d, query_max[short], _Shared(sub[shared.q[mine]], shared.g[mine], shared.s[mine]),
            queries[short], gallery, top_k, lambda_value, dev)
    return indices, distances


def _find(sorted_keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in ``sorted_keys`` (ascending), whether found) of each of ``values``."""
    if not len(sorted_keys):
        return np.zeros(values.shape, np.int64), np.zeros(values.shape, bool)
    pos = np.minimum(np.searchsorted(sorted_keys, values), len(sorted_keys) - 1)
    return pos, sorted_keys[pos] == values


def _order_key(final: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """int64 keys ordering by (final distance, plain distance), as ``rerank_topk`` orders."""
    return (_sortable(final) << 32) + _sortable(dist) + (1 << 31)


def _sortable(values: np.ndarray) -> np.ndarray:
    """int64 keys in the order of the float32 ``values`` (IEEE bits, negatives flipped), as ``rerank``'s."""
    bits = np.ascontiguousarray(values, np.float32).view(np.int32).astype(np.int64)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _pair_plain(queries: np.ndarray, gallery: np.ndarray, q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Squared distances of (query, gallery item) pairs as ``|g|^2 - 2 q.g + |q|^2`` in float32."""
    used, inverse = _unique_inverse(g)
    xg = np.ascontiguousarray(gallery[used], np.float32)
    sq_g, sq_q = squared_norms(xg), squared_norms(queries)
    out = np.empty(len(q), np.float32)
    for a in range(0, len(q), 65536):
        s = slice(a, a + 65536)
        out[s] = (sq_g[inverse[s]] - 2 * np.einsum("nd,nd->n", queries[q[s]], xg[inverse[s]])) + sq_q[q[s]]
    return out
