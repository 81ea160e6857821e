"""Exact re-ranked evaluation: the published dense algorithm vs ``reid_deploy.retrieval.rerank``.

Synthetic features shaped like Market-1501 (3,368 queries x 15,913 gallery, d=1024) and MSMT17
(11,659 x 82,161), L2-normalised and clustered by identity like real ReID features (a few images per
identity per split, plus distractors). Every method runs in a fresh subprocess so that its time and peak
resident memory (``ru_maxrss``, which counts numpy/torch/faiss buffers) are its own; ``baseline_mb`` is the
process with the features only. ``seconds`` is the re-ranked evaluation (re-ranking + mAP/CMC by
``evaluate.metrics``), ``rerank_s`` the re-ranking alone. The floor is one N x N x d float32 product
(N = queries + gallery, torch, in row blocks whose output is dropped).
The ``reid evaluate --features`` rows time the whole command as a user runs it (a fresh ``reid`` process:
start-up, loading the .npz, plain and re-ranked metrics chunk by chunk of queries, table, both plots),
with the peak resident memory of that process; every image path of the features file points at one real
JPEG, so the match plot decodes real thumbnails.
At full Market size the floor and the whole command run PAIRS times, alternating (the command's fixed
start-up is a large part of it there and the VM's speed drifts within minutes): their rows are the median
runs, ``runs_s`` every run, ``pair_ratios`` each command over the floor just before it.
``python -m bench.bench_rerank [--quick]`` prints a Markdown table; quick mode uses a quarter-size Market.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]
MARKET = (3368, 15913, 1024)
MSMT = (11659, 82161, 1024)
PAIRS = 3  # floor / whole-command runs, alternating, at full Market size
METHODS = {"matmul": "one N x N x d matmul (floor)", "dense": "published dense reference",
           "ours": "reid_deploy (exact kNN)", "cli": "reid evaluate --features (whole command)"}  # row labels
DENSE_LIMIT_N = 40_000  # beyond this the dense matrices (several N x N float32) cannot fit in 24 GB
CAM_SHIFT, NOISE, SUBSPACE = 0.6, 1.0, 16  # camera / image deviation; identity subspace dims


def synthetic_features(n_query: int, n_gallery: int, dim: int, seed: int = 0, ids: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(query_feats, gallery_feats, query_pids, gallery_pids, query_camids, gallery_camids).

    Identities are random unit directions; an image is its identity's direction plus per-camera and
    per-image noise (cosine to the identity ~0.7), then L2-normalised. 15 % of the gallery are distractors
    (pid 0) with their own sparse clusters. ``ids`` defaults to one identity per 4.5 queries (Market-1501).
    Generated in float32 blocks to keep the baseline memory low.
    """
    rng = np.random.default_rng(seed)
    ids = ids or max(2, int(n_query / 4.5))
    basis = rng.standard_normal((SUBSPACE, dim), dtype=np.float32)  # identities differ in few directions

    def directions(*shape: int) -> np.ndarray:
        return _unit(rng.standard_normal((*shape, SUBSPACE), dtype=np.float32) @ basis)

    centers = directions(ids + 1)
    cam_shift = CAM_SHIFT * directions(ids + 1, 6)
    n_distract = int(0.15 * n_gallery)
    q_pids = rng.integers(1, ids + 1, n_query)
    g_pids = np.concatenate([rng.integers(1, ids + 1, n_gallery - n_distract), np.zeros(n_distract, np.int64)])
    q_cams, g_cams = rng.integers(0, 6, n_query), rng.integers(0, 6, n_gallery)
    distractor_centers = directions(max(1, n_distract // 3))

    def images(pids: np.ndarray, cams: np.ndarray) -> np.ndarray:
        out = np.empty((len(pids), dim), np.float32)
        for a in range(0, len(pids), 8192):
            p, c = pids[a:a + 8192], cams[a:a + 8192]
            base = np.where((p == 0)[:, None], distractor_centers[rng.integers(0, len(distractor_centers),
                                                                                len(p))], centers[p])
            noise = rng.standard_normal((len(p), dim), dtype=np.float32) / np.sqrt(dim)
            out[a:a + 8192] = _unit(base + cam_shift[p, c] + NOISE * noise)
        return out

    return images(q_pids, q_cams), images(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def run_method(method: str, n_query: int, n_gallery: int, dim: int) -> dict:
    """Time and peak memory of one method (call in a fresh process)."""
    import torch

    from reid_deploy.evaluate.metrics import compute_metrics

    qf, gf, qp, gp, qc, gc = synthetic_features(n_query, n_gallery, dim)
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, cpu_start = time.perf_counter(), _cpu_seconds(resource.RUSAGE_SELF)
    result: dict = {}
    if method == "matmul":  # in 4096-row blocks whose output is dropped: same flops, no N x N buffer
        x = torch.from_numpy(np.concatenate([qf, gf]))
        del qf, gf
        start, cpu_start = time.perf_counter(), _cpu_seconds(resource.RUSAGE_SELF)
        for a in range(0, len(x), 4096):
            x[a:a + 4096] @ x.T
    elif method == "dense":
        sys.path.insert(0, str(ROOT))
        from bench.dense_rerank_reference import dense_rerank

        dist = dense_rerank(qf, gf)
        result["rerank_s"] = round(time.perf_counter() - start, 2)
        result["mAP"] = round(compute_metrics(dist, qp, gp, qc, gc)["mAP"], 4)
    elif method.startswith("ours"):
        from reid_deploy.retrieval.rerank import rerank_distances

        knn = method.partition(":")[2] or "exact"
        dist = rerank_distances(qf, gf, knn_method=knn)
        result["rerank_s"] = round(time.perf_counter() - start, 2)
        result["mAP"] = round(compute_metrics(dist, qp, gp, qc, gc)["mAP"], 4)
        if knn != "exact":
            exact = rerank_distances(qf, gf)  # agreement of the approximate kNN graph with the exact one
            top = np.argsort(dist, axis=1)[:, :10]
            top_exact = np.argsort(exact, axis=1)[:, :10]
            result["top10_agreement"] = float(np.mean([len(np.intersect1d(a, b)) / 10
                                                       for a, b in zip(top, top_exact)]))
            result["max_abs_diff"] = float(np.abs(dist - exact).max())
            result["note"] = "time includes the exact run used for the agreement"
    elif method == "cli":
        return _time_cli(qf, gf, qp, gp, qc, gc, base_mb)
    else:
        raise ValueError(method)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds(resource.RUSAGE_SELF) - cpu_start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": round(seconds, 2), "cpu_s": round(cpu, 2), "peak_mb": round(peak_mb),
            "baseline_mb": round(base_mb), **result}


def _cpu_seconds(who: int) -> float:
    """User + system CPU time of this process or of its finished children (less skewed than wall time
    when other jobs share the cores)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _time_cli(qf: np.ndarray, gf: np.ndarray, qp: np.ndarray, gp: np.ndarray, qc: np.ndarray, gc: np.ndarray,
              base_mb: float) -> dict:
    """``reid evaluate --features`` (re-ranking on, the spec's defaults) in a child process: wall time and
    the child's peak resident memory."""
    import tempfile

    from PIL import Image

    from reid_deploy.inference.features import LabelledFeatures, save_features_npz

    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "person.jpg"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (128, 64, 3), dtype=np.uint8)).save(image)
        features = Path(tmp) / "features.npz"
        save_features_npz(features, LabelledFeatures(qf, qp, qc, [str(image)] * len(qf)),
                          LabelledFeatures(gf, gp, gc, [str(image)] * len(gf)))
        del qf, gf
        start, cpu_start = time.perf_counter(), _cpu_seconds(resource.RUSAGE_CHILDREN)
        proc = subprocess.run([sys.executable, "-m", "reid_deploy.cli", "evaluate", "--features", str(features),
                               f"results_dir={tmp}"], check=False, cwd=ROOT, capture_output=True, text=True)
        seconds, cpu = time.perf_counter() - start, _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_start
        if proc.returncode:
            raise RuntimeError((proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1])
        metrics = json.loads((Path(tmp) / "evaluate" / "metrics.json").read_text())
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": round(seconds, 2), "cpu_s": round(cpu, 2), "peak_mb": round(peak_mb),
            "baseline_mb": round(base_mb), "mAP": round(metrics["mAP"], 4),
            "note": "whole command in its own process (start-up, loading, metrics, plots); peak_mb is its own"}


def _subprocess(method: str, shape: tuple[int, int, int]) -> dict:
    code = ("import json, sys; from bench.bench_rerank import run_method; "
            "print('@@' + json.dumps(run_method(sys.argv[1], *map(int, sys.argv[2:]))))")
    proc = subprocess.run([sys.executable, "-c", code, method, *map(str, shape)], check=False, cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(next(line[2:] for line in proc.stdout.splitlines() if line.startswith("@@")))


def _median_run(runs: list[dict]) -> dict:
    """The run of median time (an error, if any run failed), with every run's seconds."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return {**ordered[len(ordered) // 2], "runs_s": [r["seconds"] for r in runs]}


def main(quick: bool) -> list[dict]:
    market = (MARKET[0] // 4, MARKET[1] // 4, MARKET[2]) if quick else MARKET
    # (dataset, shape, methods timed once, whether the floor and the whole command run there)
    cases = [("Market" + (" / 4" if quick else ""), market, ("dense", "ours"), True)]
    if not quick:
        cases.append(("Market", market, ("ours:hnsw",), False))
        cases.append(("MSMT17", MSMT, ("ours",), True))
    rows = []
    for name, shape, methods, with_floor in cases:
        head = {"dataset": name, "queries": shape[0], "gallery": shape[1], "dim": shape[2]}
        # the floor and the whole command alternate PAIRS times at Market size (start-up weighs there and the
        # VM's speed drifts): each row is its median run (x_floor: median over median), pair_ratios each pair's
        paired = ("matmul", "cli") if with_floor else ()
        pairs = 1 if quick or sum(shape[:2]) > DENSE_LIMIT_N else PAIRS
        runs: dict[str, list[dict]] = {m: [] for m in paired}
        for _ in range(pairs if paired else 0):
            for method in paired:
                runs[method].append(_subprocess(method, shape))
        if paired:
            rows.append({**head, "method": METHODS["matmul"], **_median_run(runs["matmul"])})
        for method in methods:
            rows.append({**head, "method": METHODS.get(method, f"reid_deploy ({method[5:]} kNN)"),
                         **_subprocess(method, shape)})
        if paired:
            cli = {**head, "method": METHODS["cli"], **_median_run(runs["cli"])}
            if pairs > 1 and "error" not in cli:
                ratios = [c["seconds"] / m["seconds"] for c, m in zip(runs["cli"], runs["matmul"])]
                cli["pair_ratios"] = [round(r, 2) for r in ratios]
            rows.append(cli)
        floor = next((r["seconds"] for r in rows if r["dataset"] == name and r["method"].startswith("one")), None)
        cpu_floor = next((r["cpu_s"] for r in rows if r["dataset"] == name and r["method"].startswith("one")), None)
        dense = next((r.get("seconds") for r in rows if r["dataset"] == name and r["method"].startswith("pub")),
                     None)
        for r in rows:
            if r["dataset"] == name and "seconds" in r and floor:
                r["x_floor"] = round(r["seconds"] / floor, 2)
                if cpu_floor:
                    r["cpu_x_floor"] = round(r["cpu_s"] / cpu_floor, 2)
                if "rerank_s" in r:
                    r["rerank_x_floor"] = round(r["rerank_s"] / floor, 2)
                if dense and not r["method"].startswith(("one", "reid evaluate")):  # re-ranking vs re-ranking
                    r["speedup_vs_dense"] = round(dense / r["seconds"], 1)
        if sum(shape[:2]) > DENSE_LIMIT_N:
            rows.append({"dataset": name, "method": "published dense reference",
                         "note": f"not run: its N x N float32 matrices are {sum(shape[:2]) ** 2 * 4 / 2**30:.0f} "
                                 f"GB each (several needed) > 24 GB RAM"})
    return rows


if __name__ == "__main__":
    from bench.run import markdown

    print(markdown(main(quick="--quick" in sys.argv)))
