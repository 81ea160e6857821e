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


@pytest.fixture(scope="module")
def other_checkpoint(tiny_spec, tmp_path_factory) -> Path:
    """A second tiny model (other weights) in the same format."""
    import torch

    from reid_deploy.model.checkpoint import save_checkpoint
    from reid_deploy.model.reid_model import build_model

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("other") / "other.pth"
    save_checkpoint(path, build_model(tiny_spec).eval(), tiny_spec, epoch=0)
    return path


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
