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
   below 1;
4. Jaccard distances are summed over shared support only; every other gallery item has Jaccard 1 and
   ranks by its plain distance, so the nearest plain items kept in pass 1 complete the top k (queries
   with too few of them are scanned again with a longer list).

The set algebra uses the same scipy/numpy operations as the reference on the same rows, so the values
match it (to float rounding of the distance products). Dense work runs in torch on ``device`` (CUDA when
present: written for, not yet run on, a GPU); the sparse set algebra is on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from reid_deploy.retrieval.knn import KnnGraph, ragged_rows, torch_device
from reid_deploy.retrieval.rerank import _bool_csr, _pair_distances, _sortable

SCAN_ELEMENTS = 1 << 22  # query x gallery entries per block of the gallery pass
TILE = 64  # columns per tile of a block: a tile whose minimum is beyond a query's radius is skipped
RADIUS_MARGIN = 3  # items expected within a query's radius, as a multiple of the plain list kept
RADIUS_SAMPLE_SHARE, RADIUS_SAMPLE_MIN = 16, 8192  # gallery sample for the radius: 1/16th, at least 8192
PLAIN_EXTRA = 128  # nearest plain gallery items kept per query beyond max(K', top_k)
SET_CHUNK = 8192  # rows per chunk of the reciprocal-set computation


def rerank_topk_with_graph(query_feats: np.ndarray, gallery_feats: np.ndarray, graph: KnnGraph, top_k: int,
                           k1: int = 20, k2: int = 6, lambda_value: float = 0.3, device: str = "auto"
                           ) -> tuple[np.ndarray, np.ndarray]:
    """The first ``top_k`` re-ranked gallery items of each query: (indices int64, distances float32), each
    [n_query, top_k], as ``rerank.rerank_topk`` returns them. ``graph`` holds the gallery's lists (gallery
    positions, nearest first, itself included), their squared distances and row maxima, at least
    max(k1 + 1, k2) wide (or the whole gallery)."""
    nq, ng = len(query_feats), len(gallery_feats)
    kk = min(max(k1 + 1, k2), nq + ng)
    if graph.indices.shape[1] < min(kk, ng) or len(graph.row_max) != ng:
        raise ValueError(f"the graph ({graph.indices.shape[1]} neighbours of {len(graph.row_max)} items) does "
                         f"not cover {min(kk, ng)} neighbours of {ng} items")
    top_k = min(top_k, ng)
    if nq == 0 or top_k == 0:
        return np.zeros((nq, top_k), np.int64), np.zeros((nq, top_k), np.float32)
    dev = torch_device(device)
    queries = np.ascontiguousarray(query_feats, np.float32)
    plain = min(ng, max(kk, top_k) + PLAIN_EXTRA)
    with torch.inference_mode():
        scan = _scan(queries, gallery_feats, graph, kk, plain, dev)
        shared = _LocalGraph(queries, gallery_feats, graph, scan, kk, k1).shared_support(k2)
        indices, distances = _select(scan.top_i, scan.top_d, scan.query_max, shared, queries, gallery_feats, top_k,
                                     lambda_value, dev)
    return indices.cpu().numpy(), distances.cpu().numpy()


@dataclass
class _Scan:
    """What pass 1 keeps (float32 distances; gallery positions)."""

    top_i: torch.Tensor  # int64 [nq, P] nearest gallery items of each query, nearest first
    top_d: torch.Tensor  # float32 [nq, P] their distances
    lists: np.ndarray  # int64 [nq, K'] each query's nearest items of all N (queries first, then gallery)
    list_d: np.ndarray  # float32 [nq, K']
    query_max: np.ndarray  # float32 [nq] row maximum of each query over all N
    gallery_max: np.ndarray  # float32 [ng] row maximum of each gallery item, queries included
    pair_q: np.ndarray  # int64: (query, gallery item) pairs where the query is within the item's K'-th
    pair_g: np.ndarray  # int64   cached distance
    pair_d: np.ndarray  # float32


def _scan(queries: np.ndarray, gallery: np.ndarray, graph: KnnGraph, kk: int, plain: int, dev) -> _Scan:
    """Pass 1 over the gallery in column blocks (see the module docstring).

    One product per block gives ``D' = |g|^2 - 2 q.g`` (queries and gallery rows extended by one column);
    ``|q|^2`` is added only where a value leaves the pass, since a per-row constant does not change a
    row's order, and columns are tested against bounds that rounding keeps conservative. Each query's
    ``plain`` nearest items are found among the entries below a radius estimated on a gallery sample
    (tiles whose minimum is above it are skipped); queries with too few entries below it are scanned
    again exactly."""
    nq, ng = len(queries), len(gallery)
    xq = torch.from_numpy(queries).to(dev)
    sq_q = (xq * xq).sum(1)
    sq_lo, sq_hi = sq_q.min(), sq_q.max()
    ext_q = torch.cat([xq, torch.ones(nq, 1, device=dev)], 1)
    radius = _radius(ext_q, gallery, plain, dev)
    row_max = torch.full((nq,), -float("inf"), device=dev)
    gallery_max = np.empty(ng, np.float32)
    found, pairs = [], []
    with torch.inference_mode():
        for a, dist in _blocks(ext_q, gallery, dev):
            found.append(_below(dist, radius, a))
            row_max = torch.maximum(row_max, dist.amax(1))
            end = a + dist.shape[1]
            cached_max = torch.from_numpy(np.array(graph.row_max[a:end], np.float32)).to(dev)
            near = torch.from_numpy(np.array(graph.distances[a:end, kk - 1], np.float32)).to(dev) \
                if graph.indices.shape[1] >= kk else torch.full_like(cached_max, float("inf"))
            flagged = ((dist.amin(0) + sq_lo <= near) | (dist.amax(0) + sq_hi > cached_max)).nonzero()[:, 0]
            new_max = cached_max.clone()
            if len(flagged):
                exact = dist[:, flagged] + sq_q[:, None]
                new_max[flagged] = torch.maximum(cached_max[flagged], exact.amax(0))
                q, f = (exact <= near[flagged]).nonzero(as_tuple=True)
                pairs.append((q.cpu(), (flagged[f] + a).cpu(), exact[q, f].cpu()))
            gallery_max[a:end] = new_max.cpu().numpy()
        top_i, top_d = _nearest_found(found, nq, plain, dev)
        short = torch.nonzero(torch.isinf(top_d[:, -1]))[:, 0]
        if len(short):  # fewer than ``plain`` items within the radius: scan these queries exactly
            top_i[short], top_d[short] = _nearest(queries[short.cpu().numpy()], gallery, plain, dev)
        top_d += sq_q[:, None]
        between = torch.addmm(sq_q[None], xq, xq.T, alpha=-2)
        between += sq_q[:, None]
        query_max = torch.maximum(row_max + sq_q, between.amax(1))
        cand_d = torch.cat([between, top_d], 1)
        cand_i = torch.cat([torch.arange(nq, device=dev).expand(nq, -1), top_i + nq], 1)
        list_d, pos = torch.topk(cand_d, kk, dim=1, largest=False, sorted=True)
        lists = torch.gather(cand_i, 1, pos)
    pq, pg, pd = (torch.cat(p).numpy() if pairs else np.zeros(0, dtype) for p, dtype in
                  zip(zip(*pairs) if pairs else ((), (), ()), (np.int64, np.int64, np.float32)))
    return _Scan(top_i, top_d, lists.cpu().numpy(), list_d.cpu().numpy(), query_max.cpu().numpy(), gallery_max,
                 pq.astype(np.int64), pg.astype(np.int64), pd.astype(np.float32))


def _blocks(ext_q: torch.Tensor, gallery: np.ndarray, dev):
    """(first column, ``D'`` [nq, block]) over the gallery in column blocks (a multiple of TILE wide)."""
    cols = max(TILE, SCAN_ELEMENTS // len(ext_q) // TILE * TILE)
    for a in range(0, len(gallery), cols):
        xg = torch.from_numpy(np.array(gallery[a:a + cols], np.float32)).to(dev)  # a copy: memmaps are read-only
        yield a, ext_q @ torch.cat([-2 * xg, (xg * xg).sum(1, keepdim=True)], 1).T


def _radius(ext_q: torch.Tensor, gallery: np.ndarray, plain: int, dev) -> torch.Tensor:
    """Per query, a ``D'`` bound below which about RADIUS_MARGIN x ``plain`` gallery items are expected
    (from a random sample of the gallery); infinite when the gallery is small."""
    nq, ng = len(ext_q), len(gallery)
    size = max(RADIUS_SAMPLE_MIN, ng // RADIUS_SAMPLE_SHARE)
    if ng <= size or RADIUS_MARGIN * plain >= ng:
        return torch.full((nq,), float("inf"), device=dev)
    rank = int(np.ceil(RADIUS_MARGIN * plain * size / ng))
    sample = np.sort(np.random.default_rng(0).choice(ng, size, replace=False))
    xs = torch.from_numpy(np.ascontiguousarray(gallery[sample], np.float32)).to(dev)
    ext_s = torch.cat([-2 * xs, (xs * xs).sum(1, keepdim=True)], 1)
    rows = max(1, SCAN_ELEMENTS // size)
    with torch.inference_mode():
        return torch.cat([torch.kthvalue(ext_q[a:a + rows] @ ext_s.T, rank, dim=1).values
                          for a in range(0, nq, rows)])


def _below(dist: torch.Tensor, radius: torch.Tensor, offset: int) -> tuple[torch.Tensor, ...]:
    """(row, column + offset, value) of the entries of ``dist`` below their row's ``radius``: tiles of TILE
    columns whose minimum is not below it are skipped."""
    nq, cols = dist.shape
    whole = cols // TILE * TILE
    tiles = dist[:, :whole].view(nq, whole // TILE, TILE)
    row, tile = (tiles.amin(2) < radius[:, None]).nonzero(as_tuple=True)
    picked = tiles[row, tile]
    h, j = (picked < radius[row, None]).nonzero(as_tuple=True)
    r, c, v = row[h], tile[h] * TILE + j, picked[h, j]
    if whole < cols:
        r2, c2 = (dist[:, whole:] < radius[:, None]).nonzero(as_tuple=True)
        r, c, v = torch.cat([r, r2]), torch.cat([c, c2 + whole]), torch.cat([v, dist[r2, c2 + whole]])
    return r, c + offset, v


def _nearest_found(found: list[tuple[torch.Tensor, ...]], nq: int, plain: int, dev
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``plain`` smallest found entries of each row (ascending; infinite where a row has fewer)."""
    r, c, v = (torch.cat(x) for x in zip(*found))
    order = torch.argsort(r, stable=True)
    d, slot = ragged_rows(r[order], v[order], nq, float("inf"))
    i = torch.zeros(d.shape, dtype=torch.int64, device=dev)
    i[r[order], slot] = c[order]
    if d.shape[1] < plain:
        d = torch.cat([d, torch.full((nq, plain - d.shape[1]), float("inf"), device=dev)], 1)
        i = torch.cat([i, torch.zeros((nq, plain - i.shape[1]), dtype=torch.int64, device=dev)], 1)
    d, pos = torch.topk(d, plain, dim=1, largest=False, sorted=True)
    return torch.gather(i, 1, pos), d


def _nearest(queries: np.ndarray, gallery: np.ndarray, plain: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``plain`` nearest gallery items of each query by ``D'`` (positions, values; ascending), exactly."""
    nq = len(queries)
    xq = torch.from_numpy(queries).to(dev)
    ext_q = torch.cat([xq, torch.ones(nq, 1, device=dev)], 1)
    best_d = torch.full((nq, plain), float("inf"), device=dev)
    best_i = torch.zeros((nq, plain), dtype=torch.int64, device=dev)
    with torch.inference_mode():
        for a, dist in _blocks(ext_q, gallery, dev):
            best_d, best_i = _merge_top(best_d, best_i, dist, a)
        order = torch.argsort(best_d, dim=1, stable=True)
        return torch.gather(best_i, 1, order), torch.gather(best_d, 1, order)


def _merge_top(best_d: torch.Tensor, best_i: torch.Tensor, dist: torch.Tensor, offset: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a block of distances (columns from ``offset``) into each row's best list: by a top-k of the
    block while a list is not full, afterwards only the entries below the row's current worst."""
    bound = best_d.max(1).values
    if torch.isinf(bound).any():
        d, i = torch.topk(dist, min(best_d.shape[1], dist.shape[1]), dim=1, largest=False, sorted=False)
        cand_d, cand_i = d, i + offset
    else:
        r, c = (dist < bound[:, None]).nonzero(as_tuple=True)
        if not len(r):
            return best_d, best_i
        cand_d, slot = ragged_rows(r, dist[r, c], len(best_d), float("inf"))
        cand_i = torch.zeros(cand_d.shape, dtype=torch.int64, device=dist.device)
        cand_i[r, slot] = c + offset
    d_top, pos = torch.topk(torch.cat([best_d, cand_d], 1), best_d.shape[1], dim=1, largest=False, sorted=False)
    return d_top, torch.gather(torch.cat([best_i, cand_i], 1), 1, pos)


class _LocalGraph:
    """The merged graph of queries + gallery (N-space: queries 0..nq-1, then gallery), read lazily: cached
    gallery lists, replaced where queries changed them; reciprocal sets computed only for rows asked for."""

    def __init__(self, queries: np.ndarray, gallery: np.ndarray, graph: KnnGraph, scan: _Scan, kk: int, k1: int):
        self.queries, self.gallery, self.graph, self.scan = queries, gallery, graph, scan
        self.nq, self.ng, self.kk, self.k1 = len(queries), len(gallery), kk, k1
        self.n = self.nq + self.ng
        self.half = int(np.around(k1 / 2))
        self.row_max = np.concatenate([scan.query_max, scan.gallery_max])
        self.changed, self.changed_lists = self._changed_lists()
        self.changed_pos = np.full(self.ng, -1, np.int64)
        self.changed_pos[self.changed] = np.arange(len(self.changed))
        self.known = np.zeros(self.n, bool)  # rows whose reciprocal sets are computed
        self.sets: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"r": [], "h": []}
        self.matrices: dict[str, sp.csr_matrix] = {}

    def _changed_lists(self) -> tuple[np.ndarray, np.ndarray]:
        """Gallery items whose K' nearest take in queries, and their merged lists (N-space)."""
        s, kk = self.scan, self.kk
        if not len(s.pair_g):
            return np.zeros(0, np.int64), np.zeros((0, kk), np.int64)
        changed = np.unique(s.pair_g)
        order = np.lexsort((s.pair_d, s.pair_g))
        g, q, d = s.pair_g[order], s.pair_q[order], s.pair_d[order]
        first = np.searchsorted(g, changed)
        rank = np.arange(len(g)) - np.repeat(first, np.diff(np.append(first, len(g))))
        keep = rank < kk
        row = np.searchsorted(changed, g[keep])
        q_d = np.full((len(changed), kk), np.inf, np.float32)
        q_i = np.zeros((len(changed), kk), np.int64)
        q_d[row, rank[keep]], q_i[row, rank[keep]] = d[keep], q[keep]
        width = min(kk, self.graph.indices.shape[1])
        cand_d = np.concatenate([np.asarray(self.graph.distances[changed, :width]), q_d], 1)
        cand_i = np.concatenate([np.asarray(self.graph.indices[changed, :width], np.int64) + self.nq, q_i], 1)
        pos = np.argsort(cand_d, axis=1, kind="stable")[:, :kk]
        return changed, np.take_along_axis(cand_i, pos, 1)

    def lists(self, ids: np.ndarray) -> np.ndarray:
        """int64 [len(ids), K']: the merged nearest items of each row (N-space)."""
        out = np.empty((len(ids), self.kk), np.int64)
        is_query = ids < self.nq
        out[is_query] = self.scan.lists[ids[is_query]]
        g = ids[~is_query] - self.nq
        pos = self.changed_pos[g]
        rows = np.empty((len(g), self.kk), np.int64)
        moved = pos >= 0
        rows[moved] = self.changed_lists[pos[moved]]
        if not moved.all():  # an unchanged item holds K' cached neighbours (or every item was changed)
            rows[~moved] = np.asarray(self.graph.indices[g[~moved], :self.kk], np.int64) + self.nq
        out[~is_query] = rows
        return out

    def ensure_sets(self, ids: np.ndarray) -> None:
        """Compute the k1- and round(k1/2)-reciprocal sets of the rows ``ids`` not yet known."""
        ids = np.unique(ids)
        ids = ids[~self.known[ids]]
        if not len(ids):
            return
        self.known[ids] = True
        self.matrices.clear()
        for a in range(0, len(ids), SET_CHUNK):
            own = ids[a:a + SET_CHUNK]
            forward = self.lists(own)[:, :self.k1 + 1]
            back = self.lists(forward.ravel()).reshape(len(own), forward.shape[1], self.kk)
            for name, k in (("r", self.k1), ("h", self.half)):
                mask = (back[:, :k + 1, :k + 1] == own[:, None, None]).any(-1)
                rows, rank = np.nonzero(mask)
                self.sets[name].append((own[rows], forward[rows, rank]))

    def matrix(self, name: str) -> sp.csr_matrix:
        """The known ``r`` (k1) or ``h`` (round(k1/2)) reciprocal sets as a 0/1 CSR matrix [N, N]."""
        if name not in self.matrices:
            rows, cols = (np.concatenate(x) for x in zip(*self.sets[name]))
            self.matrices[name] = _bool_csr(rows, cols, (self.n, self.n))
        return self.matrices[name]

    def encode(self, ids: np.ndarray) -> sp.csr_matrix:
        """Rows ``ids`` (sorted, unique) of V, the normalised k-reciprocal weights: float32 CSR
        [len(ids), N], computed as ``rerank.encode`` computes them (steps 2-4)."""
        self.ensure_sets(ids)
        r_rows = self.matrix("r")[ids]
        self.ensure_sets(r_rows.indices)  # the candidates' round(k1/2)-reciprocal sets
        h_set = self.matrix("h")
        shared = (r_rows @ h_set.T).multiply(r_rows).tocoo()
        h_size = np.diff(h_set.indptr)
        accept = shared.data > 2 / 3 * h_size[shared.col]
        joined = _bool_csr(shared.row[accept], shared.col[accept], (len(ids), self.n)) @ h_set
        expanded = (r_rows + joined).tocsr()
        expanded.sum_duplicates()
        i = np.repeat(ids, np.diff(expanded.indptr))
        j = expanded.indices
        weight = np.exp(-self.pair_distances(i, j) / self.row_max[i])
        v = sp.csr_matrix((weight.astype(np.float32), j, expanded.indptr), shape=(len(ids), self.n))
        return sp.diags((1.0 / np.asarray(v.sum(axis=1)).ravel()).astype(np.float32)) @ v

    def pair_distances(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """``rerank._pair_distances`` of N-space pairs (only the rows involved are gathered)."""
        used, inverse = np.unique(np.concatenate([i, j]), return_inverse=True)
        return _pair_distances(self.features(used), inverse[:len(i)], inverse[len(i):])

    def features(self, ids: np.ndarray) -> np.ndarray:
        is_query = ids < self.nq
        out = np.empty((len(ids), self.queries.shape[1]), np.float32)
        out[is_query] = self.queries[ids[is_query]]
        out[~is_query] = self.gallery[ids[~is_query] - self.nq]
        return out

    def shared_support(self, k2: int) -> _Shared:
        """Steps 5-6 for the pairs that share support: V' rows of the queries and of every gallery item whose
        k2 nearest hold a row meeting the queries' support, and S = sum_k min(V'[q, k], V'[g, k])."""
        queries = np.arange(self.nq)
        nearest = min(k2, self.kk)
        expanded_by = np.unique(self.lists(queries)[:, :nearest]) if k2 != 1 else queries
        v_query_side = self.encode(expanded_by)
        support = np.unique(v_query_side.indices)
        self.ensure_sets(support)
        reach = np.unique(self.matrix("h")[support].indices)  # H(Sup): expansions that can bring Sup in
        self.ensure_sets(reach)
        r_set = self.matrix("r")
        candidates = np.setdiff1d(np.union1d(r_set[support].indices, r_set[reach].indices), expanded_by)
        v_candidates = self.encode(candidates)
        in_support = np.zeros(self.n, bool)
        in_support[support] = True
        meets = np.add.reduceat(in_support[v_candidates.indices], v_candidates.indptr[:-1]) > 0 \
            if v_candidates.nnz else np.zeros(len(candidates), bool)
        meets &= np.diff(v_candidates.indptr) > 0
        rows = np.concatenate([expanded_by, candidates[meets]])
        order = np.argsort(rows)
        v = sp.vstack([v_query_side, v_candidates[np.flatnonzero(meets)]]).tocsr()[order]
        rows = rows[order]
        v_all = sp.csr_matrix((v.data, v.indices, _spread_indptr(v.indptr, rows, self.n)), shape=(self.n, self.n))
        in_rows = np.zeros(self.n, bool)
        in_rows[rows] = True
        if k2 != 1:
            held = in_rows[self.nq:][np.asarray(self.graph.indices[:, :nearest])].any(1) \
                if self.ng else np.zeros(0, bool)
            if len(self.changed):
                held[self.changed] = in_rows[self.changed_lists[:, :nearest]].any(1)
        else:
            held = in_rows[self.nq:].copy()
        gallery = np.flatnonzero(held)
        v_query = self._expand(queries, v_all, k2)
        v_gallery = self._expand(gallery + self.nq, v_all, k2).tocsc()
        return _min_overlap_pairs(v_query, v_gallery, gallery)

    def _expand(self, ids: np.ndarray, v_all: sp.csr_matrix, k2: int) -> sp.csr_matrix:
        """Step 5 (query expansion) for rows ``ids``: the mean of the V rows of their k2 nearest."""
        if k2 == 1:
            return v_all[ids]
        nearest = self.lists(ids)[:, :min(k2, self.kk)]
        mean = sp.csr_matrix((np.full(nearest.size, 1.0 / nearest.shape[1], np.float32),
                              (np.repeat(np.arange(len(ids)), nearest.shape[1]), nearest.ravel())),
                             shape=(len(ids), self.n))
        return (mean @ v_all).tocsr()


def _spread_indptr(indptr: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """The indptr [n + 1] of an N-row matrix holding the rows of ``indptr`` at positions ``rows`` (sorted)."""
    counts = np.zeros(n, np.int64)
    counts[rows] = np.diff(indptr)
    return np.concatenate([[0], np.cumsum(counts)])


@dataclass
class _Shared:
    """Query x gallery pairs with shared support, ordered by (query, gallery item): S = sum_k min(V'[q, k],
    V'[g, k]) (float64)."""

    q: np.ndarray
    g: np.ndarray
    s: np.ndarray


def _min_overlap_pairs(vq: sp.csr_matrix, vg: sp.csc_matrix, gallery: np.ndarray) -> _Shared:
    """``rerank._min_overlap`` as a sparse result: the (query, gallery item) pairs that share support, with
    S summed in float64 in the same order (the gallery side ``vg`` holds only the rows ``gallery``)."""
    col_start, col_count = vg.indptr[:-1].astype(np.int64), np.diff(vg.indptr).astype(np.int64)
    q = np.repeat(np.arange(vq.shape[0]), np.diff(vq.indptr))
    count = col_count[vq.indices]
    total = int(count.sum())
    if not total:
        return _Shared(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    offsets = np.repeat(col_start[vq.indices] - (np.cumsum(count) - count), count) + np.arange(total)
    key = np.repeat(q * len(gallery), count) + vg.indices[offsets]
    order = np.argsort(key, kind="stable")  # runs of ascending keys: the stable merge is cheap
    key = key[order]
    first = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
    values = np.minimum(np.repeat(vq.data, count)[order], vg.data[offsets[order]]).astype(np.float64)
    s = np.bincount(np.repeat(np.arange(len(first)), np.diff(np.append(first, total))), weights=values)
    pairs = key[first]
    return _Shared(pairs // len(gallery), gallery[pairs % len(gallery)], s)


def _select(top_i: torch.Tensor, top_d: torch.Tensor, query_max: np.ndarray, shared: _Shared,
            queries: np.ndarray, gallery: np.ndarray, top_k: int, lambda_value: float, dev
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 7 and the top k, ordered by (final, plain distance) as ``rerank_topk`` orders them.

    ``top_i`` / ``top_d``: each query's nearest plain items (ascending), whose final distances are exact
    here (Jaccard from the pairs, or exactly 1 without shared support). Every other gallery item lies
    beyond the list's last plain distance: without shared support it ranks after the list's last item;
    a pair with shared support has final >= (1 - lambda) J + lambda (last plain / row max), and
    <= (1 - lambda) J + lambda, so plain distances are computed only for pairs whose lower bound can
    reach the top k. A query whose answer could still hold an item beyond the list without shared support
    is scanned again with a longer list."""
    nq, ng = len(queries), len(gallery)
    never = torch.iinfo(torch.int64).max
    row_max = torch.from_numpy(query_max).to(dev)
    q, g = torch.from_numpy(shared.q).to(dev), torch.from_numpy(shared.g).to(dev)
    s = torch.from_numpy(shared.s).to(dev)
    part = (1 - lambda_value) * (1 - s / (2 - s)).float()  # final = part + lambda * dist, as rerank_topk
    pair_pos, in_shared = _find(q * ng + g, torch.arange(nq, device=dev)[:, None] * ng + top_i)
    part_t = (1 - lambda_value) * torch.ones_like(top_d)
    part_t[in_shared] = part[pair_pos[in_shared]]
    dist_t = top_d / row_max[:, None]
    final_t = part_t + lambda_value * dist_t
    outside = torch.ones(len(q), dtype=torch.bool, device=dev)
    outside[pair_pos[in_shared]] = False
    q, g, part = q[outside], g[outside], part[outside]
    upper, _ = ragged_rows(q, part + (lambda_value * 1.001 + 1e-6), nq, float("inf"))
    limit = torch.topk(torch.cat([final_t, upper], 1), top_k, dim=1, largest=False).values[:, -1]
    keep = part + lambda_value * dist_t[q, -1] <= limit[q] + 1e-6  # margin: pair distances round differently
    q, g, part = q[keep], g[keep], part[keep]
    dist_s = torch.from_numpy(_pair_plain(queries, gallery, q.cpu().numpy(), g.cpu().numpy())).to(dev) / row_max[q]
    final_s = part + lambda_value * dist_s
    key_s, slot = ragged_rows(q, _order_key(final_s, dist_s), nq, never)
    index_s = torch.zeros_like(key_s)
    index_s[q, slot] = g
    final_pad = torch.zeros(key_s.shape, dtype=torch.float32, device=dev)
    final_pad[q, slot] = final_s
    keys, pos = torch.topk(torch.cat([_order_key(final_t, dist_t), key_s], 1), top_k, dim=1, largest=False)
    indices = torch.gather(torch.cat([top_i, index_s], 1), 1, pos)
    distances = torch.gather(torch.cat([final_t, final_pad], 1), 1, pos)
    last = dist_t[:, -1:]  # items outside the list without shared support: Jaccard 1, plain beyond the last
    beyond = _order_key((1 - lambda_value) * torch.ones_like(last) + lambda_value * last, last)[:, 0]
    short = torch.nonzero((keys[:, -1] >= beyond) & ((~in_shared).sum(1) < top_k) & (top_i.shape[1] < ng))[:, 0]
    if len(short):  # scan these queries again with a list longer than their pairs with shared support
        rows = short.cpu().numpy()
        sub = np.full(nq, -1)
        sub[rows] = np.arange(len(rows))
        mine = sub[shared.q] >= 0
        longer = min(ng, top_k + int(np.bincount(shared.q[mine]).max(initial=0)))
        longer_i, longer_d = _nearest(queries[rows], gallery, longer, dev)
        xq = torch.from_numpy(queries[rows]).to(dev)
        longer_d = longer_d + (xq * xq).sum(1)[:, None]
        indices[short], distances[short] = _select(
            longer_i, longer_d, query_max[rows], _Shared(sub[shared.q[mine]], shared.g[mine], shared.s[mine]),
            queries[rows], gallery, top_k, lambda_value, dev)
    return indices, distances


def _find(sorted_keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position in ``sorted_keys`` (ascending), whether found) of each of ``values``."""
    if not len(sorted_keys):
        return torch.zeros(values.shape, dtype=torch.int64, device=values.device), \
            torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    pos = torch.searchsorted(sorted_keys, values).clamp_(max=len(sorted_keys) - 1)
    return pos, sorted_keys[pos] == values


def _order_key(final: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering by (final distance, plain distance), as ``rerank_topk`` orders."""
    return (_sortable(final) << 32) + _sortable(dist) + (1 << 31)


def _pair_plain(queries: np.ndarray, gallery: np.ndarray, q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Squared distances of (query, gallery item) pairs as ``|g|^2 - 2 q.g + |q|^2`` in float32."""
    used, inverse = np.unique(g, return_inverse=True)
    xg = np.ascontiguousarray(gallery[used], np.float32)
    sq_g = np.einsum("nd,nd->n", xg, xg)
    sq_q = np.einsum("nd,nd->n", queries, queries)
    out = np.empty(len(q), np.float32)
    for a in range(0, len(q), 65536):
        s = slice(a, a + 65536)
        out[s] = (sq_g[inverse[s]] - 2 * np.einsum("nd,nd->n", queries[q[s]], xg[inverse[s]])) + sq_q[q[s]]
    return out
