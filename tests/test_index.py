"""The gallery index file: round trips, model fingerprint, damage, and concurrent additions."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from reid_deploy.errors import ModelFileError
from reid_deploy.retrieval.index import GalleryIndex, IndexParams

FINGERPRINT = {"model_sha256": "ab" * 32, "model_name": "m.pth"}


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw", "ivfpq"])
def test_save_load_round_trip(tmp_path, index_type):
    feats = unit(300, 32)
    paths = [f"/g/{i:04d}_c{i % 3 + 1}s1_000001_01.jpg" for i in range(299)] + ["/g/other.jpg"]
    index = GalleryIndex(32, FINGERPRINT, IndexParams(index_type, nlist=4, nprobe=4, pq_m=4))
    index.add(feats[:260], paths[:260])  # the first addition trains IVF / PQ (PQ needs >= 256 vectors)
    index.add(feats[260:], paths[260:])
    before = index.search(feats[:5], 7)
    index.save(tmp_path / "g.index")
    loaded = GalleryIndex.load(tmp_path / "g.index")
    assert len(loaded) == 300 and loaded.paths == paths and loaded.params == index.params
    assert loaded.pids[:4] == [0, 1, 2, 3] and loaded.camids[:4] == [0, 1, 2, 0]
    assert loaded.pids[-1] is None and loaded.camids[-1] is None
    np.testing.assert_array_equal(np.asarray(loaded.feats), feats)
    after = loaded.search(feats[:5], 7)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_allclose(after[1], before[1], atol=1e-6)
    assert (np.diff(after[1], axis=1) >= 0).all()
    np.testing.assert_array_equal(after[0][:, 0], np.arange(5))  # IVF-PQ too: candidates re-scored exactly
    np.testing.assert_allclose(after[1][:, 0], 0, atol=1e-5)



def test_flat_index_is_searched_exactly_without_a_faiss_copy(tmp_path, monkeypatch):
    from reid_deploy.retrieval import knn

    monkeypatch.setattr(knn, "QUERY_CHUNK", 3)  # 7 queries: passes of 3, 3 and 1
    monkeypatch.setattr(knn, "SCORES_PER_BLOCK", 3 * 512)  # blocks of 512 gallery items
    feats = unit(3000, 16)
    index = GalleryIndex(16, FINGERPRINT, IndexParams(graph_k=0))
    index.add(feats[:2000], [f"{i}.jpg" for i in range(2000)])
    index.save(tmp_path / "g.index")
    loaded = GalleryIndex.load(tmp_path / "g.index")
    loaded.add(feats[2000:], [f"{i}.jpg" for i in range(2000, 3000)])
    assert loaded.faiss_index is None  # the features are searched where they are (memory-mapped on load)
    queries = unit(7, 16, seed=1)
    scores = queries @ feats.T
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :9]
    for searched in (loaded, GalleryIndex.load(tmp_path / "g.index")):
        indices, distances = searched.search(queries, 9)
        if len(searched) == 3000:
            np.testing.assert_array_equal(indices, expected)
            np.testing.assert_allclose(distances, 2 - 2 * np.take_along_axis(scores, expected, 1), atol=1e-5)
        else:
            np.testing.assert_array_equal(indices, np.argsort(-scores[:, :2000], axis=1, kind="stable")[:, :9])
    duplicated = GalleryIndex(16, FINGERPRINT, IndexParams(graph_k=0))
    duplicated.add(np.tile(feats[:4], (3, 1)), [f"{i}.jpg" for i in range(12)])
    monkeypatch.setattr(knn, "SCORES_PER_BLOCK", 3 * 3)  # blocks of 3: each copy in another block
    indices, _ = duplicated.search(feats[:4], 3)  # equal scores: lower position first
    np.testing.assert_array_equal(indices, np.arange(4)[:, None] + [0, 4, 8])
    assert [x.shape for x in duplicated.search(np.zeros((0, 16), np.float32), 3)] == [(0, 3), (0, 3)]


def test_identical_rows_tie_in_position_order_whatever_the_blocks_round(monkeypatch):
    """On some CPUs the product of one vector with copies of a row in blocks of other shapes differs in its last
    bits (AMD EPYC, MKL's AVX-512 path): a block-dependent rounding, simulated here, must not reorder ties."""
    from reid_deploy.retrieval import knn

    merge = knn.merge_top

    def rounded_by_block(best_v, best_i, block, offset, largest=False):
        import torch

        shifted = torch.nextafter(block, torch.tensor(float("inf"))) if offset else block  # 1 ulp up after block 0
        return merge(best_v, best_i, shifted, offset, largest)

    monkeypatch.setattr(knn, "merge_top", rounded_by_block)
    monkeypatch.setattr(knn, "SCORES_PER_BLOCK", 3)  # one query: blocks of 3 items, each copy in another block
    feats = unit(4, 16)
    indices, scores = knn.top_inner_products(feats[:4], np.tile(feats, (3, 1)), 3)
    np.testing.assert_array_equal(indices, np.arange(4)[:, None] + [0, 4, 8])
    assert (scores == scores[:, :1]).all()


def test_scores_do_not_depend_on_the_query_batch():
    """A query's scores are the same bits alone and in batches of any size (the BLAS kernel for one row
    differs from the one for many on x86 MKL), and equal the float64 products rounded once."""
    from reid_deploy.retrieval.knn import top_inner_products

    gallery, queries = unit(5000, 64), unit(40, 64, seed=1)
    alone = [top_inner_products(queries[i:i + 1], gallery, 10) for i in range(len(queries))]
    for size in (2, 7, 16, 40):
        batch_i, batch_s = top_inner_products(queries[:size], gallery, 10)
        np.testing.assert_array_equal(batch_i, np.concatenate([a[0] for a in alone[:size]]))
        np.testing.assert_array_equal(batch_s, np.concatenate([a[1] for a in alone[:size]]))
    exact = (queries.astype(np.float64) @ gallery.T.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(alone[0][1][0], np.sort(exact[0])[::-1][:10])


def test_near_ties_beyond_the_candidates_are_found(monkeypatch):
    """More copies of the k-th item than candidates re-scored: the pass over the items within the product's
    error bound keeps position order among all of them."""
    from reid_deploy.retrieval import knn

    monkeypatch.setattr(knn, "RESCORE_EXTRA", 2)
    feats = unit(50, 16)
    gallery = np.concatenate([feats[1:], np.tile(feats[:1], (12, 1))])  # copies of the query at 49..60
    indices, scores = knn.top_inner_products(feats[:1], gallery[::-1].copy(), 5)  # copies at 0..11
    np.testing.assert_array_equal(indices[0], np.arange(5))
    np.testing.assert_allclose(scores[0], 1, atol=1e-6)


def test_flat_search_distance_is_squared_euclidean():
    feats = unit(50, 16)
    index = GalleryIndex(16, FINGERPRINT)
    index.add(feats, [f"{i}.jpg" for i in range(50)])
    queries = unit(3, 16, seed=1)
    indices, distances = index.search(queries, 50)
    expected = ((queries[:, None] - feats[None]) ** 2).sum(-1)
    np.testing.assert_allclose(distances, np.take_along_axis(expected, indices, 1), atol=1e-5)
    np.testing.assert_array_equal(indices, np.argsort(expected, axis=1))


def test_damaged_or_foreign_file_is_refused(tmp_path):
    index = GalleryIndex(8, FINGERPRINT)
    index.add(unit(10, 8), [f"{i}.jpg" for i in range(10)])
    path = tmp_path / "g.index"
    index.save(path)
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    with pytest.raises(ModelFileError, match="damaged"):
        GalleryIndex.load(path)
    overwritten = bytearray(data)
    overwritten[-100:-60] = b"\xff" * 40  # same size, features changed
    path.write_bytes(bytes(overwritten))
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        GalleryIndex.load(path)
    path.write_bytes(b"not an index at all")
    with pytest.raises(ModelFileError, match="not a reid-deploy index"):
        GalleryIndex.load(path)
    with pytest.raises(ModelFileError, match="not found"):
        GalleryIndex.load(tmp_path / "missing.index")


def test_other_model_is_refused():
    index = GalleryIndex(8, FINGERPRINT)
    with pytest.raises(ModelFileError, match="another model"):
        index.check_model({"model_sha256": "cd" * 32, "model_name": "x.onnx"})
    with pytest.raises(ModelFileError, match="feat_dim 8"):
        index.check_model(FINGERPRINT, feat_dim=16)


def test_cli_build_add_and_model_check(cli, tiny_checkpoint, other_checkpoint, demo_dir, tmp_path):
    out = tmp_path / "gallery.index"
    opts = [f"results_dir={tmp_path / 'results'}", "dataset.num_workers=0"]
    gallery = sorted((demo_dir / "bounding_box_test").iterdir())
    result = cli("index", "build", "--model", tiny_checkpoint, "--images", demo_dir / "bounding_box_test",
                 "--out", out, *opts)
    assert result.code == 0, result.err
    index = GalleryIndex.load(out)
    assert len(index) == len(gallery) and index.feat_dim == 32
    assert (tmp_path / "results" / "index" / "experiment.yaml").is_file()
    assert '"index_built"' in (tmp_path / "results" / "index" / "status.json").read_text()

    result = cli("index", "add", "--index", out, "--model", tiny_checkpoint, "--images", demo_dir / "query", *opts)
    assert result.code == 0, result.err
    queries = sorted((demo_dir / "query").iterdir())
    grown = GalleryIndex.load(out)
    assert len(grown) == len(gallery) + len(queries)
    assert grown.paths[:len(gallery)] == index.paths
    np.testing.assert_array_equal(np.asarray(grown.feats[:len(gallery)]), np.asarray(index.feats))
    assert cli("index", "add", "--index", out, "--model", tiny_checkpoint, "--images", demo_dir / "query",
               *opts).out.startswith("added 0 images")

    for command in (("index", "add", "--index", out, "--images", demo_dir / "query"),
                    ("search", "--index", out, "--query", demo_dir / "query", "--out", tmp_path / "r.json")):
        result = cli(*command, "--model", other_checkpoint, *opts)
        assert result.code == 2 and "another model" in result.err and len(result.err.splitlines()) == 1
    assert len(GalleryIndex.load(out)) == len(grown)

    out.write_bytes(out.read_bytes()[:200])
    result = cli("search", "--index", out, "--model", tiny_checkpoint, "--query", demo_dir / "query",
                 "--out", tmp_path / "r.json", *opts)
    assert result.code == 2 and "damaged index" in result.err


def test_concurrent_adds_both_land(cli, tiny_checkpoint, demo_dir, tmp_path):
    """Two ``reid index add`` processes on one index at once: the lock serialises them, none is lost."""
    out = tmp_path / "g.index"
    opts = [f"results_dir={tmp_path / 'results'}", "dataset.num_workers=0", "-q"]
    first = tmp_path / "first"
    first.mkdir()
    shutil.copy(min((demo_dir / "bounding_box_test").iterdir()), first)
    assert cli("-q", "index", "build", "--model", tiny_checkpoint, "--images", first, "--out", out,
               *opts[:2]).code == 0
    folders = []
    for name, images in (("a", sorted((demo_dir / "query").iterdir())),
                         ("b", sorted((demo_dir / "bounding_box_test").iterdir())[1:])):
        folders.append(tmp_path / name)
        folders[-1].mkdir()
        for image in images:
            shutil.copy(image, folders[-1])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "reid_deploy", "-q", "index", "add", "--index", str(out),
                               "--model", str(tiny_checkpoint), "--images", str(folder), *opts[:2]],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for folder in folders]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    index = GalleryIndex.load(out)
    expected = {str(first.resolve() / p.name) for p in first.iterdir()} | \
        {str(f.resolve() / p.name) for f in folders for p in f.iterdir()}
    assert set(index.paths) == expected and len(index.paths) == len(expected)


def clustered_unit(n: int, d: int = 16, ids: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ids, d))[rng.integers(0, ids, n)] + 0.6 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def graph_params(**changes) -> IndexParams:
    return IndexParams(**{"graph_k": 16, "rerank_k1": 6, **changes})


def test_graph_after_adds_equals_graph_from_scratch():
    feats = clustered_unit(300)
    paths = [f"{i}.jpg" for i in range(300)]
    grown = GalleryIndex(16, FINGERPRINT, graph_params())
    for a, b in ((0, 10), (10, 150), (150, 300)):  # the first addition holds fewer items than graph_k
        grown.add(feats[a:b], paths[a:b])
    scratch = GalleryIndex(16, FINGERPRINT, graph_params())
    scratch.add(feats, paths)
    for index in (grown, scratch):
        assert index.graph.indices.shape == (300, 16) and index.graph.weights_k1 == 6
    np.testing.assert_array_equal(grown.graph.indices, scratch.graph.indices)
    np.testing.assert_allclose(grown.graph.distances, scratch.graph.distances, atol=1e-6)
    np.testing.assert_allclose(grown.graph.row_max, scratch.graph.row_max, atol=1e-6)
    d = ((feats[:, None] - feats[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(scratch.graph.indices, np.argsort(d, axis=1, kind="stable")[:, :16])
    np.testing.assert_allclose(scratch.graph.row_max, d.max(1), atol=1e-5)
    a, b = grown.graph.weights, scratch.graph.weights
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.data, b.data, atol=1e-6)
    np.testing.assert_array_equal(grown.graph.sets, scratch.graph.sets)


def test_graph_round_trip_and_checksum(tmp_path):
    feats = clustered_unit(120, seed=2)
    index = GalleryIndex(16, FINGERPRINT, graph_params())
    index.add(feats, [f"{i}.jpg" for i in range(120)])
    path = tmp_path / "g.index"
    index.save(path)
    loaded = GalleryIndex.load(path)
    for name in ("indices", "distances", "row_max"):
        np.testing.assert_array_equal(np.asarray(getattr(loaded.graph, name)), getattr(index.graph, name))
    assert (loaded.graph.k, loaded.graph.method, loaded.graph.weights_k1) == (16, "exact", 6)
    assert (loaded.graph.weights != index.graph.weights).nnz == 0
    np.testing.assert_array_equal(loaded.graph.sets, index.graph.sets)
    assert loaded.graph.sets.shape == (120, 2)  # k1=6: 7 bits of k1-reciprocal, then 4 of 3-reciprocal sets
    data = bytearray(path.read_bytes())
    feat_end = len(data) - 120 * (2 * 16 + 1) * 4 - 121 * 8 - index.graph.weights.nnz * 8 - 120 * 2
    data[feat_end + 8] ^= 0xFF  # a neighbour index
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        GalleryIndex.load(path)


@pytest.mark.parametrize("method", ["hnsw", "ivf"])
def test_approximate_graph_reports_its_agreement(tmp_path, method):
    feats = clustered_unit(400, seed=3)
    index = GalleryIndex(16, FINGERPRINT, graph_params(graph=method, nlist=8, nprobe=8))
    index.add(feats, [f"{i}.jpg" for i in range(400)])
    assert index.graph.method == method and 0.9 <= index.graph.agreement <= 1.0
    index.save(tmp_path / "g.index")
    assert GalleryIndex.load(tmp_path / "g.index").graph.agreement == index.graph.agreement


def write_format2(path: Path, feats: np.ndarray, paths: list[str]) -> None:
    """An index file as format 2 wrote it (no graph): header, features, CRC-32 of the features."""
    import json
    import struct
    import zlib

    raw = json.dumps({"format": 2, "feat_dim": feats.shape[1], "count": len(feats), "fingerprint": {},
                      "params": {"index_type": "flat", "nlist": 1024, "nprobe": 32, "hnsw_m": 32, "pq_m": 16,
                                 "ef_search": 128},
                      "flip": False, "faiss_bytes": 0, "payload_crc32": zlib.crc32(feats.tobytes()),
                      "paths": paths, "pids": [None] * len(paths), "camids": [None] * len(paths)}).encode()
    head = b"REIDIDX1" + struct.pack("<Q", len(raw)) + raw
    path.write_bytes(head + b"\0" * (-len(head) % 64) + feats.tobytes())


def test_format2_index_loads_and_rerank_builds_its_graph_once(cli, tmp_path):
    from reid_deploy.retrieval.rerank import rerank_topk

    gallery, queries = clustered_unit(150, seed=4), clustered_unit(12, seed=5)
    path = tmp_path / "old.index"
    write_format2(path, gallery, [f"/g/{i}.jpg" for i in range(150)])
    old = GalleryIndex.load(path)
    assert len(old) == 150 and old.graph is None
    np.savez(tmp_path / "q.npz", query_feats=queries, query_paths=np.array([f"/q/{i}.jpg" for i in range(12)]))
    opts = [f"results_dir={tmp_path / 'results'}", "re_ranking.k1=8", "re_ranking.k2=3"]
    for attempt in range(2):
        result = cli("search", "--index", path, "--query-features", tmp_path / "q.npz", "--rerank", "--top-k", 5,
                     "--out", tmp_path / "r.json", *opts)
        assert result.code == 0, result.err
        assert ("computed the neighbour graph" in result.err) == (attempt == 0)
        assert result.err.count("without a neighbour graph") == (attempt == 0)
    index = GalleryIndex.load(path)
    assert index.graph.k == 32 and index.graph.weights_k1 == 8
    import json

    results = json.loads((tmp_path / "r.json").read_text())["results"]
    got = [[int(m["path"][3:-4]) for m in r["matches"]] for r in results]
    np.testing.assert_array_equal(got, rerank_topk(queries, gallery, 5, 8, 3, 0.3)[0])


def test_format3_index_gains_its_sets_once(cli, tmp_path):
    """A format-3 file (graph and weights, no packed sets) loads; a re-ranked search computes the sets
    once and saves them; the result equals the reference either way."""
    from reid_deploy.retrieval.rerank import rerank_topk

    gallery, queries = clustered_unit(150, seed=8), clustered_unit(12, seed=9)
    index = GalleryIndex(16, {}, graph_params(rerank_k1=8))
    index.add(gallery, [f"/g/{i}.jpg" for i in range(150)])
    sets = index.graph.sets
    index.graph.sets = None
    path = tmp_path / "old.index"
    index.save(path)
    data = path.read_bytes()
    assert data.count(b'"format": 4') == 1 and data.count(b', "sets_width": 0') == 1
    path.write_bytes(data.replace(b'"format": 4', b'"format": 3').replace(b', "sets_width": 0', b" " * 17))
    assert GalleryIndex.load(path).graph.sets is None
    np.savez(tmp_path / "q.npz", query_feats=queries, query_paths=np.array([f"/q/{i}.jpg" for i in range(12)]))
    for attempt in range(2):
        result = cli("search", "--index", path, "--query-features", tmp_path / "q.npz", "--rerank", "--top-k", 5,
                     "--out", tmp_path / "r.json", f"results_dir={tmp_path / 'results'}", "re_ranking.k1=8",
                     "re_ranking.k2=3", "index.graph_k=16")
        assert result.code == 0, result.err
        assert result.err.count("without re-ranking sets") == (attempt == 0)  # said once, not again under the lock
        import json

        results = json.loads((tmp_path / "r.json").read_text())["results"]
        got = [[int(m["path"][3:-4]) for m in r["matches"]] for r in results]
        np.testing.assert_array_equal(got, rerank_topk(queries, gallery, 5, 8, 3, 0.3)[0])
    np.testing.assert_array_equal(GalleryIndex.load(path).graph.sets, sets)


def test_search_with_wider_k1_rebuilds_graph_and_weights(cli, tmp_path):
    gallery, queries = clustered_unit(200, seed=6), clustered_unit(5, seed=7)
    np.savez(tmp_path / "g.npz", gallery_feats=gallery, gallery_paths=np.array([f"{i}.jpg" for i in range(200)]))
    np.savez(tmp_path / "q.npz", query_feats=queries, query_paths=np.array([f"q{i}.jpg" for i in range(5)]))
    opts = [f"results_dir={tmp_path / 'results'}"]
    out = tmp_path / "g.index"
    assert cli("index", "build", "--features", tmp_path / "g.npz", "--out", out, "index.graph_k=8",
               "re_ranking.k1=7", *opts).code == 0
    assert (GalleryIndex.load(out).graph.k, GalleryIndex.load(out).graph.weights_k1) == (8, 7)
    for k1, expected in ((7, (8, 7)), (5, (8, 5)), (12, (13, 12))):
        result = cli("search", "--index", out, "--query-features", tmp_path / "q.npz", "--rerank", "--out",
                     tmp_path / "r.json", f"re_ranking.k1={k1}", "re_ranking.k2=3", "index.graph_k=8", *opts)
        assert result.code == 0, result.err
        graph = GalleryIndex.load(out).graph
        assert (graph.k, graph.weights_k1) == expected
