"""Gallery search throughput through ``GalleryIndex``: flat (exact: blocked products of the stored features)
and approximate FAISS indexes, beside FAISS's own exact ``IndexFlatIP`` (what ``flat`` used before).

Clustered, L2-normalised synthetic features (d=256; 20 gallery images per identity, 15 % distractors) at 100k
and 1M gallery items; 1,000 queries searched in one batch for the top 10. Each index searches one query first
(warm-up), then the batch is timed. Recall@10 of an approximate index is the overlap of its top 10 with the
flat index's. IVF: 1,024 lists, 32 probed; PQ: 32 bytes a vector; HNSW: M=32, efSearch=128 (the spec
defaults). HNSW is built at 100k only (building it for 1M takes longer than a bench run on 2 cores). Quick
mode: 50k items, 200 queries, no IVF-PQ (its codebook training alone takes about a minute on 2 cores).
``python -m bench.bench_search [--quick]`` prints a Markdown table.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from bench.bench_rerank import synthetic_features
from reid_deploy.retrieval.index import GalleryIndex, IndexParams

DIM, TOP_K = 256, 10
FAISS_FLAT = "faiss IndexFlatIP (reference)"


def measure(feats: np.ndarray, queries: np.ndarray, index_type: str) -> tuple[dict, np.ndarray]:
    """Build and search one index (``index_type``, or FAISS_FLAT: FAISS's own IndexFlatIP): (row of timings,
    top-k indices)."""
    start = time.perf_counter()
    if index_type == FAISS_FLAT:
        import faiss

        flat = faiss.IndexFlatIP(DIM)
        flat.add(feats)

        def search(q: np.ndarray) -> np.ndarray:
            return flat.search(q, TOP_K)[1]
    else:
        index = GalleryIndex(DIM, {"model_sha256": "", "model_name": "synthetic"},
                             IndexParams(index_type, nlist=1024, nprobe=32, pq_m=32, graph_k=0))  # no graph
        index.add(feats, [""] * len(feats))

        def search(q: np.ndarray) -> np.ndarray:
            return index.search(q, TOP_K)[0]
    built = time.perf_counter()
    search(queries[:1])  # warm-up (flat: torch's first product), as in a reid search process
    searched = time.perf_counter()
    indices = search(queries)
    seconds = time.perf_counter() - searched
    return {"build_s": round(built - start, 1), "search_s": round(seconds, 3),
            "queries_per_s": round(len(queries) / seconds)}, indices


def main(quick: bool) -> list[dict]:
    sizes = [(50_000, 200)] if quick else [(100_000, 1000), (1_000_000, 1000)]
    rows = []
    for n, n_query in sizes:
        queries, feats, *_ = synthetic_features(n_query, n, DIM, seed=1, ids=n // 20)
        exact = None
        for index_type in ("flat", FAISS_FLAT, "ivf", "hnsw") if quick else \
                ("flat", FAISS_FLAT, "ivf", "ivfpq", "hnsw"):
            if index_type == "hnsw" and n > 200_000:
                continue
            row, found = measure(feats, queries, index_type)
            if exact is None:
                exact = found
            recall = np.mean([len(np.intersect1d(a, b)) / TOP_K for a, b in zip(found, exact)])
            rows.append({"gallery": n, "dim": DIM, "queries": n_query, "index": index_type, **row,
                         "recall@10_vs_flat": round(float(recall), 4)})
    return rows


if __name__ == "__main__":
    from bench.run import markdown

    print(markdown(main(quick="--quick" in sys.argv)))
