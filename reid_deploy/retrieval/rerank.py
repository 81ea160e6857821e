"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) in O(N k) memory, from a k-nearest-neighbour graph.

The result equals the published dense algorithm (zhunzhong07/person-re-ranking ``re_ranking``), which on
all N = query + gallery items does:

1. ``d = |x_i - x_j|^2``, each row divided by its maximum (the reference divides columns by their maximum
   and transposes; the matrix is symmetric, so row i is ``d[i] / max(d[i])``);
2. ``R(i)``: the k1-reciprocal set, the j among the k1+1 nearest of i (i itself included) that have i
   among their own k1+1 nearest;
3. expansion: for each candidate c in R(i), its round(k1/2)-reciprocal set H(c) joins when more than 2/3
   of H(c) lies in R(i);
4. ``V[i, j] = exp(-d[i, j])`` over the expanded set, normalised to sum 1 per row;
5. when k2 > 1, ``V[i]`` becomes the mean of the rows of its k2 nearest items (itself included);
6. Jaccard ``1 - S / (2 - S)``, ``S = sum_k min(V[q, k], V[g, k])``, for query rows and gallery columns;
7. final ``(1 - lambda) * jaccard + lambda * d`` (the row-normalised distance).

Here: step 1's neighbour lists and row maxima come from ``knn.knn_graph`` (never N x N), steps 2-5 are
scipy sparse matrices with O(N k) entries, and steps 6-7 run over chunks of queries: ``S`` is accumulated
only over shared support (gallery items sharing none get Jaccard exactly 1 and rank by their plain
distance). Dense chunk work runs in torch on ``device`` (CUDA when present; tests and bench run on an H100);
the sparse set algebra is on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch

from reid_deploy.retrieval.knn import KnnGraph, knn_graph, torch_device
from reid_deploy.retrieval.parts import in_parts, stacked_in_parts

# query x gallery entries (and support triples) per dense chunk: 8 MB of float32, small enough for the
# allocator to reuse its memory from chunk to chunk (larger chunks fault their fresh pages in again each time)
CHUNK_ELEMENTS = 1 << 21


def rerank_distances(query_feats: np.ndarray, gallery_feats: np.ndarray, k1: int = 20, k2: int = 6,
                     lambda_value: float = 0.3, knn_method: str = "exact", device: str = "auto"
                     ) -> np.ndarray:
    """The re-ranked distance matrix, float32 [n_query, n_gallery]."""
    out = np.empty((len(query_feats), len(gallery_feats)), np.float32)  # plain distances, then final
    for rows, final, _, _ in _final_chunks(query_feats, gallery_feats, k1, k2, lambda_value, knn_method, device,
                                           plain=out):
        out[rows] = final.cpu().numpy()
    return out


def rerank_topk(query_feats: np.ndarray, gallery_feats: np.ndarray, top_k: int, k1: int = 20, k2: int = 6,
                lambda_value: float = 0.3, knn_method: str = "exact", device: str = "auto"
                ) -> tuple[np.ndarray, np.ndarray]:
    """The first ``top_k`` of each query's re-ranked gallery list: (indices int64, distances float32),
    each [n_query, top_k], distances ascending; equal to the head of ``rerank_distances``'s ranking,
    with ties (with lambda_value = 0, every gallery item sharing no support has distance 1) broken by
    the plain distance."""
    top_k = min(top_k, len(gallery_feats))
    indices = np.empty((len(query_feats), top_k), np.int64)
    distances = np.empty((len(query_feats), top_k), np.float32)
    for rows, final, dist, _ in _final_chunks(query_feats, gallery_feats, k1, k2, lambda_value, knn_method,
                                              device):
        key = (_sortable(final) << 32) + _sortable(dist) + (1 << 31)  # order by (final, plain distance)
        i = torch.topk(key, top_k, dim=1, largest=False, sorted=True).indices
        indices[rows], distances[rows] = i.cpu().numpy(), torch.gather(final, 1, i).cpu().numpy()
    return indices, distances


def _sortable(values: torch.Tensor) -> torch.Tensor:
    """int64 keys in the order of the float32 ``values`` (IEEE bits, negatives flipped)."""
    bits = values.float().contiguous().view(torch.int32).long()
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def reciprocal_mask(neighbours: np.ndarray, k: int, chunk: int = 8192) -> np.ndarray:
    """bool [N, k+1]: whether ``neighbours[i, r]`` (r <= k) has i among its own k+1 nearest."""
    forward = neighbours[:, :k + 1]
    mask = np.empty(forward.shape, bool)

    def fill(part: slice) -> None:
        for a in range(part.start, part.stop, chunk):
            own = np.arange(a, min(a + chunk, part.stop))
            mask[own] = (forward[forward[own]] == own[:, None, None]).any(-1)

    in_parts(fill, len(forward), min_rows=chunk)
    return mask


def encode(graph: KnnGraph, feats: np.ndarray, k1: int, k2: int) -> sp.csr_matrix:
    """The k-reciprocal encoding V (steps 2-5), a float32 CSR matrix [N, N] whose rows sum to 1."""
    n = len(feats)
    nbr = graph.indices
    r_set = _reciprocal_set(nbr, k1)
    h_set = _reciprocal_set(nbr, int(np.around(k1 / 2)))
    expanded = expanded_sets(r_set, h_set, h_set.T.tocsr())
    i = np.repeat(np.arange(n), np.diff(expanded.indptr))
    j = expanded.indices
    distances = _pair_distances(lambda ids: feats.take(ids, 0), squared_norms(feats), i, j)  # take: ~2x indexing
    weight = np.exp(-distances / graph.row_max[i])
    v = sp.csr_matrix((weight.astype(np.float32), j, expanded.indptr), shape=(n, n))
    v = sp.diags((1.0 / np.asarray(v.sum(axis=1)).ravel()).astype(np.float32)) @ v
    if k2 != 1:
        nearest = nbr[:, :k2]  # fewer than k2 columns only when N < k2
        mean = sp.csr_matrix((np.full(nearest.size, 1.0 / nearest.shape[1], np.float32),
                              (np.repeat(np.arange(n), nearest.shape[1]), nearest.ravel())), shape=(n, n))
        v = stacked_in_parts(lambda part: mean[part] @ v, n)
    return v.tocsr()


def expanded_sets(r_rows: sp.csr_matrix, h_set: sp.csr_matrix, h_t: sp.csr_matrix) -> sp.csr_matrix:
    """Step 3 for the rows of ``r_rows`` (their k1-reciprocal sets, 0/1 CSR [rows, N]): R(i) and every H(c),
    c in R(i), with |H(c) & R(i)| > 2/3 |H(c)| (``h_set``: the round(k1/2)-reciprocal sets, 0/1 CSR [N, N];
    ``h_t``: its transpose, CSR); ranges of rows in threads, duplicates summed."""
    h_size = np.diff(h_set.indptr)

    def expand(part: slice) -> sp.csr_matrix:
        rows = r_rows[part]
        shared = (rows @ h_t).multiply(rows).tocoo()
        accept = shared.data > 2 / 3 * h_size[shared.col]
        return (rows + _bool_csr(shared.row[accept], shared.col[accept], rows.shape) @ h_set).tocsr()

    expanded = stacked_in_parts(expand, r_rows.shape[0])
    expanded.sum_duplicates()
    return expanded


def _reciprocal_set(neighbours: np.ndarray, k: int) -> sp.csr_matrix:
    """The k-reciprocal sets as a 0/1 CSR matrix [N, N]."""
    rows, rank = np.nonzero(reciprocal_mask(neighbours, k))
    return _bool_csr(rows, neighbours[rows, rank], len(neighbours))


def _bool_csr(rows: np.ndarray, cols: np.ndarray, shape: int | tuple[int, int]) -> sp.csr_matrix:
    """0/1 float32 CSR matrix of ``shape`` (an int: square) with ones at (rows, cols)."""
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                         shape=(shape, shape) if isinstance(shape, int) else shape)


def squared_norms(feats: np.ndarray) -> np.ndarray:
    """|x|^2 of each row in float32, rounded as ``_pair_distances`` needs them (row by row, as einsum sums)."""
    return np.einsum("nd,nd->n", feats, feats)


def _pair_distances(rows: Callable[[np.ndarray], np.ndarray], squares: np.ndarray, i: np.ndarray, j: np.ndarray,
                    chunk: int = 4096) -> np.ndarray:
    """Squared Euclidean distances of the pairs (i[t], j[t]), as |x|^2 + |y|^2 - 2 x.y in float32; ``rows``
    gathers the feature rows of ids (small chunks: the gathered rows stay in cache), ``squares`` holds
    every id's ``squared_norms``. Ranges of pairs run in threads (``parts.in_parts``)."""
    out = np.empty(len(i), np.float32)

    def fill(part: slice) -> None:
        for a in range(part.start, part.stop, chunk):
            b = min(a + chunk, part.stop)
            ii, jj = i[a:b], j[a:b]
            out[a:b] = squares.take(ii) + squares.take(jj) - 2 * np.einsum("nd,nd->n", rows(ii), rows(jj))

    in_parts(fill, len(i), min_rows=16 * chunk)
    return out


def _final_chunks(query_feats: np.ndarray, gallery_feats: np.ndarray, k1: int, k2: int, lambda_value: float,
                  knn_method: str, device: str, plain: np.ndarray | None = None
                  ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Steps 6-7 over chunks of queries: (rows, final, row-normalised plain and plain squared distances, each
    [rows, n_gallery], torch tensors). With ``plain`` [n_query, n_gallery] and the exact kNN method, the kNN
    pass stores the query x gallery distances there and the chunks read them instead of multiplying again."""
    nq, ng = len(query_feats), len(gallery_feats)
    feats = np.concatenate([query_feats, gallery_feats]).astype(np.float32, copy=False)
    plain = plain if knn_method == "exact" else None
    graph = knn_graph(feats, max(k1 + 1, k2), knn_method, device, cross=plain)
    v = encode(graph, feats, k1, k2)
    vq, vg = v[:nq], v[nq:].tocsc()  # vg: for each support item k, the gallery items that hold it
    dev = torch_device(device)
    col_rows = torch.from_numpy(vg.indices.astype(np.int64)).to(dev)
    col_vals = torch.from_numpy(vg.data).to(dev)
    col_start = vg.indptr[:-1].astype(np.int64)
    col_count = np.diff(vg.indptr).astype(np.int64)
    per_entry = np.concatenate([[0], np.cumsum(col_count[vq.indices])])
    triples = per_entry[vq.indptr[1:]] - per_entry[vq.indptr[:-1]]  # support triples of each query row
    xg = torch.from_numpy(feats[nq:]).to(dev)
    sq_g = (xg * xg).sum(1)
    row_max = graph.row_max[:nq]
    with torch.inference_mode():
        for rows in _chunks(triples, max(1, CHUNK_ELEMENTS // max(ng, 1))):
            if plain is None:
                xq = torch.from_numpy(feats[rows]).to(dev)
                dist = torch.addmm(sq_g[None, :], xq, xg.T, alpha=-2)
                dist += (xq * xq).sum(1)[:, None]
            else:
                dist = torch.from_numpy(plain[rows]).to(dev)
            scaled = dist / torch.from_numpy(row_max[rows]).to(dev)[:, None]
            shared = _min_overlap(vq[rows], col_start, col_count, col_rows, col_vals, ng, dev)
            jaccard = torch.div(shared, 2 - shared).neg_().add_(1).float()  # 1 - S / (2 - S), in place
            yield rows, jaccard.mul_(1 - lambda_value).add_(lambda_value * scaled), scaled, dist


def _chunks(triples: np.ndarray, max_rows: int) -> Iterator[slice]:
    """Consecutive query slices of at most ``max_rows`` rows and about CHUNK_ELEMENTS support triples."""
    start, n = 0, len(triples)
    cum = np.cumsum(triples)
    while start < n:
        base = cum[start - 1] if start else 0
        end = int(np.searchsorted(cum, base + CHUNK_ELEMENTS, side="right"))
        end = min(max(end, start + 1), start + max_rows, n)
        yield slice(start, end)
        start = end


def _min_overlap(vq: sp.csr_matrix, col_start: np.ndarray, col_count: np.ndarray, col_rows, col_vals,
                 ng: int, dev) -> torch.Tensor:
    """``S[q, g] = sum_k min(V[q, k], V[g, k])`` over the supports shared by query rows and gallery rows
    (float64 [rows, ng]); zero where nothing is shared."""
    q = np.repeat(np.arange(vq.shape[0]), np.diff(vq.indptr))
    count = col_count[vq.indices]
    total = int(count.sum())
    shared = torch.zeros(vq.shape[0] * ng, dtype=torch.float64, device=dev)
    if total:
        # positions of every (q, k) entry's gallery column entries: ragged ranges col_start[k] + 0..count-1
        offsets = np.repeat(col_start[vq.indices] - (np.cumsum(count) - count), count) + np.arange(total)
        pos = torch.from_numpy(offsets).to(dev)
        a = torch.from_numpy(np.repeat(vq.data, count)).to(dev)
        key = torch.from_numpy(np.repeat(q * ng, count)).to(dev) + col_rows[pos]
        shared.index_add_(0, key, torch.minimum(a, col_vals[pos]).double())
    return shared.view(vq.shape[0], ng)


def rerank_rows(query_feats: np.ndarray, gallery_feats: np.ndarray, k1: int = 20, k2: int = 6,
                lambda_value: float = 0.3, knn_method: str = "exact", device: str = "auto"
                ) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """The rows of ``rerank_distances`` chunk by chunk of queries, in order: (query rows, re-ranked and plain
    squared distances (clipped at 0), each float32 [rows, n_gallery]); the plain ones are the product the
    re-ranking computed anyway. The whole query x gallery matrix never exists."""
    for rows, final, _, dist in _final_chunks(query_feats, gallery_feats, k1, k2, lambda_value, knn_method,
                                              device):
        yield rows, final.cpu().numpy(), dist.clamp_min_(0).cpu().numpy()
