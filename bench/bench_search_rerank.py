"""Re-ranked gallery search from the index's cached neighbour graph vs today's from-scratch ``rerank_topk``.

Synthetic L2-normalised features clustered like real ReID features (``bench_rerank.synthetic_features``:
identities with about 6 gallery views each, 15 % distractors), d=256, 1,000 queries, top 10, k1=20, k2=6,
lambda=0.3. Each gallery size runs in a fresh process:

- 100,000 (exact graph): the from-scratch re-ranked search (``rerank_topk``: kNN graph of all queries +
  gallery, then everything) against the cached graph (``rerank_topk_with_graph`` on the index file's graph
  and weights): speed ratio and top-10 agreement (share of identical top-10 entries; goal 1.0);
- 200,000: the exact graph's build time;
- 1,000,000 (graph built with ``index.graph=hnsw index.hnsw_m=16 index.ef_search=32``; its top-10 agreement
  with exact on 1,000 sampled items): the re-ranked search of 1,000 queries against the queries' q x G x d
  matmul timed in the same process.

Build times are the graph (``build_graph``) and the re-ranking weights (``with_weights``) separately;
index sizes are the saved file with and without the graph (weights: with the packed reciprocal sets).
Search times are medians of repeats after a warm-up, on the index loaded from its file (memory-mapped, as
``reid search`` reads it); the cached search's row splits its time into the gallery pass (the q x G product
and its statistics, on the GPU when there is one) and the set algebra after it (on the CPU), each the median
over the repeats. Quick mode: a
3,000-item gallery and 100 queries. On a CUDA machine graph builds and searches run on the GPU (``device``
column) and the matmul floor multiplies a gallery already in GPU memory; ``--gpu`` runs the GPU cases:
100,000 (exact, with the from-scratch comparison) and 1,000,000 with the exact graph.
``python -m bench.bench_search_rerank [--quick] [--gpu]`` prints a table.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import shown

ROOT = Path(__file__).parents[1]
DIM, TOP_K, K1, K2, LAMBDA = 256, 10, 20, 6, 0.3
VIEWS = 6  # gallery images per identity, on average
HNSW = {"hnsw_m": 16, "ef_search": 32}  # index.hnsw_m / index.ef_search of the 1M graph (faster than 32 / 128)


def run_size(n_gallery: int, n_query: int, graph: str, scratch: bool, search: bool, repeats: int) -> list[dict]:
    """Rows for one gallery size (call in a fresh process)."""
    import torch

    from bench.bench_rerank import synthetic_features
    from reid_deploy import console
    from reid_deploy.retrieval.graph import build_graph, with_weights
    from reid_deploy.retrieval.graph_rerank import rerank_topk_with_graph
    from reid_deploy.retrieval.index import GalleryIndex, IndexParams
    from reid_deploy.retrieval.knn import torch_device
    from reid_deploy.retrieval.rerank import rerank_topk

    console.setup(quiet=True)
    queries, gallery, *_ = synthetic_features(n_query, n_gallery, DIM, seed=1, ids=n_gallery // VIEWS)
    dev = torch_device("auto")
    base = {"gallery": n_gallery, "queries": n_query, "graph": graph, "device": dev.type}
    rows = []
    start = time.perf_counter()
    knn = build_graph(gallery, 32, graph, **(HNSW if graph == "hnsw" else {}))
    built = time.perf_counter()
    knn = with_weights(knn, gallery, K1)
    weighed = time.perf_counter()
    rows.append({**base, "what": f"build: graph ({graph}, k=32)", "seconds": round(built - start, 1),
                 **({"top10_agreement": round(knn.agreement, 4)} if knn.agreement is not None else {})})
    rows.append({**base, "what": f"build: re-ranking weights (k1={K1})", "seconds": round(weighed - built, 1)})
    if not search:
        return rows
    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        path = Path(tmp) / "g.index"
        index = GalleryIndex(DIM, {}, IndexParams(graph_k=0))
        index.add(gallery, [f"{i}.jpg" for i in range(n_gallery)])
        index.graph = knn
        index.save(path)
        total = path.stat().st_size
        graph_mb = (knn.indices.nbytes + knn.distances.nbytes + knn.row_max.nbytes) / 2**20
        weights_mb = (knn.weights.indptr.size * 8 + knn.weights.nnz * 8 + knn.sets.nbytes) / 2**20  # with the sets
        rows.append({**base, "what": "index size", "index_mb": round(total / 2**20), "graph_mb": round(graph_mb),
                     "weights_mb": round(weights_mb), "without_graph_mb": round(total / 2**20 - graph_mb - weights_mb)})
        del index, knn
        index = GalleryIndex.load(path)
        feats = index.feats

        phases: list[dict[str, float]] = []  # each run's, the warm-up first

        def cached() -> tuple[np.ndarray, np.ndarray]:
            phases.append({})
            return rerank_topk_with_graph(queries, feats, index.graph, TOP_K, K1, K2, LAMBDA,
                                          encoding=index.graph.encoding, phases=phases[-1])

        x = torch.from_numpy(queries).to(dev)
        resident = torch.from_numpy(gallery).to(dev) if dev.type == "cuda" else None

        def matmul() -> None:
            for a in range(0, n_gallery, 65536):  # the output of each block is dropped: same flops, no q x G buffer
                x @ (torch.from_numpy(gallery[a:a + 65536]) if resident is None else resident[a:a + 65536]).T
            if resident is not None:
                torch.cuda.synchronize()

        floor, floor_s = _timed(matmul, repeats)
        rows.append({**base, "what": "q x G x d matmul (floor)", "seconds": floor_s})
        (got_i, got_d), cached_s = _timed(cached, repeats)
        timed = phases[1:]
        row = {**base, "what": "re-ranked search, cached graph", "seconds": cached_s,
               "x_matmul": round(cached_s / floor_s, 2),
               "gallery_pass_s": round(statistics.median(p["gallery_pass"] for p in timed), 3),
               "set_algebra_s": round(statistics.median(sum(p.values()) - p["gallery_pass"] for p in timed), 3)}
        if scratch:
            start = time.perf_counter()
            ref_i, ref_d = rerank_topk(queries, np.asarray(feats), TOP_K, K1, K2, LAMBDA)
            scratch_s = round(time.perf_counter() - start, 2)
            rows.append({**base, "what": "re-ranked search, from scratch (rerank_topk)", "seconds": scratch_s,
                         "x_matmul": round(scratch_s / floor_s, 2)})
            row.update(speedup_vs_scratch=round(scratch_s / cached_s, 1),
                       top10_agreement=float(np.mean([len(np.intersect1d(a, b)) / TOP_K
                                                      for a, b in zip(got_i, ref_i)])),
                       identical_rankings=bool((got_i == ref_i).all()),
                       max_abs_diff=float(np.abs(got_d - ref_d).max()))
        rows.append(row)
    return rows


def _timed(fn, repeats: int):
    """(result, median seconds of ``repeats`` runs after one warm-up run)."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, round(statistics.median(times), 3)


def _subprocess(*args) -> list[dict]:
    code = ("import json, sys; from bench.bench_search_rerank import run_size; "
            "a = sys.argv[1:]; print('@@' + json.dumps(run_size(int(a[0]), int(a[1]), a[2], a[3] == '1', "
            "a[4] == '1', int(a[5]))))")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], check=False, cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode:
        return [{"gallery": args[0], "error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}]
    return json.loads(next(line[2:] for line in proc.stdout.splitlines() if line.startswith("@@")))


def main(quick: bool, gpu_only: bool = False) -> list[dict]:
    if quick:
        cases = [(3000, 100, "exact", True, True, 1)]
    elif gpu_only:
        cases = [(100_000, 1000, "exact", True, True, 3), (1_000_000, 1000, "exact", False, True, 3)]
    else:
        cases = [(100_000, 1000, "exact", True, True, 3), (200_000, 1000, "exact", False, False, 1),
                 (1_000_000, 1000, "hnsw", False, True, 2)]
    rows = []
    for case in cases:
        rows.extend(shown(_subprocess(*[int(c) if isinstance(c, bool) else c for c in case])))
    return rows


if __name__ == "__main__":
    from bench.run import markdown

    print(markdown(main(quick="--quick" in sys.argv, gpu_only="--gpu" in sys.argv)))
