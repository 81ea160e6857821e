"""Batched feature extraction: order, flip averaging, bad images, workers, and the .npz file."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from reid_deploy.errors import DataError
from reid_deploy.inference.extractors import FeatureExtractor
from reid_deploy.inference.features import (
    NPZ_KEYS,
    LabelledFeatures,
    extract_features,
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
        self.max_batch = max_batch
        self.batches: list[int] = []

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(len(batch))
        feats = batch.mean(axis=(1, 2)) + 2.0
        return (feats / np.linalg.norm(feats, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (16, 8, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def reference(extractor: ColumnExtractor, paths) -> np.ndarray:
    return extractor.run(np.stack([extractor.preprocess.load(p) for p in paths]))


def test_features_in_input_order_over_batches(images):
    extractor = ColumnExtractor()
    result = extract_features(extractor, images, batch_size=3)
    assert extractor.batches == [3, 3, 1]
    assert result.feats.dtype == np.float32 and result.feats.shape == (7, 4)
    np.testing.assert_allclose(result.feats, reference(ColumnExtractor(), images), atol=1e-6)
    assert result.paths == [str(p) for p in images]
    assert result.kept.tolist() == list(range(7))


def test_worker_threads_give_the_same_features(images):
    plain = extract_features(ColumnExtractor(), images, batch_size=2)
    threaded = extract_features(ColumnExtractor(), images, batch_size=2, num_workers=2)
    np.testing.assert_array_equal(threaded.feats, plain.feats)
    assert threaded.paths == plain.paths


def test_flip_averages_image_and_mirror_then_renormalises(images):
    extractor = ColumnExtractor()
    feats = reference(extractor, images)
    want = feats + feats[:, ::-1]  # mirroring the input reverses the column features
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    got = extract_features(extractor, images, batch_size=4, flip=True).feats
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert not np.allclose(got, feats)


def test_unreadable_images_are_skipped_with_a_warning(images, tmp_path, caplog):
    bad = [tmp_path / "broken.jpg", tmp_path / "empty.png"]
    bad[0].write_text("not an image")
    bad[1].write_bytes(b"")
    paths = [images[0], bad[0], images[1], images[2], bad[1], images[3]]
    with caplog.at_level(logging.WARNING, logger="reid"):
        result = extract_features(ColumnExtractor(), paths, batch_size=2, num_workers=1)
    assert result.kept.tolist() == [0, 2, 3, 5]
    assert result.paths == [str(p) for p in (images[0], images[1], images[2], images[3])]
    np.testing.assert_allclose(result.feats, reference(ColumnExtractor(), result.paths), atol=1e-6)
    text = caplog.text
    assert str(bad[0]) in text and str(bad[1]) in text and "skipped 2 unreadable image(s) of 6" in text


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
