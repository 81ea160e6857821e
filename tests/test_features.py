"""Batched feature extraction: order, flip averaging, bad images, worker processes, and the .npz file."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from reid_deploy.errors import DataError
from reid_deploy.inference import loader
from reid_deploy.inference.base import FeatureExtractor
from reid_deploy.inference.features import (
    NPZ_KEYS,
    LabelledFeatures,
    extract_features,
    iter_features,
    load_features_npz,
    save_features_npz,
)
from reid_deploy.inference.preprocess import Preprocess


class ColumnExtractor(FeatureExtractor):
    """Feature = mean of each image column (plus an offset), L2-normalised: mirroring reverses it."""

    backend = "test"

    def __init__(self, max_batch: int | None = None):
        self.preprocess = Preprocess(8, 4, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.feat_dim = 4
        self.device = torch.device("cpu")
        self.max_batch = max_batch
        self.batches: list[int] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        assert inputs.dtype == torch.float32 and inputs.shape[1:] == (3, 8, 4)
        self.batches.append(len(inputs))
        return torch.nn.functional.normalize(inputs.mean(dim=(1, 2)) + 2.0, dim=1)


def _write_images(folder, count: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (int(rng.integers(9, 40)), 8, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def images(tmp_path):
    return _write_images(tmp_path, 7)


def reference(extractor: ColumnExtractor, paths) -> np.ndarray:
    """Features the way extraction made them before uint8 batches: float32 normalised by numpy."""
    return extractor(np.stack([extractor.preprocess.load(p) for p in paths]))


def test_features_in_input_order_over_batches(images):
    extractor = ColumnExtractor()
    result = extract_features(extractor, images, batch_size=3)
    assert extractor.batches == [3, 3, 1]
    assert result.feats.dtype == np.float32 and result.feats.shape == (7, 4)
    np.testing.assert_allclose(result.feats, reference(ColumnExtractor(), images), atol=1e-6)
    assert result.paths == [str(p) for p in images]
    assert result.kept.tolist() == list(range(7))


def test_uint8_batches_are_normalised_once_with_the_numpy_arithmetic(images):
    pre = ColumnExtractor().preprocess
    uint8 = torch.from_numpy(np.stack([pre.load_uint8(p) for p in images]))
    assert uint8.dtype == torch.uint8 and uint8.shape == (7, 3, 8, 4)
    np.testing.assert_array_equal(pre.normalize_tensor(uint8).numpy(), np.stack([pre.load(p) for p in images]))


def test_batches_are_split_by_max_batch(images):
    extractor = ColumnExtractor(max_batch=2)
    result = extract_features(extractor, images, batch_size=5)
    assert extractor.batches == [2, 2, 1, 2]
    np.testing.assert_allclose(result.feats, reference(ColumnExtractor(), images), atol=1e-6)


def test_flip_averages_image_and_mirror_then_renormalises(images):
    extractor = ColumnExtractor()
    feats = reference(extractor, images)
    want = feats + feats[:, ::-1]  # mirroring the input reverses the column features
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    got = extract_features(extractor, images, batch_size=4, flip=True).feats
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert not np.allclose(got, feats)


def test_worker_processes_give_the_same_features_and_name_bad_images(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(loader, "SMALL_JOB", 0)  # a few images, yet loaded by worker processes
    images = _write_images(tmp_path, 6)
    bad = [tmp_path / "broken.jpg", tmp_path / "empty.png"]
    bad[0].write_text("not an image")
    bad[1].write_bytes(b"")
    paths = [images[0], bad[0], images[1], images[2], bad[1], images[3], images[4], images[5]]
    assert loader.loader_workers(2, len(paths), batch_size=2) == min(2, loader.usable_cpus())
    in_process = extract_features(ColumnExtractor(), paths, batch_size=2, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="reid"):
        result = extract_features(ColumnExtractor(), paths, batch_size=2, num_workers=2)
    assert result.kept.tolist() == [0, 2, 3, 5, 6, 7]
    assert result.paths == [str(p) for p in images]
    np.testing.assert_array_equal(result.feats, in_process.feats)
    np.testing.assert_allclose(result.feats, reference(ColumnExtractor(), result.paths), atol=1e-6)
    text = caplog.text
    assert f"skipping unreadable image {bad[0]}" in text and f"skipping unreadable image {bad[1]}" in text
    assert "skipped 2 unreadable image(s) of 8" in text


def test_worker_count_is_capped(monkeypatch):
    monkeypatch.setattr(loader, "usable_cpus", lambda: 3)
    assert loader.loader_workers(8, 10_000, 128) == 3  # the usable CPUs
    assert loader.loader_workers(8, 300, 128) == 2  # fewer than the batches
    assert loader.loader_workers(8, loader.SMALL_JOB - 1, 8) == 0  # a small job loads in-process
    assert loader.loader_workers(0, 10_000, 128) == 0


def test_unreadable_image_stops_the_run_when_asked(images, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    with pytest.raises(DataError, match="broken.jpg"):
        extract_features(ColumnExtractor(), [images[0], bad, images[1]], batch_size=8, on_bad_image="error")


def test_no_readable_image_is_an_error(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    with pytest.raises(DataError, match="none of the 1 query images could be read"):
        extract_features(ColumnExtractor(), [bad], batch_size=8, description="query")


def test_empty_input_gives_empty_features():
    result = extract_features(ColumnExtractor(), [], batch_size=8)
    assert result.feats.shape == (0, 4) and result.paths == [] and len(result.kept) == 0


def test_streaming_batches_carry_their_paths(images):
    batches = list(iter_features(ColumnExtractor(), images, batch_size=4))
    assert [b.paths for b in batches] == [[str(p) for p in images[:4]], [str(p) for p in images[4:]]]
    assert [b.indices.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6]]


def split(rng, n: int) -> LabelledFeatures:
    return LabelledFeatures(rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 9, n),
                            rng.integers(0, 6, n), [f"/data/{n}_{i}_ü.jpg" for i in range(n)])


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    query, gallery = split(rng, 3), split(rng, 5)
    path = tmp_path / "features.npz"
    save_features_npz(path, query, gallery)
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == sorted(NPZ_KEYS)
        assert data["query_feats"].dtype == np.float32
    loaded = load_features_npz(path)
    for want, got in zip((query, gallery), loaded):
        np.testing.assert_array_equal(got.feats, want.feats)
        np.testing.assert_array_equal(got.pids, want.pids)
        np.testing.assert_array_equal(got.camids, want.camids)
        assert got.paths == want.paths


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("gallery_camids"), "lacks key\\(s\\) gallery_camids"),
    (lambda a: a.update(query_pids=a["query_pids"][:2]), "query_pids has shape \\(2,\\)"),
    (lambda a: a.update(gallery_feats=a["gallery_feats"][:, :4]), "gallery_feats has 4"),
    (lambda a: a.update(query_feats=a["query_feats"][0]), "query_feats must be a non-empty float"),
    (lambda a: a.update(query_feats=np.full((3, 6), np.nan, np.float32)), "NaN"),
])
def test_bad_npz_is_a_data_error(tmp_path, change, message):
    rng = np.random.default_rng(0)
    query, gallery = split(rng, 3), split(rng, 5)
    arrays = {f"{name}_{part}": getattr(s, part) for name, s in (("query", query), ("gallery", gallery))
              for part in ("feats", "pids", "camids")}
    arrays.update(query_paths=np.array(query.paths), gallery_paths=np.array(gallery.paths))
    change(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        load_features_npz(path)


def test_unreadable_npz_is_a_data_error(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_text("garbage")
    with pytest.raises(DataError, match="cannot read features file"):
        load_features_npz(path)
